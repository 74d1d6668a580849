"""FleetSchedule in waves (``--merge lockstep``): hops start only while no lane is busy."""

from __future__ import annotations

from gtbus.protocol.fleet import FleetSchedule
from gtbus.protocol.schedule import Schedule


def fleet(waves: bool, lanes: int = 3) -> FleetSchedule:
    return FleetSchedule(Schedule({"h1": 2, "h2": 2, "h3": 2}, 1), lanes, waves=waves)


def test_a_wave_starts_only_when_every_lane_is_idle_and_ends_when_the_last_hop_settles() -> None:
    f = fleet(True)
    assert f.may_start
    wave = [f.next_for(k) for k in range(3)]  # one pass: the caller asked may_start once, before it
    assert all(a is not None for a in wave) and not f.may_start
    f.release(0, "done")
    f.release(1, "failed")
    assert not f.may_start  # lane 2's hop is still in flight: lanes 0 and 1 wait for it
    f.release(2, "deferred")
    assert f.may_start


def test_without_waves_an_idle_lane_may_always_start() -> None:
    f = fleet(False)
    assert f.next_for(0) is not None and f.may_start


def test_waves_are_the_runs_not_the_checkpoints() -> None:
    f = fleet(True)
    state = f.to_state()
    assert "waves" not in state
    assert FleetSchedule.from_state(state, waves=True).waves and not FleetSchedule.from_state(state).waves
