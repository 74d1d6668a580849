"""The simulator runs lockstep fleets (``gtbus sim --gpus K --lockstep``): hops start in waves, and the wave rule is an invariant that can fire."""

from __future__ import annotations

from typing import Any

from gtbus.protocol.fleet import FleetSchedule
from gtbus.testing.sim import run_seed, run_seeds
from gtbus.testing.sim.config import SimConfig
from gtbus.testing.sim.invariants import WAVE_OVERLAP
from gtbus.testing.sim.run import Machines


class WaveIgnoringFleet(FleetSchedule):
    """Hands idle lanes hops while a wave is in flight, as a fleet without waves does."""

    @property
    def may_start(self) -> bool:
        return True


def quiet(**kw: Any) -> SimConfig:
    """Three local holders, two chunks each, no faults, two lanes in lockstep."""
    return SimConfig(**{"holders": ["h1", "h2", "h3"], "remote": [], "tokens": {"h1": 128, "h2": 100, "h3": 128}, "faults": False,
                        "hostile": {}, "gpus": 2, "lockstep": True, **kw})


def test_a_fleet_that_starts_a_hop_beside_an_earlier_wave_is_caught() -> None:
    # A trained hop makes a merge due, which holds new hops back too; a declined one does not: only the wave rule does.
    r = run_seed(1, config=quiet(hostile={"h1": "decline-junk"}), machines=Machines(fleet=WaveIgnoringFleet))
    assert {v.name for v in r.violations} == {WAVE_OVERLAP}, r.violations
    assert "while hops of wave" in r.violations[0].detail


def test_the_real_fleet_schedule_keeps_its_waves_on_quiet_runs() -> None:
    for cfg in (quiet(), quiet(rounds=2), quiet(gpus=3)):
        r = run_seed(1, config=cfg)
        assert r.ok and r.finished, (r.violations, r.trace)
        assert sum(1 for n in r.lane_hops if n) > 1, r.lane_hops  # more than one GPU travelled
        assert "--lockstep" in r.flags


def test_lockstep_fleets_under_faults_and_hostile_holders_keep_every_invariant() -> None:
    for gpus in (2, 3):
        summary = run_seeds(150, first=5000, gpus=gpus, lockstep=True)
        assert summary.violations == 0, [r.repro for r in summary.failures]
        assert summary.trained > 0
