"""The simulated data holder: the real :class:`HolderMachine` deciding, a shell that writes segments.

Like ``gtbus/nodes/holder.py``: registers (again whenever it hears of a new
orchestrator process), heartbeats, and on a grant asks the machine what to
do: provision (ack, map the staging, write the chunk's segments under the
hop's key, unmap, return), ack again, ignore, or decline. A local holder
writes the device's staging itself; a remote one streams its segments to the
device agent and returns once the agent says all were written; in ship mode
every holder sends its segments to the orchestrator, then returns. A revoke for
the hop in progress stops it; writes check the hop is still current first. A
local holder maps the staging of a hop prepared for it (``prepare``) at once,
keeps one such mapping, and drops it when the grant it provisions names
another staging.

:mod:`hostile` subclasses it; its hooks are the ``_segments``,
``_after_write`` and ``_send_return`` methods.
"""

from __future__ import annotations

from typing import Any

from gtbus.gpu.channel import TAG_SIZE, segment_bounds, segment_count
from gtbus.messages.types import ShipSegment, TokenAck, TokenDecline, TokenReturn
from gtbus.protocol.holder_hop import Action, HolderMachine
from gtbus.testing.sim.config import AGENT, CHUNK_TOKENS, ORCHESTRATOR, SEGMENT_BYTES, TOKEN_BYTES, SimConfig
from gtbus.testing.sim.device import Segment, SimDevice, chunk_tag
from gtbus.testing.sim.orchestrator import GrantBody
from gtbus.testing.sim.registration import Registrant
from gtbus.testing.sim.world import Envelope, World

HEARTBEAT = 1.0


class SimHolder(Registrant):
    """One data holder node."""

    def __init__(self, world: World, cfg: SimConfig, device: SimDevice, name: str) -> None:
        self.world = world
        self.cfg = cfg
        self.device = device
        self.name = name
        self.remote = name in cfg.via_agent
        self.up = False
        self.incarnation = 0
        self.done = False
        self.provisioned = 0

    def manifest(self) -> dict[str, Any]:
        """What it registers with (an honest holder's manifest)."""
        m: dict[str, Any] = {
            "token_dtype": "uint16",
            "total_tokens": self.cfg.tokens[self.name],
            "max_token": 255,
            "digest_alg": "blake3",
            "digest": f"{sum(map(ord, self.name)):064x}",
            "name": self.name,
        }
        if self.remote:
            m["via"] = AGENT
        return m

    def start(self) -> None:
        """Start (or restart after a crash): a fresh machine, register, heartbeat."""
        self.up = True
        self.incarnation += 1
        self.machine = HolderMachine()
        self.welcomed: int | None = None
        self.granted: GrantBody | None = None
        self.prepared: int | None = None  # the staging handle a preparation mapped, until its grant or the next one
        self.done = False
        self._register(self.incarnation)
        self.world.on_node(self.name, HEARTBEAT, self._heartbeat, self.incarnation)

    def crash(self) -> None:
        """kill -9."""
        self.up = False
        self.world.note("holder crashed", self.name)

    def _live(self, inc: int) -> bool:
        return self.up and inc == self.incarnation and not self.done

    def registration(self) -> dict[str, Any]:
        """It registers with its manifest."""
        return self.manifest()

    def _heartbeat(self, inc: int) -> None:
        if self._live(inc):
            self.world.send(self.name, ORCHESTRATOR, "heartbeat", None)
            self.world.on_node(self.name, HEARTBEAT, self._heartbeat, inc)

    def send(self, kind: str, body: Any, epoch: int = 0) -> None:
        """Send to the orchestrator."""
        self.world.send(self.name, ORCHESTRATOR, kind, body, epoch)

    # -- messages -------------------------------------------------------------------------------

    def receive(self, env: Envelope) -> None:
        """Dispatch one delivered message."""
        kind = env.kind
        if self.done or self.on_registration(env):
            return
        if kind == "grant":
            self._on_grant(env)
        elif kind == "prepare":
            self._on_prepare(env)
        elif kind == "revoke":
            if self.machine.on_revoke(env.body, env.epoch):
                self.world.note("holder revoked", (self.name, env.epoch))
        elif kind == "agent-written":
            self._on_written(env)
        elif kind in ("complete", "shutdown"):
            self.done = True

    def _on_prepare(self, env: Envelope) -> None:
        """Map the staging of a hop prepared ahead (as gtbus/nodes/holder.py: one at a time, nothing written)."""
        holder, _chunk, _key, sid = env.body
        if holder != self.name or self.remote:
            return
        self._drop_prepared()
        if self.device.map(sid, self.name) is not None:
            self.prepared = sid
            self._prepared_hook(env.body)

    def _prepared_hook(self, body: tuple[str, int, int, int]) -> None:
        """Hook: what a holder does with a preparation it mapped (nothing more, if honest)."""

    def _drop_prepared(self) -> None:
        if self.prepared is not None:
            self.device.unmap(self.prepared, self.name)
            self.prepared = None

    def _on_grant(self, env: Envelope) -> None:
        g: GrantBody = env.body
        epoch = env.epoch
        if g.holder != self.name:
            return
        decision = self.machine.on_grant(g.token_id, epoch, g.lease_deadline, self.world.clock(self.name))
        if decision.action is Action.PROVISION:
            if self.prepared != g.staging:
                self._drop_prepared()  # a guess for another hop: this grant maps its own
            self.prepared = None  # the write maps it (again) and unmaps it
        if decision.action is Action.IGNORE:
            return
        if decision.action is Action.ACK_AGAIN:
            self.send("ack", TokenAck(g.token_id), epoch)
            return
        if decision.action is Action.DECLINE:
            self.send("decline", TokenDecline(g.token_id, decision.reason), epoch)
            return
        self.send("ack", TokenAck(g.token_id), epoch)
        self.granted = g
        self.world.on_node(self.name, 0.002, self._write, self.incarnation, g, epoch)

    def chunk_shape(self, chunk: int) -> tuple[int, int]:
        """(segments, bytes) of one of its chunks."""
        nbytes = max(0, min(CHUNK_TOKENS, self.cfg.tokens[self.name] - chunk * CHUNK_TOKENS)) * TOKEN_BYTES
        return segment_count(nbytes, SEGMENT_BYTES), nbytes

    def _segments(self, g: GrantBody, epoch: int) -> list[Segment]:
        n, _ = self.chunk_shape(g.chunk_index)
        tag = chunk_tag(self.name, g.chunk_index)
        return [Segment(g.key, epoch, self.name, i, n, tag, self.name) for i in range(n)]

    def _write(self, inc: int, g: GrantBody, epoch: int) -> None:
        if not self._live(inc) or not self.machine.is_current(g.token_id, epoch):
            return
        segs = self._segments(g, epoch)
        if g.mode == "ship":
            for seg, shipped in zip(segs, self._shipped(g, epoch, segs)):
                self.send("ship-segment", (shipped, seg, self._shipped_size(g, seg.index)), epoch)
            self.world.on_node(self.name, 0.001, self._return, inc, g, epoch)
            return
        if self.remote:
            for body in self._to_agent(g, epoch, segs):
                self.world.send(self.name, AGENT, "ship-segment", body, epoch)
            self.world.send(self.name, AGENT, "agent-done", (g.token_id, len(segs), self.chunk_shape(g.chunk_index)[1]), epoch)
            return
        if self.device.map(g.staging, self.name) is None:
            self.machine.failed(g.token_id, epoch)
            self.send("decline", TokenDecline(g.token_id, "provisioning failed: staging not mapped"), epoch)
            return
        for seg in segs:
            self.device.write(g.staging, seg, self.name)
        self.device.unmap(g.staging, self.name)
        self._after_write(g, epoch)
        self.world.on_node(self.name, 0.001, self._return, inc, g, epoch)

    def _to_agent(self, g: GrantBody, epoch: int, segs: list[Segment]) -> list[tuple[Any, ...]]:
        """Hook: what it streams to the device agent, (token id, index, count, segment, bytes) each."""
        return [(g.token_id, seg.index, len(segs), seg, self._shipped_size(g, seg.index)) for seg in segs]

    def _shipped(self, g: GrantBody, epoch: int, segs: list[Segment]) -> list[Any]:
        """Hook: the ``ship.segment`` bodies for ``segs`` (index and count)."""
        return [ShipSegment(g.token_id, seg.index, len(segs)) for seg in segs]

    def _shipped_size(self, g: GrantBody, index: int) -> int:
        """Bytes of ciphertext and tag of segment ``index`` of the granted chunk."""
        _, nbytes = self.chunk_shape(g.chunk_index)
        return segment_bounds(index, nbytes, SEGMENT_BYTES)[2] + TAG_SIZE

    def _on_written(self, env: Envelope) -> None:
        g = self.granted
        if g is not None and g.token_id == env.body and self.machine.is_current(g.token_id, env.epoch):
            self.world.on_node(self.name, 0.001, self._return, self.incarnation, g, env.epoch)

    def _after_write(self, g: GrantBody, epoch: int) -> None:
        """Hook: what a holder does between writing and returning (nothing, if honest)."""

    def _return(self, inc: int, g: GrantBody, epoch: int) -> None:
        if not self._live(inc) or not self.machine.is_current(g.token_id, epoch):
            return
        n, nbytes = self.chunk_shape(g.chunk_index)
        self._send_return(g, epoch, TokenReturn(g.token_id, g.chunk_index, n, nbytes, b"", bytes(32)))
        self.machine.returned(g.token_id, epoch)
        self.provisioned += 1

    def _send_return(self, g: GrantBody, epoch: int, ret: TokenReturn) -> None:
        """Hook: send the return (a hostile holder sends something else)."""
        self.send("return", ret, epoch)
