"""The simulated device agent (remote holders write through it) and the observer.

The agent keeps ``gtbus/nodes/agent.py``'s rules: segments only from the
holder named in the current stage, for its token and epoch, each index once
and within the declared count; ``agent-done`` is answered with
``agent-written`` only when every segment arrived, the mapping closed first; a
newer stage replaces an older one; a revoke of the staged hop drops it. It
never holds the key, so it can only move ciphertext.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gtbus.testing.sim.config import AGENT, OBSERVER, ORCHESTRATOR
from gtbus.testing.sim.device import Segment, SimDevice
from gtbus.testing.sim.registration import Registrant
from gtbus.testing.sim.world import Envelope, World


@dataclass
class _Stage:
    token_id: str
    epoch: int
    holder: str
    sid: int
    received: set[int] = field(default_factory=set)
    count: int | None = None


class SimAgent(Registrant):
    """The device agent on the GPU host."""

    name = AGENT

    def __init__(self, world: World, device: SimDevice) -> None:
        self.world = world
        self.device = device
        self.up = False
        self.incarnation = 0
        self.stage: _Stage | None = None
        self.welcomed: int | None = None

    def start(self) -> None:
        """Start (or restart): no stage, register."""
        self.up = True
        self.incarnation += 1
        self.stage = None
        self.welcomed = None
        self._register(self.incarnation)

    def crash(self) -> None:
        """kill -9: its mapping closes with the process."""
        self._drop()
        self.up = False

    def _drop(self) -> None:
        if self.stage is not None:
            self.device.unmap(self.stage.sid, self.stage.holder)
            self.stage = None

    def receive(self, env: Envelope) -> None:
        """Dispatch one delivered message."""
        kind, src = env.kind, env.src
        if self.on_registration(env):
            return
        if kind == "agent-stage" and src == ORCHESTRATOR:
            token_id, epoch, holder, sid = env.body
            self._drop()
            if self.device.map(sid, holder) is not None:
                self.stage = _Stage(token_id, epoch, holder, sid)
                self.world.send(self.name, ORCHESTRATOR, "agent-ready", token_id, epoch)
        elif kind == "revoke" and src == ORCHESTRATOR:
            if self.stage is not None and self.stage.token_id == env.body and self.stage.epoch == env.epoch:
                self._drop()
        elif kind == "ship-segment":
            self._on_segment(env)
        elif kind == "agent-done":
            self._on_done(env)

    def _current(self, env: Envelope, token_id: object) -> _Stage | None:
        s = self.stage
        if s is None or env.src != s.holder or env.epoch != s.epoch or token_id != s.token_id:
            return None
        return s

    def _on_segment(self, env: Envelope) -> None:
        token_id, index, count, seg = env.body
        s = self._current(env, token_id)
        if s is None or type(index) is not int or type(count) is not int or not isinstance(seg, Segment):
            return
        if s.count is None:
            s.count = count
        if count != s.count or not 0 <= index < count or index in s.received:
            return
        if self.device.write(s.sid, seg, s.holder):
            s.received.add(index)

    def _on_done(self, env: Envelope) -> None:
        token_id, count = env.body
        s = self._current(env, token_id)
        if s is None:
            return
        if count != s.count or len(s.received) != count:
            self.world.send(self.name, s.holder, "refusal", "not every segment arrived", s.epoch)
            return
        self._drop()
        self.world.send(self.name, s.holder, "agent-written", token_id, s.epoch)


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
