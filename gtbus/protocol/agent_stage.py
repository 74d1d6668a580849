"""The device agent's staging of one hop: events in, actions out.

A remote holder streams its AEAD segments to the device agent on the GPU host,
which writes them, still encrypted, into the hop's staging (DESIGN §2). Rules
this module keeps (everything that decides what the agent writes lives here):

* A stage request replaces whatever was staged before: the older mapping is
  dropped (:class:`Unmap`) before the new staging is mapped (:class:`MapStaging`).
  A request whose staging size or segment size is not a positive int is
  refused before anything is mapped.
* The staging is accepted only if the real mapping holds at least the bytes the
  orchestrator announced (:class:`Mapped` carries the mapping's own size);
  otherwise it is unmapped and refused. Only then is the receive fence raised
  to the hop's epoch and the orchestrator told :class:`SendReady`.
* A segment counts only from the holder named in the stage, for its token and
  epoch; each index once, within the count the first segment of the staged
  hop declared (whether or not that one was written; every later one must
  declare the same), no larger than a segment and its tag, and
  inside the announced staging bytes. Its offset is ``index * stride``: nothing
  the holder claims moves it. The shell's write checks the offset against the
  mapping's real size as well, and a write that failed does not count.
* ``agent.done`` is answered with ``agent.written`` (after the mapping is
  dropped) only when exactly the declared count of segments was written;
  otherwise the holder is told what is missing and the stage stays.
* A revoke of the staged hop drops its mapping at once and fences its epoch
  (anything later for it is stale); a revoke of another hop changes nothing.
  The end of the run drops the mapping.
* A stage left with nothing happening for ``idle_timeout`` seconds (a revoke
  lost on the way) is dropped when :class:`Tick` says its time is up.
* Any event in a phase with no rule for it is ignored with a reason, never an
  exception.

No I/O, no clock: times come in with the events; the shell maps, writes and sends.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Union

from gtbus.gpu.channel import TAG_SIZE


#: Events a machine keeps in its trace (for debugging and tests).
TRACE_LEN = 256


class StagePhase(str, Enum):
    """Where the agent's one stage is."""

    IDLE = "idle"  # nothing staged
    MAPPING = "mapping"  # staging being fetched and mapped
    STAGED = "staged"  # mapped: segments are written as they come


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRequested:
    """An ``agent.stage`` from the orchestrator: ``holder`` may write ``staging_bytes`` for this hop."""

    token_id: str
    epoch: int
    holder: str
    staging_bytes: int
    segment_size: int
    now: float


@dataclass(frozen=True)
class Mapped:
    """The staging of hop ``epoch`` is mapped; ``nbytes`` is the mapping's real size."""

    epoch: int
    nbytes: int
    now: float


@dataclass(frozen=True)
class MapFailed:
    """The staging of hop ``epoch`` could not be opened or mapped."""

    epoch: int
    reason: str


@dataclass(frozen=True)
class SegmentArrived:
    """A ``ship.segment`` from a remote holder: segment ``index`` of ``count``, ``size`` bytes of ciphertext and tag."""

    sender: str
    token_id: str
    epoch: int
    index: int
    count: int
    size: int
    now: float


@dataclass(frozen=True)
class SegmentWritten:
    """The shell wrote segment ``index`` of hop ``epoch`` into staging."""

    epoch: int
    index: int


@dataclass(frozen=True)
class SegmentNotWritten:
    """The shell's write of segment ``index`` failed (the mapping refused the offset or is gone)."""

    epoch: int
    index: int
    reason: str


@dataclass(frozen=True)
class DoneRequested:
    """An ``agent.done`` from a remote holder: it says it streamed ``segments`` segments (``nbytes`` of plaintext)."""

    sender: str
    token_id: str
    epoch: int
    segments: int
    nbytes: int


@dataclass(frozen=True)
class StageRevoked:
    """A ``token.revoke`` from the orchestrator."""

    token_id: str
    epoch: int


@dataclass(frozen=True)
class RunOver:
    """The run completed or was shut down."""


@dataclass(frozen=True)
class Tick:
    """The shell's timer: it is ``now`` (fed at or after :attr:`AgentStageMachine.wake_at`)."""

    now: float


StageEvent = Union[
    StageRequested, Mapped, MapFailed, SegmentArrived, SegmentWritten, SegmentNotWritten, DoneRequested, StageRevoked, RunOver, Tick,
]  # fmt: skip


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapStaging:
    """Open the sealed handle of hop ``epoch`` and map its staging. Answer: Mapped/MapFailed."""

    epoch: int


@dataclass(frozen=True)
class Unmap:
    """Drop the mapping of hop ``epoch`` (best effort: a mapping already gone is fine)."""

    epoch: int


@dataclass(frozen=True)
class RefuseStage:
    """Tell the orchestrator the stage of hop ``epoch`` could not be made."""

    epoch: int
    reason: str


@dataclass(frozen=True)
class RaiseFence:
    """Refuse anything from remote holders for an epoch below ``epoch`` from now on."""

    epoch: int


@dataclass(frozen=True)
class SendReady:
    """Tell the orchestrator the staging of hop ``epoch`` is mapped and takes segments."""

    token_id: str
    epoch: int


@dataclass(frozen=True)
class WriteSegment:
    """Write the segment's bytes into staging at ``offset``. Answer: SegmentWritten/SegmentNotWritten."""

    epoch: int
    index: int
    offset: int


@dataclass(frozen=True)
class SendWritten:
    """Tell the holder every segment of its hop is in staging (the mapping is already dropped)."""

    to: str
    token_id: str
    epoch: int
    segments: int
    nbytes: int


@dataclass(frozen=True)
class SendMissing:
    """Tell the holder its ``agent.done`` came before all its segments were written."""

    to: str
    epoch: int
    reason: str


StageAction = Union[MapStaging, Unmap, RefuseStage, RaiseFence, SendReady, WriteSegment, SendWritten, SendMissing]


@dataclass(frozen=True)
class StageStep:
    """What one event did: whether it counted (``reason`` says why not) and the actions, in order."""

    counted: bool
    reason: str = ""
    actions: tuple[StageAction, ...] = ()


def _ignored(reason: str) -> StageStep:
    return StageStep(False, reason)


@dataclass
class Stage:
    """The hop being staged: who may write it, how much, and what was written."""

    token_id: str
    epoch: int
    holder: str
    staging_bytes: int
    stride: int  # a segment and its tag
    count: int | None = None  # fixed by the first segment
    written: set[int] = field(default_factory=set)
    pending: set[int] = field(default_factory=set)  # WriteSegment issued, no answer yet
    last_active: float = 0.0


# (phase, event type) -> handler. An event absent from its phase's row is ignored with a reason.
TRANSITIONS: dict[StagePhase, dict[type, str]] = {
    StagePhase.IDLE: {StageRequested: "_requested", Mapped: "_mapped"},
    StagePhase.MAPPING: {
        StageRequested: "_requested",
        Mapped: "_mapped",
        MapFailed: "_map_failed",
        StageRevoked: "_revoked",
        RunOver: "_over",
    },
    StagePhase.STAGED: {
        StageRequested: "_requested",
        Mapped: "_mapped",
        SegmentArrived: "_segment",
        SegmentWritten: "_segment_written",
        SegmentNotWritten: "_segment_not_written",
        DoneRequested: "_done",
        StageRevoked: "_revoked",
        RunOver: "_over",
        Tick: "_tick",
    },
}

# The phases a handler may move to (documentation and the exhaustive tests).
NEXT_PHASES: dict[StagePhase, frozenset[StagePhase]] = {
    StagePhase.IDLE: frozenset({StagePhase.IDLE, StagePhase.MAPPING}),  # a stray Mapped stays idle
    StagePhase.MAPPING: frozenset({StagePhase.IDLE, StagePhase.MAPPING, StagePhase.STAGED}),
    StagePhase.STAGED: frozenset({StagePhase.IDLE, StagePhase.MAPPING, StagePhase.STAGED}),
}


class AgentStageMachine:
    """The device agent's one stage: feed it events with :meth:`handle`, execute the actions it returns."""

    def __init__(self, *, idle_timeout: float | None = None) -> None:
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError("idle_timeout must be positive (or None: never)")
        self.idle_timeout = idle_timeout
        self.phase = StagePhase.IDLE
        self.stage: Stage | None = None
        self.written_hops = 0
        # (phase, event, next, counted) of the last TRACE_LEN events: a machine may live for a
        # whole run and judge every segment and stale message, so the trace is bounded.
        self.trace: deque[tuple[StagePhase, str, StagePhase, bool]] = deque(maxlen=TRACE_LEN)

    @property
    def wake_at(self) -> float | None:
        """When the shell must feed :class:`Tick` if nothing else happened (None: no timer)."""
        if self.phase is StagePhase.STAGED and self.idle_timeout is not None and self.stage is not None:
            return self.stage.last_active + self.idle_timeout
        return None

    def handle(self, event: StageEvent) -> StageStep:
        """Apply ``event``; never raises for an event in the wrong phase or from the wrong peer."""
        before = self.phase
        name = TRANSITIONS[self.phase].get(type(event))
        step = getattr(self, name)(event) if name is not None else _ignored(f"{type(event).__name__} in phase {self.phase.value}")
        self.trace.append((before, type(event).__name__, self.phase, step.counted))
        return step

    # -- helpers -------------------------------------------------------------------------------

    def _drop(self) -> tuple[StageAction, ...]:
        st, self.stage, self.phase = self.stage, None, StagePhase.IDLE
        return (Unmap(st.epoch),) if st is not None else ()

    def _of_stage(self, sender: str, token_id: str, epoch: int) -> Stage | str:
        st = self.stage
        assert st is not None
        if sender != st.holder or epoch != st.epoch or token_id != st.token_id:
            return "not the staged hop"
        return st

    # -- handlers ----------------------------------------------------------------------------

    def _requested(self, ev: StageRequested) -> StageStep:
        dropped = self._drop()
        for name in ("staging_bytes", "segment_size"):
            value = getattr(ev, name)
            if type(value) is not int or value <= 0:
                return StageStep(True, "", (*dropped, RefuseStage(ev.epoch, f"cannot stage: {name} {value!r} is not a positive size")))
        self.stage = Stage(ev.token_id, ev.epoch, ev.holder, ev.staging_bytes, ev.segment_size + TAG_SIZE, last_active=ev.now)
        self.phase = StagePhase.MAPPING
        return StageStep(True, "", (*dropped, MapStaging(ev.epoch)))

    def _mapped(self, ev: Mapped) -> StageStep:
        st = self.stage
        if st is None or ev.epoch != st.epoch or self.phase is not StagePhase.MAPPING:
            # A mapping that finished after its stage was replaced or revoked: drop it.
            return StageStep(False, f"mapping of epoch {ev.epoch} is not awaited", (Unmap(ev.epoch),))
        if ev.nbytes < st.staging_bytes:
            self._drop()
            return StageStep(True, "", (Unmap(ev.epoch), RefuseStage(ev.epoch, f"staging holds {ev.nbytes} bytes, {st.staging_bytes} announced")))
        self.phase = StagePhase.STAGED
        st.last_active = ev.now
        return StageStep(True, "", (RaiseFence(st.epoch), SendReady(st.token_id, st.epoch)))

    def _map_failed(self, ev: MapFailed) -> StageStep:
        st = self.stage
        assert st is not None
        if ev.epoch != st.epoch:
            return _ignored(f"map failure of epoch {ev.epoch}, staging epoch {st.epoch}")
        self.stage, self.phase = None, StagePhase.IDLE
        return StageStep(True, "", (RefuseStage(ev.epoch, f"cannot stage: {ev.reason}"),))

    def _segment(self, ev: SegmentArrived) -> StageStep:
        st = self._of_stage(ev.sender, ev.token_id, ev.epoch)
        if isinstance(st, str):
            return _ignored(st)
        if st.count is None and type(ev.count) is int:
            st.count = ev.count  # the first segment of the staged hop fixes the count, even one refused below
        count = st.count
        if type(ev.index) is not int or type(ev.count) is not int or ev.count != count:
            return _ignored("segment count differs from the first segment's, or is not an int")
        offset = ev.index * st.stride if 0 <= ev.index < count else -1
        if offset < 0 or ev.index in st.written or ev.index in st.pending:
            return _ignored(f"segment {ev.index!r} out of range or already written")
        if type(ev.size) is not int or not 0 < ev.size <= st.stride or offset + ev.size > st.staging_bytes:
            return _ignored(f"segment {ev.index} of {ev.size!r} bytes does not fit the staged hop")
        st.pending.add(ev.index)
        st.last_active = ev.now
        return StageStep(True, "", (WriteSegment(st.epoch, ev.index, offset),))

    def _segment_written(self, ev: SegmentWritten) -> StageStep:
        st = self.stage
        assert st is not None
        if ev.epoch != st.epoch or ev.index not in st.pending:
            return _ignored(f"write of segment {ev.index} of epoch {ev.epoch} was not asked for")
        st.pending.discard(ev.index)
        st.written.add(ev.index)
        return StageStep(True)

    def _segment_not_written(self, ev: SegmentNotWritten) -> StageStep:
        st = self.stage
        assert st is not None
        if ev.epoch != st.epoch or ev.index not in st.pending:
            return _ignored(f"write of segment {ev.index} of epoch {ev.epoch} was not asked for")
        st.pending.discard(ev.index)  # it may come again
        return StageStep(True, ev.reason)

    def _done(self, ev: DoneRequested) -> StageStep:
        st = self._of_stage(ev.sender, ev.token_id, ev.epoch)
        if isinstance(st, str):
            return _ignored(st)
        if st.count != ev.segments or len(st.written) != ev.segments or st.pending:
            reason = f"received {len(st.written)} of {ev.segments!r} segments"
            return StageStep(True, "", (SendMissing(ev.sender, ev.epoch, reason),))
        self.written_hops += 1
        return StageStep(True, "", (*self._drop(), SendWritten(ev.sender, st.token_id, st.epoch, ev.segments, ev.nbytes)))

    def _revoked(self, ev: StageRevoked) -> StageStep:
        st = self.stage
        assert st is not None
        if (ev.token_id, ev.epoch) != (st.token_id, st.epoch):
            return _ignored(f"revoke of epoch {ev.epoch}, staged epoch {st.epoch}")
        # Late segments of that hop are stale from now on.
        return StageStep(True, "", (*self._drop(), RaiseFence(ev.epoch + 1)))

    def _over(self, ev: RunOver) -> StageStep:
        return StageStep(True, "", self._drop())

    def _tick(self, ev: Tick) -> StageStep:
        wake = self.wake_at
        if wake is None or ev.now < wake:
            return _ignored(f"the stage is active until {wake}, it is {ev.now}")
        return StageStep(True, "stage idle past its timeout", self._drop())
