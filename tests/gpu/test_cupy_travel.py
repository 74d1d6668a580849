"""The whole travel loop with the model on a real GPU: holders as processes writing by CUDA IPC.

Skipped cleanly where cupy or a GPU is absent (as in CI).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cuda_guard import cupy_or_skip

cupy = cupy_or_skip()

from gtbus.nodes.launcher import LocalDeployment, LocalRun  # noqa: E402

pytestmark = pytest.mark.gpu


def test_travel_on_gpu_trains_and_refuses_garbage(tmp_path: Path) -> None:
    run = LocalRun(run_dir=tmp_path / "run", holders=3, backend="cupy", chunk_tokens=32768, steps="40",
                   bytes_per_holder=128 * 1024, holder_faults={"h3": "garbage"}, lease=60.0)
    summary = LocalDeployment(run).run_to_end(timeout=600)
    assert summary["device"].startswith("cuda:")
    outcomes = summary["outcomes"]
    assert outcomes.get("trained", 0) >= 8  # h1 and h2: 4 chunks each
    assert outcomes.get("rejected", 0) >= 1  # h3's garbage never authenticates
    assert summary["last_loss"] < summary["first_loss"]
    # Hops prepared ahead (token.prepare): the honest holders opened CUDA IPC staging before their grants and wrote through it.
    assert summary["prepared_hops"]["used"] >= 8, summary["prepared_hops"]
    ahead = sum((run.run_dir / f"{h}.err").read_text(errors="replace").count("params and staging were prepared ahead") for h in ("h1", "h2"))
    assert ahead >= 6, ahead
    r = subprocess.run([sys.executable, "-m", "gtbus", "replay", "--verify", str(run.run_dir / "logs")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for node in ("orch", "h1", "h3"):
        r = subprocess.run([sys.executable, "-m", "gtbus", "replay", str(run.run_dir / "logs"), "--redrive", node], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr


def test_ship_on_gpu(tmp_path: Path) -> None:
    run = LocalRun(run_dir=tmp_path / "run", holders=2, backend="cupy", mode="ship", chunk_tokens=32768, steps="20", bytes_per_holder=64 * 1024)
    summary = LocalDeployment(run).run_to_end(timeout=600)
    assert summary["outcomes"] == {"trained": summary["hops"]}
