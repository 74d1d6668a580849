"""kill -9 of the orchestrator mid-run, then `--resume` in the same run folder (DESIGN §7)."""

from __future__ import annotations

import signal

import pytest
from travel_kit import Travel, process_state, trained_keys

from gtbus.recording import read_log
from gtbus.replay.view import entries

pytestmark = pytest.mark.slow


def test_orchestrator_killed_mid_hop_resumes_without_reusing_epochs_or_chunks(travel) -> None:
    # h2 stops itself right after acking: the orchestrator is killed while h2 holds the token
    # (the test waits for the stop; no signal has to land inside a window).
    t: Travel = travel(holders=2, chunk_tokens=32768, holder_faults={"h2": "stop_after_ack"}).start()
    t.wait_for("h2 stopped after its ack", lambda: process_state(t.holder("h2").pid) == "T")
    ack = t.wait_message("h2's ack (in its own log)", lambda m: m.dir == "out" and m.type == "token.ack", node="h2")
    assert t.kill(t.orchestrator) == -signal.SIGKILL
    before = t.grants()
    run_id = next(m.body["run_id"] for m in t.messages() if m.type == "token.grant")
    assert [g.epoch for g in before] == [1, ack.epoch] == [1, 2]
    hops_before = t.hops()
    assert [(h["epoch"], h["outcome"]) for h in hops_before] == [(1, "trained")]  # hop 2 was in flight

    # Holders are restarted with it (a holder registers once per orchestrator process).
    for name in t.holder_names:
        t.kill(t.holder(name))
    t.dep.run.holder_faults.clear()  # restarted as plain holders
    t.start_orchestrator(resume=True)
    for name in t.holder_names:
        t.restart_holder(name)
    summary = t.finish()

    # Across both lifetimes, every grant has a new epoch: the in-flight hop's epoch 2
    # was reserved on disk before its grant left, so the resumed run starts above it.
    log = t.log_of("orch")
    grant_epochs = [
        e.header.epoch for e in entries(log)
        if e.header is not None and e.header.type == "token.grant" and e.record.data.get("dir") == "out"
    ]
    assert grant_epochs == sorted(set(grant_epochs)), grant_epochs
    assert grant_epochs[:2] == [1, 2] and min(grant_epochs[2:]) > 2
    assert sum(1 for r in read_log(log) if r.kind == "meta") == 2

    # The schedule went on from the checkpoint: every chunk trained exactly once.
    hops = t.hops()
    assert hops[0] == hops_before[0]
    keys = trained_keys(hops)
    assert sorted(keys) == [(0, "h1", 0), (0, "h1", 1), (0, "h2", 0), (0, "h2", 1)]
    assert len(keys) == len(set(keys))
    assert all(h["epoch"] != 2 for h in hops)
    assert [h["epoch"] for h in hops] == sorted({h["epoch"] for h in hops})
    assert summary["run_id"] == run_id
    assert summary["hops_trained"] == 4 and summary["skipped"] == []
    assert summary["bytes_provisioned"] == 4 * 64 * 1024
    assert summary["last_epoch"] == grant_epochs[-1]

    # Both lifetimes' logs (and the holders' two each) still verify offline.
    res = t.replay_verify()
    assert res.returncode == 0, res.stdout + res.stderr


def test_holders_that_keep_running_register_again_with_the_resumed_orchestrator(travel) -> None:
    from gtbus.errors import DeviceError
    from gtbus.gpu.host import HostDevice

    t: Travel = travel(holders=2, chunk_tokens=32768, holder_faults={"h2": "stop_after_ack"}).start()
    t.wait_for("h2 stopped after its ack", lambda: process_state(t.holder("h2").pid) == "T")
    assert t.kill(t.orchestrator) == -signal.SIGKILL
    t.signal(t.holder("h2"), signal.SIGCONT)  # it finds its hop gone, and keeps running
    # The dead process's staging (an anonymous memfd) went with it: nothing on disk to clean up.
    assert not (t.run_dir / "state" / "orch" / "inflight-staging").exists()
    handle = t.grants()[-1].handle
    with pytest.raises(DeviceError, match="its device is gone"):
        HostDevice.map_staging(handle)
    t.start_orchestrator(resume=True)  # holders keep running: they notice the new session and register again
    summary = t.finish()
    keys = trained_keys(t.hops())
    assert sorted(keys) == [(0, "h1", 0), (0, "h1", 1), (0, "h2", 0), (0, "h2", 1)]
    assert summary["hops_trained"] == 4
    assert t.replay_verify().returncode == 0
    # The resumed process started above the epochs reserved on disk: re-driving the
    # token machine over both lifetimes finds no reused epoch.
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "gtbus", "replay", str(t.run_dir / "logs"), "--redrive", "orch"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
