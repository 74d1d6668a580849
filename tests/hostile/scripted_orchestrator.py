"""A scripted orchestrator: the deployment's real orchestrator key on a real server transport, driven by the test.

Built from gtbus's own classes (NodeRuntime, the ZeroMQ server transport, the
platform key, the evidence server), so what it sends (Welcome, evidence,
grants, receipts) is as authentic as an honest orchestrator's: only the values
are the test's. The holder under test is the real ``gtbus holder`` process
started by the ``travel`` fixture.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from travel_kit import Travel

from gtbus.attest import run_binding
from gtbus.attest.emulated import EmulatedVerifier
from gtbus.gpu.attestation import MeasurementReport, channel_key_commitment
from gtbus.gpu.platform_key import load_platform_signer
from gtbus.messages.identity import Roster, load_identity
from gtbus.messages.pipeline import Accepted
from gtbus.messages.types import AttestRequest, Register, Welcome
from gtbus.nodes.attester import EvidenceServer
from gtbus.nodes.runtime import NodeRuntime
from gtbus.nodes.wiring import server_transport


class ScriptedOrchestrator:
    """Welcomes holders to run ``run_id`` (chunks of ``chunk_tokens``), gives evidence, sends what the test says.

    ``hold_evidence``: evidence is answered only once this event is set (a holder then stays in its setup).
    """

    def __init__(self, t: Travel, run_id: str, chunk_tokens: int, *, hold_evidence: asyncio.Event | None = None) -> None:
        dep = t.dep
        self.run_id, self.chunk_tokens = run_id, chunk_tokens
        self.identity = load_identity(dep.dep.key_path(dep.dep.orchestrator.name))
        roster = Roster.from_dir(dep.keys)
        self.rt = NodeRuntime(self.identity, roster, server_transport(self.identity, roster, dep.router, dep.pub), run_dir=t.run_dir / "scripted")
        self.platform = load_platform_signer(dep.platform_key)
        self.code = bytes.fromhex(dep.pin)
        if hold_evidence is not None:  # handlers run in registration order: this one first

            async def hold(acc: Accepted[AttestRequest], delivery: Any) -> None:
                await hold_evidence.wait()

            self.rt.on(AttestRequest, hold)
        EvidenceServer(self.rt, {"emulated": EmulatedVerifier(self.platform, lambda: {"code": self.code}, lambda: run_binding(run_id))})
        self.rt.on(Register, self._on_register)

    def queue_of(self, message_type: type) -> asyncio.Queue[Accepted]:
        """Every accepted message of ``message_type``, in a queue the test reads (call before :meth:`start`)."""
        queue: asyncio.Queue[Accepted] = asyncio.Queue()

        async def put(acc: Accepted, delivery: Any) -> None:
            await queue.put(acc)

        self.rt.on(message_type, put)
        return queue

    def report(self, key: bytes, epoch: int) -> dict[str, Any]:
        """A signed measurement report of the pinned code committing to channel ``key`` at ``epoch``, as wire data."""
        rep = MeasurementReport(self.code, b"m" * 32, "host:0", channel_key_commitment(key), self.run_id, epoch, float(time.time()))
        return dict(self.platform.sign(rep).to_wire())

    async def _on_register(self, acc: Accepted[Register], delivery: Any) -> None:
        welcome = Welcome(self.run_id, self.report(b"", 0), {"chunk_tokens": self.chunk_tokens, "rounds": 1})
        await self.rt.send(welcome, acc.header.sender, parent=acc.header.id)
