"""The GPT-2 user path on a GPU, as README shows it: `gtbus data build` -> `gtbus measure` -> orchestrator and holders by the CLI.

`--backend cupy --trainer gpt2` throughout: GPT-2 124M (PyTorch) trains on the
hop buffers. A wrong pin makes the holders refuse in one line and the
orchestrator stop with a named reason. And the table's command, `gtbus bench
travel --trainer gpt2`, at a tiny size. Skipped cleanly without cupy, torch or
a GPU (as in CI).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cuda_guard import cupy_or_skip

cupy = cupy_or_skip()
pytest.importorskip("torch")

from gtbus.errors import GtbusError  # noqa: E402
from gtbus.nodes.launcher import LocalDeployment, LocalRun  # noqa: E402
from gtbus.training.checkpoint import read_checkpoint  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def gtbus(*args: str) -> str:
    """Run the CLI as a user does; its stdout (the test fails with its stderr if it fails)."""
    done = subprocess.run([sys.executable, "-m", "gtbus", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("data")
    gtbus("data", "build", "--demo-corpus", "--holders", "2", "--bytes-per-holder", str(64 * 1024), "--out", str(out))
    return sorted(out.glob("holder*.bin"))


@pytest.fixture(scope="module")
def pin() -> str:
    value = gtbus("measure", "--backend", "cupy", "--trainer", "gpt2").strip()
    assert len(value) == 64 and int(value, 16) >= 0
    return value


def test_gpt2_trains_every_hop_through_the_cli(tmp_path: Path, shards: list[Path], pin: str) -> None:
    # 2 holders x 65536 byte tokens, chunks of 16384 tokens: 8 hops of 2 GPT-2 steps (8 x 1024 tokens each).
    run = LocalRun(run_dir=tmp_path / "run", holders=2, backend="cupy", trainer="gpt2", chunk_tokens=16384, steps="2",
                   data=shards, pin=pin, lease=60.0)
    summary = LocalDeployment(run).run_to_end(timeout=600)
    assert summary["device"].startswith("cuda:")
    assert summary["hops_trained"] == summary["hops"] == 8, summary["outcomes"]
    for key in ("first_loss", "last_loss", "final_train_loss"):
        assert math.isfinite(summary[key]), (key, summary[key])
    assert summary["first_loss"] > summary["final_train_loss"]  # 16 steps on bytes move a fresh GPT-2 off ln(50257)
    hops = read_checkpoint(Path(summary["checkpoint"]), state=False).hops
    assert [h["outcome"] for h in hops] == ["trained"] * 8
    assert all(math.isfinite(h["loss_last"]) and h["train_s"] > 0 for h in hops)


def test_a_wrong_pin_stops_the_gpt2_run_with_a_reason(tmp_path: Path, shards: list[Path], pin: str) -> None:
    wrong = ("0" if pin[0] != "0" else "1") + pin[1:]
    run = LocalRun(run_dir=tmp_path / "run", holders=2, backend="cupy", trainer="gpt2", chunk_tokens=16384, steps="2",
                   data=shards, pin=wrong)
    with pytest.raises(GtbusError, match=r"every holder of the run refused this orchestrator's code measurement \(h1: measurement report: "):
        LocalDeployment(run).run_to_end(timeout=600)
    for name in ("h1", "h2"):
        last = (run.run_dir / f"{name}.err").read_text().strip().splitlines()[-1]
        assert last.startswith("Error: measurement report: code hash ") and "does not match pinned" in last
    hops = read_checkpoint(run.run_dir / "checkpoints" / "orch.npz", state=False).hops
    assert {h["outcome"] for h in hops} <= {"declined", "undelivered"}


def test_the_table_command_runs_with_gpt2(tmp_path: Path) -> None:
    out = gtbus("bench", "travel", "--backend", "cupy", "--trainer", "gpt2", "--total-mib", "0.25", "--caps", "32K,uncapped",
                "--train-steps", "8", "--alone-steps", "5", "--out", str(tmp_path))
    assert "Training budget: 8 gpt2 optimizer steps per run" in out
    (result,) = tmp_path.glob("travel-cupy-gpt2-*.json")
    data = json.loads(result.read_text())
    assert {(r["cap"], r["mode"]) for r in data["runs"]} == {(c, m) for c in ("32K", "uncapped") for m in ("ship", "travel")}
    for r in data["runs"]:
        assert r["hops_trained"] == r["hops"] and r["steps_total"] == 8
        assert math.isfinite(r["last_loss"])
    assert data["alone"]["trainer"] == "gpt2" and data["alone"]["tokens_per_s"] > 0
    assert {g["name"] for g in data["goals"]} >= {"travel Tx % at cap 32K", "travel Tx % at cap uncapped"}
