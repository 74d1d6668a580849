"""The orchestrator's hop shell (gtbus.nodes.hop_runner) running the HopMachine on a real device and runtime.

In-process over the memory transport, with a real orchestrator (host device,
ByteLM, signed messages, recorded log) and a scripted holder that answers each
grant as the test says: a decline, a return of another chunk, a return of the
right size whose segments were never written, silence past the lease. Every
hop ends as the machine decides, the run goes on, nothing is trained, and
``replay --redrive`` of the orchestrator's log finds no difference. A run
cancelled while a holder holds the token takes it back and scrubs (the
cancellation is what surfaces); a scrub that does not read back zero stops
the run with its reason.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from gtbus.errors import GtbusError
from gtbus.gpu.attestation import PlatformSigner
from gtbus.gpu.channel import segment_count
from gtbus.gpu.host import HostDevice
from gtbus.messages.types import Register, Shutdown, TokenAck, TokenDecline, TokenGrant, TokenReturn, Welcome
from gtbus.nodes.orchestrator import Orchestrator, RunConfig
from gtbus.nodes.runtime import NodeRuntime
from gtbus.protocol.hop import HopOutcome
from gtbus.protocol.token import Phase
from gtbus.replay.redrive import redrive
from gtbus.testing import MemoryNetwork, eventually, make_deployment, run_async
from gtbus.training.bytelm import ByteLM, ByteLMConfig

CHUNK_TOKENS = 4096
CHUNK_BYTES = CHUNK_TOKENS * 2


def manifest(total: int) -> dict[str, Any]:
    return {"name": "scripted", "total_tokens": total, "token_dtype": "uint16", "max_token": 255, "digest_alg": "blake3", "digest": "ab" * 32}


Answer = Callable[[NodeRuntime, TokenGrant, int], Any]


async def decline(h: NodeRuntime, g: TokenGrant, epoch: int) -> None:
    await h.send(TokenDecline(g.token_id, "measurement not pinned"), epoch=epoch)


async def return_other_chunk(h: NodeRuntime, g: TokenGrant, epoch: int) -> None:
    await h.send(TokenAck(g.token_id), epoch=epoch)
    await h.send(TokenReturn(g.token_id, g.chunk_index + 7, 1, CHUNK_BYTES, b"d" * 32, bytes(32)), epoch=epoch)


async def return_unwritten(h: NodeRuntime, g: TokenGrant, epoch: int) -> None:
    # The right chunk, bytes and segment count: but nothing was written under the hop's key.
    await h.send(TokenAck(g.token_id), epoch=epoch)
    await h.send(TokenReturn(g.token_id, g.chunk_index, segment_count(CHUNK_BYTES, 4 << 20), CHUNK_BYTES, b"d" * 32, bytes(32)), epoch=epoch)


async def stay_silent(h: NodeRuntime, g: TokenGrant, epoch: int) -> None:
    await h.send(TokenAck(g.token_id), epoch=epoch)


class ZeroFails(HostDevice):
    """Failure injection: the host device, except that a scrubbed buffer never reads back zero."""

    def verify_zero(self, buf: Any) -> bool:
        return False


async def deployment(tmp: Path, answers: list[Answer], *, rounds: int = 1, device: HostDevice | None = None) -> tuple[Orchestrator, NodeRuntime, list[TokenGrant]]:
    dep = make_deployment(tmp / "keys", holders=1)
    net = MemoryNetwork()
    rt = NodeRuntime(dep.orchestrator, dep.roster, net.server("orch"), run_dir=tmp, heartbeat_interval=0)
    cfg = RunConfig(run_dir=tmp, holders=["h1"], rounds=rounds, chunk_tokens=CHUNK_TOKENS, lease=0.3, steps_per_hop=1, max_attempts=1, max_chunks=8)
    orch = Orchestrator(rt, device or HostDevice(), ByteLM(ByteLMConfig(hidden=16, batch=4)), PlatformSigner.generate(), cfg)
    h1 = NodeRuntime(dep.holders[0], dep.roster, net.client("h1", server="orch"), run_dir=tmp, server="orch", heartbeat_interval=0)
    grants: list[TokenGrant] = []
    script = list(answers)

    async def on_grant(acc: Any, delivery: Any) -> None:
        grants.append(acc.message)
        await script.pop(0)(h1, acc.message, acc.header.epoch)

    h1.on(TokenGrant, on_grant)
    await rt.start()
    await h1.start()
    await orch.setup()
    assert isinstance((await h1.request(Register(manifest(2 * CHUNK_TOKENS), "t"), timeout=5)).message, Welcome)
    return orch, h1, grants


def test_every_failed_hop_ends_as_the_machine_decides_and_redrive_agrees(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], list[tuple[int, str, str]], Phase]:
        orch, h1, grants = await deployment(tmp_path, [decline, return_other_chunk, return_unwritten, stay_silent], rounds=2)
        model = orch.device.measure(*orch.trainer.parameter_views())
        try:
            summary = await orch.run()
            assert orch.device.measure(*orch.trainer.parameter_views()) == model  # nothing was trained
            return summary, [(h.epoch, h.outcome, h.detail) for h in orch.hops], orch.token.phase
        finally:
            await h1.close()
            await orch.rt.close()

    summary, hops, phase = run_async(scenario(), timeout=60)
    assert [o for _, o, _ in hops] == ["declined", "rejected", "rejected", "revoked"]
    assert hops[0][2].startswith("measurement not pinned")
    assert re.match(r"segments refused: returned chunk (\d+), granted chunk (\d+)", hops[1][2])
    assert hops[2][2].startswith("segments refused: ") and "returned" not in hops[2][2]
    assert hops[3][2].startswith("lease expired before the return")
    assert all(d.endswith("(skipped this round)") for _, _, d in hops)
    assert summary["hops_trained"] == 0 and summary["outcomes"] == {"declined": 1, "rejected": 2, "revoked": 1}
    assert phase is Phase.IDLE
    assert redrive(tmp_path / "logs" / "orch.gtlog") == ("orch", None)


def test_cancelled_while_a_holder_holds_the_token_revokes_and_scrubs(tmp_path: Path) -> None:
    async def scenario() -> None:
        orch, h1, grants = await deployment(tmp_path, [stay_silent])
        orch.config.lease = 30.0
        try:
            run = asyncio.create_task(orch.run())
            await eventually(lambda: orch.token.phase is Phase.HELD, what="h1 holds the token")
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run  # the cancellation surfaces, not an error of the unwinding
            assert orch.token.phase is Phase.IDLE and orch.token.owner is None
            assert orch.current is not None and orch.current.machine.outcome is HopOutcome.ABORTED
            assert orch.current.staging is None and orch.current.params is None  # released, key dropped
            assert orch.hops == []  # nothing settled or recorded
        finally:
            await h1.close()
            await orch.rt.close()

    run_async(scenario(), timeout=60)


def test_a_scrub_that_does_not_read_zero_stops_the_run(tmp_path: Path) -> None:
    async def scenario() -> None:
        orch, h1, grants = await deployment(tmp_path, [decline], device=ZeroFails())
        shutdowns: list[str] = []

        async def on_shutdown(acc: Any, delivery: Any) -> None:
            shutdowns.append(acc.message.reason)

        h1.on(Shutdown, on_shutdown)
        try:
            with pytest.raises(GtbusError, match="did not read zero after scrub"):
                await orch.run()
            assert orch.token.phase is not Phase.IDLE  # nothing more is granted
            assert orch.hops == []
            await eventually(lambda: bool(shutdowns), what="the shutdown")
            assert "did not read zero" in shutdowns[0]
        finally:
            await h1.close()
            await orch.rt.close()

    run_async(scenario(), timeout=60)
