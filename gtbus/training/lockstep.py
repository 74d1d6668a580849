"""A lockstep wave: the hops a fleet started together train step by step, their gradients reduced each step.

``--merge lockstep`` (:class:`~gtbus.training.merge.LockstepAverage`) starts
hops in *waves* (:attr:`gtbus.protocol.fleet.FleetSchedule.waves`): up to K
at once, one per idle lane, and no new one while one is in flight. A
:class:`LockstepGroup` is the wave's barrier. Rules:

* The orchestrator opens the wave with the lanes it started
  (:meth:`LockstepGroup.open_wave`) before any of them can train: a member
  is *expected* from then until it leaves, whether it trains yet or is still
  waiting for its holder's return.
* Each training step, a member hands its gradient arrays to
  :meth:`LockstepGroup.sync` (the trainer's ``grad_sync`` hook, between its
  backward pass and its optimizer step) and waits until every expected
  member has handed in this step's; the last to arrive reduces them
  (:class:`~gtbus.training.merge.GradientReduce`: every member's arrays then
  hold the members' mean) and wakes the others, which take their optimizer
  steps. The reduction runs on one thread, under the group's lock; the
  members are waiting anyway.
* A member leaves (:meth:`LockstepGroup.leave`) when its training returns,
  and every hop leaves when it ends, whatever ended it (refused, revoked,
  lease expired, its device failed, cancelled): that is what keeps the
  barrier from waiting for a wave mate that will never arrive. Leaving
  twice is nothing. The rest go on reducing among themselves; a member whose
  hop had fewer steps leaves early, and the wave-end merge averages the
  replicas that trained.
* A member that leaves *unfinished* after handing in at least one step's
  gradients has put some of its chunk into its wave mates' replicas through
  the mean, while its own chunk goes back into the schedule to be trained
  again: the wave is *tainted* (:attr:`LockstepGroup.tainted`), and the
  orchestrator rolls back every replica that trained in it (to the last
  merge, their hops reopened), so nothing is trained twice.
* A reduction that fails (members whose gradients differ in number, shape or
  type) fails that step for every member with the same one-line
  :class:`~gtbus.errors.GtbusError`; :meth:`LockstepGroup.close` (the run
  stops) fails every waiting and later step likewise, so worker threads
  return instead of training on alone.

Threads: every member trains on its own worker thread (one per lane, the
orchestrator's); the event loop never waits here. A barrier on the loop's
thread would stop the very loop that delivers the other members' returns.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Sequence

from gtbus.errors import GtbusError
from gtbus.training.merge import GradientReduce

#: What a trainer's ``train_on(..., grad_sync=)`` is handed: called after each backward pass with the gradient arrays.
GradSync = Callable[[Sequence[Any]], None]


class LockstepGroup:
    """The barrier of one wave at a time: each step, the expected members' gradients are reduced before their optimizer steps."""

    def __init__(self, reduce: GradientReduce) -> None:
        """``reduce``: how one step's gradients become the members' mean (in-process, or an all-reduce engine)."""
        self.reduce = reduce
        self._cond = threading.Condition()
        self._expected: set[int] = set()  # lanes of the wave that have not left
        self._arrived: dict[int, Sequence[Any]] = {}  # this step's gradients, by lane
        self._generation = 0  # steps reduced by this group (all waves)
        self._failed: tuple[int, str] | None = None  # (generation, why) of the last step whose reduction failed
        self._closed: str | None = None
        self.steps: dict[int, int] = {}  # this wave's steps reduced, by lane
        self.tainted: list[int] = []  # this wave's lanes that left unfinished after contributing a step

    def open_wave(self, lanes: Iterable[int]) -> None:
        """A new wave of these lanes starts (each leaves when its hop ends); GtbusError while a member of the last one has not left."""
        with self._cond:
            if self._expected:
                raise GtbusError(f"a lockstep wave opened while lanes {sorted(self._expected)} of the last one had not left")
            self._expected = set(lanes)
            self._arrived.clear()
            self.steps = {lane: 0 for lane in self._expected}
            self.tainted = []
            self._closed = None

    def member(self, lane: int) -> GradSync:
        """The ``grad_sync`` hook of ``lane``'s trainer for this wave."""
        return lambda grads: self.sync(lane, grads)

    def sync(self, lane: int, grads: Sequence[Any]) -> None:
        """Hand in ``lane``'s gradient of this step and wait until it holds the members' mean (GtbusError if the step fails)."""
        with self._cond:
            if self._closed is not None:
                raise GtbusError(self._closed)
            if lane not in self._expected or lane in self._arrived:
                raise GtbusError(f"lane {lane} is not a member of the lockstep wave waiting for this step")
            gen = self._generation
            self._arrived[lane] = grads
            self._reduce_if_complete()
            while self._generation == gen and self._closed is None:
                self._cond.wait()
            if self._generation == gen:  # closed before the step was reduced
                raise GtbusError(self._closed or "the lockstep wave was closed")
            if self._failed is not None and self._failed[0] == gen:
                raise GtbusError(self._failed[1])
            self.steps[lane] = self.steps.get(lane, 0) + 1

    def leave(self, lane: int, *, finished: bool) -> None:
        """``lane`` takes no more steps in this wave (``finished``: its training returned); nothing if it already left."""
        with self._cond:
            if lane not in self._expected:
                return
            self._expected.discard(lane)
            if self._arrived.pop(lane, None) is not None or (not finished and self.steps.get(lane, 0) > 0):
                self.tainted.append(lane)
            self._reduce_if_complete()

    def close(self, why: str) -> None:
        """Fail every member's waiting and later steps with ``why`` (the run stops); the next :meth:`open_wave` reopens."""
        with self._cond:
            self._closed = why
            self._expected.clear()
            self._arrived.clear()
            self._cond.notify_all()

    @property
    def members(self) -> list[int]:
        """The lanes of the wave that have not left yet."""
        with self._cond:
            return sorted(self._expected)

    def _reduce_if_complete(self) -> None:
        # Under the lock: every member still expected has handed in this step's gradients.
        if not self._arrived or not self._expected <= self._arrived.keys():
            return
        try:
            self.reduce.reduce([self._arrived[lane] for lane in sorted(self._arrived)])
        except Exception as exc:  # every member fails this step with one line: none may wait for a reduction that never comes
            why = str(exc) if isinstance(exc, GtbusError) else f"the gradient reduction failed: {type(exc).__name__}: {exc}"
            self._failed = (self._generation, f"lockstep step refused: {why}")
        self._arrived.clear()
        self._generation += 1
        self._cond.notify_all()
