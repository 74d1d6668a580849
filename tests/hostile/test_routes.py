"""Class 3: a route belongs to the key that authenticated it.

A member of the deployment with a valid key connects under another member's
name (its ZeroMQ routing id), before the victim or after it. Nothing addressed
to the victim may reach it: the orchestrator routes by the CURVE-authenticated
key, never by a name a client chose. First every role squatting every other on
the orchestrator's real transport, then a whole run with squatters connected
from the start.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from process_memory import peak_rss_bytes
from travel_kit import Travel, trained_keys

from gtbus.errors import PeerUnreachable, TransportError
from gtbus.messages.identity import NodeIdentity, Roster, load_identity
from gtbus.nodes.runtime import NodeRuntime
from gtbus.nodes.wiring import server_transport
from gtbus.testing import make_deployment, run_async
from gtbus.transport import CurveClientConfig, Delivery, ZmqClient, ZmqServer

#: The orchestrator's peak resident memory with squatters connected (it idles at ~110 MiB here).
RSS_CAP = 400 << 20

# One identity of every role: the orchestrator, a holder, an observer and a device agent.
ROLES = {"orchestrator": "orch", "holder": "h1", "observer": "status", "agent": "agent1"}
PAIRS = [(s, v) for s in ROLES for v in ROLES if s != v and v != "orchestrator"]


def _client(me: NodeIdentity, roster: Roster, server: ZmqServer, routing_id: bytes | None = None) -> ZmqClient:
    cfg = CurveClientConfig.from_secret(me.curve_secret_bytes, roster["orch"].curve)
    return ZmqClient(me.name, *server.endpoints, cfg, server_name="orch", routing_id=routing_id)


async def _nothing(client: ZmqClient, within: float = 0.3) -> None:
    try:
        got = await asyncio.wait_for(client.recv(), within)
    except TimeoutError:
        return
    raise AssertionError(f"the squatter received {got!r}")


@pytest.mark.parametrize(("squatter", "victim"), PAIRS, ids=[f"{s}-as-{v}" for s, v in PAIRS])
def test_every_role_squatting_every_other_gets_nothing_of_the_victims(tmp_path: Path, squatter: str, victim: str) -> None:
    dep = make_deployment(tmp_path / "keys", holders=1, agents=1)
    roster = Roster.from_dir(dep.key_dir)
    ident = {n: load_identity(dep.key_path(n)) for n in ROLES.values()}
    bad, good = ident[ROLES[squatter]], ident[ROLES[victim]]
    name = good.name.encode()

    async def main() -> None:
        server = server_transport(ident["orch"], roster, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
        await server.start()
        early = _client(bad, roster, server, routing_id=name)  # connects first, to pre-empt
        await early.start()
        try:
            if squatter == "orchestrator":
                # The server's own key is not a client's: refused at the handshake.
                with pytest.raises(TransportError, match="refused our CURVE key"):
                    await early.wait_connected(2.0)
            else:
                await early.wait_connected(5)
                await early.send([b"squatting"])
                got = await server.recv()
                assert got.peer == bad.name  # its own key's name, whatever routing id it chose
            with pytest.raises(PeerUnreachable):
                await server.send(good.name, [b"for the victim"])  # the victim's key never spoke

            real = _client(good, roster, server)
            async with real:
                await real.send([b"hello"])
                assert (await server.recv()).peer == good.name
                late = _client(bad, roster, server, routing_id=name)  # and again, after the victim
                async with late:
                    if squatter != "orchestrator":
                        await late.wait_connected(5)
                    for i in range(3):
                        await server.send(good.name, [b"grant %d" % i])
                        assert (await real.recv()).frames == [b"grant %d" % i]
                    await _nothing(early)
                    await _nothing(late)
            assert server.stats.spoofed_dropped == 0
        finally:
            await early.close()
            await server.close()

    run_async(main(), timeout=20)


async def _squat(t: Travel, as_name: str, key_of: str, run_dir: Path, *, speaks: bool) -> tuple[Any, list[Delivery]]:
    """Connect ``key_of``'s key under routing id ``as_name``; collect every direct message it gets."""
    roster = Roster.from_dir(t.dep.keys)
    me = load_identity(t.dep.dep.key_path(key_of))
    cfg = CurveClientConfig.from_secret(me.curve_secret_bytes, roster[t.dep.dep.orchestrator.name].curve)
    transport = ZmqClient(me.name, t.dep.router, t.dep.pub, cfg, server_name=t.dep.dep.orchestrator.name,
                          routing_id=as_name.encode())
    direct: list[Delivery] = []
    if speaks:  # a full node: signed heartbeats every 0.2 s under its own key
        rt = NodeRuntime(me, roster, transport, run_dir=run_dir, server=t.dep.dep.orchestrator.name, heartbeat_interval=0.2)
        original = rt.handle_delivery

        def keep(d: Delivery) -> Any:
            if d.channel == "direct":
                direct.append(d)
            return original(d)

        rt.handle_delivery = keep  # type: ignore[method-assign]
        await rt.start()
        return rt, direct
    await transport.start()

    async def listen() -> None:
        while True:
            d = await transport.recv()
            if d.channel == "direct":
                direct.append(d)

    task = asyncio.create_task(listen())
    return (transport, task), direct


def test_a_run_with_squatters_connected_from_the_start_trains_every_hop(travel: Any, tmp_path: Path) -> None:
    t: Travel = travel(holders=2, chunk_tokens=4096, lease=30.0, steps="5", bytes_per_holder=2 * 4096)
    t.start_orchestrator()

    async def scenario() -> dict[str, Any]:
        squatters = [
            # the observer's key as holder h1, sending signed heartbeats
            await _squat(t, "h1", "status", tmp_path / "s1", speaks=True),
            # holders' keys as each other, silent (their owners are in the run too)
            await _squat(t, "h1", "h2", tmp_path / "s2", speaks=False),
            await _squat(t, "h2", "h1", tmp_path / "s3", speaks=False),
        ]
        for i in range(2):
            t.dep.start_holder(i)
        try:
            summary = await asyncio.to_thread(t.finish)
            return {"summary": summary, "direct": [d for _, got in squatters for d in got]}
        finally:
            for handle, _ in squatters:
                if isinstance(handle, NodeRuntime):
                    await handle.close()
                else:
                    transport, task = handle
                    task.cancel()
                    await transport.close()

    rss_seen: list[int] = []

    async def watch_rss() -> None:
        pid = t.orchestrator.pid
        while t.orchestrator.poll() is None:
            try:
                rss_seen.append(peak_rss_bytes(pid))
            except (FileNotFoundError, ProcessLookupError, AssertionError):
                return
            await asyncio.sleep(0.2)

    async def both() -> dict[str, Any]:
        watcher = asyncio.create_task(watch_rss())
        try:
            return await scenario()
        finally:
            await watcher

    got = run_async(both(), timeout=150)
    hops = t.hops()
    assert len(trained_keys(hops)) == len(hops) == 4, hops  # both holders' two chunks, none expired
    assert {h["holder"] for h in hops} == {"h1", "h2"}
    # The squatters got nothing on the direct channel: no grant, no reply meant for h1 or h2.
    assert got["direct"] == []
    print(f"orchestrator peak RSS {max(rss_seen, default=0) >> 20} MiB with squatters (cap {RSS_CAP >> 20} MiB)")
    assert rss_seen and max(rss_seen) < RSS_CAP, max(rss_seen, default=0)
    assert t.replay_verify().returncode == 0
