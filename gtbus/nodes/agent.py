"""The device agent: writes remote holders' ciphertext into device staging on the GPU host.

A holder on another server cannot map the GPU host's staging. It streams its
AEAD segments over ZeroMQ to the agent instead ("ship-to-device", DESIGN §2);
the agent writes them, still encrypted, into the hop's staging, and the
device authenticates and decrypts them exactly as for a local holder. The
agent never holds the channel key: plaintext still appears only on the device.

The agent has two links: a client of the orchestrator (it registers, and is
told per hop which holder may write which staging, the handle sealed to the
agent's X25519 key), and a server that remote holders connect to. What it
may write, when, and when it answers is decided by
:class:`~gtbus.protocol.agent_stage.AgentStageMachine`; this node only feeds it
the messages and performs its actions (map, write, unmap, fence, send).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Final

from gtbus.errors import ChannelError, DeviceError
from gtbus.gpu.device import HolderStaging, StagingWriter
from gtbus.gpu.sealing import open_bytes
from gtbus.messages.pipeline import Accepted
from gtbus.messages.types import AgentDone, AgentReady, AgentStage, AgentWritten, Refusal, RunComplete, ShipSegment, Shutdown, TokenRevoke
from gtbus.nodes.registration import register_with
from gtbus.nodes.runtime import NodeRuntime
from gtbus.protocol.agent_stage import (
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
    Stage,
    StageRequested,
    StageRevoked,
    StageStep,
    Tick,
    Unmap,
    WriteSegment,
)
from gtbus.transport.base import Delivery

HOLDERS_LOG: Final = "-holders"
"""The agent's server for remote holders logs apart from its link to the orchestrator, under its name and this."""


class DeviceAgent:
    """Relays remote holders' ciphertext into device staging: the shell around :class:`AgentStageMachine`."""

    def __init__(
        self, upstream: NodeRuntime, downstream: NodeRuntime, device_cls: type[HolderStaging], *, idle_timeout: float | None = None
    ) -> None:
        self.up = upstream  # client of the orchestrator
        self.down = downstream  # server for remote holders
        self.device_cls = device_cls
        self.machine = AgentStageMachine(idle_timeout=idle_timeout)
        self.mappings: dict[int, StagingWriter] = {}  # epoch -> its staging mapping (the machine says when to drop it)
        self.done = asyncio.Event()
        self.log = logging.getLogger(f"gtbus.agent.{upstream.name}")
        upstream.on(AgentStage, self._on_stage)
        upstream.on(TokenRevoke, self._on_revoke)
        upstream.on(RunComplete, self._on_complete)
        upstream.on(Shutdown, self._on_complete)
        downstream.on(ShipSegment, self._on_segment)
        downstream.on(AgentDone, self._on_done)

    @property
    def stage(self) -> Stage | None:
        """The hop being staged now (None: nothing staged)."""
        return self.machine.stage

    @property
    def written(self) -> int:
        """Hops whose every segment this agent wrote."""
        return self.machine.written_hops

    async def register(self, *, attempts: int = 30, timeout: float = 2.0) -> None:
        """Announce this agent to the orchestrator (retries while it starts)."""
        await register_with(self.up, {"agent": True}, attempts=attempts, timeout=timeout)

    async def _feed(self, event: Any, acc: Accepted | None = None, payload: Any = None) -> None:
        """Feed one event and perform its actions in order (``acc``: the message they answer; ``payload``: its data)."""
        step: StageStep = self.machine.handle(event)
        if not step.counted and isinstance(event, SegmentArrived):
            self.log.warning("refused segment %r from %s: %s", event.index, event.sender, step.reason)
        elif not step.counted and acc is not None:
            self.log.info("refused %s from %s: %s", acc.spec.name, acc.header.sender, step.reason)
        for action in step.actions:
            await self._ACTIONS[type(action)](self, action, acc, payload)

    async def _on_revoke(self, acc: Accepted[TokenRevoke], delivery: Delivery) -> None:
        await self._feed(StageRevoked(acc.message.token_id, acc.header.epoch), acc)

    async def _on_complete(self, acc: Accepted[RunComplete | Shutdown], delivery: Delivery) -> None:
        await self._feed(RunOver())
        self.done.set()

    async def _on_stage(self, acc: Accepted[AgentStage], delivery: Delivery) -> None:
        m: AgentStage = acc.message
        await self._feed(StageRequested(m.token_id, acc.header.epoch, m.holder, m.staging_bytes, m.segment_size, time.time()), acc, m)

    async def _on_segment(self, acc: Accepted[ShipSegment], delivery: Delivery) -> None:
        m: ShipSegment = acc.message
        if len(acc.blobs) != 1:
            self.log.info("refused ship.segment from %s: %d blobs", acc.header.sender, len(acc.blobs))
            return
        event = SegmentArrived(acc.header.sender, m.token_id, acc.header.epoch, m.index, m.count, len(acc.blobs[0]), time.time())
        await self._feed(event, acc, acc.blobs[0])

    async def _on_done(self, acc: Accepted[AgentDone], delivery: Delivery) -> None:
        m: AgentDone = acc.message
        await self._feed(DoneRequested(acc.header.sender, m.token_id, acc.header.epoch, m.segments, m.nbytes), acc)

    # -- actions -------------------------------------------------------------------------------

    async def _map(self, a: MapStaging, acc: Accepted | None, stage: Any) -> None:
        assert isinstance(stage, AgentStage)
        try:
            handle = open_bytes(stage.sealed_handle, bytes(self.up.identity.x25519_secret), "sealed staging handle").decode()
            # Fetching the staging may wait on the device's broker: not on the event loop.
            mapping = await asyncio.to_thread(self.device_cls.map_staging, handle)
        except (ChannelError, DeviceError, UnicodeDecodeError) as exc:
            await self._feed(MapFailed(a.epoch, str(exc)), acc)
            return
        self.mappings[a.epoch] = mapping
        await self._feed(Mapped(a.epoch, mapping.nbytes, time.time()), acc)

    async def _unmap(self, a: Unmap, acc: Accepted | None, payload: Any) -> None:
        mapping = self.mappings.pop(a.epoch, None)
        if mapping is not None:
            try:
                mapping.close()
            except DeviceError:
                pass

    async def _refuse_stage(self, a: RefuseStage, acc: Accepted | None, payload: Any) -> None:
        assert acc is not None
        await self.up.send(Refusal("agent-stage", a.reason), parent=acc.header.id, epoch=a.epoch)

    async def _raise_fence(self, a: RaiseFence, acc: Accepted | None, payload: Any) -> None:
        self.down.guard.raise_fence(a.epoch)

    async def _send_ready(self, a: SendReady, acc: Accepted | None, payload: Any) -> None:
        assert acc is not None
        await self.up.send(AgentReady(a.token_id), parent=acc.header.id, epoch=a.epoch)

    async def _write(self, a: WriteSegment, acc: Accepted | None, blob: Any) -> None:
        mapping = self.mappings.get(a.epoch)
        try:
            if mapping is None:
                raise DeviceError("the staging is no longer mapped")
            # The writer checks the offset against the mapping's real size as well.
            await asyncio.to_thread(mapping.write_ciphertext, a.offset, blob)
        except DeviceError as exc:
            self.log.warning("refused segment %d: %s", a.index, exc)
            await self._feed(SegmentNotWritten(a.epoch, a.index, str(exc)), acc)
            return
        await self._feed(SegmentWritten(a.epoch, a.index), acc)

    async def _send_written(self, a: SendWritten, acc: Accepted | None, payload: Any) -> None:
        assert acc is not None
        await self.down.send(AgentWritten(a.token_id, a.segments, a.nbytes), a.to, parent=acc.header.id, epoch=a.epoch)

    async def _send_missing(self, a: SendMissing, acc: Accepted | None, payload: Any) -> None:
        assert acc is not None
        await self.down.send(Refusal("agent-missing", a.reason), a.to, parent=acc.header.id, epoch=a.epoch)

    _ACTIONS: dict[type, Callable[..., Awaitable[None]]] = {
        MapStaging: _map,
        Unmap: _unmap,
        RefuseStage: _refuse_stage,
        RaiseFence: _raise_fence,
        SendReady: _send_ready,
        WriteSegment: _write,
        SendWritten: _send_written,
        SendMissing: _send_missing,
    }

    async def run(self) -> None:
        """Register, then serve until the run completes."""
        await self.register()
        self.up.state_label = "ready"
        await self.serve()

    async def serve(self) -> None:
        """Until the run completes: handlers do the work; this drops a stage left idle past ``idle_timeout``."""
        if self.machine.idle_timeout is None:
            await self.done.wait()
            return
        while not self.done.is_set():
            # Looked at again each second: a stage mapped meanwhile sets a new wake-up.
            wake = self.machine.wake_at
            try:
                await asyncio.wait_for(self.done.wait(), 1.0 if wake is None else min(1.0, max(0.0, wake - time.time())))
            except asyncio.TimeoutError:
                if wake is not None and time.time() >= wake:
                    self.log.info("stage of hop %d idle for %.0fs: dropping its mapping", self.stage.epoch if self.stage else 0, self.machine.idle_timeout)
                    await self._feed(Tick(time.time()))
