"""The device agent: remote holders write ciphertext through it into device staging.

In-process over the in-memory network for the agent's rules; real processes
and sockets for the whole loop with remote holders.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gtbus.gpu.channel import ChannelParams, SegmentContext, SegmentOpener, SegmentSealer, segment_count, staging_size, TAG_SIZE
from gtbus.gpu.host import HostDevice
from gtbus.gpu.sealing import seal_bytes
from gtbus.messages.types import AgentDone, AgentReady, AgentStage, AgentWritten, Refusal, ShipSegment, TokenRevoke
from gtbus.nodes.agent import DeviceAgent
from gtbus.nodes.launcher import LocalDeployment, LocalRun
from gtbus.nodes.runtime import NodeRuntime
from gtbus.replay.redrive import redrive
from gtbus.testing import MemoryNetwork, make_deployment

SEG = 1 << 20


def test_agent_writes_only_the_staged_holders_segments(tmp_path: Path) -> None:
    async def scenario() -> None:
        dep = make_deployment(tmp_path / "keys", holders=2, agents=1)
        roster = dep.roster
        a = dep.agents[0]
        to_orch, to_agent = MemoryNetwork(), MemoryNetwork()
        orch = NodeRuntime(dep.orchestrator, roster, to_orch.server("orch"), run_dir=tmp_path, heartbeat_interval=0)
        up = NodeRuntime(a, roster, to_orch.client(a.name, server="orch"), run_dir=tmp_path, server="orch", heartbeat_interval=0)
        down = NodeRuntime(a, roster, to_agent.server(a.name), run_dir=tmp_path, log_name="agent1-holders", heartbeat_interval=0)
        h1, h2 = (NodeRuntime(h, roster, to_agent.client(h.name, server=a.name), run_dir=tmp_path, server=a.name,
                              log_name=f"{h.name}-to-agent", heartbeat_interval=0) for h in dep.holders)
        agent = DeviceAgent(up, down, HostDevice)
        for rt in (orch, down, up, h1, h2):
            await rt.start()
        try:
            dev = HostDevice()
            nbytes = 3 * SEG + 100
            staging, handle = dev.alloc_hop_staging(staging_size(nbytes, SEG))
            params = ChannelParams.generate(str(handle), nbytes, segment_size=SEG)
            ctx = SegmentContext("run", 5, "h1", segment_count(nbytes, SEG))
            sealed = seal_bytes(str(handle).encode(), a.public.x25519)
            ready = await orch.request(AgentStage("tok", "h1", sealed, staging.nbytes, SEG), a.name, epoch=5)
            assert isinstance(ready.message, AgentReady)
            plain = os.urandom(nbytes)
            buf = bytearray(staging_size(nbytes, SEG))
            SegmentSealer(params).seal_into(plain, buf, ctx)
            stride = SEG + TAG_SIZE
            blobs = [bytes(buf[i * stride : min(len(buf), (i + 1) * stride)]) for i in range(ctx.count)]
            # h2 is not the staged holder: its segment is dropped, nothing written.
            await h2.send(ShipSegment("tok", 0, ctx.count), epoch=5, blobs=[b"\xff" * len(blobs[0])])
            # A segment for another epoch never reaches the agent's logic (fenced).
            await h1.send(ShipSegment("tok", 0, ctx.count), epoch=4, blobs=[blobs[0]])
            for i, blob in enumerate(blobs[:-1]):
                await h1.send(ShipSegment("tok", i, ctx.count), epoch=5, blobs=[blob])
            early = await h1.request(AgentDone("tok", ctx.count, nbytes), epoch=5)
            assert isinstance(early.message, Refusal) and "received 3 of 4" in early.message.reason
            await h1.send(ShipSegment("tok", ctx.count - 1, ctx.count), epoch=5, blobs=[blobs[-1]])
            done = await h1.request(AgentDone("tok", ctx.count, nbytes), epoch=5)
            assert isinstance(done.message, AgentWritten) and done.message.segments == ctx.count
            assert down.rejected["stale-epoch"] == 1
            out = dev.alloc(nbytes)
            dev.open_segments(staging, out, params, ctx, ctx.count, nbytes)
            assert bytes(dev.as_array(out, "u1")[:nbytes]) == plain
            assert agent.stage is None and agent.written == 1
            dev.release(staging)

            # A revoked hop: the agent drops the mapping at once; late segments are stale.
            staging2, handle2 = dev.alloc_hop_staging(staging_size(nbytes, SEG))
            ready = await orch.request(AgentStage("tok", "h1", seal_bytes(str(handle2).encode(), a.public.x25519), staging2.nbytes, SEG), a.name, epoch=6)
            assert isinstance(ready.message, AgentReady) and agent.stage is not None
            await orch.send(TokenRevoke("tok", "lease expired"), a.name, epoch=6)
            for _ in range(50):
                if agent.stage is None:
                    break
                await asyncio.sleep(0.01)
            assert agent.stage is None
            await h1.send(ShipSegment("tok", 0, ctx.count), epoch=6, blobs=[blobs[0]])
            await asyncio.sleep(0.05)
            assert down.rejected["stale-epoch"] == 2
            dev.release(staging2)
        finally:
            for rt in (h1, h2, up, down, orch):
                await rt.close()

    asyncio.run(scenario())
    # Re-driven from its two logs (either names both), every answer the agent gave is its machine's.
    assert redrive(tmp_path / "logs" / "agent1.gtlog") == ("agent1", None)
    assert redrive(tmp_path / "logs" / "agent1-holders.gtlog") == ("agent1", None)


def test_a_stage_left_idle_past_its_timeout_is_dropped(tmp_path: Path) -> None:
    # A revoke lost on the way must not keep a hop's staging mapped for ever.
    async def scenario() -> None:
        dep = make_deployment(tmp_path / "keys", holders=1, agents=1)
        a = dep.agents[0]
        to_orch, to_agent = MemoryNetwork(), MemoryNetwork()
        orch = NodeRuntime(dep.orchestrator, dep.roster, to_orch.server("orch"), run_dir=tmp_path, heartbeat_interval=0)
        up = NodeRuntime(a, dep.roster, to_orch.client(a.name, server="orch"), run_dir=tmp_path, server="orch", heartbeat_interval=0)
        down = NodeRuntime(a, dep.roster, to_agent.server(a.name), run_dir=tmp_path, log_name="agent1-holders", heartbeat_interval=0)
        agent = DeviceAgent(up, down, HostDevice, idle_timeout=0.2)
        for rt in (orch, down, up):
            await rt.start()
        serving = asyncio.create_task(agent.serve())
        dev = HostDevice()
        staging, handle = dev.alloc_hop_staging(staging_size(100, SEG))
        try:
            ready = await orch.request(AgentStage("tok", "h1", seal_bytes(str(handle).encode(), a.public.x25519), staging.nbytes, SEG), a.name, epoch=3)
            assert isinstance(ready.message, AgentReady) and 3 in agent.mappings
            for _ in range(1000):  # the agent's own timer drops it; wait on its state, not on a time window
                if agent.stage is None:
                    break
                await asyncio.sleep(0.01)
            assert agent.stage is None and agent.mappings == {}
        finally:
            agent.done.set()
            await serving
            dev.release(staging)
            for rt in (up, down, orch):
                await rt.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_remote_holders_train_through_the_agent(tmp_path: Path) -> None:
    run = LocalRun(run_dir=tmp_path / "run", holders=3, chunk_tokens=16384, steps="10", bytes_per_holder=64 * 1024, remote_holders=["h2", "h3"])
    summary = LocalDeployment(run).run_to_end(timeout=300)
    assert summary["outcomes"] == {"trained": summary["hops"]} and summary["hops"] == 12
    logs = run.run_dir / "logs"
    assert (logs / "agent1-holders.gtlog").exists() and (logs / "h2-to-agent1.gtlog").exists()
    r = subprocess.run([sys.executable, "-m", "gtbus", "replay", "--verify", str(logs)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "gtbus", "replay", str(logs), "--node", "agent1", "--type", "agent", "--json"], capture_output=True, text=True, timeout=120)
    staged = [line for line in r.stdout.splitlines() if '"agent.stage"' in line and '"in"' in line]
    assert len(staged) == 8  # every hop of h2 and h3 went through the agent, none of h1's
    for node in ("agent1", "h1", "h2", "h3"):
        assert redrive(logs / f"{node}.gtlog") == (node, None)
