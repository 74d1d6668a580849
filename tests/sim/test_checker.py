"""The invariant checker's model history, driven directly on a simulated device."""

from __future__ import annotations

from gtbus.testing.sim.device import INITIAL_MODEL, Segment, SimDevice, chunk_tag, merged_model
from gtbus.testing.sim.invariants import CHUNK_TWICE, HOLDER_TWO_GPUS, MODEL_UNACCOUNTED, InvariantChecker


def _train(device: SimDevice, epoch: int, holder: str, rnd: int, chunk: int) -> None:
    s = device.alloc_staging(epoch, epoch, holder, 1000 + epoch, 3)
    device.map(s.sid, holder)
    device.write(s.sid, Segment(s.key, epoch, holder, 0, 1, chunk_tag(holder, chunk), holder), holder)
    opened = device.open_segments(s, s.key, epoch, holder, 1)
    assert not isinstance(opened, str)
    device.scrub(s)
    device.train(opened, (rnd, holder, chunk))
    device.release(s)
    device.drop_key(s.key)


def setup() -> tuple[SimDevice, InvariantChecker]:
    device, checker = SimDevice(), InvariantChecker()
    device.watch = checker
    return device, checker


def test_a_training_lost_in_a_crash_and_redone_in_a_later_round_is_the_history() -> None:
    """Found by the soak (seed 149712 at bd3e090): the same chunk from the same model makes the same
    model; the checker kept the first (lost) training as the history and called the final model wrong."""
    device, checker = setup()
    _train(device, 1, "h2", 0, 0)
    base = device.model
    assert base is not None
    _train(device, 2, "h1", 0, 0)  # trained, then the orchestrator died before its checkpoint
    device.restore(base)  # resumed from the checkpoint before it
    _train(device, 3, "h1", 1, 0)  # round 0's retry failed; round 1 trains it
    checker.check_final_model(device.model, {(0, "h2", 0), (1, "h1", 0)})
    assert not checker.violations, checker.violations


def test_a_chunk_trained_twice_in_one_round_along_one_history_is_caught() -> None:
    device, checker = setup()
    _train(device, 1, "h1", 0, 0)
    _train(device, 2, "h1", 0, 0)
    assert [v.name for v in checker.violations] == [CHUNK_TWICE]


def test_a_restore_rewinds_the_round() -> None:
    device, checker = setup()
    _train(device, 1, "h1", 0, 0)
    device.restore(INITIAL_MODEL)
    _train(device, 2, "h1", 0, 0)
    assert not checker.violations
    checker.check_final_model(device.model, {(0, "h1", 0)})
    assert not checker.violations


def fleet(k: int) -> tuple[list[SimDevice], InvariantChecker]:
    checker = InvariantChecker()
    devices = [SimDevice() for _ in range(k)]
    for lane, d in enumerate(devices):
        d.watch, d.lane = checker, lane
    checker.devices = devices
    return devices, checker


def merge(devices: list[SimDevice], checker: InvariantChecker) -> int:
    replicas = [d.model for d in devices if d.model is not None]
    model = merged_model(replicas)
    checker.merged(replicas, model)
    for d in devices:
        d.restore(model)
    return model


def test_one_chunk_on_two_replicas_is_caught_where_they_merge() -> None:
    (a, b), checker = fleet(2)
    _train(a, 1, "h1", 0, 0)
    _train(b, 2, "h1", 0, 0)  # neither replica's own history has it twice
    assert not checker.violations
    merge([a, b], checker)
    assert [v.name for v in checker.violations] == [CHUNK_TWICE]
    assert "trained on two replicas" in checker.violations[0].detail


def test_merged_histories_are_the_final_model() -> None:
    (a, b), checker = fleet(2)
    _train(a, 1, "h1", 0, 0)
    _train(b, 2, "h2", 0, 0)
    merge([a, b], checker)
    _train(a, 3, "h1", 1, 0)  # round 1, after the merge: on top of both replicas' round 0
    _train(b, 4, "h2", 1, 0)
    final = merge([a, b], checker)
    assert not checker.violations
    checker.check_final_model(final, {(0, "h1", 0), (0, "h2", 0), (1, "h1", 0), (1, "h2", 0)})
    assert not checker.violations
    checker.check_final_model(final, {(0, "h1", 0), (0, "h2", 0), (1, "h1", 0)})
    assert [v.name for v in checker.violations] == [MODEL_UNACCOUNTED]


def test_two_lanes_training_one_chunk_from_one_model_make_two_models() -> None:
    """Found by the fleet sweep: a round-0 chunk and its round-1 training on another lane, from the
    same merged model, made one digest and the checker lost the first; each lane trains its own way."""
    (a, b), checker = fleet(2)
    _train(a, 1, "h2", 0, 0)
    _train(b, 2, "h2", 1, 0)
    assert a.model != b.model
    final = merge([a, b], checker)
    checker.check_final_model(final, {(0, "h2", 0), (1, "h2", 0)})
    assert not checker.violations, checker.violations


def test_a_holder_granted_on_a_second_lane_while_it_holds_the_first_is_caught() -> None:
    (a, b), checker = fleet(2)
    a.alloc_staging(1, 1, "h1", 101, 3, token="gpu0")
    b.alloc_staging(2, 2, "h1", 102, 3, token="gpu1")
    assert [v.name for v in checker.violations] == [HOLDER_TWO_GPUS]
