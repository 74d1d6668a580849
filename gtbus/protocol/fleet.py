"""Which holder each GPU lane trains next: a :class:`Schedule` shared by K lanes.

A *lane* is one GPU token (its own token machine, device, replica and staging).
This module maps idle lanes to the Schedule's assignments; the Schedule keeps
what it always kept (rounds, each chunk at most once per round, retries,
deferrals, give-ups). Rules:

* A holder is on at most one lane at a time: it provisions into one GPU at a
  time. Its assignment is the lane's until :meth:`FleetSchedule.release`.
* With one lane, the sequence is exactly :meth:`Schedule.next`'s (no holder is
  ever busy when the only lane asks).
* When the Schedule's next chunk belongs to a holder that is on another lane,
  the chunk is passed over (the Schedule puts it at the end of the round) and
  *owed*: it is served, ahead of the Schedule's order, as soon as its holder is
  free and available. A holder has at most one owed chunk; a second one passed
  over while it is still busy waits at the end of the round like any put-back
  chunk. The owed list is served first come, first served.
* Fairness, the bound this module keeps (``tests/protocol/test_fleet_schedule.py``
  checks it on random runs): a holder that is free and available at every ask,
  whose next chunk is owed or still in the round's order (not put back at the
  end by a failure, a deferral or the caller's unavailability), is assigned
  within ``2 * (H - 1)`` assignments, H holders, whatever K. Proof: at most
  H - 1 owed chunks (one per other holder) can be ahead of it; of the round's
  order, at most H - 1 chunks (one per other holder, one level of the
  round-robin) lie before its chunk, and each is either assigned or passed
  over into the owed list (one assignment either way). A chunk put back at the
  end of the round waits for the round's order to drain, as with one lane.
* Rounds are barriers: round r + 1 starts only when every hop of round r has
  settled (a hop in flight may still fail and need its retry in round r). Every
  lane is then idle: that is a merge point (see the orchestrator).
* A chunk whose training is thrown away goes back into the schedule, untrained,
  in the same round (:meth:`FleetSchedule.reopen`): a lane rolled back to the
  last merge, or retired, loses what its replica trained since, and those hops
  are done again, so every chunk of a round ends up in the final model exactly
  once and nothing counts as done that the model does not hold. That needs what
  a replica trained since the last merge to be of the current round: the
  orchestrator merges (and checkpoints) at every round's end
  (:attr:`FleetSchedule.round_settled`), before the next round's first hop.
* A checkpoint (:meth:`FleetSchedule.to_state`) keeps no lane: hops in flight
  are still pending in the Schedule, so a resumed run does them again.
* Waves (``waves=True``, the lockstep merge, :mod:`gtbus.training.lockstep`):
  hops start only while no lane has one in flight
  (:attr:`FleetSchedule.may_start`), so the hops handed out together, one per
  idle lane in one pass of the caller's, are a wave that trains side by side
  and ends before the next starts: the same barrier a merge every
  ``merge_every`` hops is, after every wave. A lane idle when a wave starts
  (no available holder for it) sits the wave out; the fairness bound above
  counts assignments and holds in waves too.

Decisions for the orchestrator that runs lanes (the simulator's shell,
:mod:`gtbus.testing.sim.orchestrator`, keeps them and ``gtbus sim --gpus K``
checks them): epochs come from one counter for every lane (each grant takes
the next, the disk reservation is shared), so each token's epochs strictly
increase; the replay guard's fence is the lowest epoch still in flight across
lanes (so a slower lane's current hop is never refused); messages go to the
lane whose token id they carry; a device agent stages one hop at a time (a
stage request replaces the one before, :mod:`gtbus.protocol.agent_stage`), so
a remote holder is offered to a lane (``available``) only while its agent
stages no other lane's hop: two lanes through one agent would revoke each
other's hops (the simulator measured it: two remote holders, two lanes, 5 of
24 hops revoked and the run 12 times longer in simulated time); every ``merge_every`` trained hops no new hop
starts until none is in flight, then the replicas are averaged and, with
K > 1, only then checkpointed (and at every round's end, and when the run
stops or ends), so a resume starts every lane from one model and redoes what
was trained since; a hop that rolls back (model or code changed while a holder
held the token) restores its lane's replica to the checkpoint (with K > 1 the
last merge) and reopens the hops that lane trained since, as a retired lane's
are reopened. Rolling back to the hop's own start instead would need a copy of
model and optimizer state per hop in flight (GPT-2 124M with AdamW: 1.5 GB a
lane), held on the device for every hop, to save retraining the few hops one
lane trains between two merges in the rare hop that rolls back, and a retired
lane's replica is gone whatever was copied: its hops must be reopened anyway,
so one mechanism serves both; a run that stops with a
reason while other lanes have hops in flight leaves them to the process's
exit (keys gone, staging discarded on resume, their chunks still pending).

No I/O, no clock: the caller says when hops end.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Mapping

from gtbus.protocol.schedule import _ALWAYS, Assignment, Schedule

#: What :meth:`FleetSchedule.release` accepts, and the Schedule call each one makes.
OUTCOMES = ("done", "failed", "deferred")


class FleetSchedule:
    """Maps idle lanes to (holder, chunk) assignments of a Schedule; a holder is on at most one lane at a time."""

    def __init__(self, schedule: Schedule, lanes: int, *, waves: bool = False) -> None:
        """``waves``: hops start in waves, only while no lane is busy (see the module's rules)."""
        if type(lanes) is not int or lanes < 1:
            raise ValueError(f"lanes must be a positive int, got {lanes!r}")
        self.schedule = schedule
        self.lanes = lanes
        self.waves = waves
        self._busy: dict[int, Assignment] = {}  # lane -> its hop's assignment
        self._on: dict[str, int] = {}  # holder -> lane
        self._owed: list[tuple[str, int]] = []  # passed over while their holder was busy; in the Schedule's put-back list too

    # -- the caller's view ------------------------------------------------------------------

    def _check_lane(self, lane: int) -> None:
        if type(lane) is not int or not 0 <= lane < self.lanes:
            raise ValueError(f"no lane {lane!r} (lanes 0..{self.lanes - 1})")

    def next_for(self, lane: int, available: Callable[[str], bool] = _ALWAYS) -> Assignment | None:
        """An assignment for this idle lane: the Schedule's next whose holder is available and on no lane; None if none now."""
        self._check_lane(lane)
        if lane in self._busy:
            raise ValueError(f"lane {lane} is busy with {self._busy[lane].holder} chunk {self._busy[lane].chunk}")
        a = self._owed_next(available) or self._schedule_next(available)
        if a is not None:
            self._busy[lane] = a
            self._on[a.holder] = lane
        return a

    def likely_next(self, lane: int, available: Callable[[str], bool] = _ALWAYS) -> Assignment | None:
        """What :meth:`next_for` would give ``lane`` after its hop in flight completes; changes nothing.

        A guess for work done ahead (the next hop's params sealed while this one
        runs): a failure, a deferral or a holder going away makes it wrong, and
        the caller must throw the guess away when the real assignment differs.
        """
        self._check_lane(lane)
        trial = copy.deepcopy(self)
        if lane in trial._busy:
            trial.release(lane, "done")
        return trial.next_for(lane, available)

    @property
    def may_start(self) -> bool:
        """May idle lanes be handed hops now? Always, but in waves only while no lane is busy (a wave starts in one pass)."""
        return not (self.waves and self._busy)

    def _owed_next(self, available: Callable[[str], bool]) -> Assignment | None:
        for key in self._owed:
            if key[0] not in self._on and available(key[0]):
                self._owed.remove(key)
                return Assignment(self.schedule.round, *key)
        return None

    def _schedule_next(self, available: Callable[[str], bool]) -> Assignment | None:
        s = self.schedule
        before = len(s.requeued)
        a = s.next(lambda h: h not in self._on and available(h))
        # What the Schedule passed over just now is at the end of its put-back list:
        # a busy holder's chunk (not the one it is training) is owed to it.
        in_flight = {(b.holder, b.chunk) for b in self._busy.values()}
        owing = {h for h, _ in self._owed}
        for key in s.requeued[before:]:
            if key[0] in self._on and key not in in_flight and key[0] not in owing:
                self._owed.append(key)
                owing.add(key[0])
        return a

    def holder_on(self, holder: str) -> int | None:
        """The lane a holder is provisioning/being trained on, if any."""
        return self._on.get(holder)

    def lane_of(self, lane: int) -> Assignment | None:
        """What a lane holds now."""
        self._check_lane(lane)
        return self._busy.get(lane)

    def busy_lanes(self) -> list[int]:
        """Lanes with a hop in flight, in order."""
        return sorted(self._busy)

    def release(self, lane: int, outcome: str) -> None:
        """The lane's hop ended: outcome "done" (Schedule.complete), "failed" (Schedule.fail), "deferred" (Schedule.defer); frees lane and holder."""
        self._check_lane(lane)
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        a = self._busy.get(lane)
        if a is None:
            raise ValueError(f"lane {lane} has no hop to release")
        settle = {"done": self.schedule.complete, "failed": self.schedule.fail, "deferred": self.schedule.defer}[outcome]
        settle(a)
        del self._busy[lane]
        del self._on[a.holder]

    def reopen(self, assignments: Iterable[Assignment]) -> None:
        """Completed hops whose training was thrown away go back into this round, untrained (see the module's rules).

        Each must be a chunk of the current round that was completed and is neither
        pending again nor on a lane (ValueError naming it, and nothing is reopened).
        """
        todo = list(assignments)
        in_flight = {(b.round, b.holder, b.chunk) for b in self._busy.values()}
        for a in todo:
            if (a.round, a.holder, a.chunk) in in_flight:
                raise ValueError(f"cannot reopen {a.holder} chunk {a.chunk}: it is on lane {self._on[a.holder]}")
        if len(set(todo)) != len(todo):
            raise ValueError("cannot reopen a chunk twice")
        before = list(self.schedule.requeued)
        try:
            for a in todo:
                self.schedule.reopen(a)
        except ValueError:
            self.schedule.requeued = before
            raise

    @property
    def round_settled(self) -> bool:
        """Every hop of the current round has settled: nothing pending in it, no lane busy (a merge point)."""
        return not self._busy and not self.schedule.pending_holders()

    def give_up(self, holder: str) -> list[Assignment]:
        """Skip a holder's put-back chunks for this round (it stayed away); not while it is on a lane."""
        if holder in self._on:
            raise ValueError(f"{holder} is on lane {self._on[holder]}: it has not stayed away")
        self._owed = [key for key in self._owed if key[0] != holder]
        return self.schedule.give_up(holder)

    def pending_holders(self) -> list[str]:
        """Holders with work left in this round that are on no lane (sorted): who an idle fleet is waiting for."""
        return [h for h in self.schedule.pending_holders() if h not in self._on]

    @property
    def finished(self) -> bool:
        """Every round done and no lane busy."""
        return not self._busy and self.schedule.finished

    # -- checkpoints ------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Plain data for a checkpoint: the Schedule's (in-flight hops are pending there), the lane count, the owed list."""
        return {"lanes": self.lanes, "schedule": self.schedule.to_state(), "owed": [list(k) for k in self._owed]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], *, schedule_factory: Callable[[Mapping[str, Any]], Schedule] = Schedule.from_state,
                   lanes: int | None = None, waves: bool = False) -> "FleetSchedule":
        """Rebuild a fleet saved with :meth:`to_state`, every lane idle (ValueError if it is not one).

        ``lanes`` resumes with another lane count (the schedule does not depend on it); ``waves`` is the run's merge's, not saved.
        """
        try:
            schedule = schedule_factory(state["schedule"])
            fleet = cls(schedule, int(state["lanes"]) if lanes is None else lanes, waves=waves)
            owed = [(str(h), int(c)) for h, c in state["owed"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a saved fleet schedule: {exc}") from None
        if any(key not in schedule.requeued for key in owed) or len({h for h, _ in owed}) != len(owed):
            raise ValueError("not a saved fleet schedule: an owed chunk is not pending, or a holder is owed twice")
        fleet._owed = owed
        return fleet
