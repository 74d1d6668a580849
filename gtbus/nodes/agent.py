"""The device agent: writes remote holders' ciphertext into device staging on the GPU host.

A holder on another server cannot map the GPU host's staging. It streams its
AEAD segments over ZeroMQ to the agent instead ("ship-to-device", DESIGN §2);
the agent writes them, still encrypted, into the hop's staging, and the
device authenticates and decrypts them exactly as for a local holder. The
agent never holds the channel key: plaintext still appears only on the device.

The agent has two links: a client of the orchestrator (it registers, and is
told per hop which holder may write which staging, the handle sealed to the
agent's X25519 key), and a server that remote holders connect to. Rules:

* segments are accepted only from the holder named in the current stage, for
  its token and epoch, each index once and within the declared count;
* a newer stage replaces an older one (its mapping is dropped), and anything
  for an older epoch is refused by the replay guard's fence;
* ``agent.done`` is answered with ``agent.written`` only when every segment
  arrived; the mapping is closed before answering;
* a ``token.revoke`` for the staged hop drops its mapping at once, and
  anything later for that epoch is stale.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from gtbus.errors import ChannelError, DeviceError
from gtbus.gpu.channel import TAG_SIZE
from gtbus.gpu.device import Device
from gtbus.gpu.sealing import open_bytes
from gtbus.messages.pipeline import Accepted
from gtbus.messages.types import AgentDone, AgentReady, AgentStage, AgentWritten, Refusal, RunComplete, ShipSegment, Shutdown, TokenRevoke
from gtbus.nodes.registration import register_with
from gtbus.nodes.runtime import NodeRuntime
from gtbus.transport.base import Delivery


@dataclass
class _Stage:
    token_id: str
    epoch: int
    holder: str
    mapping: Any
    stride: int
    staging_bytes: int
    received: set[int] = field(default_factory=set)
    count: int | None = None
    nbytes: int = 0


class DeviceAgent:
    """Relays remote holders' ciphertext into device staging."""

    def __init__(self, upstream: NodeRuntime, downstream: NodeRuntime, device_cls: type[Device]) -> None:
        self.up = upstream  # client of the orchestrator
        self.down = downstream  # server for remote holders
        self.device_cls = device_cls
        self.stage: _Stage | None = None
        self.done = asyncio.Event()
        self.written = 0
        self.log = logging.getLogger(f"gtbus.agent.{upstream.name}")
        upstream.on(AgentStage, self._on_stage)
        upstream.on(TokenRevoke, self._on_revoke)
        upstream.on(RunComplete, self._on_complete)
        upstream.on(Shutdown, self._on_complete)
        downstream.on(ShipSegment, self._on_segment)
        downstream.on(AgentDone, self._on_done)

    async def register(self, *, attempts: int = 30, timeout: float = 2.0) -> None:
        """Announce this agent to the orchestrator (retries while it starts)."""
        await register_with(self.up, {"agent": True}, attempts=attempts, timeout=timeout)

    def _drop_stage(self) -> None:
        if self.stage is not None:
            try:
                self.device_cls.unmap(self.stage.mapping)
            except DeviceError:
                pass
            self.stage = None

    async def _on_revoke(self, acc: Accepted[TokenRevoke], delivery: Delivery) -> None:
        st = self.stage
        if st is not None and st.token_id == acc.message.token_id and st.epoch == acc.header.epoch:
            self.log.info("hop %d revoked: dropping its staging mapping", st.epoch)
            self._drop_stage()
            self.down.guard.raise_fence(acc.header.epoch + 1)  # late segments of that hop are stale now

    async def _on_complete(self, acc: Accepted[RunComplete | Shutdown], delivery: Delivery) -> None:
        self._drop_stage()
        self.done.set()

    async def _on_stage(self, acc: Accepted[AgentStage], delivery: Delivery) -> None:
        m: AgentStage = acc.message
        self._drop_stage()
        try:
            handle = open_bytes(m.sealed_handle, bytes(self.up.identity.x25519_secret), "sealed staging handle").decode()
            # Fetching the staging may wait on the device's broker: not on the event loop.
            mapping = await asyncio.to_thread(self.device_cls.map_staging, handle)
        except (ChannelError, DeviceError, UnicodeDecodeError) as exc:
            await self.up.send(Refusal("agent-stage", f"cannot stage: {exc}"), parent=acc.header.id, epoch=acc.header.epoch)
            return
        if mapping.nbytes < m.staging_bytes:
            self.device_cls.unmap(mapping)
            await self.up.send(Refusal("agent-stage", f"staging holds {mapping.nbytes} bytes, {m.staging_bytes} announced"),
                               parent=acc.header.id, epoch=acc.header.epoch)
            return
        self._drop_stage()  # another stage may have landed while this one was fetched
        self.stage = _Stage(m.token_id, acc.header.epoch, m.holder, mapping, m.segment_size + TAG_SIZE, m.staging_bytes)
        self.down.guard.raise_fence(acc.header.epoch)
        await self.up.send(AgentReady(m.token_id), parent=acc.header.id, epoch=acc.header.epoch)

    def _current(self, acc: Accepted, token_id: str) -> _Stage | None:
        st = self.stage
        if st is None or acc.header.sender != st.holder or acc.header.epoch != st.epoch or token_id != st.token_id:
            self.log.info("refused %s from %s: not the staged hop", acc.spec.name, acc.header.sender)
            return None
        return st

    async def _on_segment(self, acc: Accepted[ShipSegment], delivery: Delivery) -> None:
        m: ShipSegment = acc.message
        st = self._current(acc, m.token_id)
        if st is None or len(acc.blobs) != 1:
            return
        blob = acc.blobs[0]
        off = m.index * st.stride
        if st.count is None:
            st.count = m.count
        if m.count != st.count or not 0 <= m.index < m.count or m.index in st.received or len(blob) > st.stride or off + len(blob) > st.staging_bytes:
            self.log.warning("refused segment %d from %s: outside the staged hop", m.index, acc.header.sender)
            return
        try:
            # write_raw checks the offset against the mapping's real size as well.
            await asyncio.to_thread(st.mapping.write_raw, blob, off)
        except DeviceError as exc:
            self.log.warning("refused segment %d from %s: %s", m.index, acc.header.sender, exc)
            return
        st.received.add(m.index)

    async def _on_done(self, acc: Accepted[AgentDone], delivery: Delivery) -> None:
        m: AgentDone = acc.message
        st = self._current(acc, m.token_id)
        if st is None:
            return
        if st.count != m.segments or len(st.received) != m.segments:
            await self.down.send(Refusal("agent-missing", f"received {len(st.received)} of {m.segments} segments"), acc.header.sender,
                                 parent=acc.header.id, epoch=acc.header.epoch)
            return
        self._drop_stage()
        self.written += 1
        await self.down.send(AgentWritten(m.token_id, m.segments, m.nbytes), acc.header.sender, parent=acc.header.id, epoch=acc.header.epoch)

    async def run(self) -> None:
        """Register, then serve until the run completes."""
        await self.register()
        self.up.state_label = "ready"
        await self.done.wait()
