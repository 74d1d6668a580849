"""Deliberately broken machines: each breaks one rule of the real ones the way a bug would.

Used by ``test_invariants_fire.py`` to show that every invariant of the
simulator can fail.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gtbus.protocol.fleet import FleetSchedule
from gtbus.protocol.hop import HopMachine, HopPhase, Remeasured, Scrub, Step
from gtbus.protocol.schedule import Assignment, Schedule
from gtbus.protocol.token import ACCEPT, Grant, TokenMachine
from gtbus.testing.sim.device import INITIAL_MODEL, Opened, SimDevice, Staging
from gtbus.testing.sim.orchestrator import SimOrchestrator, _Hop



class ReusingToken(TokenMachine):
    """Issues epoch 1 again for its second grant."""

    def grant(self, holder: str, now: float, lease: float) -> Grant:
        g = super().grant(holder, now, lease)
        if g.epoch == 2:
            self.epoch = 1
            return Grant(g.token_id, 1, holder, g.deadline)
        return g


class ForgetfulOrchestrator(SimOrchestrator):
    """Never writes its epoch reservation to disk: a restart starts from the checkpoint's epoch."""

    def _reserve_epoch(self, epoch: int) -> None:
        self.reserved_upto = epoch


class DoubleGrantOrchestrator(SimOrchestrator):
    """Sends each grant (handle and key) to the granted holder and to the next one as well."""

    def _grant_to_holder(self, hop: _Hop) -> Any:
        answer = super()._grant_to_holder(hop)
        g = hop.grant
        assert g is not None
        other = next(h for h in self.cfg.holders if h != g.holder)
        self.world.send(self.name, other, "grant", replace(g, holder=other), hop.machine.epoch)
        return answer


class RepeatingSchedule(Schedule):
    """Puts a completed chunk back at the end of the round once (as if its completion were lost)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._repeated: set[tuple[str, int]] = set()

    def complete(self, a: Assignment) -> None:
        if (a.holder, a.chunk) in self._repeated:
            super().complete(a)
        else:
            self._repeated.add((a.holder, a.chunk))
            self.defer(a)


class TrustingDevice(SimDevice):
    """Opens segments without authenticating them (takes whatever staging holds)."""

    def open_segments(self, staging: Staging, key: int, epoch: int, holder: str, total: int) -> Opened | str:
        segs = tuple(staging.segments[i] for i in range(total) if i in staging.segments)
        return Opened(staging, segs) if len(segs) == total else "segment missing"


class UnscrubbingDevice(SimDevice):
    """Its release keeps the buffer and its contents (no scrub, export still tracked)."""

    def scrub(self, staging: Staging) -> None:
        pass

    def release(self, staging: Staging) -> None:
        self.revoke_export(staging)
        staging.released = True


class KeyKeepingDevice(SimDevice):
    """Never forgets a hop key."""

    def drop_key(self, key: int) -> None:
        pass


class DriftingDevice(SimDevice):
    """Scrubbing disturbs the model (a kernel writing out of bounds)."""

    def scrub(self, staging: Staging) -> None:
        super().scrub(staging)
        if self.model is not None and staging.epoch == 2:
            self.model ^= 1


class UnverifiedHop(HopMachine):
    """The hop machine before the simulator's first finding: a hop that ends without
    training ignores what its re-measure found (a model changed while a holder held
    the token was checkpointed and trained on)."""

    def _verified(self, ev: Remeasured) -> Step:
        self.phase = HopPhase.SCRUBBING
        return Step(ACCEPT, (Scrub(),))


class NoRemeasureOrchestrator(SimOrchestrator):
    """Reports the model it measured at the grant instead of measuring again."""

    def _measured(self, hop: _Hop) -> int | None:
        return hop.model_before


class StuckOrchestrator(SimOrchestrator):
    """Stops granting after the first hop that did not train."""

    def _next_hop(self, inc: int) -> None:
        if all(o == "trained" for _, o in self.hops):
            super()._next_hop(inc)


class ReleasingUnscrubbedDevice(SimDevice):
    """Skips the scrub but releases the buffer as usual (review: the checker only saw stagings still held)."""

    def scrub(self, staging: Staging) -> None:
        pass


# -- fleets (gtbus sim --gpus K) -------------------------------------------------------------------


class LaneEpochOrchestrator(SimOrchestrator):
    """Each lane counts its own epochs (no fleet counter): two lanes issue the same epochs."""

    def _align_epoch(self, lane: Any) -> None:
        pass


class SwappedEpochToken(TokenMachine):
    """Issues epochs in swapped pairs (2, 1, 4, 3, ...): never one twice, but not increasing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._base = self.epoch
        self._grants = 0

    def grant(self, holder: str, now: float, lease: float) -> Grant:
        g = super().grant(holder, now, lease)
        self._grants += 1
        n = self._grants
        self.epoch = self._base + (n + 1 if n % 2 else n - 1)
        return Grant(g.token_id, self.epoch, holder, g.deadline)


class CrowdingFleet(FleetSchedule):
    """Hands an idle lane the Schedule's next hop even when its holder is on another lane."""

    def _owed_next(self, available: Any) -> Assignment | None:
        return None

    def _schedule_next(self, available: Any) -> Assignment | None:
        return self.schedule.next(available)


class CheckpointRollback(SimOrchestrator):
    """A fleet's hop that rolls back restores the checkpoint's model and nothing more, as the shipped
    orchestrator did. With K > 1 the checkpoint is the last merge: what the lane trained since (hops
    already settled as done) is in no model, and nothing trains it again."""

    def _restore_model(self, hop: _Hop) -> None:
        ck = self.disk.checkpoint
        hop.lane.device.restore(ck["model"] if ck is not None else INITIAL_MODEL)
        hop.lane.trained = []


class SilentLoss(SimOrchestrator):
    """Retires a failed GPU's lane and drops what its replica trained since the last merge, still marked
    done (the shipped orchestrator counted it as lost instead of training it again)."""

    def _retired_training(self, lane: Any) -> None:
        self.trained_since_merge -= min(self.trained_since_merge, len(lane.trained))
        lane.trained = []


class AnyPreparedOrchestrator(SimOrchestrator):
    """Grants the staging it prepared ahead to whichever hop comes next, its guess right or wrong."""

    def _take_prepared(self, lane: Any, holder: str, chunk: int) -> Staging | None:
        p, lane.prepared = lane.prepared, None
        return p[2] if p is not None else None


class MisdirectedPrepare(SimOrchestrator):
    """Sends each hop it prepares ahead to the guessed holder and to another one as well."""

    def _prepare_next_hop(self, inc: int, lane: Any) -> None:
        super()._prepare_next_hop(inc, lane)
        if lane.prepared is not None:
            holder, chunk, staging = lane.prepared
            other = next(h for h in self.cfg.holders if h != holder)
            self.world.send(self.name, other, "prepare", (other, chunk, staging.key, staging.sid))
