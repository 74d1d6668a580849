"""Each invariant of the simulator fires on a deliberately broken machine (a simulator that cannot fail proves nothing).

Every double here breaks one rule of the real machines the way a bug would:
an epoch issued twice, a grant handed to two holders, a chunk settled without
being taken off the schedule, a device that does not authenticate, an
epilogue that does not scrub or drop the key, a model that changes outside
training, a run loop that stops granting. Each run must end with exactly
that invariant's name.
"""

from __future__ import annotations

from typing import Any

import pytest

from gtbus.protocol.schedule import Assignment, Schedule
from gtbus.protocol.token import Grant, TokenMachine
from gtbus.testing.sim import Machines, run_seed
from gtbus.testing.sim.config import SimConfig
from gtbus.testing.sim.device import Opened, SimDevice, Staging
from gtbus.testing.sim.invariants import (
    CHUNK_TWICE,
    EPOCH_REUSED,
    INVARIANTS,
    MODEL_UNACCOUNTED,
    NO_PROGRESS,
    TWO_OWNERS,
    UNAUTHENTICATED,
    UNSCRUBBED,
)
from gtbus.testing.sim.orchestrator import GrantBody, SimOrchestrator, _Hop


def quiet(hostile: dict[str, str] | None = None, **kw: Any) -> SimConfig:
    """Three local holders, two chunks each, no faults."""
    return SimConfig(holders=["h1", "h2", "h3"], remote=[], tokens={"h1": 128, "h2": 100, "h3": 128}, faults=False, hostile=hostile or {}, **kw)


def names(result: Any) -> set[str]:
    return {v.name for v in result.violations}


def first_failing(machines: Machines, seeds: range) -> Any:
    """The first seed (with faults) on which the broken machine is caught."""
    for seed in seeds:
        r = run_seed(seed, machines=machines)
        if not r.ok:
            return r
    raise AssertionError(f"no seed in {seeds} caught the broken machine")


# -- doubles ---------------------------------------------------------------------------------------


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

    def _send_grant(self, hop: _Hop) -> None:
        super()._send_grant(hop)
        others = [h for h in self.cfg.holders if h != hop.a.holder]
        body = GrantBody(hop.token_id, others[0], hop.a.chunk, hop.deadline, hop.key, hop.staging.sid)
        self.world.send(self.name, others[0], "grant", body, hop.epoch)


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


class NoRemeasureOrchestrator(SimOrchestrator):
    """Trains without comparing the model with its measurement at the grant."""

    remeasure_every_hop = False

    def _returned(self, hop: _Hop, ret: Any) -> None:
        hop.model_before = self.device.measure()
        super()._returned(hop, ret)


class StuckOrchestrator(SimOrchestrator):
    """Stops granting after the first hop that did not train."""

    def _next_hop(self, inc: int) -> None:
        if all(o == "trained" for _, o in self.hops):
            super()._next_hop(inc)


# -- one test per invariant --------------------------------------------------------------------------


def test_epoch_reused_fires() -> None:
    r = run_seed(1, config=quiet(), machines=Machines(token=ReusingToken))
    assert names(r) == {EPOCH_REUSED}, r.violations
    assert "epoch 1 granted again" in r.violations[0].detail


def test_epoch_reused_across_restart_fires() -> None:
    r = first_failing(Machines(orchestrator=ForgetfulOrchestrator), range(400))
    assert names(r) == {EPOCH_REUSED}, r.violations
    assert any("orchestrator crashed" in line for line in r.trace)


def test_two_owners_fires() -> None:
    r = run_seed(1, config=quiet(), machines=Machines(orchestrator=DoubleGrantOrchestrator))
    assert names(r) == {TWO_OWNERS}, r.violations
    assert "h1, h2 hold live staging" in r.violations[0].detail


def test_chunk_trained_twice_fires() -> None:
    r = run_seed(1, config=quiet(), machines=Machines(schedule=RepeatingSchedule))
    assert names(r) == {CHUNK_TWICE}, r.violations


def test_trained_unauthenticated_fires_on_garbage() -> None:
    r = first_failing(Machines(device=TrustingDevice), range(400))
    assert names(r) == {UNAUTHENTICATED}, r.violations


@pytest.mark.parametrize("behaviour", ["garbage", "replay-other"])
def test_trained_unauthenticated_fires_on_a_hostile_holder(behaviour: str) -> None:
    for seed in range(40):
        r = run_seed(seed, config=quiet({"h2": behaviour}, rounds=2), machines=Machines(device=TrustingDevice))
        if not r.ok:
            assert names(r) == {UNAUTHENTICATED}, r.violations
            assert "h2" in r.violations[0].detail
            return
    raise AssertionError("a trusting device never trained the hostile holder's segments")


def test_unscrubbed_staging_fires() -> None:
    r = run_seed(1, config=quiet(), machines=Machines(device=UnscrubbingDevice))
    assert names(r) == {UNSCRUBBED}, r.violations
    assert "not scrubbed and released" in r.violations[0].detail


def test_live_key_fires() -> None:
    r = run_seed(1, config=quiet(), machines=Machines(device=KeyKeepingDevice))
    assert names(r) == {UNSCRUBBED}, r.violations
    assert "hop key" in r.violations[0].detail


def test_model_changed_without_training_fires() -> None:
    r = run_seed(1, config=quiet(), machines=Machines(device=DriftingDevice))
    assert names(r) == {MODEL_UNACCOUNTED}, r.violations


def test_model_tampered_and_trained_fires() -> None:
    r = first_failing(Machines(orchestrator=NoRemeasureOrchestrator), range(400))
    assert names(r) == {MODEL_UNACCOUNTED}, r.violations
    assert any("model tampered" in line for line in r.trace)


def test_no_progress_fires() -> None:
    r = run_seed(1, config=quiet({"h2": "decline-junk"}), machines=Machines(orchestrator=StuckOrchestrator))
    assert names(r) == {NO_PROGRESS}, r.violations
    assert not r.finished and r.stopped is None


def test_every_invariant_has_a_test_here() -> None:
    fired = {EPOCH_REUSED, TWO_OWNERS, CHUNK_TWICE, UNAUTHENTICATED, UNSCRUBBED, MODEL_UNACCOUNTED, NO_PROGRESS}
    assert fired == set(INVARIANTS)


def test_the_real_machines_pass_the_same_runs() -> None:
    for cfg in (quiet(), quiet({"h2": "decline-junk"}), quiet({"h2": "garbage"}, rounds=2)):
        r = run_seed(1, config=cfg)
        assert r.ok and r.finished, (r.violations, r.trace)
