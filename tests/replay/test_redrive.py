"""`gtbus replay --redrive`: a clean log re-drives with no difference; a planted one is found exactly."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import HopRecord, TokenAck, TokenGrant, TokenReturn
from gtbus.recording import Recorder, read_log
from gtbus.replay.redrive import redrive
from gtbus.testing import make_deployment

TOKEN = "tok0"


def _grant(holder: str, chunk: int, now: float) -> TokenGrant:
    return TokenGrant(TOKEN, "run", holder, chunk, "travel", now + 10, b"sealed", {})


def _holder_log(tmp: Path, *, plant: bool) -> tuple[Path, int | None]:
    dep = make_deployment(tmp / "keys", holders=1)
    orch, h1 = MessageSigner(dep.orchestrator), MessageSigner(dep.holders[0])
    path = tmp / "h1.gtlog"
    rec = Recorder(path, "h1", dep.roster)
    now = time.time()
    planted_index = None
    for epoch in (1, 2, 3):
        _, g = orch.sign(_grant("h1", epoch - 1, now), "h1", epoch=epoch)
        rec.record("in", g, "accepted")
        _, a = h1.sign(TokenAck(TOKEN), "orch", epoch=epoch)
        rec.record("out", a, "sent")
        _, r = h1.sign(TokenReturn(TOKEN, epoch - 1, 1, 10, b"d" * 32, bytes(32)), "orch", epoch=epoch)
        rec.record("out", r, "sent")
        if plant and epoch == 2:
            # Doctored: a grant for an old epoch accepted and acknowledged as if fresh.
            _, stale = orch.sign(TokenGrant("tok-old", "run", "h1", 0, "travel", now + 10, b"sealed", {}), "h1", epoch=1)
            rec.record("in", stale, "accepted")
            planted_index = read_log(path)[-1].index
            _, a2 = h1.sign(TokenAck("tok-old"), "orch", epoch=1)
            rec.record("out", a2, "sent")
    rec.close()
    return path, planted_index


def test_clean_holder_log_has_no_difference(tmp_path: Path) -> None:
    path, _ = _holder_log(tmp_path, plant=False)
    assert redrive(path) == ("h1", None)


def test_planted_stale_grant_ack_is_found_at_its_record(tmp_path: Path) -> None:
    path, index = _holder_log(tmp_path, plant=True)
    name, diff = redrive(path)
    assert name == "h1" and diff is not None
    assert diff.record == index
    assert "epoch 1" in diff.message and "ignore" in diff.message and "token.ack" in diff.message


def _orch_log(tmp: Path, epochs: list[int]) -> tuple[Path, list[int]]:
    dep = make_deployment(tmp / "keys", holders=2)
    orch = MessageSigner(dep.orchestrator)
    hs = {h.name: MessageSigner(h) for h in dep.holders}
    path = tmp / "orch.gtlog"
    rec = Recorder(path, "orch", dep.roster)
    grant_records = []
    now = time.time()
    for k, epoch in enumerate(epochs):
        holder = f"h{k % 2 + 1}"
        _, g = orch.sign(_grant(holder, k, now), holder, epoch=epoch)
        rec.record("out", g, "sent")
        grant_records.append(read_log(path)[-1].index)
        _, a = hs[holder].sign(TokenAck(TOKEN), "orch", epoch=epoch)
        rec.record("in", a, "accepted")
        _, r = hs[holder].sign(TokenReturn(TOKEN, k, 1, 10, b"d" * 32, bytes(32)), "orch", epoch=epoch)
        rec.record("in", r, "accepted")
        _, hr = orch.sign(HopRecord(epoch, holder, k, "trained", {"nbytes": 10}), "*", epoch=epoch)
        rec.record("out", hr, "sent", channel="event")
    rec.close()
    return path, grant_records


def test_clean_orchestrator_log_and_reused_epoch(tmp_path: Path) -> None:
    clean, _ = _orch_log(tmp_path / "a", [1, 2, 3, 4])
    assert redrive(clean) == ("orch", None)
    doctored, grants = _orch_log(tmp_path / "b", [1, 2, 2, 3])
    _, diff = redrive(doctored)
    assert diff is not None and diff.record == grants[2]
    assert "reuses an epoch" in diff.message


def test_cli_redrive_exit_codes(tmp_path: Path) -> None:
    path, index = _holder_log(tmp_path, plant=True)
    r = subprocess.run([sys.executable, "-m", "gtbus", "replay", str(path), "--redrive", "h1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"record {index}:" in r.stderr
    clean, _ = _holder_log(tmp_path / "clean", plant=False)
    r = subprocess.run([sys.executable, "-m", "gtbus", "replay", str(clean), "--redrive", "h1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "gtbus", "replay", str(clean), "--redrive", "nobody"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no log of node 'nobody'" in r.stderr
