"""``gtbus bench fleet`` at a tiny size: a one-GPU and a two-GPU deployment on the host backend, the numbers they give.

Real processes, sockets and files (the nodes are started by the CLI, as the
bench always does); nothing timed is asserted against a limit: only what the
definitions say must hold between the numbers of one run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gtbus.bench.fleet import parse_gpus, run_fleet_bench
from gtbus.errors import ConfigError
from gtbus.training.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow

STEPS, CHUNK, HOLDERS, CHUNKS = 4, 4096, 2, 2


def test_two_gpus_and_one_train_the_same_tokens_and_the_goals_are_the_runs_numbers(tmp_path: Path) -> None:
    said: list[str] = []
    res = run_fleet_bench(tmp_path / "out", gpus=[2], holders=HOLDERS, chunk_tokens=CHUNK, chunks_per_holder=CHUNKS, steps_per_hop=STEPS,
                          heldout_tokens=4096, merge="average", compare_merge=["sum", "average"], keep_runs=tmp_path / "runs", say=said.append)
    md, js = (Path(f) for f in res.data["files"])
    data = json.loads(js.read_text())
    one, two, two_sum = data["runs"]
    assert (one["gpus"], two["gpus"], two_sum["gpus"]) == (1, 2, 2)
    assert (two["merge"], two_sum["merge"]) == ("average", "sum")  # the policy compared, run once (not "average" again)
    per_step = data["heldout"]["tokens_per_step"]
    hops = HOLDERS * CHUNKS
    for r in (one, two, two_sum):
        # Every chunk trained once, the same steps each: the same tokens in both runs.
        assert r["hops_trained"] == r["hops_expected"] == hops
        assert r["tokens"] == hops * STEPS * per_step
        # A lane has one hop in flight at a time: K lanes' training and evaluation fit in K windows.
        assert r["train_s"] + r["eval_s"] <= r["gpus"] * r["window_s"] and r["window_s"] <= r["wall_s"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["window_s"])
        assert r["cpu_s"] > 0  # the deployment's processes, waited for
        assert math.isfinite(r["heldout_loss"]) and r["heldout_loss"] < data["heldout"]["initial_loss"]
    assert one["merges"] == 0 and two["merges"] >= 1
    assert len(two["trained_per_gpu"]) == 2 and sum(two["trained_per_gpu"]) == hops
    # Each hop in the checkpoint says which lane it ran on; both lanes trained.
    ck = next((tmp_path / "runs").glob("01-gpus2-*")) / "checkpoints" / "orch.npz"
    lanes = [h["lane"] for h in read_checkpoint(ck, state=False).hops if h["outcome"] == "trained"]
    assert sorted(set(lanes)) == [0, 1] and [lanes.count(k) for k in (0, 1)] == two["trained_per_gpu"]
    # Each K = 2 orchestrator capped its BLAS threads for its lanes (the host lanes train with numpy on threads), K = 1 did not;
    # each merged with the policy it was given.
    cap = max(1, len(os.sched_getaffinity(0)) // 2)
    assert [(r["blas_threads"], r["merged_by"]) for r in (one, two, two_sum)] == [(None, "average"), (cap, "average"), (cap, "sum")]

    goals = {g["name"]: g for g in data["goals"]}
    assert set(goals) == {"fleet_scaling_2gpus", "fleet_loss_vs_1gpu_2gpus"}
    scaling = goals["fleet_scaling_2gpus"]
    assert scaling["measured"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"]) and scaling["goal"] == 1.85
    assert scaling["met"] == (scaling["measured"] >= 1.85)
    loss = goals["fleet_loss_vs_1gpu_2gpus"]
    assert loss["measured"] == pytest.approx((two["heldout_loss"] - one["heldout_loss"]) / one["heldout_loss"] * 100)
    assert loss["direction"] == "at most" and loss["goal"] == 2.0 and loss["met"] == (loss["measured"] <= 2.0)

    text = md.read_text()
    cores = len(os.sched_getaffinity(0))
    assert f"{cores} usable cores shared by K up to 2 emulated devices" in text
    assert ("recorded anyway, missed" in text) == (cores < 4)  # two lanes and two holders want four cores
    assert "Aggregate tokens/s = tokens trained / training window" in text
    assert "PARTIAL" not in text
    # A ratio above the cores is named as the baseline's slowdown, not the lanes' scaling.
    assert ("WARNING: K = 2 ran at" in text) == (scaling["measured"] > cores)
    assert any("K = 2, merge every 2 trained hops (sum)" in s for s in said)
    # The policies compared, with loss per wall-clock second: the one-GPU row and a row per K = 2 policy.
    policy_table = text.split("### Merge policy at the largest K: loss per wall-clock second")[1].split("###")[0]
    rows = [line for line in policy_table.splitlines() if line.startswith("| ") and not line.startswith("| GPUs")]
    assert [r.split(" | ")[2] for r in rows] == ["-", "average", "sum"]
    for r, run in zip(rows, (one, two, two_sum)):
        drop = (data["heldout"]["initial_loss"] - run["heldout_loss"]) / run["window_s"]
        assert r.split(" | ")[7] == f"{drop:.4f}"


def test_gpu_counts_are_checked() -> None:
    assert parse_gpus("4, 2,2") == [2, 4]
    for bad in ("1", "two", "", "2,0"):
        with pytest.raises(ConfigError, match="--gpus"):
            parse_gpus(bad)


@pytest.mark.parametrize("args, says", [
    (["--gpus", "1"], "each count must be 2 or more"),
    (["--gpus", "2;4"], "comma-separated numbers of GPUs"),
    (["--gpus", "4", "--holders", "2"], "2 holders cannot keep 4 GPUs busy"),
    (["--compare-merge-every", "4;8"], "comma-separated numbers of trained hops"),
    (["--compare-merge-every", "-1"], "0 (every K) or a positive number"),
    (["--merge", "mean"], "--merge 'mean': give average, sum, or delta:LR"),
    (["--compare-merge", "sum,delta:-2"], "--merge 'delta:-2': give average, sum, or delta:LR"),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path: Path, args: list[str], says: str) -> None:
    done = subprocess.run([sys.executable, "-m", "gtbus", "bench", "fleet", *args, "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and says in lines[0]
    assert not (tmp_path / "out").exists()
