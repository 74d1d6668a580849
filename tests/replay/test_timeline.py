"""Merged timelines follow causality even when clocks disagree; filters by time and epoch."""

from __future__ import annotations

from pathlib import Path

from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import Echo, EchoReply, TokenAck
from gtbus.recording import Recorder
from gtbus.replay.view import entries, in_window, select, timeline
from gtbus.testing import make_deployment


def _logs(tmp: Path) -> Path:
    dep = make_deployment(tmp / "keys", holders=1)
    o, h = MessageSigner(dep.orchestrator), MessageSigner(dep.holders[0])
    logs = tmp / "logs"
    ro = Recorder(logs / "orch.gtlog", "orch", dep.roster)
    rh = Recorder(logs / "h1.gtlog", "h1", dep.roster)
    # h1's clock runs 100 s behind the orchestrator's: its receipt looks "earlier" than the send.
    import gtbus.recording as recording

    real_time = recording.time.time
    try:
        for i in range(3):
            recording.time.time = lambda: 1000.0 + 10 * i  # type: ignore[assignment]
            _, f = o.sign(Echo(b"x", f"ping{i}"), "h1", epoch=i)
            ro.record("out", f, "sent")
            recording.time.time = lambda: 900.0 + 10 * i  # type: ignore[assignment]
            rh.record("in", f, "accepted")
            _, r = h.sign(EchoReply(b"x", f"pong{i}"), "orch", epoch=i)
            rh.record("out", r, "sent")
            recording.time.time = lambda: 1001.0 + 10 * i  # type: ignore[assignment]
            ro.record("in", r, "accepted")
            _, a = h.sign(TokenAck("t"), "orch", epoch=i)
            rh.record("out", a, "sent")
    finally:
        recording.time.time = real_time  # type: ignore[assignment]
    ro.close()
    rh.close()
    return logs


def test_timeline_puts_every_send_before_its_receipt(tmp_path: Path) -> None:
    merged = timeline(entries(_logs(tmp_path)))
    assert len(merged) == 15
    seen: set[bytes] = set()
    for e in merged:
        assert e.header is not None
        if e.record.data["dir"] == "out":
            seen.add(e.header.id)
        else:
            assert e.header.id in seen, f"receipt of {e.header.type} before its send"
    notes = [e.body["note"] for e in merged if e.body and "note" in e.body and e.record.data["dir"] == "out"]
    assert notes == ["ping0", "pong0", "ping1", "pong1", "ping2", "pong2"]


def test_filters_by_node_type_time_and_epoch(tmp_path: Path) -> None:
    logs = _logs(tmp_path)
    only_h1_acks = list(select(entries(logs), nodes=("h1",), types=("token",)))
    assert [e.header.type for e in only_h1_acks if e.header] == ["token.ack"] * 3
    epoch1 = list(in_window(entries(logs), epochs=(1, 1)))
    assert epoch1 and all(e.header is not None and e.header.epoch == 1 for e in epoch1)
    late = list(in_window(entries(logs), since=1005.0))
    assert late and all(e.time >= 1005.0 for e in late)


def test_a_refused_message_is_shown_by_what_it_claimed_and_its_sizes(tmp_path: Path) -> None:
    """A refused record keeps magic and header (cut), digest and sizes: replay shows one escaped line of them."""
    from gtbus.replay.view import format_detail, format_entry
    from gtbus.replay.verify import verify_log

    dep = make_deployment(tmp_path / "keys", holders=1)
    log = tmp_path / "orch.gtlog"
    rec = Recorder(log, "orch", dep.roster, identity=dep.orchestrator)
    _, frames = MessageSigner(dep.holders[0]).sign(Echo(b"x", "hi\n\x1b[2J"), "orch")
    rec.record_refused([*frames[:3], b"\0" * 64, b"junk" * 1000], "rejected:bad-signature", peer="h1")
    rec.close()
    (e,) = list(entries(log))
    line = format_entry(e)
    assert "rejected:bad-signature" in line and "echo" in line and "h1->orch" in line
    assert "refused-frames=[" in line and "4000" in line and "digest=" in line
    assert "\n" not in format_detail(e).split("\n", 1)[0] and "\x1b" not in format_detail(e)
    rep = verify_log(log)
    assert rep.ok and rep.rejected_records == 1 and rep.checked == 0 and rep.closed
