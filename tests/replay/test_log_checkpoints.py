"""Signed checkpoints: records dropped, inserted, reordered or truncated are found even in a re-chained log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import Echo
from gtbus.recording import Recorder, read_log
from gtbus.replay.verify import verify_log
from gtbus.testing import make_deployment
from logkit import edit


def _log(tmp_path: Path, n: int = 20, every: int = 8, close: bool = True) -> tuple[Path, Recorder]:
    dep = make_deployment(tmp_path / "keys", holders=1)
    log = tmp_path / "orch.gtlog"
    rec = Recorder(log, "orch", dep.roster, identity=dep.orchestrator, checkpoint_every=every, checkpoint_seconds=1e9)
    signer = MessageSigner(dep.holders[0])
    for i in range(n):
        rec.record("in", signer.sign(Echo(b"x", f"m{i}"), "orch")[1], "accepted")
    if close:
        rec.close()
    return log, rec


def test_a_clean_log_is_proven_whole_and_closed(tmp_path: Path) -> None:
    log, _ = _log(tmp_path)
    kinds = [r.kind for r in read_log(log)]
    assert kinds[:2] == ["meta", "checkpoint"] and kinds[-1] == "checkpoint"
    assert kinds.count("checkpoint") == 1 + 20 // 8 + 1
    rep = verify_log(log)
    assert rep.ok and rep.checked == 20 and rep.unsigned_tail == 0 and rep.closed


def test_a_crash_leaves_an_unsigned_tail_reported_as_such(tmp_path: Path) -> None:
    log, rec = _log(tmp_path, n=20, every=8, close=False)
    rep = verify_log(log)
    # 20 messages, checkpoints after 8 and 16 (+ the first): the last 4 are unproven.
    assert rep.ok and rep.checked == 20 and rep.unsigned_tail == 4 and not rep.closed
    rec.close()
    assert verify_log(log).unsigned_tail == 0


def _msg_indices(log: Path) -> list[int]:
    return [r.index for r in read_log(log) if r.kind == "msg"]


def _drop(i: int):  # type: ignore[no-untyped-def]
    def change(records: list[dict[str, Any]]) -> None:
        del records[i]
    return change


def _swap(i: int, j: int):  # type: ignore[no-untyped-def]
    def change(records: list[dict[str, Any]]) -> None:
        records[i], records[j] = records[j], records[i]
    return change


def _retime(i: int):  # type: ignore[no-untyped-def]
    def change(records: list[dict[str, Any]]) -> None:
        records[i]["t"] = 1.0
    return change


@pytest.mark.parametrize("attack", ["drop", "reorder-two-streams", "local-field", "drop-checkpoint", "truncate"])
def test_rechained_edit_is_found_by_the_next_checkpoint(tmp_path: Path, attack: str) -> None:
    dep = make_deployment(tmp_path / "keys", holders=2)
    log = tmp_path / "orch.gtlog"
    rec = Recorder(log, "orch", dep.roster, identity=dep.orchestrator, checkpoint_every=8, checkpoint_seconds=1e9)
    a, b = MessageSigner(dep.holders[0]), MessageSigner(dep.holders[1])
    for i in range(20):
        rec.record("in", (a if i % 2 else b).sign(Echo(b"x", f"m{i}"), "orch")[1], "accepted")
    rec.close()
    msgs = _msg_indices(log)
    if attack == "drop":
        edit(log, _drop(msgs[3]))
    elif attack == "reorder-two-streams":  # two senders' records: sequences stay forward, only the checkpoint sees it
        edit(log, _swap(msgs[3], msgs[4]))
    elif attack == "local-field":
        edit(log, _retime(msgs[3]))
    elif attack == "drop-checkpoint":
        cps = [r.index for r in read_log(log) if r.kind == "checkpoint"]
        edit(log, _drop(cps[-1]))  # the final one: the log no longer says it was closed
        rep = verify_log(log)
        assert rep.ok and not rep.closed and rep.unsigned_tail > 0
        return
    else:  # cut at a checkpoint boundary: indistinguishable from a crash, and said so
        cps = [r for r in read_log(log) if r.kind == "checkpoint"]
        cut = cps[-2]
        with open(log, "r+b") as fh:
            fh.truncate(cut.offset + 4 + cut.length + 16)
        rep = verify_log(log)
        assert rep.ok and not rep.closed and rep.unsigned_tail == 0
        return
    rep = verify_log(log)
    assert not rep.ok
    assert "checkpoint does not match the records before it" in str(rep.error)


def test_a_checkpoint_signed_by_another_key_fails(tmp_path: Path) -> None:
    log, _ = _log(tmp_path)
    dep = make_deployment(tmp_path / "other", holders=1)
    from gtbus.recording import checkpoint_message

    cp = next(r for r in read_log(log) if r.kind == "checkpoint" and r.index > 2)

    def change(records: list[dict[str, Any]]) -> None:
        records[cp.index]["sig"] = dep.orchestrator.sign(checkpoint_message("orch", cp.index, cp.prev, False))

    edit(log, change)
    rep = verify_log(log)
    assert not rep.ok and f"record {cp.index} " in str(rep.error) and "checkpoint signature" in str(rep.error)


def test_recorder_refuses_a_key_of_another_node(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path / "keys", holders=1)
    from gtbus.errors import ConfigError

    with pytest.raises(ConfigError, match="key of 'h1'"):
        Recorder(tmp_path / "orch.gtlog", "orch", dep.roster, identity=dep.holders[0])
