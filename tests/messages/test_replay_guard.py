"""The replay guard's journal: what survives a reopen, a crash mid-write, and corruption."""

from __future__ import annotations

import struct

import msgpack
import pytest

from gtbus.errors import ConfigError, RejectedMessage
from gtbus.messages import BROADCAST, MessageSigner, ReceivePipeline, ReplayGuard
from gtbus.messages.envelope import parse_header
from gtbus.messages.types import Echo, Heartbeat, TokenAck


def _accept_some(dep, clock, guard):
    """Three streams into orch: h1 direct (3 msgs), h2 direct (1), agent broadcast (2)."""
    pipe = ReceivePipeline("orch", dep.roster, guard)
    s1, s2, sa = MessageSigner(dep.h1, clock), MessageSigner(dep.h2, clock), MessageSigner(dep.agent, clock)
    for _ in range(3):
        pipe.accept(s1.sign(Echo(b"", ""), "orch")[1])
    pipe.accept(s2.sign(Echo(b"", ""), "orch")[1])
    for _ in range(2):
        pipe.accept(sa.sign(Heartbeat("ok", 1.0), BROADCAST)[1])
    return {("h1", "orch"): (s1.session, 3), ("h2", "orch"): (s2.session, 1), ("agent", "*"): (sa.session, 2)}


def test_marks_and_fence_survive_reopen(dep, clock, journal):
    g = ReplayGuard(clock, journal=journal)
    expected = _accept_some(dep, clock, g)
    g.raise_fence(9)
    g.raise_fence(4)
    assert g.marks() == expected and g.fence == 9
    g.close()
    for _ in range(2):  # reopen twice: compaction must keep everything
        g = ReplayGuard(clock, journal=journal)
        assert g.marks() == expected
        assert g.fence == 9
        g.close()
    assert journal.stat().st_mode & 0o777 == 0o600


def test_journal_keeps_the_highest_mark_per_stream(dep, clock, journal):
    g = ReplayGuard(clock, journal=journal)
    pipe = ReceivePipeline("orch", dep.roster, g)
    old = MessageSigner(dep.h1, clock)
    for _ in range(5):
        pipe.accept(old.sign(TokenAck("t"), "orch")[1])
    clock.advance(1)
    new = MessageSigner(dep.h1, clock)
    pipe.accept(new.sign(TokenAck("t"), "orch")[1])
    g.close()
    g = ReplayGuard(clock, journal=journal)
    # The newer session wins even though its seq (1) is below the old one's (5).
    assert g.marks() == {("h1", "orch"): (new.session, 1)}
    g.close()


def _records(data: bytes) -> list[tuple[int, int]]:
    """(offset, length incl. prefix) of each journal record."""
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from(">H", data, pos)
        out.append((pos, 2 + n))
        pos += 2 + n
    assert pos == len(data)
    return out


def test_truncated_last_record_loads_everything_before_it(dep, clock, journal):
    g = ReplayGuard(clock, journal=journal)
    pipe = ReceivePipeline("orch", dep.roster, g)
    s = MessageSigner(dep.h1, clock)
    frames = [s.sign(Echo(b"", str(i)), "orch")[1] for i in range(3)]
    pipe.accept(frames[0])
    pipe.accept(frames[1])
    before_last = g.marks()
    pipe.accept(frames[2])
    g.close()
    data = journal.read_bytes()
    recs = _records(data)
    assert len(recs) == 3
    _, last_len = recs[-1]
    for cut in range(1, last_len):  # every way the last write can be torn
        journal.write_bytes(data[: len(data) - cut])
        g2 = ReplayGuard(clock, journal=journal)
        try:
            assert g2.marks() == before_last, cut
            # The torn tail is gone after the reopen, and new records append cleanly.
            assert len(_records(journal.read_bytes())) == 1  # compacted: one mark, no torn bytes
            p2 = ReceivePipeline("orch", dep.roster, g2)
            with pytest.raises(RejectedMessage) as ei:
                p2.accept(frames[1])
            assert ei.value.reason == "replay"
            p2.accept(frames[2])  # its record was lost in the crash, so it is new to this guard
        finally:
            g2.close()
        g3 = ReplayGuard(clock, journal=journal)
        assert g3.marks()[("h1", "orch")][1] == 3
        g3.close()


def test_journal_cut_inside_a_length_prefix(dep, clock, journal):
    g = ReplayGuard(clock, journal=journal)
    _accept_some(dep, clock, g)
    g.close()
    data = journal.read_bytes()
    journal.write_bytes(data + b"\x00")  # one byte of the next record's length
    g = ReplayGuard(clock, journal=journal)
    assert len(g.marks()) == 3
    g.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\xc1",  # never-used msgpack byte
        b"\x00\x05hello",  # decodes to 104 with extra data
        b"\x00\x01\x05",  # a bare int, not a record
        b"\x00\x02\xa1m",  # the string "m"
        b"\x00\x03\x92\xa1f\xa1x",  # ["f", "x"]: fence not an int
        b"\x00\x01\x90",  # []
        b"\x00\x04\x93\xa1m\x01\x02",  # ["m", 1, 2]: wrong length
        b"\x00\x03\x92\xa1z\x01",  # unknown record kind
    ],
)
def test_corrupt_journal_is_a_one_line_config_error_naming_the_file(garbage, dep, clock, journal):
    g = ReplayGuard(clock, journal=journal)
    _accept_some(dep, clock, g)
    g.close()
    good = journal.read_bytes()
    for data in (garbage + good, good + garbage + good):
        journal.write_bytes(data)
        with pytest.raises(ConfigError) as ei:
            ReplayGuard(clock, journal=journal)
        msg = str(ei.value)
        assert str(journal) in msg
        assert "corrupt" in msg
        assert "\n" not in msg
        assert journal.read_bytes() == data  # the evidence is left alone


def test_a_mark_record_with_wrong_field_types_is_corrupt(clock, journal):
    journal.parent.mkdir(parents=True)
    rec = msgpack.packb(["m", "h1", "orch", "not-bytes", 3], use_bin_type=True)
    journal.write_bytes(struct.pack(">H", len(rec)) + rec)
    with pytest.raises(ConfigError, match="replay journal corrupt"):
        ReplayGuard(clock, journal=journal)


def test_check_has_no_side_effects_and_commit_records(dep, clock):
    g = ReplayGuard(clock)
    s = MessageSigner(dep.h1, clock)
    header = parse_header(s.sign(Echo(b"", ""), "orch")[1][1])
    for _ in range(3):
        g.check(header, fenced=False)
    assert g.marks() == {}
    g.commit(header)
    assert g.marks() == {("h1", "orch"): (s.session, 1)}
    with pytest.raises(RejectedMessage):
        g.check(header, fenced=False)
