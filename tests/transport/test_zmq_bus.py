"""ZmqServer / ZmqClient over real sockets on 127.0.0.1 with real CURVE keys."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from nacl.public import PrivateKey
from transport_helpers import Deployment, eventually, nothing_arrives, run

from gtbus.errors import ConfigError, PeerUnreachable, TransportError
from gtbus.messages.envelope import DEFAULT_LIMITS
from gtbus.transport import (
    ClientTransport,
    CurveClientConfig,
    CurveServerConfig,
    ServerTransport,
    SocketTuning,
    Subscription,
    ZmqClient,
    ZmqServer,
    curve_public_key,
    z85_key,
)

pytestmark = pytest.mark.timeout(20)

ANY_PORT = "tcp://127.0.0.1:*"


def make_server(dep: Deployment, **kw: object) -> ZmqServer:
    router = kw.pop("router", ANY_PORT)
    pub = kw.pop("pub", ANY_PORT)
    return ZmqServer("orch", router, pub, dep.server_config(), dep.allowed(), **kw)  # type: ignore[arg-type]


def make_client(
    dep: Deployment, server: ZmqServer, name: str, key: PrivateKey | None = None, **kw: object
) -> ZmqClient:
    return ZmqClient(name, *server.endpoints, dep.client_config(name, key), server_name="orch", **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(*transports: ZmqServer | ZmqClient) -> AsyncIterator[None]:
    try:
        for t in transports:
            await t.start()
        yield
    finally:
        for t in reversed(transports):
            await t.close()


def test_request_reply_and_publish_round_trip(deployment: Deployment) -> None:
    async def main() -> None:
        subs: list[Subscription] = []
        server = make_server(deployment, on_subscribe=subs.append)
        await server.start()
        h1 = make_client(deployment, server, "h1")
        assert isinstance(server, ServerTransport) and isinstance(h1, ClientTransport)
        async with running(h1):
            await h1.wait_connected(5)
            await h1.send([b"magic", b"hello"])
            got = await server.recv()
            assert got.channel == "direct"
            assert got.frames == [b"magic", b"hello"]
            assert got.peer == "h1" and got.authenticated_as == "h1"

            await server.send(got.peer, [b"reply", memoryview(b"view")])
            reply = await h1.recv()
            assert (reply.channel, reply.frames, reply.peer, reply.authenticated_as) == (
                "direct",
                [b"reply", b"view"],
                None,
                "orch",
            )

            await eventually(lambda: any(s.peer == "h1" and s.subscribed for s in subs), what="subscription")
            await server.publish([b"event", b"42"])
            event = await h1.recv()
            assert (event.channel, event.frames) == ("event", [b"event", b"42"])
        await server.close()
        assert server.stats.auth_accepted >= 2  # DEALER and SUB both went through ZAP
        assert server.stats.auth_rejected == 0

    run(main())


def test_unknown_curve_key_is_refused_and_others_are_served(deployment: Deployment) -> None:
    async def main() -> None:
        server = make_server(deployment)
        await server.start()
        stranger = PrivateKey.generate()  # valid CURVE key, not in the deployment
        intruder = make_client(deployment, server, "h1", key=stranger)
        h2 = make_client(deployment, server, "h2")
        async with running(intruder, h2):
            await intruder.send([b"let me in"])
            with pytest.raises(TransportError, match="refused our CURVE key"):
                await intruder.wait_connected(1.0)
            assert intruder.stats.handshake_failures >= 1
            assert server.stats.auth_rejected >= 1
            assert server.stats.extra.get("auth-unknown-key", 0) >= 1

            await h2.wait_connected(5)
            await h2.send([b"legit"])
            got = await server.recv()
            assert (got.peer, got.frames) == ("h2", [b"legit"])
            await server.publish([b"for members"])
            assert (await h2.recv()).frames == [b"for members"]
            await nothing_arrives(intruder.recv)
            await nothing_arrives(server.recv)  # the intruder's queued message never arrives
            with pytest.raises(PeerUnreachable):
                await server.send("h1", [b"x"])
        await server.close()

    run(main())


def test_a_name_is_not_a_route_even_for_a_squatter_that_connects_first(deployment: Deployment) -> None:
    async def main() -> None:
        server = make_server(deployment)
        await server.start()
        # h2's genuine key, connecting first under the routing id "h1" to pre-empt it
        squatter = ZmqClient("h2", *server.endpoints, deployment.client_config("h2"), routing_id=b"h1")
        async with running(squatter):
            await squatter.wait_connected(5)
            with pytest.raises(PeerUnreachable):
                await server.send("h1", [b"for h1"])  # h1's key has not spoken: there is no route
            await squatter.send([b"i am h1"])
            got = await server.recv()
            assert (got.peer, got.frames) == ("h2", [b"i am h1"])  # its key, not its chosen name
            h1 = make_client(deployment, server, "h1")
            async with running(h1):
                await h1.send([b"really h1"])
                got = await server.recv()
                assert (got.peer, got.frames) == ("h1", [b"really h1"])
                await server.send("h1", [b"grant"])
                assert (await h1.recv()).frames == [b"grant"]
                await nothing_arrives(squatter.recv)
                # a second squatter connecting later under "h1" changes nothing either
                late = ZmqClient("h3", *server.endpoints, deployment.client_config("h3"), routing_id=b"h1")
                async with running(late):
                    await late.wait_connected(5)
                    await server.send("h1", [b"grant 2"])
                    assert (await h1.recv()).frames == [b"grant 2"]
                    await nothing_arrives(late.recv)
        assert server.stats.spoofed_dropped == 0
        await server.close()

    run(main())


def test_a_route_used_by_another_key_is_dropped_and_forgotten(deployment: Deployment) -> None:
    async def main() -> None:
        server = make_server(deployment)
        await server.start()
        h1 = make_client(deployment, server, "h1")
        async with running(h1):
            await h1.send([b"hello"])
            assert (await server.recv()).peer == "h1"
            secret = server.route_of("h1")
            assert secret is not None and secret != b"h1"
            # An attacker who somehow knew h1's secret routing id takes its connection over ...
            thief = ZmqClient("h2", *server.endpoints, deployment.client_config("h2"), routing_id=secret)
            async with running(thief):
                await thief.wait_connected(5)
                await thief.send([b"mine now"])
                await nothing_arrives(server.recv)  # ... the first thing it says gives it away
                assert server.stats.spoofed_dropped == 1
                assert server.route_of("h1") is None
                with pytest.raises(PeerUnreachable):
                    await server.send("h1", [b"not to the thief"])
        # libzmq left h1's old connection without a pipe; a new h1 connection is routed again
        again = make_client(deployment, server, "h1")
        async with running(again):
            await again.send([b"still me"])
            got = await server.recv()
            assert (got.peer, got.frames) == ("h1", [b"still me"])
            await server.send("h1", [b"welcome back"])
            assert (await again.recv()).frames == [b"welcome back"]
        await server.close()

    run(main(), timeout=15)


def test_a_restarted_client_is_routed_to_its_new_connection(deployment: Deployment) -> None:
    async def main() -> None:
        server = make_server(deployment)
        await server.start()
        first = make_client(deployment, server, "h1")
        async with running(first):
            await first.send([b"one"])
            assert (await server.recv()).peer == "h1"
            old = server.route_of("h1")
        second = make_client(deployment, server, "h1")
        async with running(second):
            await second.send([b"two"])
            assert (await server.recv()).frames == [b"two"]
            assert server.route_of("h1") not in (None, old)
            await server.send("h1", [b"to the new one"])
            assert (await second.recv()).frames == [b"to the new one"]
        await server.close()

    run(main())


_COLLIDE = """
import asyncio, sys
from nacl.public import PrivateKey
from gtbus.transport import ZmqClient, ZmqServer, CurveServerConfig, CurveClientConfig
from gtbus.testing import run_async

async def main():
    skey, keys = PrivateKey.generate(), {n: PrivateKey.generate() for n in ("a", "b")}
    server = ZmqServer("orch", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", CurveServerConfig.from_secret(bytes(skey)),
                       {bytes(k.public_key): n for n, k in keys.items()})
    await server.start()
    cfg = lambda n: CurveClientConfig.from_secret(bytes(keys[n]), bytes(skey.public_key))
    # The id libzmq 4.3.5 gives the first client that sets none when C rand() is unseeded.
    a = ZmqClient("a", *server.endpoints, cfg("a"), routing_id=b"\\x00k\\x8bEg")
    await a.start(); await a.send([b"a"]); print((await server.recv()).peer)
    b = ZmqClient("b", *server.endpoints, cfg("b"), routing_id=b"")
    await b.start(); await b.send([b"b"]); print((await server.recv()).peer)
    await a.close(); await b.close(); await server.close()

asyncio.run(main())
"""


def test_a_client_chosen_id_cannot_collide_with_libzmq_auto_ids() -> None:
    # Unseeded, libzmq aborts the whole process here (Assertion failed in socket_base.cpp).
    done = subprocess.run([sys.executable, "-c", _COLLIDE], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["a", "b"]


def test_a_message_over_the_frame_count_or_size_is_drained_and_dropped(deployment: Deployment) -> None:
    async def main() -> None:
        tuning = SocketTuning(max_frames=5, max_message_bytes=1 << 20)
        server = make_server(deployment, tuning=tuning)
        await server.start()
        h1 = make_client(deployment, server, "h1")
        async with running(h1):
            await h1.send([b"f"] * 6)  # one frame too many
            await h1.send([bytes(600 << 10), bytes(600 << 10)])  # each frame fits, together they do not
            await h1.send([b"f"] * 5)  # exactly the limit
            got = await server.recv()
            assert got.frames == [b"f"] * 5
            assert server.stats.oversize_dropped == 2
            await server.send("h1", [b"x"] * 6)  # the client keeps the same limits
            await server.send("h1", [b"ok"])
            assert (await h1.recv()).frames == [b"ok"]
            assert h1.stats.oversize_dropped == 1
        await server.close()

    run(main())


def test_oversize_frame_is_dropped_and_server_keeps_serving(deployment: Deployment) -> None:
    async def main() -> None:
        tuning = SocketTuning(max_frame_bytes=1 << 20)
        server = make_server(deployment, tuning=tuning)
        await server.start()
        h1 = make_client(deployment, server, "h1")
        h2 = make_client(deployment, server, "h2")
        async with running(h1, h2):
            await h1.wait_connected(5)
            await h2.wait_connected(5)
            await h1.send([b"big", bytes(2 << 20)])
            await nothing_arrives(server.recv)
            await h2.send([b"small"])
            got = await server.recv()
            assert (got.peer, got.frames) == ("h2", [b"small"])
            # the offender is disconnected, reconnects, and is served again afterwards
            await h1.send([b"sorry"])
            got = await asyncio.wait_for(server.recv(), 5)
            assert (got.peer, got.frames) == ("h1", [b"sorry"])
        await server.close()

    run(main())


def test_send_to_unknown_peer_raises_peer_unreachable(deployment: Deployment) -> None:
    async def main() -> None:
        server = make_server(deployment)
        async with running(server):
            with pytest.raises(PeerUnreachable, match="'nobody' is not connected"):
                await server.send("nobody", [b"x"])

    run(main())


def test_client_reconnects_after_server_restart_on_same_port(deployment: Deployment) -> None:
    async def main() -> None:
        first = make_server(deployment)
        await first.start()
        router, pub = first.endpoints
        h1 = make_client(deployment, first, "h1")
        await h1.start()
        await h1.send([b"before"])
        assert (await first.recv()).frames == [b"before"]
        await first.close()

        subs: list[Subscription] = []
        second = make_server(deployment, router=router, pub=pub, on_subscribe=subs.append)
        async with running(second):
            assert second.endpoints == (router, pub)
            await h1.send([b"after"])  # queued in the DEALER until it reconnects
            got = await asyncio.wait_for(second.recv(), 8)
            assert (got.peer, got.frames) == ("h1", [b"after"])
            await second.send("h1", [b"welcome back"])
            assert (await h1.recv()).frames == [b"welcome back"]
            await eventually(lambda: bool(subs), timeout=8, what="resubscription")
            await second.publish([b"event"])
            assert (await h1.recv()).frames == [b"event"]
        await h1.close()

    run(main(), timeout=15)


def test_largest_legitimate_frame_round_trips_and_one_byte_more_is_refused(deployment: Deployment) -> None:
    async def main() -> None:
        server = make_server(deployment)
        await server.start()
        h1 = make_client(deployment, server, "h1")
        h2 = make_client(deployment, server, "h2")
        largest = DEFAULT_LIMITS.largest_frame  # one 4 MiB ship segment with its tag
        assert SocketTuning().max_frame_bytes == largest
        blob = bytes(range(256)) * (largest // 256) + bytes(largest % 256)
        async with running(h1, h2):
            await h1.send([b"bulk", memoryview(blob)])
            got = await server.recv()
            assert got.frames[0] == b"bulk" and got.frames[1] == blob
            await server.send("h1", [b"bulk", blob])
            back = await h1.recv()
            assert back.frames[1] == blob
            await h2.wait_connected(5)
            await h2.send([b"bulk", blob + b"!"])  # libzmq drops the connection (MAXMSGSIZE)
            await nothing_arrives(server.recv)
        await server.close()

    run(main(), timeout=15)


def test_recv_cancelled_loses_nothing_and_close_wakes_recv(deployment: Deployment) -> None:
    async def main() -> None:
        server = make_server(deployment)
        await server.start()
        h1 = make_client(deployment, server, "h1")
        async with running(h1):
            for _ in range(3):
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(server.recv(), 0.05)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(h1.recv(), 0.05)
            await h1.send([b"one"])
            assert (await server.recv()).frames == [b"one"]
            await server.send("h1", [b"two"])
            assert (await h1.recv()).frames == [b"two"]

            pending_server = asyncio.create_task(server.recv())
            pending_client = asyncio.create_task(h1.recv())
            await asyncio.sleep(0.05)
            await server.close()
            await h1.close()
            with pytest.raises(TransportError, match="closed"):
                await pending_server
            with pytest.raises(TransportError, match="closed"):
                await pending_client
            with pytest.raises(TransportError, match="closed"):
                await server.send("h1", [b"late"])
            with pytest.raises(TransportError, match="closed"):
                await h1.send([b"late"])

    run(main())


def test_configuration_errors_are_clear(deployment: Deployment) -> None:
    async def main() -> None:
        server = make_server(deployment)
        async with running(server):
            taken = server.endpoints[0]
            clash = ZmqServer("other", taken, ANY_PORT, deployment.server_config(), deployment.allowed())
            with pytest.raises(ConfigError, match=f"cannot bind {taken}: address already in use"):
                await clash.start()
            await clash.close()

        with pytest.raises(ConfigError, match="refusing plaintext on tcp://"):
            ZmqServer("orch", ANY_PORT, ANY_PORT, None)
        with pytest.raises(ConfigError, match="refusing plaintext on tcp://"):
            ZmqClient("h1", "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556", None)
        with pytest.raises(ConfigError, match="unsupported endpoint"):
            ZmqServer("orch", "udp://x", ANY_PORT, deployment.server_config(), {})
        with pytest.raises(ConfigError, match="32 raw bytes"):
            CurveServerConfig.from_secret(b"short")
        with pytest.raises(ConfigError, match="does not belong"):
            CurveClientConfig(bytes(32), bytes(32), bytes(32))
        with pytest.raises(ConfigError, match="needs a CURVE config"):
            ZmqServer("orch", "ipc:///tmp/x", "ipc:///tmp/y", None, deployment.allowed())
        sk = deployment.clients["h1"]
        assert curve_public_key(bytes(sk)) == bytes(sk.public_key)
        assert len(z85_key(bytes(sk.public_key))) == 40
        assert "secret_key" not in repr(deployment.client_config("h1"))

    run(main())


def test_insecure_plaintext_pair_for_the_raw_baseline() -> None:
    async def main() -> None:
        server = ZmqServer("orch", ANY_PORT, ANY_PORT, None, insecure=True)
        async with running(server):
            client = ZmqClient("bench", *server.endpoints, None, insecure=True)
            async with running(client):
                await client.send([b"ping"])
                got = await server.recv()
                assert (got.peer, got.authenticated_as) == ("bench", None)
                await server.send("bench", [b"pong"])
                assert (await client.recv()).frames == [b"pong"]

    run(main())


LEAK_SCRIPT = """
import asyncio, gc
from gtbus.transport import *

async def leak():
    ssk, spk = generate_curve_keypair()
    csk, cpk = generate_curve_keypair()
    s = ZmqServer("orch", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", CurveServerConfig.from_secret(ssk), {cpk: "h1"})
    await s.start()
    c = ZmqClient("h1", *s.endpoints, CurveClientConfig.from_secret(csk, spk))
    await c.start()
    await c.send([b"never read"])
    await asyncio.sleep(0.05)

for _ in range(2):
    asyncio.run(leak())  # transports dropped without close()
    gc.collect()
print("ok")
"""


def test_transports_dropped_without_close_do_not_hang_gc() -> None:
    # pyzmq's Context.__del__ can block forever in term() when the GC has already
    # cleared its socket weakrefs; the transports' finalizer closes the sockets first.
    done = subprocess.run([sys.executable, "-c", LEAK_SCRIPT], capture_output=True, text=True, timeout=15)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]


def test_a_client_that_stops_reading_gets_an_error_not_a_stalled_server(deployment: Deployment) -> None:
    async def main() -> None:
        server = make_server(deployment, tuning=SocketTuning(sndhwm=8, rcvhwm=8))
        await server.start()
        mute = make_client(deployment, server, "h1", tuning=SocketTuning(sndhwm=8, rcvhwm=8))
        h2 = make_client(deployment, server, "h2")
        async with running(mute, h2):
            await mute.send([b"hi"])
            assert (await server.recv()).peer == "h1"
            chunk = bytes(64 << 10)
            with pytest.raises(TransportError, match="not reading"):
                for _ in range(5000):  # kernel buffers hold some; the queue fills well before this
                    await server.send("h1", [chunk])
            assert server.stats.extra["send-queue-full"] == 1
            await h2.send([b"still served?"])
            got = await server.recv()
            assert got.peer == "h2"
            await server.send("h2", [b"yes"])
            assert (await h2.recv()).frames == [b"yes"]
        await server.close()

    run(main(), timeout=15)


def test_a_key_opening_connections_in_a_loop_is_refused_and_others_are_served(deployment: Deployment) -> None:
    async def main() -> None:
        server = make_server(deployment, tuning=SocketTuning(handshake_burst=6, handshake_per_s=0.01))
        await server.start()
        churn = [make_client(deployment, server, "h1") for _ in range(5)]  # two handshakes each
        try:
            for c in churn:
                await c.start()
            await eventually(lambda: server.stats.extra.get("auth-connection-rate", 0) >= 1, 5, "a refused handshake")
            h2 = make_client(deployment, server, "h2")
            async with running(h2):
                await h2.send([b"other keys are served"])
                assert (await server.recv()).peer == "h2"
        finally:
            for c in churn:
                await c.close()
            await server.close()

    run(main())


def test_connections_that_never_speak_are_shut_and_one_that_speaks_stays(deployment: Deployment) -> None:
    async def main() -> None:
        server = make_server(deployment, tuning=SocketTuning(first_message_s=0.3))
        await server.start()
        # A client that opens a connection and says nothing (no subscriptions either) ...
        mute = make_client(deployment, server, "h1", topics=())
        talker = make_client(deployment, server, "h2")
        async with running(mute, talker):
            await talker.send([b"hello"])
            assert (await server.recv()).peer == "h2"
            await eventually(lambda: server.stats.extra.get("connections-shut", 0) >= 2, 5, "the mute connections shut")
            await talker.send([b"still here"])
            got = await server.recv()
            assert (got.peer, got.frames) == ("h2", [b"still here"])
        await server.close()

    run(main())
