"""`gtbus status` against a real run: snapshot over CURVE, then the live view to completion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gtbus.nodes.launcher import LocalDeployment, LocalRun

pytestmark = pytest.mark.slow


def _status(dep: LocalDeployment, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gtbus", "status", "--key", str(dep.keys / "status.key"), "--keys", str(dep.keys),
         "--router", dep.router, "--pub", dep.pub, "--json", *extra],
        capture_output=True, text=True, timeout=120,
    )


def test_status_snapshot_and_watch_until_complete(tmp_path: Path) -> None:
    dep = LocalDeployment(LocalRun(run_dir=tmp_path / "run", holders=2, chunk_tokens=16384, steps="20", bytes_per_holder=128 * 1024))
    dep.start()
    # The live view starts with the run, so it cannot miss the end however fast the run is.
    watch = subprocess.Popen(
        [sys.executable, "-m", "gtbus", "status", "--key", str(dep.keys / "status.key"), "--keys", str(dep.keys),
         "--router", dep.router, "--pub", dep.pub, "--json", "--watch", "--timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = watch.communicate(timeout=180)
        assert watch.returncode == 0, err
        states = [json.loads(line) for line in out.splitlines()]
        assert states[0]["run_id"] and states[0]["token"]["epoch"] >= 0
        assert states[-1]["complete"] is True
        summary = dep.wait()
        assert states[-1]["run_id"] == summary["run_id"]
        assert states[-1]["hops_trained"] == summary["hops_trained"]
        assert states[-1]["bytes"] == summary["bytes_provisioned"]
        assert any(set(st.get("liveness", {})) >= {"h1", "h2"} for st in states)
        # Per-hop losses reach the observer (directly: they are never broadcast to holders).
        reports = [st["last_report"] for st in states if "last_report" in st]
        assert reports and all(r["eval_before"] is not None for r in reports if r["outcome"] == "trained")
        assert {r["holder"] for r in reports} <= {"h1", "h2"}
        assert states[-1]["last_loss"] is not None
    finally:
        if watch.poll() is None:
            watch.kill()
        dep.stop()


def test_status_without_orchestrator_fails_with_one_line(tmp_path: Path) -> None:
    dep = LocalDeployment(LocalRun(run_dir=tmp_path / "run", holders=1, bytes_per_holder=4096))
    r = _status(dep, "--timeout", "1")
    assert r.returncode != 0
    assert "no answer from the orchestrator" in r.stderr
    assert "Traceback" not in r.stderr
