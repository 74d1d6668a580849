"""Sans-I/O tests of the device agent's staging (gtbus.protocol.agent_stage): what it writes, where, and when it answers."""

from __future__ import annotations

import pytest

from gtbus.gpu.channel import TAG_SIZE
from gtbus.protocol.agent_stage import (
    NEXT_PHASES,
    TRANSITIONS,
    AgentStageMachine,
    DoneRequested,
    MapFailed,
    MapStaging,
    Mapped,
    RaiseFence,
    RefuseStage,
    RunOver,
    SegmentArrived,
    SegmentNotWritten,
    SegmentWritten,
    SendMissing,
    SendReady,
    SendWritten,
    StageEvent,
    StagePhase,
    StageRequested,
    StageRevoked,
    Tick,
    Unmap,
    WriteSegment,
)

SEG = 64
STRIDE = SEG + TAG_SIZE
STAGING = 3 * STRIDE  # three segments


def _staged(epoch: int = 5, *, timeout: float | None = None) -> AgentStageMachine:
    m = AgentStageMachine(idle_timeout=timeout)
    assert m.handle(StageRequested("tok", epoch, "h1", STAGING, SEG, 0.0)).actions == (MapStaging(epoch),)
    assert m.handle(Mapped(epoch, STAGING, 1.0)).actions == (RaiseFence(epoch), SendReady("tok", epoch))
    assert m.phase is StagePhase.STAGED
    return m


def _seg(index: int, *, count: int = 3, size: int = STRIDE, sender: str = "h1", epoch: int = 5, token: str = "tok") -> SegmentArrived:
    return SegmentArrived(sender, token, epoch, index, count, size, 2.0)


def _write_all(m: AgentStageMachine, n: int = 3) -> None:
    for i in range(n):
        step = m.handle(_seg(i))
        assert step.actions == (WriteSegment(5, i, i * STRIDE),)
        assert m.handle(SegmentWritten(5, i)).counted


def test_a_stage_maps_writes_each_segment_at_its_own_offset_and_answers_once_complete() -> None:
    m = _staged()
    _write_all(m)
    done = m.handle(DoneRequested("h1", "tok", 5, 3, 150))
    assert done.actions == (Unmap(5), SendWritten("h1", "tok", 5, 3, 150))
    assert m.phase is StagePhase.IDLE and m.stage is None and m.written_hops == 1


def test_done_before_every_segment_is_written_says_what_is_missing_and_keeps_the_stage() -> None:
    m = _staged()
    m.handle(_seg(0))
    m.handle(SegmentWritten(5, 0))
    m.handle(_seg(1))  # asked for, not yet written
    step = m.handle(DoneRequested("h1", "tok", 5, 3, 150))
    assert step.actions == (SendMissing("h1", 5, "received 1 of 3 segments"),)
    assert m.phase is StagePhase.STAGED
    # A count that differs from the streamed one is missing segments too, never "written".
    m.handle(SegmentWritten(5, 1))
    m.handle(_seg(2))
    m.handle(SegmentWritten(5, 2))
    assert isinstance(m.handle(DoneRequested("h1", "tok", 5, 2, 100)).actions[0], SendMissing)
    assert isinstance(m.handle(DoneRequested("h1", "tok", 5, 3, 150)).actions[1], SendWritten)


@pytest.mark.parametrize(
    "seg, why",
    [
        (_seg(0, sender="h2"), "not the staged hop"),
        (_seg(0, epoch=4), "not the staged hop"),
        (_seg(0, token="forged"), "not the staged hop"),
        (_seg(3), "out of range"),
        (_seg(-1), "out of range"),
        (_seg(1 << 62, count=1 << 63), "does not fit"),
        (_seg(0, size=STRIDE + 1), "does not fit"),
        (_seg(0, size=0), "does not fit"),
        (_seg(True), "not an int"),  # type: ignore[arg-type]
        (_seg(0, count="3"), "not an int"),  # type: ignore[arg-type]
        (_seg(0, size=2.5), "does not fit"),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_hostile_segments_are_ignored_before_any_write(seg: SegmentArrived, why: str) -> None:
    m = _staged()
    step = m.handle(seg)
    assert not step.counted and step.actions == () and why in step.reason


def test_a_segment_is_written_once_and_the_first_count_holds() -> None:
    m = _staged()
    assert m.handle(_seg(0)).actions  # pending
    assert not m.handle(_seg(0)).counted  # a copy while the first is being written
    m.handle(SegmentWritten(5, 0))
    assert not m.handle(_seg(0)).counted  # and after
    assert "count differs" in m.handle(_seg(1, count=2)).reason
    # A failed write does not count, and the segment may come again.
    m.handle(_seg(1))
    assert m.handle(SegmentNotWritten(5, 1, "do not fit")).counted
    assert m.handle(_seg(1)).actions == (WriteSegment(5, 1, STRIDE),)
    # Answers for writes never asked for change nothing.
    assert not m.handle(SegmentWritten(5, 2)).counted and 2 not in m.stage.written  # type: ignore[union-attr]


def test_a_short_mapping_is_refused_and_unmapped() -> None:
    m = AgentStageMachine()
    m.handle(StageRequested("tok", 5, "h1", STAGING, SEG, 0.0))
    step = m.handle(Mapped(5, STAGING - 1, 1.0))
    assert step.actions == (Unmap(5), RefuseStage(5, f"staging holds {STAGING - 1} bytes, {STAGING} announced"))
    assert m.phase is StagePhase.IDLE


@pytest.mark.parametrize("staging, segment", [(0, SEG), (-1, SEG), (STAGING, 0), (1.5, SEG), (STAGING, "64"), (True, SEG)])
def test_stage_sizes_that_are_not_positive_ints_are_refused_before_mapping(staging: object, segment: object) -> None:
    m = AgentStageMachine()
    step = m.handle(StageRequested("tok", 5, "h1", staging, segment, 0.0))  # type: ignore[arg-type]
    assert len(step.actions) == 1 and isinstance(step.actions[0], RefuseStage) and "not a positive size" in step.actions[0].reason
    assert m.phase is StagePhase.IDLE


def test_map_failure_refuses_the_stage() -> None:
    m = AgentStageMachine()
    m.handle(StageRequested("tok", 5, "h1", STAGING, SEG, 0.0))
    assert m.handle(MapFailed(5, "not exported")).actions == (RefuseStage(5, "cannot stage: not exported"),)


def test_a_newer_stage_replaces_the_old_and_a_late_mapping_is_dropped() -> None:
    m = _staged(5)
    m.handle(_seg(0))
    step = m.handle(StageRequested("tok", 6, "h2", STAGING, SEG, 3.0))
    assert step.actions == (Unmap(5), MapStaging(6))
    assert not m.handle(SegmentWritten(5, 0)).counted  # the old hop's write answers nothing now
    # A revoke while mapping; the mapping then finishes: it is dropped, nothing is staged.
    assert m.handle(StageRevoked("tok", 6)).actions == (Unmap(6), RaiseFence(7))
    late = m.handle(Mapped(6, STAGING, 4.0))
    assert not late.counted and late.actions == (Unmap(6),) and m.phase is StagePhase.IDLE


def test_revoke_of_the_staged_hop_drops_it_and_fences_its_epoch_other_revokes_do_nothing() -> None:
    m = _staged(5)
    assert not m.handle(StageRevoked("tok", 4)).counted
    assert not m.handle(StageRevoked("other", 5)).counted
    assert m.handle(StageRevoked("tok", 5)).actions == (Unmap(5), RaiseFence(6))
    assert not m.handle(_seg(0)).counted
    assert not m.handle(DoneRequested("h1", "tok", 5, 3, 150)).counted


def test_run_over_drops_the_stage() -> None:
    m = _staged()
    assert m.handle(RunOver()).actions == (Unmap(5),)
    assert m.phase is StagePhase.IDLE


def test_an_idle_stage_is_dropped_only_once_its_time_is_up() -> None:
    m = _staged(timeout=10.0)
    assert m.wake_at == 11.0  # mapped at 1.0
    m.handle(_seg(0))  # at 2.0: activity pushes the timer
    assert m.wake_at == 12.0
    assert not m.handle(Tick(11.9)).counted and m.phase is StagePhase.STAGED
    assert m.handle(Tick(12.0)).actions == (Unmap(5),)
    assert m.wake_at is None and AgentStageMachine().wake_at is None


def test_idle_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AgentStageMachine(idle_timeout=0)


_EVENTS: list[StageEvent] = [
    StageRequested("tok", 5, "h1", STAGING, SEG, 0.0), StageRequested("tok", 6, "h1", 0, SEG, 0.0),
    Mapped(5, STAGING, 1.0), Mapped(4, STAGING, 1.0), Mapped(5, 1, 1.0), MapFailed(5, "x"), MapFailed(4, "x"),
    _seg(0), _seg(9), SegmentWritten(5, 0), SegmentNotWritten(5, 0, "x"), DoneRequested("h1", "tok", 5, 3, 150),
    DoneRequested("h2", "tok", 5, 0, 0), StageRevoked("tok", 5), StageRevoked("tok", 9), RunOver(), Tick(1e9), Tick(0.0),
]  # fmt: skip


def _in(phase: StagePhase) -> AgentStageMachine:
    m = AgentStageMachine(idle_timeout=5.0)
    if phase is not StagePhase.IDLE:
        m.handle(StageRequested("tok", 5, "h1", STAGING, SEG, 0.0))
    if phase is StagePhase.STAGED:
        m.handle(Mapped(5, STAGING, 1.0))
    assert m.phase is phase
    return m


@pytest.mark.parametrize("phase", list(StagePhase))
@pytest.mark.parametrize("event", _EVENTS, ids=repr)
def test_every_event_in_every_phase_is_decided_without_raising(phase: StagePhase, event: StageEvent) -> None:
    m = _in(phase)
    step = m.handle(event)
    assert m.phase in NEXT_PHASES[phase]
    if type(event) not in TRANSITIONS[phase]:
        assert not step.counted and step.actions == () and phase.value in step.reason
    # Nothing is written outside a staged hop, nor outside its announced bytes.
    for a in step.actions:
        if isinstance(a, WriteSegment):
            assert phase is StagePhase.STAGED and 0 <= a.offset <= STAGING - STRIDE
    assert (m.stage is None) == (m.phase is StagePhase.IDLE)
