"""A node's zmq transport towards the server: DEALER for direct messages, SUB for events.

Under CURVE the client pins the server's public key, so a reply or an event
comes from the server or from nobody; the DEALER's routing id is
:data:`ROUTING_ID_BYTES` random bytes of its own, never its name and never
shown to anyone, so no other member can have the server route this node's
messages to itself (see :mod:`gtbus.transport.zmq.server`). A send waits for a
full queue up to ``send_timeout_s``, then fails; both sockets are read
through :class:`~gtbus.transport.zmq.pipe.Pipe`, fairly, with the same frame
and byte limits as the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Sequence

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from gtbus.errors import ConfigError, TransportError
from gtbus.transport.base import Channel, Delivery, FrameSeq, TransportStats
from gtbus.transport.zmq.endpoint import (
    MAX_NAME_BYTES,
    OnceLog,
    ZmqEndpoint,
    background,
    check_endpoint,
    check_name,
    stop_watching,
)
from gtbus.transport.zmq.errors import map_errors
from gtbus.transport.zmq.keys import CurveClientConfig
from gtbus.transport.zmq.options import DEFAULT_TUNING, SocketTuning, apply_curve_client, apply_tuning
from gtbus.transport.zmq.pipe import POLLOUT, Oversize, Pipe, Wakeup

__all__ = ["ROUTING_ID_BYTES", "ZmqClient"]

log = logging.getLogger("gtbus.transport")

#: Random bytes of a client's routing id under CURVE.
ROUTING_ID_BYTES = 16


def _new_routing_id() -> bytes:
    """A client's secret routing id: random, never starting with NUL (libzmq reserves those)."""
    rid = bytearray(os.urandom(ROUTING_ID_BYTES))
    rid[0] = rid[0] | 1
    return bytes(rid)


_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
)


class ZmqClient(ZmqEndpoint):
    """A node's transport towards the server: DEALER for direct messages, SUB for events.

    ``curve`` holds the client key pair and the pinned server public key;
    ``curve=None`` gives plaintext (refused on tcp:// unless ``insecure=True``).
    ``server_name`` is reported as ``Delivery.authenticated_as`` when CURVE is
    on (the pinned key authenticates the server). ``topics`` are the event
    prefixes to subscribe to (all by default). The DEALER's routing id is
    secret random bytes under CURVE and the node name in plaintext;
    ``routing_id`` overrides it (``b""``: none), for tests that play a hostile
    client; the server never routes by a name a client chose.
    """

    _role = "client"

    def __init__(
        self,
        name: str,
        router_endpoint: str,
        pub_endpoint: str,
        curve: CurveClientConfig | None,
        *,
        server_name: str | None = None,
        insecure: bool = False,
        tuning: SocketTuning = DEFAULT_TUNING,
        topics: Sequence[bytes] = (b"",),
        context: zmq.asyncio.Context | None = None,
        routing_id: bytes | None = None,
    ) -> None:
        raw_name = check_name(name)
        if routing_id is not None and len(routing_id) > MAX_NAME_BYTES:
            raise ConfigError(f"routing id must be at most {MAX_NAME_BYTES} bytes")
        if routing_id is None:
            routing_id = _new_routing_id() if curve is not None else raw_name
        self._routing_id = routing_id  # b"": none (libzmq's ROUTER makes one up)
        if not zmq.has("curve") and curve is not None:
            raise ConfigError("this libzmq was built without CURVE support")
        for ep in (router_endpoint, pub_endpoint):
            check_endpoint(ep, secure=curve is not None, insecure=insecure)
            if ep.startswith("tcp://") and ep.endswith(":*"):
                raise ConfigError(f"cannot connect to {ep}: give the server's real port")
        self._name = name
        self._endpoints = (router_endpoint, pub_endpoint)
        self._curve = curve
        self._server_name = server_name if curve is not None else None
        self._tuning = tuning
        self._topics = tuple(bytes(t) for t in topics)
        self._given_ctx = context
        self._ctx: zmq.asyncio.Context | None = None
        self._sockets: list[zmq.asyncio.Socket] = []  # every socket opened, for _release_leaked
        self._finalizer: weakref.finalize | None = None  # type: ignore[type-arg]
        self._dealer: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._monitors: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._direct: Pipe | None = None  # DEALER and SUB, driven by hand (see Pipe)
        self._event: Pipe | None = None
        self._waiters = Wakeup()  # shared by both sockets (only the DEALER ever reports POLLOUT)
        self._prefer_event = False
        self._recv_lock = asyncio.Lock()
        self._connected = {"direct": asyncio.Event(), "event": asyncio.Event()}
        self._closed = False
        self._once = OnceLog()
        self.stats = TransportStats()

    @property
    def name(self) -> str:
        """This node's name (its DEALER routing id only in plaintext)."""
        return self._name

    @property
    def connected(self) -> bool:
        """True while both sockets have a completed handshake with the server."""
        return all(e.is_set() for e in self._connected.values())

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until both sockets completed a handshake; TransportError on timeout."""
        try:
            async with asyncio.timeout(timeout):
                for event in self._connected.values():
                    await event.wait()
        except TimeoutError:
            raise TransportError(
                f"client {self._name!r}: no handshake with {self._endpoints[0]} within {timeout}s"
                + (" (server refused our CURVE key)" if self.stats.handshake_failures else "")
            ) from None

    def _running(self) -> bool:
        return self._dealer is not None

    def _start_sockets(self) -> None:
        assert self._ctx is not None
        dealer = self._dealer = self._socket(zmq.DEALER)
        sub = self._sub = self._socket(zmq.SUB)
        for sock, ep in ((dealer, self._endpoints[0]), (sub, self._endpoints[1])):
            apply_tuning(sock, self._tuning, ep)
            if self._curve is not None:
                apply_curve_client(sock, self._curve)
        if self._routing_id:
            dealer.setsockopt(zmq.ROUTING_ID, self._routing_id)
        dealer.setsockopt(zmq.SNDTIMEO, int(self._tuning.send_timeout_s * 1000))
        for topic in self._topics:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        for channel, sock in (("direct", dealer), ("event", sub)):
            monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
            self._sockets.append(monitor)
            self._monitors.append(monitor)
            self._tasks.append(background(self._watch(monitor, channel), f"{self._name}-{channel}-monitor"))
        for sock, ep in ((dealer, self._endpoints[0]), (sub, self._endpoints[1])):
            with map_errors(f"cannot connect to {ep}", config=True):
                sock.connect(ep)
        t = self._tuning
        self._direct = Pipe(dealer, self._waiters, t.max_frames, t.max_message_bytes)
        self._event = Pipe(sub, self._waiters, t.max_frames, t.max_message_bytes)

    async def _watch(self, monitor: zmq.asyncio.Socket, channel: str) -> None:
        ready = self._connected[channel]
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                ready.set()
            elif kind == zmq.EVENT_DISCONNECTED:
                ready.clear()
            else:
                self.stats.handshake_failures += 1
                if self._once.first(("handshake", channel, kind)):
                    why = (
                        f"server refused our CURVE key (status {event['value']})"
                        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                        else "protocol error (wrong server key or mechanism?)"
                    )
                    log.warning(
                        "client %s: handshake with %s failed: %s",
                        self._name,
                        event["endpoint"].decode(errors="replace"),
                        why,
                    )

    async def _teardown(self) -> None:
        for pipe in (self._direct, self._event):
            if pipe is not None:
                pipe.detach()
        self._direct = self._event = None  # a plain shadow socket must never touch a closed libzmq socket
        self._waiters.wake_all()  # a pending recv or send wakes and finds the transport closed
        await stop_watching(self._tasks, (self._dealer, self._sub), self._monitors)
        for sock in (self._dealer, self._sub):
            if sock is not None:
                sock.close(linger=self._tuning.linger_ms)
        await self._release_context()

    def _live(self, what: str) -> tuple[Pipe, Pipe]:
        if self._closed:
            raise TransportError(f"{what}: transport is closed")
        if self._direct is None or self._event is None:
            raise TransportError(f"{what}: client {self._name!r} is not started")
        return self._direct, self._event

    async def send(self, frames: FrameSeq) -> None:
        """Send to the server; queued while disconnected, TransportError if the queue stays full."""
        direct = self._direct
        if self._closed or direct is None:
            self._live(f"send to {self._endpoints[0]}")  # raises
            return
        try:
            direct.send_nowait(frames)
        except zmq.ZMQError as e:
            await self._send_slow(frames, e)
        self.stats.sent += 1

    async def _send_slow(self, frames: FrameSeq, first: zmq.ZMQError) -> None:
        """The DEALER's queue is full: wait for room up to ``send_timeout_s``, then TransportError."""
        what = f"send to {self._endpoints[0]}"
        if not isinstance(first, zmq.Again):
            with map_errors(what):
                raise first
        loop = asyncio.get_running_loop()
        waiters = self._waiters
        try:
            async with asyncio.timeout(self._tuning.send_timeout_s):
                while True:
                    direct, _ = self._live(what)
                    if direct.poll() & POLLOUT:
                        try:
                            with map_errors(what):
                                direct.send_nowait(frames)
                            return
                        except TransportError as e:
                            if not isinstance(e.__cause__, zmq.Again):
                                raise
                    waiter = loop.create_future()
                    waiters.writable.append(waiter)
                    try:
                        await waiter  # cancelled here: the message was never queued
                    finally:
                        waiters.writable.remove(waiter)
        except TimeoutError:
            raise TransportError(f"{what}: timed out, the peer is not reading") from first

    async def recv(self) -> Delivery:
        """Wait for the next direct reply or event (both channels served fairly)."""
        async with self._recv_lock:
            waiters = self._waiters
            while True:
                direct, event = self._live("recv")
                try:
                    parts, channel = self._next_parts(direct, event)
                except Oversize as big:
                    self.stats.oversize_dropped += 1
                    if self._once.first(("oversize",)):
                        log.warning("client %s dropped a message from the server of %s", self._name, big)
                    continue
                if parts is not None:
                    self._prefer_event = channel == "direct"
                    self.stats.received += 1
                    return Delivery(channel, parts, None, self._server_name)
                waiter = waiters.readable = direct.loop.create_future()
                try:
                    await waiter  # cancelled here: nothing was taken off the sockets
                finally:
                    waiters.readable = None

    def _next_parts(self, direct: Pipe, event: Pipe) -> tuple[list[bytes] | None, Channel]:
        """The next waiting message of either socket (fairly: the other one first next time)."""
        first, second = (event, direct) if self._prefer_event else (direct, event)
        with map_errors("recv"):
            parts = first.recv_nowait()
            if parts is not None:
                return parts, "event" if first is event else "direct"
            return second.recv_nowait(), "event" if second is event else "direct"
