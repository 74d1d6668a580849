"""Tests of the fleet schedule (gtbus.protocol.fleet): K lanes over one Schedule, one lane per holder, fairness, checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gtbus.protocol.fleet import FleetSchedule
from gtbus.protocol.schedule import Assignment, Schedule

CHUNKS = st.dictionaries(st.sampled_from(["h1", "h2", "h3", "h4", "h5"]), st.integers(0, 4), min_size=1, max_size=5)


@dataclass
class Drive:
    """A random run of next_for/release with an independent account of what happened."""

    fleet: FleetSchedule
    trained: list[tuple[int, str, int]] = field(default_factory=list)
    failures: dict[tuple[int, str, int], int] = field(default_factory=dict)
    assignments: int = 0
    # holder -> assignments to others since it became free, available and due (see fleet.py's fairness rule)
    waited: dict[str, int] = field(default_factory=dict)
    worst_wait: int = 0

    def check_lanes(self) -> None:
        f = self.fleet
        held = [f.lane_of(k) for k in range(f.lanes)]
        holders = [a.holder for a in held if a is not None]
        assert len(holders) == len(set(holders)), f"a holder on two lanes: {held}"
        for k, a in enumerate(held):
            if a is not None:
                assert f.holder_on(a.holder) == k

    def due(self, holder: str, available: set[str]) -> bool:
        """The fairness rule's premise: free, available, and its next chunk owed or still in the round's order."""
        f, s = self.fleet, self.fleet.schedule
        if holder not in available or f.holder_on(holder) is not None:
            return False
        if any(h == holder for h, _ in f._owed):
            return True
        done = {(h, c) for r, h, c in self.trained if r == s.round} | {(h, c) for r, h, c in s.skipped if r == s.round}
        pending = {(holder, c) for c in range(s.chunks.get(holder, 0))} - done - set(s.requeued)
        return bool(pending)

    def ask(self, lane: int, available: set[str]) -> Assignment | None:
        f = self.fleet
        due = {h for h in f.schedule.chunks if self.due(h, available)}
        for h in list(self.waited):
            if h not in due:
                del self.waited[h]
        a = f.next_for(lane, lambda h: h in available)
        self.check_lanes()
        if a is None:
            assert not due, f"{sorted(due)} were due and lane {lane} got nothing"
            return None
        assert a.holder in available
        self.assignments += 1
        for h in due:
            if h == a.holder:
                self.waited.pop(h, None)
            else:
                self.waited[h] = self.waited.get(h, 0) + 1
                self.worst_wait = max(self.worst_wait, self.waited[h])
        return a

    def end(self, lane: int, outcome: str) -> None:
        a = self.fleet.lane_of(lane)
        assert a is not None
        key = (a.round, a.holder, a.chunk)
        if outcome == "done":
            assert key not in self.trained, f"{key} trained twice"
            self.trained.append(key)
        elif outcome == "failed":
            self.failures[key] = self.failures.get(key, 0) + 1
        self.fleet.release(lane, outcome)
        assert self.fleet.holder_on(a.holder) is None and self.fleet.lane_of(lane) is None


def every_chunk(s: Schedule) -> set[tuple[int, str, int]]:
    return {(r, h, c) for r in range(s.rounds) for h, n in s.chunks.items() for c in range(n)}


def run(data: st.DataObject, fleet: FleetSchedule, *, outcomes: list[str], flaky: bool, steps: int = 2000,
        trained: list[tuple[int, str, int]] | None = None) -> Drive:
    """Drive ``fleet`` with random asks and ends until it finishes (availability random when ``flaky``);
    ``trained``: what a run before a resume trained."""
    d = Drive(fleet, trained=list(trained or []))
    holders = sorted(fleet.schedule.chunks)
    for _ in range(steps):
        if fleet.finished:
            break
        idle = [k for k in range(fleet.lanes) if fleet.lane_of(k) is None]
        busy = fleet.busy_lanes()
        if idle and (not busy or data.draw(st.booleans())):
            available = set(holders)
            if flaky:
                available = {h for h in holders if data.draw(st.integers(0, 3))}
            if d.ask(data.draw(st.sampled_from(idle)), available) is not None or busy or fleet.finished:
                continue
            if not flaky:
                raise AssertionError("nothing to do, nothing busy, and the fleet is not finished")
        elif busy:
            d.end(data.draw(st.sampled_from(busy)), data.draw(st.sampled_from(outcomes)))
        # A round left only with skipped or given-up work: as the orchestrator does after waiting.
        # Asked through the Drive, so the fairness account sees this assignment too.
        if flaky and not fleet.busy_lanes() and d.ask(0, set(holders)) is not None:
            d.end(0, "done")
    assert fleet.finished, "the fleet did not finish"
    return d


@settings(max_examples=200, deadline=None)
@given(data=st.data(), chunks=CHUNKS, rounds=st.integers(1, 3), lanes=st.integers(1, 6))
def test_when_every_hop_succeeds_every_chunk_of_every_round_trains_once(data: st.DataObject, chunks: dict[str, int], rounds: int,
                                                                       lanes: int) -> None:
    fleet = FleetSchedule(Schedule(chunks, rounds), lanes)
    d = run(data, fleet, outcomes=["done"], flaky=False)
    assert sorted(d.trained) == sorted(every_chunk(fleet.schedule))
    assert fleet.schedule.skipped == []
    assert d.worst_wait <= 2 * (len(chunks) - 1), d.worst_wait


@settings(max_examples=200, deadline=None)
@given(data=st.data(), chunks=CHUNKS, rounds=st.integers(1, 2), lanes=st.integers(1, 6), attempts=st.integers(1, 3),
       flaky=st.booleans())
def test_failures_and_deferrals_keep_the_schedules_rules(data: st.DataObject, chunks: dict[str, int], rounds: int, lanes: int,
                                                        attempts: int, flaky: bool) -> None:
    fleet = FleetSchedule(Schedule(chunks, rounds, max_attempts=attempts), lanes)
    d = run(data, fleet, outcomes=["done", "done", "failed", "deferred"], flaky=flaky)
    s = fleet.schedule
    skipped = {tuple(x) for x in s.skipped}
    # Each chunk of each round is trained once, or skipped (and reported) once; never both.
    assert len(d.trained) == len(set(d.trained))
    assert set(d.trained) | skipped == every_chunk(s) and not set(d.trained) & skipped
    # Retries are bounded as the Schedule's: a skipped chunk failed max_attempts times, at most (or its holder was given up on).
    assert all(n <= attempts for n in d.failures.values()), d.failures
    assert d.worst_wait <= 2 * (len(chunks) - 1), d.worst_wait


@settings(max_examples=150, deadline=None)
@given(data=st.data(), chunks=CHUNKS, rounds=st.integers(1, 2), attempts=st.integers(1, 3))
def test_one_lane_is_the_schedule_alone(data: st.DataObject, chunks: dict[str, int], rounds: int, attempts: int) -> None:
    fleet, alone = FleetSchedule(Schedule(chunks, rounds, max_attempts=attempts), 1), Schedule(chunks, rounds, max_attempts=attempts)
    holders = sorted(chunks)
    for _ in range(200):
        available = {h for h in holders if data.draw(st.integers(0, 3))}
        a, b = fleet.next_for(0, lambda h: h in available), alone.next(lambda h: h in available)
        assert a == b
        if a is None:
            if alone.finished:
                break
            continue
        assert b is not None
        outcome = data.draw(st.sampled_from(["done", "failed", "deferred"]))
        fleet.release(0, outcome)
        {"done": alone.complete, "failed": alone.fail, "deferred": alone.defer}[outcome](b)
        assert fleet.schedule.to_state() == alone.to_state()


@settings(max_examples=150, deadline=None)
@given(data=st.data(), chunks=CHUNKS, rounds=st.integers(1, 2), lanes=st.integers(2, 5), cut=st.integers(0, 40))
def test_state_round_trip_mid_run_puts_hops_in_flight_back(data: st.DataObject, chunks: dict[str, int], rounds: int, lanes: int,
                                                          cut: int) -> None:
    fleet = FleetSchedule(Schedule(chunks, rounds), lanes)
    d = Drive(fleet)
    for _ in range(cut):
        idle = [k for k in range(lanes) if fleet.lane_of(k) is None]
        if idle and data.draw(st.booleans()):
            d.ask(idle[0], set(chunks))
        elif fleet.busy_lanes():
            d.end(fleet.busy_lanes()[0], "done")
    in_flight = [fleet.lane_of(k) for k in fleet.busy_lanes()]
    saved = json.loads(json.dumps(fleet.to_state()))  # what a checkpoint file holds
    resumed = FleetSchedule.from_state(saved)
    assert resumed.busy_lanes() == [] and resumed.lanes == lanes and resumed.to_state() == fleet.to_state()
    # The resumed run trains exactly what the first had not finished, in-flight hops included.
    rest = run(data, resumed, outcomes=["done"], flaky=False, trained=d.trained)
    assert sorted(rest.trained) == sorted(every_chunk(resumed.schedule))  # no chunk twice, none lost
    assert {(a.round, a.holder, a.chunk) for a in in_flight if a is not None} <= set(rest.trained[len(d.trained):])


def test_a_busy_holder_is_owed_its_chunk_and_served_first_when_free() -> None:
    fleet = FleetSchedule(Schedule({"h1": 3, "h2": 1, "h3": 1}, 1), 2)
    assert fleet.next_for(0) == Assignment(0, "h1", 0)
    assert fleet.next_for(1) == Assignment(0, "h2", 0)
    fleet.release(1, "done")
    assert fleet.next_for(1) == Assignment(0, "h3", 0)  # h1 c1 is next in order: h1 is on lane 0, so it is owed
    fleet.release(1, "done")
    assert fleet.next_for(1) is None  # only h1 has work, and it is busy
    fleet.release(0, "done")
    assert [fleet.next_for(0), fleet.holder_on("h1")] == [Assignment(0, "h1", 1), 0]
    fleet.release(0, "done")
    assert fleet.next_for(1) == Assignment(0, "h1", 2)
    fleet.release(1, "done")
    assert fleet.finished and fleet.next_for(0) is None


def test_a_round_starts_only_when_every_hop_of_the_last_one_settled() -> None:
    fleet = FleetSchedule(Schedule({"h1": 1, "h2": 1}, 2), 3)
    a, b = fleet.next_for(0), fleet.next_for(1)
    assert (a, b) == (Assignment(0, "h1", 0), Assignment(0, "h2", 0))
    assert fleet.next_for(2) is None  # round 1's h1 c0 waits: h1's round-0 hop may still fail and need its retry
    fleet.release(0, "failed")
    assert fleet.next_for(0) == Assignment(0, "h1", 0)  # the retry, in round 0
    fleet.release(1, "done")
    fleet.release(0, "done")
    assert fleet.next_for(2) == Assignment(1, "h1", 0)


def test_giving_up_on_a_holder_on_a_lane_is_refused() -> None:
    fleet = FleetSchedule(Schedule({"h1": 2, "h2": 1}, 1), 2)
    fleet.next_for(0)
    with pytest.raises(ValueError, match="h1 is on lane 0"):
        fleet.give_up("h1")
    assert fleet.pending_holders() == ["h2"]


@pytest.mark.parametrize(
    "call, says",
    [
        (lambda f: f.next_for(2), "no lane 2"),
        (lambda f: f.next_for(-1), "no lane -1"),
        (lambda f: f.next_for(True), "no lane True"),
        (lambda f: f.lane_of("0"), "no lane '0'"),
        (lambda f: f.release(1, "done"), "lane 1 has no hop"),
        (lambda f: f.release(0, "won"), "outcome must be one of"),
        (lambda f: (f.next_for(0), f.next_for(0)), "lane 0 is busy with h1 chunk 0"),
    ],
)
def test_misuse_is_refused_with_a_reason(call: object, says: str) -> None:
    fleet = FleetSchedule(Schedule({"h1": 2, "h2": 1}, 1), 2)
    with pytest.raises(ValueError, match=says):
        call(fleet)  # type: ignore[operator]


@pytest.mark.parametrize("lanes", [0, -1, 1.5, "2", True])
def test_lane_count_must_be_a_positive_int(lanes: object) -> None:
    with pytest.raises(ValueError, match="lanes must be a positive int"):
        FleetSchedule(Schedule({"h1": 1}, 1), lanes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"lanes": 2, "schedule": {}, "owed": []},
        {"lanes": 0, "schedule": Schedule({"h1": 1}, 1).to_state(), "owed": []},
        {"lanes": 2, "schedule": Schedule({"h1": 1}, 1).to_state(), "owed": [["h1", 0]]},  # owed, yet not put back
        {"lanes": 2, "schedule": Schedule({"h1": 1}, 1).to_state(), "owed": "h1"},
    ],
)
def test_a_damaged_saved_state_is_refused(state: dict) -> None:
    with pytest.raises(ValueError, match="not a saved fleet schedule|lanes must be"):
        FleetSchedule.from_state(state)


def test_a_holder_back_from_a_long_hop_does_not_catch_up_ahead_of_the_others() -> None:
    """g is busy on lane 0 while lane 1 goes round the others, level after level: g is owed one chunk
    only (the rest wait at the end of the round), so once free it takes one turn, not six in a row."""
    fleet = FleetSchedule(Schedule({"g": 8, "h": 8, "x": 8}, 1), 2)
    assert fleet.next_for(0) == Assignment(0, "g", 0)  # a long hop
    served = []
    for _ in range(12):  # levels 0..5 of h and x on lane 1; g's chunks 1..6 are passed over meanwhile
        a = fleet.next_for(1)
        assert a is not None
        served.append((a.holder, a.chunk))
        fleet.release(1, "done")
    assert served == [(h, k) for k in range(6) for h in ("h", "x")]
    assert fleet.next_for(1) == Assignment(0, "h", 6)  # a long hop on lane 1 now
    fleet.release(0, "done")
    turns = []
    for _ in range(2):  # lane 0 alone serves g and x, each hop ending at once
        a = fleet.next_for(0)
        assert a is not None
        turns.append((a.holder, a.chunk))
        fleet.release(0, "done")
    assert turns == [("g", 1), ("x", 6)]  # not g 1, 2, 3, 4, 5, 6 while x waits


# -- reopen: a completed hop whose training was thrown away ------------------------------------------


def test_reopened_hops_are_trained_again_in_the_same_round_and_the_round_waits_for_them() -> None:
    f = FleetSchedule(Schedule({"h1": 2, "h2": 2}, rounds=2), lanes=2)
    done = []
    for _ in range(2):
        for lane in (0, 1):
            done.append(f.next_for(lane))
        for lane in (0, 1):
            f.release(lane, "done")
    assert [(a.holder, a.chunk) for a in done] == [("h1", 0), ("h2", 0), ("h1", 1), ("h2", 1)]
    assert f.round_settled and f.schedule.round == 0  # round 1 starts only at the next ask

    f.reopen([done[0], done[3]])  # lane 0's replica trained these, and was rolled back
    assert not f.round_settled and f.pending_holders() == ["h1", "h2"]
    again = [f.next_for(0), f.next_for(1)]
    assert [(a.round, a.holder, a.chunk) for a in again] == [(0, "h1", 0), (0, "h2", 1)]
    assert f.schedule.attempts == {}  # no attempt used: the hops had not failed
    f.release(0, "done")
    f.release(1, "done")
    assert f.round_settled
    assert f.next_for(0) == Assignment(1, "h1", 0)


@pytest.mark.parametrize(
    "what, match",
    [
        (Assignment(0, "h1", 1), "not a completed hop"),  # still in the round's order
        (Assignment(0, "h2", 0), "on lane 1"),  # in flight
        (Assignment(1, "h1", 0), "schedule is in round 0"),
        (Assignment(0, "h1", 7), "has no chunk 7"),
        (Assignment(0, "h9", 0), "has no chunk 0"),
    ],
)
def test_reopen_refuses_what_was_not_completed_and_reopens_nothing(what: Assignment, match: str) -> None:
    f = FleetSchedule(Schedule({"h1": 2, "h2": 2}, rounds=2), lanes=2)
    first = f.next_for(0)
    f.release(0, "done")
    f.next_for(1)  # h2 chunk 0, in flight
    state = f.to_state()
    with pytest.raises(ValueError, match=match):
        f.reopen([first, what])
    assert f.to_state() == state  # the valid one before it was not reopened either


def test_reopen_refuses_a_chunk_pending_again_failed_out_or_given_twice() -> None:
    f = FleetSchedule(Schedule({"h1": 1, "h2": 1}, rounds=1, max_attempts=1), lanes=1)
    a = f.next_for(0)
    f.release(0, "done")
    with pytest.raises(ValueError, match="twice"):
        f.reopen([a, a])
    f.reopen([a])
    with pytest.raises(ValueError, match="not a completed hop"):
        f.reopen([a])  # pending again
    b = f.next_for(0)
    assert b == Assignment(0, "h2", 0)
    f.release(0, "failed")  # skipped: one attempt
    with pytest.raises(ValueError, match="not a completed hop"):
        f.reopen([b])


def test_reopened_hops_survive_a_checkpoint() -> None:
    f = FleetSchedule(Schedule({"h1": 2}, rounds=1), lanes=2)
    a = f.next_for(0)
    f.release(0, "done")
    f.reopen([a])
    g = FleetSchedule.from_state(json.loads(json.dumps(f.to_state())))
    assert g.next_for(1) == Assignment(0, "h1", 1) and g.next_for(0) is None  # h1 is on lane 1
    g.release(1, "done")
    assert g.next_for(0) == a


@settings(max_examples=150, deadline=None)
@given(data=st.data(), chunks=CHUNKS, rounds=st.integers(1, 2), lanes=st.integers(1, 3))
def test_the_likely_next_hop_changes_nothing_and_is_the_next_after_a_success(data: st.DataObject, chunks: dict[str, int],
                                                                             rounds: int, lanes: int) -> None:
    # The guess the orchestrator prepares the next hop from (gtbus.nodes.hop_prepare): with the same
    # availability, a lane whose hop completes is handed exactly the guessed assignment.
    fleet = FleetSchedule(Schedule(chunks, rounds), lanes)
    holders = sorted(chunks)
    compared = 0
    for _ in range(300):
        if fleet.finished:
            break
        available = {h for h in holders if data.draw(st.integers(0, 3))}
        lane = data.draw(st.integers(0, lanes - 1))
        before = json.dumps(fleet.to_state(), sort_keys=True), fleet.busy_lanes(), fleet.lane_of(lane)
        guess = fleet.likely_next(lane, lambda h: h in available)
        assert (json.dumps(fleet.to_state(), sort_keys=True), fleet.busy_lanes(), fleet.lane_of(lane)) == before
        if fleet.lane_of(lane) is not None:
            outcome = data.draw(st.sampled_from(["done", "done", "failed", "deferred"]))
            fleet.release(lane, outcome)
            if outcome != "done":
                continue  # the guess assumed a success: it may be wrong, and is thrown away
        got = fleet.next_for(lane, lambda h: h in available)
        assert got == guess
        compared += 1
        if got is None and not fleet.busy_lanes():
            fleet.next_for(lane)  # every holder back, as the orchestrator waits for: the run goes on
    assert compared or fleet.finished
