"""Fault drills with real processes: dead, paused and misbehaving holders, a tampered model.

Each test starts a small deployment (holders with 1-2 chunks, 20 training
steps a hop), injects one kind of failure, and checks what DESIGN.md §7 and
§11 require: the run goes on, nothing unauthenticated or stale is trained on,
no chunk is trained twice, and the model measurement says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from travel_kit import Travel, by_epoch, process_state, trained_keys

from gtbus.errors import DeviceError
from gtbus.gpu.channel import TAG_SIZE
from gtbus.gpu.host import SHM_DIR, HostDevice

pytestmark = pytest.mark.slow

LEASE = 2.5  # seconds: far above a healthy grant..return (ms), below the ZMTP heartbeat timeout (5 s)


def _no_chunk_trained_twice(hops: list[dict]) -> None:
    keys = trained_keys(hops)
    assert len(keys) == len(set(keys)), f"a chunk was trained twice: {keys}"


def test_holder_killed_mid_provision_is_revoked_and_run_completes(travel) -> None:
    # h2 acks, writes half its chunk into staging, then SIGKILLs itself.
    t: Travel = travel(holders=3, chunk_tokens=65536, lease=LEASE, holder_faults={"h2": "exit_mid_provision"},
                       extra_orchestrator_args=("--absent-timeout", "2")).start()
    summary = t.finish()
    assert t.holder("h2").returncode == -signal.SIGKILL

    hops = t.hops()
    h2 = [h for h in hops if h["holder"] == "h2"]
    # First attempt: granted, acked, then silence until the lease ran out.
    assert h2[0]["epoch"] == 2 and h2[0]["outcome"] == "revoked"
    assert "lease expired" in h2[0]["detail"]
    revokes = [m for m in t.messages() if m.dir == "out" and m.type == "token.revoke"]
    assert [(m.recipient, m.epoch) for m in revokes][:1] == [("h2", 2)]
    # h2 sent its ack (its own log says so) before it died; whether libzmq got it onto the
    # wire before the SIGKILL is a race the protocol does not depend on: the lease decides.
    sent = [m for m in t.messages("h2") if m.dir == "out" and m.type == "token.ack"]
    assert [m.epoch for m in sent] == [2]
    acks = [m for m in t.messages() if m.type == "token.ack" and m.sender == "h2"]
    assert [m.epoch for m in acks] in ([2], [])
    # Its retries found no holder: deferred with backoff (no attempt used up) until it had
    # been away for --absent-timeout, then the chunk is reported skipped, never trained.
    outcomes = [h["outcome"] for h in h2]
    assert outcomes[0] == "revoked" and len(outcomes) >= 2 and set(outcomes[1:]) == {"undelivered"}
    assert "grant not delivered" in h2[1]["detail"] and "not connected" in h2[1]["detail"]
    assert [0, "h2", 0] in summary["skipped"]
    assert "h2 unreachable for 2s: skipped its 1 remaining chunks of round 0" in t.stderr()
    # The others trained their chunks, once each.
    assert sorted(trained_keys(hops)) == [(0, "h1", 0), (0, "h3", 0)]
    _no_chunk_trained_twice(hops)
    assert summary["hops_trained"] == 2
    assert summary["bytes_provisioned"] == 2 * 128 * 1024
    res = t.replay_verify()
    assert res.returncode == 0, res.stdout + res.stderr


def _is_revoke_to(holder: str):
    return lambda m: m.dir == "out" and m.type == "token.revoke" and m.recipient == holder


def test_holder_sigstopped_past_its_lease_is_revoked_and_run_completes(travel) -> None:
    # h2 acks its first grant and stops itself right there (SIGSTOP), before writing:
    # the test waits for that, it does not race a signal into a window.
    t: Travel = travel(holders=2, chunk_tokens=65536, lease=LEASE, holder_faults={"h2": "stop_after_ack"}).start()
    h2 = t.holder("h2")
    t.wait_for("h2 stopped after its ack", lambda: process_state(h2.pid) == "T")
    ack = t.wait_message("h2's ack (in its own log)", lambda m: m.dir == "out" and m.type == "token.ack", node="h2")
    revoke = t.wait_message("the lease of h2's hop runs out", _is_revoke_to("h2"))
    assert revoke.epoch == ack.epoch
    nxt = t.wait_message("the next grant", lambda m: m.dir == "out" and m.type == "token.grant" and m.epoch > ack.epoch)
    t.signal(h2, signal.SIGCONT)
    summary = t.finish()

    hops = by_epoch(t.hops())
    assert hops[ack.epoch]["outcome"] == "revoked" and "lease expired" in hops[ack.epoch]["detail"]
    # The chunk went back into the round and trained once, at a later epoch.
    retried = [h for h in t.hops() if (h["holder"], h["chunk"]) == ("h2", 0) and h["outcome"] == "trained"]
    assert [h["epoch"] for h in retried] == [nxt.epoch]
    _no_chunk_trained_twice(t.hops())
    assert summary["hops_trained"] == 2 and summary["skipped"] == []
    # Whatever h2 said about the revoked hop after waking up was refused as stale:
    # the fence had moved to the next grant's epoch before h2 ran again.
    late = [m for m in t.messages() if m.sender == "h2" and m.type.startswith("token.") and m.epoch == ack.epoch and m.t > revoke.t]
    assert all(m.verdict == "rejected:stale-epoch" for m in late), late


def test_late_return_of_a_paused_holder_is_refused_as_stale_epoch(travel) -> None:
    # h2 writes its chunk, then stops (SIGSTOP) just before its return leaves.
    t: Travel = travel(holders=2, chunk_tokens=65536, lease=LEASE, holder_faults={"h2": "stop_before_return"}).start()
    h2 = t.holder("h2")
    t.wait_for("h2 stopped with its return unsent", lambda: process_state(h2.pid) == "T")
    revoke = t.wait_message("the lease of h2's hop runs out", _is_revoke_to("h2"))
    nxt = t.wait_message("the next grant", lambda m: m.dir == "out" and m.type == "token.grant" and m.epoch > revoke.epoch)
    t.signal(h2, signal.SIGCONT)  # past its lease: the return now leaves, too late
    summary = t.finish()

    # The return was sent for the old epoch and refused by the orchestrator's fence.
    sent = [m for m in t.messages("h2") if m.dir == "out" and m.type == "token.return"]
    assert [m.epoch for m in sent] == [revoke.epoch, nxt.epoch]
    got = [m for m in t.messages() if m.type == "token.return" and m.sender == "h2"]
    assert [(m.epoch, m.verdict) for m in got] == [(revoke.epoch, "rejected:stale-epoch"), (nxt.epoch, "accepted")]
    # The same, as `gtbus replay` shows it.
    res = subprocess.run(
        [sys.executable, "-m", "gtbus", "replay", "--json", "--node", "orch", "--type", "token.return", str(t.logs)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert [(r["sender"], r["epoch"], r["verdict"]) for r in rows if r["sender"] == "h2"] == [
        ("h2", revoke.epoch, "rejected:stale-epoch"),
        ("h2", nxt.epoch, "accepted"),
    ]

    hops = by_epoch(t.hops())
    assert hops[revoke.epoch]["outcome"] == "revoked"
    assert hops[nxt.epoch]["outcome"] == "trained" and (hops[nxt.epoch]["holder"], hops[nxt.epoch]["chunk"]) == ("h2", 0)
    _no_chunk_trained_twice(t.hops())
    assert summary["hops_trained"] == 2
    res = t.replay_verify()
    assert res.returncode == 0, res.stdout + res.stderr


def _model_unchanged_across(t: Travel, epochs: list[int]) -> None:
    """The model measurement after hop e equals the one before it, for each e in ``epochs``.

    "Before hop e" is the measurement signed into grant e; "after" is the one in
    grant e+1, or the final checkpoint's for the run's last hop.
    """
    grants = {g.epoch: g.model_hash for g in t.grants()}
    final = t.checkpoint_model_hash()
    for e in epochs:
        after = grants.get(e + 1, final)
        assert grants[e] == after, f"the model changed across hop {e}"


def test_garbage_and_replayed_segments_are_rejected_and_never_trained(travel, tmp_path: Path) -> None:
    dump = tmp_path / "h1-ciphertext"
    faults = {
        "h1": f"dump_to={dump}",  # honest; keeps a copy of what it wrote into staging
        "h2": "garbage",  # random bytes instead of ciphertext
        "h3": "replay_previous",  # honest first hop, then its own earlier ciphertext again
        "h4": f"replay_from={dump}",  # h1's ciphertext of the hop before
    }
    t: Travel = travel(holders=4, chunk_tokens=32768, holder_faults=faults).start()
    summary = t.finish()
    hops = t.hops()

    def outcomes(name: str) -> list[tuple[int, str]]:
        return [(h["chunk"], h["outcome"]) for h in hops if h["holder"] == name]

    assert outcomes("h1") == [(0, "trained"), (1, "trained")]
    assert outcomes("h2") == [(0, "rejected"), (1, "rejected"), (0, "rejected"), (1, "rejected")]
    assert outcomes("h3") == [(0, "trained"), (1, "rejected"), (1, "rejected")]
    assert outcomes("h4") == [(0, "rejected"), (1, "rejected"), (0, "rejected"), (1, "rejected")]
    rejected = [h for h in hops if h["outcome"] == "rejected"]
    for h in rejected:
        assert "did not authenticate" in h["detail"], h
    # h4 wrote exactly the bytes h1 wrote for the hop before (cross-holder replay),
    # and h3 its own earlier ciphertext (cross-hop replay): AAD and key refuse both.
    assert dump.stat().st_size == 64 * 1024 + TAG_SIZE  # one segment of ciphertext and its tag

    # Nothing of theirs was trained on: the model is unchanged across every rejected hop ...
    _model_unchanged_across(t, [h["epoch"] for h in rejected])
    # ... and did change across the trained ones (the comparison can see a change).
    grants = {g.epoch: g.model_hash for g in t.grants()}
    for h in hops:
        if h["outcome"] == "trained" and h["epoch"] + 1 in grants:
            assert grants[h["epoch"]] != grants[h["epoch"] + 1]

    assert sorted(trained_keys(hops)) == [(0, "h1", 0), (0, "h1", 1), (0, "h3", 0)]
    assert sorted(map(tuple, summary["skipped"])) == [(0, "h2", 0), (0, "h2", 1), (0, "h3", 1), (0, "h4", 0), (0, "h4", 1)]
    assert summary["bytes_provisioned"] == 3 * 64 * 1024


def _shared_mappings(pid: int) -> tuple[list[str], list[str]]:
    """(paths under /dev/shm, anything mapped shared and writable) of process ``pid``."""
    shm, writable = set(), set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(None, 5)
        path = parts[5] if len(parts) == 6 else "(anonymous)"
        if path.startswith(SHM_DIR + "/"):
            shm.add(path)
        if parts[1][1] == "w" and parts[1][3] == "s":
            writable.add(path)
    return sorted(shm), sorted(writable)


def _needles(arrays: dict) -> list[bytes]:
    """A few 64-byte pieces of the model's parameters (not all-zero, so they identify it)."""
    out = []
    for name, a in sorted(arrays.items()):
        if not name.startswith("param/"):
            continue
        raw = a.tobytes()
        for start in (0, len(raw) // 2, max(0, len(raw) - 64)):
            piece = raw[start : start + 64]
            if len(piece) == 64 and piece.count(0) < 32:
                out.append(piece)
    return out


def test_old_staging_cannot_be_mapped_and_the_model_is_never_exported(travel) -> None:
    # h1 tries to map its previous hop's staging handle before each later hop.
    # h2 stops itself right after acking (SIGSTOP), so the test can look at the
    # orchestrator mid-hop: waiting for the return, model as last checkpointed.
    t: Travel = travel(holders=2, chunk_tokens=32768, holder_faults={"h1": "map_old", "h2": "stop_after_ack"}).start()
    orch, h2 = t.orchestrator, t.holder("h2")
    t.wait_for("h2 stopped after its ack", lambda: process_state(h2.pid) == "T")
    ack = t.wait_message("h2's ack (in its own log)", lambda m: m.dir == "out" and m.type == "token.ack", node="h2")

    grants = t.grants()
    current = next(g for g in grants if g.epoch == ack.epoch)
    earlier = [g for g in grants if g.epoch < ack.epoch]
    assert earlier
    # The orchestrator maps nothing from /dev/shm, and nothing shared and writable
    # at all, but this hop's staging (an anonymous memfd): the model lives in
    # private memory only.
    assert _shared_mappings(orch.pid) == ([], ["/memfd:gtbus-hop (deleted)"])
    # Earlier hops' staging is withdrawn: no process can map it again.
    for g in earlier:
        with pytest.raises(DeviceError, match="revoked or never issued"):
            HostDevice.map_staging(g.handle)
    # The model's bytes are in no shared-memory file at all.
    arrays = t.checkpoint().arrays
    needles = _needles(arrays)
    assert len(needles) >= 6
    ckpt = (t.run_dir / "checkpoints" / "orch.npz").read_bytes()
    assert all(n in ckpt for n in needles)  # the probe finds the model where it is
    for entry in os.scandir(SHM_DIR):
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat().st_size > 256 << 20:
                continue
            with open(entry.path, "rb") as fh:
                data = fh.read()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        assert not any(n in data for n in needles), f"model bytes found in {entry.path}"
    looked = time.time()
    t.signal(h2, signal.SIGCONT)
    summary = t.finish()
    # All of that happened while the hop was still open (h2 had not returned yet).
    ret = next(m for m in t.messages() if m.type == "token.return" and m.epoch == ack.epoch)
    assert ret.verdict == "accepted" and ret.t > looked
    assert by_epoch(t.hops())[ack.epoch]["outcome"] == "trained"

    # h1's attempt to map the earlier hop's buffer failed on the holder (DeviceError:
    # the staging is no longer exported); it declined the hop, twice, and the chunk is skipped.
    hops = t.hops()
    h1_later = [h for h in hops if h["holder"] == "h1" and h["chunk"] == 1]
    assert [h["outcome"] for h in h1_later] == ["declined", "declined"]
    for h in h1_later:
        assert "not exported" in h["detail"], h
    assert "not exported (revoked or never issued)" in t.stderr("h1")
    assert sorted(trained_keys(hops)) == [(0, "h1", 0), (0, "h2", 0), (0, "h2", 1)]
    assert [0, "h1", 1] in summary["skipped"]
    _model_unchanged_across(t, [h["epoch"] for h in h1_later])


def test_model_changed_during_a_hop_is_rolled_back_to_the_checkpoint(travel) -> None:
    # The orchestrator flips one parameter bit during hop 2, after the return.
    t: Travel = travel(holders=2, chunk_tokens=65536, orchestrator_fault="tamper-model-at-epoch=2").start()
    summary = t.finish()
    hops = by_epoch(t.hops())
    assert hops[1]["outcome"] == "trained"
    assert hops[2]["outcome"] == "rolled-back" and "model changed during the hop" in hops[2]["detail"]
    assert hops[2]["loss_first"] is None  # nothing was trained on that hop's buffer
    # Restored from the checkpoint written after hop 1: the measurement signed into
    # the next grant is the one from before the tampered hop.
    grants = {g.epoch: g for g in t.grants()}
    assert grants[3].model_hash == grants[2].model_hash != grants[1].model_hash
    # The chunk was retried and trained once.
    assert (hops[3]["holder"], hops[3]["chunk"], hops[3]["outcome"]) == ("h2", 0, "trained")
    _no_chunk_trained_twice(t.hops())
    assert summary["outcomes"] == {"rolled-back": 1, "trained": 2}
    assert summary["skipped"] == []


def test_model_changed_between_hops_is_seen_by_the_next_hop(travel) -> None:
    # The orchestrator flips one parameter bit after hop 1 has ended (trained, checkpointed,
    # published). Hop 2's grant reports hop 1's measurement after training (not a fresh one,
    # which would take the flipped bit in as the model), so hop 2's remeasure sees the change.
    t: Travel = travel(holders=2, chunk_tokens=65536, orchestrator_fault="tamper-model-after-epoch=1").start()
    summary = t.finish()
    hops = by_epoch(t.hops())
    assert hops[1]["outcome"] == "trained"
    assert hops[2]["outcome"] == "rolled-back" and "model changed during the hop" in hops[2]["detail"]
    grants = {g.epoch: g for g in t.grants()}
    # Restored from the checkpoint written after hop 1 (before the flip): grant 3 reports the
    # model grant 2 did, the one hop 1 trained.
    assert grants[3].model_hash == grants[2].model_hash != grants[1].model_hash
    assert (hops[3]["holder"], hops[3]["chunk"], hops[3]["outcome"]) == ("h2", 0, "trained")
    _no_chunk_trained_twice(t.hops())
    assert summary["outcomes"] == {"rolled-back": 1, "trained": 2}


def test_code_changed_during_a_hop_rolls_back_and_stops_the_run(travel) -> None:
    # The orchestrator swaps the code of a trainer method during hop 2, after the return.
    t: Travel = travel(holders=2, chunk_tokens=65536, orchestrator_fault="tamper-code-at-epoch=2").start()
    rc = t.orchestrator.wait(timeout=120)
    assert rc != 0
    err = t.stderr()
    assert "loaded code changed during hop 2 (gtbus.training.bytelm.ByteLM.evaluate); the run stops" in err
    hops = by_epoch(t.hops())
    assert hops[1]["outcome"] == "trained"
    assert hops[2]["outcome"] == "rolled-back" and "code (gtbus.training.bytelm.ByteLM.evaluate) changed" in hops[2]["detail"]
    assert 3 not in hops  # nothing after the tampered hop
