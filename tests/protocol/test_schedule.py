"""Tests of the hop schedule (gtbus.protocol.schedule): order, retries, checkpoint state."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gtbus.protocol.schedule import Assignment, Schedule


def drain(s: Schedule, fail: set[tuple[int, str, int]] = frozenset()) -> list[tuple[int, str, int, str]]:
    """Run ``s`` to the end; hops in ``fail`` fail every attempt. Returns (round, holder, chunk, result)."""
    out = []
    while (a := s.next()) is not None:
        if (a.round, a.holder, a.chunk) in fail:
            out.append((a.round, a.holder, a.chunk, "retry" if s.fail(a) else "skip"))
        else:
            s.complete(a)
            out.append((a.round, a.holder, a.chunk, "ok"))
    return out


def test_round_robin_over_holders_chunk_by_chunk() -> None:
    s = Schedule({"h2": 3, "h1": 2, "h3": 1}, rounds=1)
    got = [(h, c) for _, h, c, _ in drain(s)]
    assert got == [("h1", 0), ("h2", 0), ("h3", 0), ("h1", 1), ("h2", 1), ("h2", 2)]
    assert s.next() is None and s.skipped == []


def test_every_round_visits_every_chunk_once() -> None:
    s = Schedule({"h1": 2, "h2": 1}, rounds=3)
    got = drain(s)
    assert [(r, h, c) for r, h, c, _ in got] == [(r, h, c) for r in range(3) for h, c in (("h1", 0), ("h2", 0), ("h1", 1))]
    assert s.round == 2


def test_next_is_stable_until_the_hop_is_settled() -> None:
    s = Schedule({"h1": 2}, rounds=1)
    assert s.next() == s.next() == Assignment(0, "h1", 0)


def test_failed_hop_is_retried_at_the_end_of_the_round_then_skipped() -> None:
    s = Schedule({"h1": 2, "h2": 2}, rounds=2, max_attempts=2)
    got = drain(s, fail={(0, "h1", 0)})
    assert got[:6] == [
        (0, "h1", 0, "retry"),
        (0, "h2", 0, "ok"),
        (0, "h1", 1, "ok"),
        (0, "h2", 1, "ok"),
        (0, "h1", 0, "skip"),  # second attempt, at the end of the round
        (1, "h1", 0, "ok"),  # a new round offers it again
    ]
    assert s.skipped == [(0, "h1", 0)]
    assert len(got) == 9


def test_a_retry_that_succeeds_is_not_skipped() -> None:
    s = Schedule({"h1": 1, "h2": 1}, rounds=1, max_attempts=3)
    a = s.next()
    assert s.fail(a) is True
    assert s.next() == Assignment(0, "h2", 0)
    s.complete(s.next())
    assert s.next() == a
    assert s.fail(a) is True
    s.complete(s.next())
    assert s.next() is None and s.skipped == []


def test_max_attempts_one_means_no_retry() -> None:
    s = Schedule({"h1": 1}, rounds=1, max_attempts=1)
    assert s.fail(s.next()) is False
    assert s.next() is None and s.skipped == [(0, "h1", 0)]


def test_settling_a_hop_of_another_round_is_refused() -> None:
    s = Schedule({"h1": 1}, rounds=2)
    with pytest.raises(ValueError, match="round 1"):
        s.complete(Assignment(1, "h1", 0))
    with pytest.raises(ValueError):
        s.fail(Assignment(1, "h1", 0))


def test_rounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Schedule({"h1": 1}, rounds=0)


def test_an_undelivered_hop_is_deferred_without_using_an_attempt() -> None:
    s = Schedule({"h1": 2, "h2": 1}, rounds=1, max_attempts=1)
    a = s.next()
    assert a == Assignment(0, "h1", 0)
    s.defer(a)
    # The rest of the round comes first, then the deferred chunk, at the end of the round.
    for want in (Assignment(0, "h2", 0), Assignment(0, "h1", 1)):
        assert s.next() == want
        s.complete(want)
    for _ in range(5):  # however often the holder is unreachable, its chunk is not lost
        assert s.next() == a
        s.defer(a)
    assert s.next() == a
    s.complete(a)
    assert s.next() is None and s.finished and s.skipped == [] and s.attempts == {}


def test_an_unavailable_holder_is_passed_over_and_served_at_the_end_of_the_round() -> None:
    s = Schedule({"h1": 2, "h2": 2}, rounds=2)
    away = {"h1"}
    got = []
    while (a := s.next(lambda h: h not in away)) is not None:
        got.append((a.round, a.holder, a.chunk))
        s.complete(a)
    # Only h1's work is left: the schedule waits instead of moving on or dropping it.
    assert got == [(0, "h2", 0), (0, "h2", 1)]
    assert not s.finished and s.pending_holders() == ["h1"]
    away.clear()
    rest = []
    while (a := s.next(lambda h: h not in away)) is not None:
        rest.append((a.round, a.holder, a.chunk))
        s.complete(a)
    assert rest[:2] == [(0, "h1", 0), (0, "h1", 1)]  # round 0 ends only when h1's chunks are trained
    assert rest[2:] == [(1, "h1", 0), (1, "h2", 0), (1, "h1", 1), (1, "h2", 1)]
    assert s.finished


def test_state_does_not_grow_with_chunk_counts() -> None:
    small = json.dumps(Schedule({"h1": 3, "h2": 3}, rounds=1).to_state())
    huge = json.dumps(Schedule({"h1": 10**9, "h2": 10**9}, rounds=1).to_state())
    assert len(huge) - len(small) < 32  # only the digits of the counts differ


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"chunks": {"h1": -1}, "rounds": 1, "max_attempts": 1, "round": 0, "cursor": [0, 0], "requeued": [], "attempts": [], "skipped": []},
        {"chunks": {"h1": 1}, "rounds": 1, "max_attempts": 1, "round": 5, "cursor": [0, 0], "requeued": [], "attempts": [], "skipped": []},
        {"chunks": {"h1": 1}, "rounds": 1, "max_attempts": 1, "round": 0, "cursor": "x", "requeued": [], "attempts": [], "skipped": []},
        {"chunks": {"h1": 1}, "rounds": 1, "max_attempts": 1, "round": 0, "cursor": [0, 9], "requeued": [], "attempts": [], "skipped": []},
        {"chunks": {"h1": 1}, "rounds": 1, "max_attempts": 1, "round": 0, "cursor": [0, 0], "requeued": [[1]], "attempts": [], "skipped": []},
    ],
)
def test_a_damaged_saved_state_is_refused(state: dict) -> None:
    with pytest.raises(ValueError, match="schedule|chunk count"):
        Schedule.from_state(state)


def test_settling_a_hop_that_is_not_pending_is_refused() -> None:
    s = Schedule({"h1": 2}, rounds=1)
    with pytest.raises(ValueError, match="not pending"):
        s.complete(Assignment(0, "h1", 1))


def test_holder_without_chunks_gets_no_hops() -> None:
    s = Schedule({"h1": 0, "h2": 1}, rounds=1)
    assert [(h, c) for _, h, c, _ in drain(s)] == [("h2", 0)]
    assert Schedule({}, rounds=2).next() is None


def _json_round_trip(s: Schedule) -> Schedule:
    # Checkpoints keep the state as JSON, so tuples come back as lists.
    return Schedule.from_state(json.loads(json.dumps(s.to_state())))


def test_state_round_trip_mid_round_continues_identically() -> None:
    fail = {(0, "h1", 1), (0, "h3", 0), (1, "h2", 0)}
    s = Schedule({"h1": 2, "h2": 1, "h3": 2}, rounds=2, max_attempts=2)
    # Play into the middle of round 0, with one retry pending.
    for _ in range(4):
        a = s.next()
        if (a.round, a.holder, a.chunk) in fail:
            s.fail(a)
        else:
            s.complete(a)
    copy = _json_round_trip(s)
    assert copy.to_state() == s.to_state()
    assert drain(copy, fail) == drain(s, fail)
    assert copy.skipped == s.skipped and copy.round == s.round


def test_state_round_trip_keeps_skips_and_attempts() -> None:
    s = Schedule({"h1": 1, "h2": 1}, rounds=1, max_attempts=2)
    a = s.next()
    s.fail(a)
    s.complete(s.next())
    s.fail(s.next())  # second failure: skipped
    copy = _json_round_trip(s)
    assert copy.skipped == [(0, "h1", 0)]
    assert copy.attempts == {("h1", 0): 2}
    assert copy.requeued == []
    assert copy.next() is None


@settings(max_examples=150, deadline=None)
@given(
    chunks=st.dictionaries(st.sampled_from(["h1", "h2", "h3", "h4"]), st.integers(0, 4), min_size=1),
    rounds=st.integers(1, 3),
    max_attempts=st.integers(1, 3),
    outcomes=st.lists(st.sampled_from(["ok", "fail", "defer"]), max_size=200),
    cut=st.integers(0, 60),
    away=st.lists(st.frozensets(st.sampled_from(["h1", "h2", "h3", "h4"])), max_size=8),
)
def test_property_each_chunk_trained_at_most_once_per_round(
    chunks: dict[str, int], rounds: int, max_attempts: int, outcomes: list[str], cut: int, away: list[frozenset[str]]
) -> None:
    s = Schedule(chunks, rounds, max_attempts=max_attempts)
    trained: list[tuple[int, str, int]] = []
    tries: dict[tuple[int, str, int], int] = {}
    step = defers = 0
    while True:
        # Holders come and go; once the outages are over every holder is back (liveness).
        gone = away[step] if step < len(away) else frozenset()
        a = s.next(lambda h: h not in gone)
        if a is None:
            if s.finished:
                break
            assert gone, "the schedule waits only while some holder is away"
            step += 1
            continue
        if step == cut:
            s = _json_round_trip(s)  # a checkpoint and resume anywhere changes nothing
            assert s.next(lambda h: h not in gone) == a
        assert a.holder not in gone
        key = (a.round, a.holder, a.chunk)
        outcome = outcomes[step % len(outcomes)] if outcomes else "ok"
        if outcome == "defer" and defers < 50:
            defers += 1
            s.defer(a)
        elif outcome == "fail":
            tries[key] = tries.get(key, 0) + 1
            assert tries[key] <= max_attempts
            s.fail(a)
        else:
            s.complete(a)
            trained.append(key)
        step += 1
        assert step <= rounds * sum(chunks.values()) * max_attempts + 50 + len(away) + 1
    everything = {(r, h, c) for r in range(rounds) for h, n in chunks.items() for c in range(n)}
    assert len(trained) == len(set(trained))
    # Every chunk of every round was either trained or reported skipped, never both.
    assert set(trained) | set(s.skipped) == everything
    assert not set(trained) & set(s.skipped)
