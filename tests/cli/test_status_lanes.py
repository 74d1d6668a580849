"""`gtbus status`: a line per GPU token of a fleet, kept current by token.state events between snapshots."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gtbus.cli.status import SHOWN_LANES, lane_lines, render
from gtbus.messages.types import TokenState
from gtbus.nodes.launcher import LocalDeployment, LocalRun
from gtbus.protocol.follower import MAX_LANES, EventFollower


def _lane(i: int, owner: str, phase: str, epoch: int, **more: Any) -> dict[str, Any]:
    return {"lane": i, "id": f"gpu{i}", "owner": owner, "epoch": epoch, "phase": phase, "hop_started": None, "failed": None, **more}


def test_a_line_per_token_with_holder_epoch_phase() -> None:
    now = 1000.0
    state = {"lanes": [_lane(0, "h1", "held", 7, hop_started=998.5), _lane(1, "orch", "idle", 6),
                       _lane(2, "orch", "idle", 3, failed="device lost: CUDA error")]}
    lines = lane_lines(state, now)
    assert lines[0] == "gpus       3 tokens, 1 on a hop"
    assert lines[1].split() == ["gpu0", "holder", "h1", "epoch", "7", "phase", "held", "for", "1.5", "s"]
    assert lines[2].split() == ["gpu1", "holder", "orch", "epoch", "6", "phase", "idle"]
    assert lines[3].endswith("retired: device lost: CUDA error")
    shown = render({**state, "run_id": "r1", "token": {"owner": "h1", "epoch": 7, "phase": "held"}, "hop_started": 990.0}, now)
    assert "gpu2" in shown and "token      owner" not in shown  # the lanes replace the single token's line
    assert "this hop" not in shown  # the run-wide hop start would be some lane's: each lane says its own


def test_one_token_keeps_the_token_line() -> None:
    state = {"token": {"id": "t", "owner": "h1", "epoch": 2, "phase": "held"}, "lanes": [_lane(0, "h1", "held", 2)]}
    assert lane_lines(state) == []
    assert "token      owner h1  epoch 2  phase held" in render(state, time.time())


def test_lane_values_of_any_shape_show_as_one_safe_line_each() -> None:
    lanes: list[Any] = [_lane(0, "h1\n\x1b[2Jforged line", "held", 1), "not a lane", _lane(1, "x" * 500, "idle", {"deep": [1]}, hop_started=float("nan")),
                        _lane(2, "h2", "held", 2, hop_started="soon")]
    lines = render({"lanes": lanes}, time.time()).splitlines()
    assert all("\x1b" not in line and "\n" not in line for line in lines)
    assert any("h1\\n\\x1b[2Jforged line" in line for line in lines)
    assert not any("x" * 30 in line for line in lines) and not any("for " in line for line in lines)
    assert render({"lanes": "gpu0"}, time.time()).count("token ") == 1  # not a list: the token line
    many = {"lanes": [_lane(i, "orch", "idle", i) for i in range(SHOWN_LANES + 5)]}
    assert lane_lines(many)[-1] == "  … and 5 more" and len(lane_lines(many)) == SHOWN_LANES + 2


def test_the_follower_moves_a_lane_on_its_token_event() -> None:
    f = EventFollower()
    f.on_snapshot({"lanes": [_lane(0, "h1", "held", 4, hop_started=5.0), _lane(1, "orch", "idle", 3)]}, event_seq=10)
    assert f.on_event(11, TokenState("gpu1", "h2", 5, "granted"))
    assert f.on_event(12, TokenState("gpu0", "orch", 4, "idle"))
    assert f.state is not None
    lanes = f.state["lanes"]
    assert [(x["id"], x["owner"], x["epoch"], x["phase"]) for x in lanes] == [("gpu0", "orch", 4, "idle"), ("gpu1", "h2", 5, "granted")]
    assert lanes[0]["hop_started"] == 5.0  # same hop: the snapshot's start still holds
    assert f.on_event(13, TokenState("gpu0", "h3", 6, "granted")) and lanes[0]["hop_started"] is None  # a new hop: unknown until the next snapshot
    f.on_event(14, TokenState("gpu7", "h1", 7, "granted"))  # a token the snapshot did not list
    assert f.state["lanes"][-1]["id"] == "gpu7"
    f.on_snapshot({"lanes": "junk"}, event_seq=20)
    f.on_event(21, TokenState("gpu0", "h1", 8, "granted"))
    assert [x["id"] for x in f.state["lanes"]] == ["gpu0"]
    for i in range(MAX_LANES + 10):
        f.on_event(22 + i, TokenState(f"t{i}", "h1", 9, "granted"))
    assert len(f.state["lanes"]) == MAX_LANES


@pytest.mark.slow
def test_status_watch_shows_each_gpu_of_a_real_fleet(tmp_path: Path) -> None:
    dep = LocalDeployment(LocalRun(run_dir=tmp_path / "run", holders=3, gpus=2, chunk_tokens=4096, steps="5", bytes_per_holder=2 * 4096))
    dep.start()
    # Started with the run: the view follows it to the end however fast the run is.
    watch = subprocess.Popen(
        [sys.executable, "-m", "gtbus", "status", "--key", str(dep.keys / "status.key"), "--keys", str(dep.keys),
         "--router", dep.router, "--pub", dep.pub, "--watch", "--timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = watch.communicate(timeout=180)
        assert watch.returncode == 0, err
        summary = dep.wait()
    finally:
        if watch.poll() is None:
            watch.kill()
        dep.stop()
    blocks = [b for b in out.split("\n\n") if b.strip()]
    fleet = [b for b in blocks if "gpus       2 tokens" in b]
    assert fleet, out[-3000:]
    for block in fleet:
        rows = [line.split() for line in block.splitlines() if line.startswith("  gpu")]
        assert [r[0] for r in rows] == ["gpu0", "gpu1"], block
        for r in rows:
            assert r[1] == "holder" and r[2] in ("h1", "h2", "h3", "orch") and r[3] == "epoch" and r[5] == "phase", block
    # (Which holders a view caught on which token depends on when it joined: not asserted.)
    assert "complete" in blocks[-1] and summary["gpus"] == 2
