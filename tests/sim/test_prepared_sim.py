"""Hops prepared ahead (``token.prepare``, gtbus/nodes/hop_prepare.py) in the simulator.

The simulated orchestrator prepares as the real one does: after a grant, the
hop the lane likely runs next gets its staging and key, sent to that holder,
who maps the staging before its grant. The invariants then hold with the
guesses right and wrong, under faults and hostile holders (a prepared staging
is mapped by its holder alone, granted to it or to no one, and released
unused when the guess was wrong; test_invariants_fire.py shows both checks can
fail).
"""

from __future__ import annotations

from typing import Any

from gtbus.testing.sim import run_seed
from gtbus.testing.sim.config import SimConfig


def _config(**kw: Any) -> SimConfig:
    base: dict[str, Any] = dict(holders=["h1", "h2", "h3"], remote=[], tokens={"h1": 128, "h2": 100, "h3": 128}, faults=False, rounds=2)
    base.update(kw)
    return SimConfig(**base)


def test_a_quiet_run_prepares_every_hop_after_the_first_and_uses_each() -> None:
    r = run_seed(1, config=_config())
    assert r.ok and r.finished, r.violations
    assert r.hops == 12 and r.prepared == {"made": 11, "used": 11, "discarded": 0}


def test_the_same_run_without_preparations_trains_the_same() -> None:
    a, b = run_seed(1, config=_config()), run_seed(1, config=_config(prepare=False))
    assert b.ok and b.finished and b.prepared == {"made": 0, "used": 0, "discarded": 0}
    assert (a.hops, a.trained, a.outcomes) == (b.hops, b.trained, b.outcomes)


def test_no_preparation_in_ship_mode_on_fleets_or_for_a_holder_behind_the_agent() -> None:
    for cfg in (_config(mode="ship"), _config(gpus=2, merge_every=1), _config(holders=["h1"], tokens={"h1": 384}, remote=["h1"])):
        r = run_seed(1, config=cfg)
        assert r.ok and r.finished, (cfg, r.violations)
        assert r.prepared["made"] == 0, cfg


def test_guesses_right_and_wrong_under_faults_break_no_invariant() -> None:
    made = used = discarded = 0
    for seed in range(300):
        r = run_seed(seed)
        assert r.ok, (seed, r.violations, r.trace[-30:])
        made, used, discarded = made + r.prepared["made"], used + r.prepared["used"], discarded + r.prepared["discarded"]
    # Most guesses are used; some go wrong (a hop failed, a holder went away) and are released unused; the rest die with a crash.
    assert used > 0.8 * made and discarded > 0, (made, used, discarded)
