"""The rules of gtbus.transport.base, checked on both implementations alike."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from transport_helpers import Deployment, eventually, nothing_arrives, run

from gtbus.errors import PeerUnreachable, TransportError
from gtbus.transport import (
    ClientTransport,
    MemoryNetwork,
    ServerTransport,
    Subscription,
    ZmqClient,
    ZmqServer,
)

pytestmark = pytest.mark.timeout(20)

# (make_server(on_subscribe), make_client(server, name)) for each implementation
Factory = tuple[Callable[..., ServerTransport], Callable[[Any, str], ClientTransport]]


def memory_factory(dep: Deployment) -> Factory:
    net = MemoryNetwork()
    return (
        lambda on_subscribe: net.server("orch", on_subscribe=on_subscribe),
        lambda server, name: net.client(name, server="orch"),
    )


def zmq_factory(dep: Deployment) -> Factory:
    any_port = "tcp://127.0.0.1:*"
    return (
        lambda on_subscribe: ZmqServer(
            "orch", any_port, any_port, dep.server_config(), dep.allowed(), on_subscribe=on_subscribe
        ),
        lambda server, name: ZmqClient(
            name, server.endpoints[0], server.endpoints[1], dep.client_config(name), server_name="orch"
        ),
    )


@pytest.fixture(params=[memory_factory, zmq_factory], ids=["memory", "zmq"])
def factory(request: pytest.FixtureRequest, deployment: Deployment) -> Factory:
    return request.param(deployment)  # type: ignore[no-any-return]


def test_round_trips_fan_out_and_identity(factory: Factory) -> None:
    make_server, make_client = factory

    async def main() -> None:
        subs: list[Subscription] = []
        server = make_server(subs.append)
        await server.start()
        clients = [make_client(server, n) for n in ("h1", "h2", "h3")]
        for c in clients:
            await c.start()
        await eventually(lambda: {s.peer for s in subs if s.subscribed} >= {"h1", "h2", "h3"}, what="subscribers")

        for c in clients:
            await c.send([b"hi from", c.name.encode()])
        seen = {}
        for _ in clients:
            d = await server.recv()
            assert d.channel == "direct" and d.peer == d.authenticated_as
            seen[d.peer] = d.frames
        assert seen == {n: [b"hi from", n.encode()] for n in ("h1", "h2", "h3")}

        await server.send("h2", [b"just h2"])
        await server.publish([b"all", b"of you"])
        got: dict[str, list[tuple[str, list[bytes]]]] = {c.name: [] for c in clients}
        for c in clients:
            want = 2 if c.name == "h2" else 1
            for _ in range(want):
                d = await c.recv()
                assert d.peer is None and d.authenticated_as == "orch"
                got[c.name].append((d.channel, d.frames))
        assert sorted(got["h2"]) == [("direct", [b"just h2"]), ("event", [b"all", b"of you"])]
        assert got["h1"] == got["h3"] == [("event", [b"all", b"of you"])]
        await nothing_arrives(clients[0].recv, within=0.1)

        with pytest.raises(PeerUnreachable):
            await server.send("nobody", [b"x"])
        await clients[2].close()
        await until_unreachable(server, "h3")

        pending = asyncio.create_task(server.recv())
        await asyncio.sleep(0.01)
        await server.close()
        with pytest.raises(TransportError, match="closed"):
            await pending
        for c in clients[:2]:
            await c.close()

    run(main())


async def until_unreachable(server: ServerTransport, peer: str, timeout: float = 5.0) -> None:
    """Probe with sends until the server reports ``peer`` as not connected."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                await server.send(peer, [b"probe"])
            except PeerUnreachable:
                return
            await asyncio.sleep(0.01)
