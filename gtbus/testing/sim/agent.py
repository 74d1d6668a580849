"""The simulated device agent (remote holders write through it) and the observer.

The agent's decisions are the real :class:`AgentStageMachine`'s (which
segments count, where they go, when the hop is written, fencing); this shell
maps the device's staging, writes the segments where the machine says and
sends its answers. It never holds the key, so it can only move ciphertext.
"""

from __future__ import annotations

from gtbus.gpu.channel import TAG_SIZE
from gtbus.protocol.agent_stage import (
    AgentStageMachine,
    DoneRequested,
    MapFailed,
    Mapped,
    MapStaging,
    RaiseFence,
    RefuseStage,
    RunOver,
    SegmentArrived,
    SegmentNotWritten,
    SegmentWritten,
    SendMissing,
    SendReady,
    SendWritten,
    StageAction,
    StageEvent,
    StageRequested,
    StageRevoked,
    Unmap,
    WriteSegment,
)
from gtbus.testing.sim.config import AGENT, OBSERVER, ORCHESTRATOR, SEGMENT_BYTES
from gtbus.testing.sim.device import Segment, SimDevice
from gtbus.testing.sim.registration import Registrant
from gtbus.testing.sim.world import Envelope, World


class SimAgent(Registrant):
    """The device agent on the GPU host: the real :class:`AgentStageMachine` decides, this shell maps and writes."""

    name = AGENT

    def __init__(self, world: World, device: SimDevice) -> None:
        self.world = world
        self.device = device
        self.up = False
        self.incarnation = 0
        self.welcomed: int | None = None
        self.machine = AgentStageMachine()
        self.handles: dict[int, tuple[int, str]] = {}  # epoch -> (staging handle, holder), from the stage request
        self.fence = 0
        self.incoming: dict[tuple[int, int], Segment] = {}  # (epoch, index) -> the segment to write

    def start(self) -> None:
        """Start (or restart): no stage, register."""
        self.up = True
        self.incarnation += 1
        self.machine = AgentStageMachine()
        self.handles.clear()
        self.incoming.clear()
        self.welcomed = None
        self._register(self.incarnation)

    def crash(self) -> None:
        """kill -9: its mapping closes with the process (the fence persists, as the replay journal does)."""
        st = self.machine.stage
        if st is not None and st.epoch in self.handles:
            sid, holder = self.handles[st.epoch]
            self.device.unmap(sid, holder)
        self.up = False

    def receive(self, env: Envelope) -> None:
        """Turn one delivered message into a machine event."""
        kind, src, now = env.kind, env.src, self.world.now
        if self.on_registration(env):
            return
        if kind == "agent-stage" and src == ORCHESTRATOR:
            token_id, epoch, holder, sid, staging_bytes, segment_size = env.body
            self.handles[epoch] = (sid, holder)
            self._drive(StageRequested(token_id, epoch, holder, staging_bytes, segment_size, now))
        elif kind == "revoke" and src == ORCHESTRATOR:
            self._drive(StageRevoked(env.body, env.epoch))
        elif kind in ("complete", "shutdown"):
            self._drive(RunOver())
        elif env.epoch < self.fence:
            self.world.note("agent fenced", (kind, src, env.epoch))
        elif kind == "ship-segment":
            token_id, index, count, seg, size = env.body
            if isinstance(seg, Segment) and type(index) is int:
                self.incoming[(env.epoch, index)] = seg
            self._drive(SegmentArrived(src, token_id, env.epoch, index, count, size, now))
        elif kind == "agent-done":
            token_id, segments, nbytes = env.body
            self._drive(DoneRequested(src, token_id, env.epoch, segments, nbytes))

    def _drive(self, event: StageEvent) -> None:
        step = self.machine.handle(event)
        if not step.counted:
            self.world.note("agent ignored", (type(event).__name__, step.reason[:60]))
        for action in step.actions:
            answer = self._do(action)
            if answer is not None:
                self._drive(answer)

    def _do(self, action: StageAction) -> StageEvent | None:
        w, device = self.world, self.device
        if isinstance(action, MapStaging):
            sid, holder = self.handles[action.epoch]
            s = device.map(sid, holder)
            if s is None:
                return MapFailed(action.epoch, "the staging export is gone")
            return Mapped(action.epoch, s.capacity * (SEGMENT_BYTES + TAG_SIZE), w.now)
        if isinstance(action, Unmap):
            sid, holder = self.handles.get(action.epoch, (0, ""))
            device.unmap(sid, holder)
        elif isinstance(action, RefuseStage):
            w.send(self.name, ORCHESTRATOR, "refusal", action.reason, action.epoch)
        elif isinstance(action, RaiseFence):
            self.fence = max(self.fence, action.epoch)
        elif isinstance(action, SendReady):
            w.send(self.name, ORCHESTRATOR, "agent-ready", action.token_id, action.epoch)
        elif isinstance(action, WriteSegment):
            sid, holder = self.handles[action.epoch]
            seg = self.incoming.pop((action.epoch, action.index), None)
            if seg is None or not device.write(sid, seg, holder, at=action.index):
                return SegmentNotWritten(action.epoch, action.index, "the mapping refused the write")
            return SegmentWritten(action.epoch, action.index)
        elif isinstance(action, SendWritten):
            w.send(self.name, action.to, "agent-written", action.token_id, action.epoch)
        elif isinstance(action, SendMissing):
            w.send(self.name, action.to, "refusal", action.reason, action.epoch)
        return None


class SimObserver:
    """A status follower: asks for a snapshot, then counts what is published."""

    name = OBSERVER

    def __init__(self, world: World) -> None:
        self.world = world
        self.up = False
        self.seen: dict[str, int] = {}

    def start(self) -> None:
        """Start following."""
        self.up = True
        self.world.send(self.name, ORCHESTRATOR, "snapshot-request", None)

    def crash(self) -> None:
        """Gone; it asks again when back."""
        self.up = False

    def receive(self, env: Envelope) -> None:
        """Count one published message."""
        self.seen[env.kind] = self.seen.get(env.kind, 0) + 1
