"""Hop phase marks (gtbus.nodes.hop_phases): bounded, first mark wins, read back as a person reads them."""

from __future__ import annotations

from gtbus.nodes.hop_phases import HOLDER_PHASES, ORCHESTRATOR_PHASES, PhaseClock, describe, durations, parse_described


def test_only_known_phases_and_only_their_first_mark() -> None:
    c = PhaseClock(("a", "b"))
    c.mark("a")
    first = c.marks["a"]
    for _ in range(1000):  # a peer repeating a message cannot grow a hop's marks
        c.mark("a")
        c.mark("made-up")
    c.mark("b")
    assert list(c.marks) == ["a", "b"] and c.marks["a"] == first
    assert 0 <= c.marks["a"] <= c.marks["b"]
    assert list(c.as_dict()) == ["a", "b"]


def test_durations_follow_time_not_declared_order() -> None:
    # An ack may arrive before the token state is published: the gaps stay positive.
    marks = {"grant_sent": 0.001, "state_published": 0.004, "ack_received": 0.003}
    assert [(n, round(s, 6)) for n, s in durations(marks)] == [("grant_sent", 0.001), ("ack_received", 0.002), ("state_published", 0.001)]


def test_a_described_line_reads_back() -> None:
    marks = {"params_opened": 0.0002, "report_verified": 0.00035, "ack_sent": 0.0006}
    line = describe(marks)
    assert line == "params_opened 0.20, report_verified 0.15, ack_sent 0.25"
    assert [(n, round(s, 6)) for n, s in parse_described(line)] == [("params_opened", 0.0002), ("report_verified", 0.00015), ("ack_sent", 0.00025)]
    assert parse_described("garbage, x y, ok 1.5") == [("ok", 0.0015)]


def test_phase_names_are_distinct() -> None:
    assert len(set(ORCHESTRATOR_PHASES)) == len(ORCHESTRATOR_PHASES)
    assert len(set(HOLDER_PHASES)) == len(HOLDER_PHASES)
