"""The invariant checker's model history, driven directly on a simulated device."""

from __future__ import annotations

from gtbus.testing.sim.device import INITIAL_MODEL, Segment, SimDevice, chunk_tag
from gtbus.testing.sim.invariants import CHUNK_TWICE, InvariantChecker


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
