"""MemoryNetwork: same semantics as the zmq transport, plus fault injection."""

from __future__ import annotations

import asyncio

import pytest
from transport_helpers import nothing_arrives, run

from gtbus.errors import ConfigError, PeerUnreachable, TransportError
from gtbus.transport import (
    ClientTransport,
    Direction,
    MemoryNetwork,
    ServerTransport,
    Subscription,
)

pytestmark = pytest.mark.timeout(10)


def test_implements_the_transport_protocols() -> None:
    net = MemoryNetwork()
    server = net.server("orch")
    client = net.client("h1")
    assert isinstance(server, ServerTransport)
    assert isinstance(client, ClientTransport)
    assert server.endpoints == ("memory://orch/router", "memory://orch/pub")


def test_partition_loses_both_ways_and_heal_resubscribes() -> None:
    async def main() -> None:
        subs: list[Subscription] = []
        net = MemoryNetwork()
        server = net.server("orch", on_subscribe=subs.append)
        h1, h2 = net.client("h1"), net.client("h2")
        for t in (server, h1, h2):
            await t.start()
        await asyncio.sleep(0)
        assert sorted(s.peer for s in subs if s.peer) == ["h1", "h2"]
        subs.clear()

        net.partition("h1")
        assert net.is_partitioned("h1")
        await h1.send([b"into the void"])
        await server.send("h1", [b"lost reply"])  # no error: a partition is silent
        await server.publish([b"event"])
        await nothing_arrives(server.recv, 0.05)
        await nothing_arrives(h1.recv, 0.05)
        assert (await h2.recv()).frames == [b"event"]
        assert net.stats.fault_dropped == 3 and net.stats.extra["partition"] == 3

        net.heal("h1")
        await asyncio.sleep(0)
        assert subs == [Subscription("h1", b"", True)]  # late joiner is noticed again
        await h1.send([b"back"])
        got = await server.recv()
        assert (got.peer, got.frames) == ("h1", [b"back"])

        net.partition("orch")  # the server itself cut off: everyone loses
        await h2.send([b"x"])
        await server.publish([b"y"])
        await nothing_arrives(server.recv, 0.05)
        await nothing_arrives(h2.recv, 0.05)
        net.heal("orch")
        await asyncio.sleep(0)
        assert {s.peer for s in subs} == {"h1", "h2"}

    run(main())


def test_drop_next_and_tap_can_observe_and_tamper() -> None:
    async def main() -> None:
        seen: list[tuple[Direction, str, str, list[bytes]]] = []

        def tap(direction: Direction, src: str, dst: str, frames: list[bytes]) -> list[bytes] | None:
            seen.append((direction, src, dst, frames))
            if frames == [b"flip me"]:
                return [b"flipped"]
            return None

        net = MemoryNetwork(on_frames=tap)
        server = net.server("orch")
        h1 = net.client("h1")
        await server.start()
        await h1.start()

        net.drop_next(2)
        await h1.send([b"drop 1"])
        await server.send("h1", [b"drop 2"])
        await h1.send([b"flip me"])
        assert (await server.recv()).frames == [b"flipped"]
        await server.publish([memoryview(b"ev")])
        assert (await h1.recv()).frames == [b"ev"]
        assert net.stats.extra == {"injected": 2}
        assert [(d, s, t) for d, s, t, _ in seen] == [
            ("to-server", "h1", "orch"),
            ("to-client", "orch", "h1"),
            ("to-server", "h1", "orch"),
            ("event", "orch", "h1"),
        ]
        assert all(isinstance(f, bytes) for *_, frames in seen for f in frames)

    run(main())


def test_identity_reachability_and_lifecycle() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        server = net.server("orch")
        h1 = net.client("h1")
        with pytest.raises(ConfigError, match="already exists"):
            net.client("h1")
        with pytest.raises(TransportError, match="not started"):
            await h1.send([b"x"])

        await h1.start()
        await h1.send([b"early"])  # waits in the inbox until the server starts, like a DEALER queue
        await server.start()
        got = await server.recv()
        assert (got.peer, got.authenticated_as, got.frames) == ("h1", "h1", [b"early"])

        late = net.client("late")
        with pytest.raises(PeerUnreachable, match="'late' is not connected"):
            await server.send("late", [b"x"])  # created but not started
        await late.start()
        await server.send("late", [b"now"])
        assert (await late.recv()).frames == [b"now"]

        buf = bytearray(b"abc")
        await h1.send([buf])
        buf[0] = ord("X")  # the wire copied it
        assert (await server.recv()).frames == [b"abc"]

        # only topics that prefix-match the first frame
        picky = net.client("picky", topics=[b"metrics"])
        await picky.start()
        await server.publish([b"token-state"])
        await server.publish([b"metrics/loss", b"1.0"])
        assert (await picky.recv()).frames == [b"metrics/loss", b"1.0"]
        assert [(await h1.recv()).frames for _ in range(2)] == [[b"token-state"], [b"metrics/loss", b"1.0"]]

        # restart: a closed server is replaced and clients reach the new one
        await server.close()
        await h1.send([b"lost while down"])
        assert net.stats.extra["no-server"] == 1
        server2 = net.server("orch")
        await server2.start()
        await h1.send([b"again"])
        assert (await server2.recv()).frames == [b"again"]

        pending = asyncio.create_task(h1.recv())
        await asyncio.sleep(0)
        await h1.close()
        with pytest.raises(TransportError, match="closed"):
            await pending
        with pytest.raises(PeerUnreachable):
            await server2.send("h1", [b"x"])

    run(main())


def test_client_needs_a_server_name_when_ambiguous() -> None:
    net = MemoryNetwork()
    with pytest.raises(ConfigError, match="name its server"):
        net.client("h1")
    net.server("a")
    net.server("b")
    with pytest.raises(ConfigError, match="name its server"):
        net.client("h1")
    assert net.client("h1", server="b").server_name == "b"
