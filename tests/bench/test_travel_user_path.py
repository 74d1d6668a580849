"""The table's runs go through what a user runs: shards by `gtbus data build`, the pin by `gtbus measure`, nodes by the CLI.

On the host backend with ByteLM (the GPT-2 trainer is far too slow on this
CPU; tests/gpu/test_gpt2_cli.py runs the same path with it on a GPU). Real
processes, sockets and files; nothing timed is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gtbus.bench.report import host_tag
from gtbus.bench.travel import run_travel_bench
from gtbus.errors import GtbusError
from gtbus.nodes.launcher import LocalDeployment, LocalRun, measure_pin
from gtbus.training.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow


def test_the_pin_is_what_gtbus_measure_prints_and_a_bad_trainer_is_one_line() -> None:
    printed = subprocess.run([sys.executable, "-m", "gtbus", "measure", "--backend", "host", "--trainer", "bytelm"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert measure_pin("host", "bytelm") == printed
    with pytest.raises(GtbusError, match="gtbus measure --backend host --trainer nope failed: .*unknown trainer 'nope'"):
        measure_pin("host", "nope")


def test_a_wrong_pin_makes_holders_refuse_and_the_run_stop_with_that_reason(tmp_path: Path) -> None:
    # The default absent timeout (60 s) stays: the run must stop on the holders' refusals, not on that timer.
    run = LocalRun(run_dir=tmp_path / "run", holders=2, chunk_tokens=1 << 14, steps="2", bytes_per_holder=64 * 1024, pin="ab" * 32)
    with pytest.raises(GtbusError, match=r"every holder of the run refused this orchestrator's code measurement \(h1: measurement report: "
                                         r"code hash [0-9a-f]+\.\.\. does not match pinned abababab.*; h2: .*\): their --pin-code is not what `gtbus measure` prints"):
        LocalDeployment(run).run_to_end(timeout=120)
    for name in ("h1", "h2"):
        err = (run.run_dir / f"{name}.err").read_text().strip().splitlines()
        assert err[-1].startswith("Error: measurement report: code hash ") and "does not match pinned abababab" in err[-1]
        assert "Traceback" not in "\n".join(err)
    # Only grants sent before a holder's refusal arrived, each declined (or not delivered): nothing trained.
    hops = read_checkpoint(run.run_dir / "checkpoints" / "orch.npz", state=False).hops
    assert {h["outcome"] for h in hops} <= {"declined", "undelivered"}
    assert all("does not match pinned" in h["detail"] for h in hops if h["outcome"] == "declined")


def test_a_refusal_removes_only_the_holder_that_sent_it(tmp_path: Path) -> None:
    # h2 pins a wrong value, h1 the right one: h1's chunks are all trained, h2's are skipped after the absent timeout.
    run = LocalRun(run_dir=tmp_path / "run", holders=2, chunk_tokens=1 << 14, steps="2", bytes_per_holder=32 * 1024,
                   holder_pins={"h2": "cd" * 32}, extra_orchestrator_args=["--absent-timeout", "2"])
    summary = LocalDeployment(run).run_to_end(timeout=120)
    assert summary["hops_trained"] == 2
    assert sorted((holder, chunk) for _round, holder, chunk in summary["skipped"]) == [("h2", 0), ("h2", 1)]
    hops = read_checkpoint(Path(summary["checkpoint"]), state=False).hops
    assert {h["holder"] for h in hops if h["outcome"] == "trained"} == {"h1"}
    err = (run.run_dir / "orchestrator.err").read_text()
    assert "h2 refused this orchestrator's code measurement and left the run: measurement report" in err
    assert "h1 refused" not in err


def test_a_row_with_a_short_last_chunk_trains_the_whole_budget(tmp_path: Path) -> None:
    # 3 holders x 65536 tokens (a whole number of the smallest cap, 32K = 16384 tokens); the 96K cap cuts
    # each holder's into 49152 + 16384 tokens; 12 steps = one per 16384 tokens: 3 + 1 per holder.
    res = run_travel_bench(tmp_path, total_mib=0.375, caps="32K,96K", train_steps=12, modes=("travel",), reps=1, chunk_mib=1,
                           alone_steps=20, say=lambda s: None)
    data = json.loads((tmp_path / f"travel-host-{host_tag()}.json").read_text())
    runs = {r["cap"]: r for r in data["runs"]}
    assert (runs["32K"]["hops_trained"], runs["96K"]["hops_trained"]) == (12, 6)
    assert runs["32K"]["steps_total"] == runs["96K"]["steps_total"] == 12
    assert data["plan"]["rows"][1]["holder_chunks"] == [49152, 16384]
    assert data["plan"]["steps_option"] == "per:16384"
    assert data["alone"]["steps"] == 20 and data["alone"]["tokens_per_s"] > 0
    run = runs["96K"]
    assert run["tokens_per_s"] > 0 and run["startup_s"] > 0
    goals = {g["name"]: g for g in data["goals"]}
    tx = goals["travel Tx % at cap 96K"]
    assert tx["goal"] == 0.05 and tx["unit"] == "%" and tx["met"] == (tx["measured"] <= 0.05)
    assert tx["measured"] == pytest.approx(run["transfer_share"] * 100)
    loop = goals["tokens/s in loop / alone, travel at cap 96K"]
    assert loop["met"] == (loop["measured"] >= 0.95)
    text = res.markdown()
    assert "Training budget: 12 bytelm optimizer steps per run" in text and "max(1, round(n / 16,384))" in text
    assert "| 96K | " in text and "3 (last 1)" in text
    assert "Arithmetic from the measured numbers (not a measurement)" in text


def test_a_sparse_checkpoint_still_holds_every_hop_when_the_run_ends(tmp_path: Path) -> None:
    # The table's GPT-2 runs checkpoint every 100 hops (1.6 GB each); the bench reads every hop from the last one.
    run = LocalRun(run_dir=tmp_path / "run", holders=2, chunk_tokens=1 << 14, steps="per:8192", bytes_per_holder=48 * 1024,
                   checkpoint_every=4)
    summary = LocalDeployment(run).run_to_end(timeout=120)
    assert summary["hops_trained"] == summary["hops"] == 6
    hops = read_checkpoint(Path(summary["checkpoint"]), state=False).hops
    assert [h["outcome"] for h in hops] == ["trained"] * 6
