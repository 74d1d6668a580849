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
from broken_machines import (
    AnyPreparedOrchestrator,
    CheckpointRollback,
    CrowdingFleet,
    DoubleGrantOrchestrator,
    DriftingDevice,
    ForgetfulOrchestrator,
    KeyKeepingDevice,
    LaneEpochOrchestrator,
    MisdirectedPrepare,
    NoRemeasureOrchestrator,
    ReleasingUnscrubbedDevice,
    RepeatingSchedule,
    ReusingToken,
    SilentLoss,
    StuckOrchestrator,
    SwappedEpochToken,
    TrustingDevice,
    UnscrubbingDevice,
    UnverifiedHop,
)

from gtbus.testing.sim import Machines, run_seed
from gtbus.testing.sim.config import SimConfig
from gtbus.testing.sim.orchestrator import ForgetfulResume
from gtbus.testing.sim.invariants import (
    CHUNK_TWICE,
    DATASET_CHANGED,
    EPOCH_ORDER,
    EPOCH_REUSED,
    HOLDER_TWO_GPUS,
    INVARIANTS,
    MODEL_UNACCOUNTED,
    NO_PROGRESS,
    PREPARED_ELSEWHERE,
    TWO_OWNERS,
    UNAUTHENTICATED,
    UNSCRUBBED,
)


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


def test_two_owners_fires_on_a_preparation_sent_to_two_holders() -> None:
    r = run_seed(1, config=quiet(), machines=Machines(orchestrator=MisdirectedPrepare))
    assert names(r) == {TWO_OWNERS}, r.violations
    assert "mapped staging prepared for" in r.violations[0].detail


def test_prepared_granted_elsewhere_fires() -> None:
    # A guess goes wrong only when the run does not go as planned (a hop fails, a holder goes away): with faults.
    r = first_failing(Machines(orchestrator=AnyPreparedOrchestrator), range(400))
    assert r.violations[0].name == PREPARED_ELSEWHERE, r.violations
    assert any("prepared" in line for line in r.trace)


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


def test_staging_released_without_a_scrub_fires() -> None:
    r = run_seed(1, config=quiet(), machines=Machines(device=ReleasingUnscrubbedDevice))
    assert names(r) == {UNSCRUBBED}, r.violations
    assert "released without a scrub" in r.violations[0].detail


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


def test_model_changed_in_a_revoked_hop_fires() -> None:
    """The first bug the simulator found (fixed in HopMachine since): the same seed passes with the real machine."""
    r = first_failing(Machines(hop=UnverifiedHop), range(400))
    assert names(r) == {MODEL_UNACCOUNTED}, r.violations
    assert any("model tampered" in line for line in r.trace)
    assert run_seed(r.seed).ok


def test_no_progress_fires() -> None:
    r = run_seed(1, config=quiet({"h2": "decline-junk"}), machines=Machines(orchestrator=StuckOrchestrator))
    assert names(r) == {NO_PROGRESS}, r.violations
    assert not r.finished and r.stopped is None


def test_dataset_changed_after_a_resume_fires() -> None:
    """The second protocol gap the simulator found: the shipped orchestrator's checkpoint keeps only
    chunk counts, so after a resume a holder is admitted with other data of the same chunk count."""
    r = first_failing(Machines(orchestrator=ForgetfulResume), range(3000))
    assert names(r) == {DATASET_CHANGED}, r.violations
    assert r.restarts >= 1  # it takes a resume
    assert run_seed(r.seed).ok


# -- fleets: the invariants across GPUs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "gpus, machines, name, detail",
    [
        # Each lane counting its own epochs: the second lane's first grant reuses the first lane's.
        (2, Machines(orchestrator=LaneEpochOrchestrator), EPOCH_REUSED, "epoch 1 granted again (to h2)"),
        (1, Machines(token=SwappedEpochToken), EPOCH_ORDER, "granted epoch 1 after epoch 2"),
        (2, Machines(fleet=CrowdingFleet), HOLDER_TWO_GPUS, "h1 granted epoch 2 while it holds lane 0's staging of epoch 1"),
    ],
)
def test_epoch_and_lane_invariants_fire(gpus: int, machines: Machines, name: str, detail: str) -> None:
    r = run_seed(1, config=quiet(gpus=gpus), machines=machines)
    assert names(r) == {name}, r.violations
    assert detail in r.violations[0].detail


@pytest.mark.parametrize("merge_every", [1, 3])
def test_a_chunk_trained_on_two_replicas_fires(merge_every: int) -> None:
    """A completed chunk put back once: trained again, on another lane or the same; caught along
    the replica's history or where the replicas are merged."""
    r = run_seed(1, config=quiet(gpus=2, merge_every=merge_every), machines=Machines(schedule=RepeatingSchedule))
    assert names(r) == {CHUNK_TWICE}, r.violations


def test_a_fleet_rollback_to_the_checkpoint_loses_trained_hops() -> None:
    """Found writing the fleet shell: a rolled-back hop restores its replica to the last checkpoint (with
    K > 1 the last merge); the hops the lane trained since, settled as done, must go back into the round.
    A shell that only restores is caught by the final model's check; the real one trains them again."""
    r = next(r for r in (run_seed(seed, gpus=2, machines=Machines(orchestrator=CheckpointRollback)) for seed in range(200)) if not r.ok)
    assert names(r) == {MODEL_UNACCOUNTED} and "missing" in r.violations[0].detail, r.violations
    assert any(f.startswith(("tamper", "code-change")) for f in r.faults)  # a hop rolled back
    again = run_seed(r.seed, gpus=2)
    assert again.ok and again.requeued > 0


def test_a_gpu_that_fails_loses_nothing_of_the_model() -> None:
    """A failed GPU's replica is out of the merges: what it trained since the last merge is in no model,
    and must be trained again; a shell that drops it is caught by the final model's check."""
    r = next(r for r in (run_seed(seed, gpus=2, machines=Machines(orchestrator=SilentLoss)) for seed in range(300)) if not r.ok)
    assert names(r) == {MODEL_UNACCOUNTED} and "missing" in r.violations[0].detail, r.violations
    again = run_seed(r.seed, gpus=2)
    assert again.ok and again.requeued > 0


def test_the_real_machines_pass_the_same_fleets() -> None:
    for gpus in (2, 3):
        for cfg in (quiet(gpus=gpus), quiet({"h2": "decline-junk"}, gpus=gpus, merge_every=1), quiet({"h2": "garbage"}, rounds=2, gpus=gpus)):
            r = run_seed(1, config=cfg)
            assert r.ok and r.finished, (r.violations, r.trace)
            assert sum(1 for n in r.lane_hops if n) > 1, r.lane_hops  # more than one GPU travelled


def test_every_invariant_has_a_test_here() -> None:
    fired = {EPOCH_REUSED, TWO_OWNERS, CHUNK_TWICE, UNAUTHENTICATED, UNSCRUBBED, MODEL_UNACCOUNTED, NO_PROGRESS, DATASET_CHANGED,
             EPOCH_ORDER, HOLDER_TWO_GPUS, PREPARED_ELSEWHERE, "wave-overlap"}  # wave-overlap fires in test_lockstep_sim.py
    assert fired == set(INVARIANTS)


def test_the_real_machines_pass_the_same_runs() -> None:
    for cfg in (quiet(), quiet({"h2": "decline-junk"}), quiet({"h2": "garbage"}, rounds=2)):
        r = run_seed(1, config=cfg)
        assert r.ok and r.finished, (r.violations, r.trace)
