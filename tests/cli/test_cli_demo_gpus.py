"""`gtbus demo --gpus K --json`: a fleet of K emulated GPUs as real processes, its summary as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_with_two_gpus_reports_the_fleet(tmp_path: Path) -> None:
    args = ["--kib-per-holder", "32", "--rounds", "1", "--chunk-tokens", "8192", "--steps", "5", "--holders", "2", "--gpus", "2", "--json"]
    p = subprocess.run([sys.executable, "-m", "gtbus", "demo", "--run-dir", str(tmp_path / "run"), *args], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "2 GPU tokens" in p.stderr
    s = json.loads(p.stdout)
    assert s["gpus"] == 2 and len(s["hops_per_gpu"]) == 2 and sum(s["hops_per_gpu"]) == s["hops"] == s["hops_trained"] == 8
    assert all(n > 0 for n in s["hops_per_gpu"]) and s["merges"] >= 1 and s["lanes_failed"] == []
    # Hop lines (on stderr with --json) name the lane each hop ran on.
    assert "gpu0  hop" in p.stderr and "gpu1  hop" in p.stderr


@pytest.mark.parametrize("value, words", [("0", "0 is not in the range 1<=x<=64"), ("65", "65 is not in the range"), ("two", "'two' is not a valid integer")])
def test_demo_refuses_a_bad_gpu_count_in_one_line(value: str, words: str, tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "gtbus", "demo", "--run-dir", str(tmp_path / "run"), "--gpus", value], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr
