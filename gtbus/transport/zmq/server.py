"""The orchestrator's zmq transport: ROUTER for direct messages, XPUB for events.

Who may connect is the ZAP handler's to say (:mod:`gtbus.transport.zmq.zap`);
what one connection may make the server hold is bounded while messages are
read (:mod:`gtbus.transport.zmq.pipe`) and before they are whole
(:mod:`gtbus.transport.zmq.connections`). This module binds the sockets and
keeps routes:

* A route belongs to the key that authenticated it. With CURVE, a client's
  DEALER routing id is 16 random bytes of its own (never its name, never
  shown to anyone; :mod:`gtbus.transport.zmq.client`), and the server keeps
  its own map from each authenticated ``User-Id`` to the routing id of the
  connection that last spoke under that key. ``send(peer)`` goes to that
  route only, so a member that connects under another member's name, or
  connects first to pre-empt it, receives nothing of the victim's: the name
  it chose is not a route. A reconnect of the same client reuses its routing
  id (``ROUTER_HANDOVER`` lets it take over its own half-dead connection); a
  restarted client gets a new one, learnt from its first message. A routing
  id that speaks under a key other than the one it was bound to is dropped
  and counted, and the route is forgotten.
* libzmq (4.3.5) aborts the process (``Assertion failed: ok
  (socket_base.cpp)``) when a ROUTER's auto-generated routing id for a client
  that set none collides with an id another client chose, and the
  auto-generated ids start from C ``rand()`` with its default seed:
  predictable. :func:`_seed_auto_routing_ids` seeds it from ``os.urandom``
  before every ROUTER is made, so a member holding a valid key can only guess
  (about one in 2**31 per connection, each one a CURVE handshake the ZAP
  handler counts).
* The server never waits on a peer: a send to a peer whose queue is full is
  TransportError at once, so a peer that stops reading its replies cannot
  stall everyone else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import weakref
from collections.abc import Mapping

import zmq
import zmq.asyncio

from gtbus.errors import ConfigError, PeerUnreachable, TransportError
from gtbus.transport.base import Delivery, FrameSeq, SubscribeHook, Subscription, TransportStats
from gtbus.transport.zmq.conn_guard import ConnectionGuard
from gtbus.transport.zmq.connections import ConnectionWatch
from gtbus.transport.zmq.endpoint import (
    MAX_NAME_BYTES,
    OnceLog,
    ZmqEndpoint,
    background,
    check_endpoint,
    check_name,
    send_nowait,
)
from gtbus.transport.zmq.errors import map_errors
from gtbus.transport.zmq.keys import CurveServerConfig
from gtbus.transport.zmq.options import DEFAULT_TUNING, SocketTuning, apply_curve_server, apply_tuning
from gtbus.transport.zmq.pipe import Oversize, Pipe, Wakeup
from gtbus.transport.zmq.zap import ZapHandler, bind_zap

__all__ = ["ZmqServer"]

log = logging.getLogger("gtbus.transport")


def _user_id(frame: zmq.Frame) -> str | None:
    """The node name the ZAP handler bound to the connection ``frame`` came on (None: none)."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) and value else None


def _seed_auto_routing_ids() -> None:
    """Seed C ``rand()``, where libzmq draws a ROUTER's first auto-generated routing id.

    Unseeded, the ids are the same in every process, so a client could pick the
    id libzmq will give the next client that sets none, and the collision
    aborts the process inside libzmq (see the module docstring).
    """
    try:
        libc = ctypes.CDLL(None)
        libc.srand(ctypes.c_uint(int.from_bytes(os.urandom(4), "big")))
    except (OSError, AttributeError) as e:  # no C library to seed: say so, run on
        log.warning("could not seed libzmq's routing ids: %s", e)


class ZmqServer(ZmqEndpoint):
    """The orchestrator's transport: ROUTER for direct messages, XPUB for events.

    ``curve`` is the server key pair; ``allowed`` maps each admitted client's raw
    CURVE public key to its node name. ``curve=None`` gives plaintext, refused on
    tcp:// unless ``insecure=True``. ``on_subscribe`` is called for every
    (un)subscription on the XPUB (see :class:`Subscription`). ``context`` lets
    inproc:// endpoints be shared with clients; a CURVE server needs a context
    of its own (one ZAP handler per context), which it creates when none is given.
    """

    _role = "server"

    def __init__(
        self,
        name: str,
        router_endpoint: str,
        pub_endpoint: str,
        curve: CurveServerConfig | None,
        allowed: Mapping[bytes, str] | None = None,
        *,
        insecure: bool = False,
        tuning: SocketTuning = DEFAULT_TUNING,
        on_subscribe: SubscribeHook | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        check_name(name)
        if not zmq.has("curve") and curve is not None:
            raise ConfigError("this libzmq was built without CURVE support")
        if curve is None and allowed:
            raise ConfigError("an allowed-keys map needs a CURVE config")
        for ep in (router_endpoint, pub_endpoint):
            check_endpoint(ep, secure=curve is not None, insecure=insecure)
        self._name = name
        self._requested = (router_endpoint, pub_endpoint)
        self._curve = curve
        self._tuning = tuning
        self._once = OnceLog()
        self.stats = TransportStats()
        self._zap_handler = ZapHandler(
            self.stats, self._once, per_s=tuning.handshake_per_s, burst=tuning.handshake_burst
        )
        self._zap_handler.set_allowed(allowed or {})
        self._on_subscribe = on_subscribe
        self._given_ctx = context
        self._ctx: zmq.asyncio.Context | None = None
        self._sockets: list[zmq.asyncio.Socket] = []  # every socket opened, for _release_leaked
        self._finalizer: weakref.finalize | None = None  # type: ignore[type-arg]
        self._router: zmq.asyncio.Socket | None = None
        self._xpub: zmq.asyncio.Socket | None = None
        self._zap: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._endpoints: tuple[str, str] | None = None
        self._pipe: Pipe | None = None  # the ROUTER's hot path
        # Under CURVE: authenticated name -> routing id of the connection that last spoke
        # under that key, and back. Bounded by the admitted keys.
        self._routes: dict[str, bytes] = {}
        self._route_owner: dict[bytes, str] = {}
        # Under CURVE on tcp://: what each connection may make the server hold.
        self._connections = ConnectionWatch(name, self.stats, self._once, tuning.guard_interval_s)
        self._waiters = Wakeup()
        self._recv_lock = asyncio.Lock()
        self._closed = False

    # -- properties

    @property
    def name(self) -> str:
        """This node's name."""
        return self._name

    @property
    def endpoints(self) -> tuple[str, str]:
        """``(router_endpoint, pub_endpoint)`` as bound, with the real port numbers."""
        if self._endpoints is None:
            raise TransportError(f"server {self._name!r} is not started")
        return self._endpoints

    def set_allowed(self, allowed: Mapping[bytes, str]) -> None:
        """Replace the admitted keys (raw public key -> node name); affects new connections only."""
        self._zap_handler.set_allowed(allowed)

    # -- lifecycle

    def _running(self) -> bool:
        return self._router is not None

    def _start_sockets(self) -> None:
        assert self._ctx is not None
        t = self._tuning
        if self._curve is not None:
            zap = self._zap = self._socket(zmq.ROUTER)
            bind_zap(zap)
            self._tasks.append(background(self._zap_handler.serve(zap), f"{self._name}-zap"))

        _seed_auto_routing_ids()
        router = self._router = self._socket(zmq.ROUTER)
        apply_tuning(router, t, self._requested[0])
        router.setsockopt(zmq.RCVHWM, t.server_rcvhwm)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        xpub = self._xpub = self._socket(zmq.XPUB)
        apply_tuning(xpub, t, self._requested[1])
        xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # report every subscribe, so late joiners are seen
        if self._curve is not None:
            apply_curve_server(router, self._curve)
            apply_curve_server(xpub, self._curve)
        for sock, ep in ((router, self._requested[0]), (xpub, self._requested[1])):
            with map_errors(f"cannot bind {ep}", config=True):
                sock.bind(ep)
        self._endpoints = (
            router.getsockopt_string(zmq.LAST_ENDPOINT),
            xpub.getsockopt_string(zmq.LAST_ENDPOINT),
        )
        # The routing id frame comes first: one frame and up to 255 bytes more.
        self._pipe = Pipe(router, self._waiters, t.max_frames + 1, t.max_message_bytes + MAX_NAME_BYTES)
        self._tasks.append(background(self._serve_subscriptions(), f"{self._name}-xpub"))
        if self._curve is not None:
            self._watch_connections(router, xpub)
        log.debug("server %s bound %s", self._name, self._endpoints)

    def _watch_connections(self, router: zmq.asyncio.Socket, xpub: zmq.asyncio.Socket) -> None:
        """Guard the tcp:// connections of both sockets (see :mod:`gtbus.transport.zmq.connections`)."""
        assert self._endpoints is not None
        t = self._tuning
        # The ROUTER may hold its queue of whole messages plus one unfinished; before its
        # first message a connection may hold one. The XPUB only ever gets subscriptions.
        limits = {
            "router": ((t.server_rcvhwm + 2) * t.max_message_bytes, t.max_message_bytes),
            "xpub": (1 << 20, 1 << 20),
        }
        for label, sock, endpoint in (("router", router, self._endpoints[0]), ("xpub", xpub, self._endpoints[1])):
            if endpoint.startswith("tcp://"):
                limit, first = limits[label]
                guard = ConnectionGuard(limit, first, first_within=t.first_message_s)
                self._sockets.append(self._connections.watch(label, sock, endpoint, guard))

    async def _teardown(self) -> None:
        if self._pipe is not None:
            self._pipe.detach()
            self._pipe = None  # a plain shadow socket must never touch a closed libzmq socket
        self._waiters.wake_all()  # a pending recv wakes and finds the transport closed
        await self._connections.stop()
        for sock in (self._router, self._xpub):
            if sock is not None:
                sock.close(linger=self._tuning.linger_ms)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._zap is not None:
            self._zap.close(linger=0)
        await self._release_context()

    # -- events in: subscriptions

    async def _serve_subscriptions(self) -> None:
        assert self._xpub is not None
        while True:
            parts = await self._xpub.recv_multipart(copy=False)
            data = parts[0].bytes
            if len(parts) != 1 or not data or data[0] not in (0, 1):
                self._drop_malformed("non-subscription message on the event socket")
                continue
            subscribed = data[0] == 1
            peer = _user_id(parts[0])
            self._connections.delivered("xpub", parts[0], peer)
            # libzmq reports "last subscriber of a topic went away" without metadata,
            # so an anonymous unsubscribe is genuine; an anonymous subscribe is not.
            if self._curve is not None and peer is None and subscribed:
                self._drop_malformed("subscription without an authenticated identity")
                continue
            self.stats.subscriptions += 1
            if self._on_subscribe is not None:
                try:
                    self._on_subscribe(Subscription(peer, data[1:], subscribed))
                except Exception:
                    log.exception("on_subscribe hook of %s failed", self._name)

    def _drop_malformed(self, why: str) -> None:
        self.stats.malformed_dropped += 1
        if self._once.first(("malformed", why)):
            log.warning("server %s dropped a message: %s", self._name, why)

    # -- direct messages

    def _live_router(self, what: str) -> Pipe:
        if self._closed:
            raise TransportError(f"{what}: transport is closed")
        if self._pipe is None:
            raise TransportError(f"{what}: server {self._name!r} is not started")
        return self._pipe

    async def recv(self) -> Delivery:
        """Wait for the next direct message whose sender is authenticated and consistent."""
        async with self._recv_lock:
            waiters = self._waiters
            while True:
                pipe = self._live_router("recv")
                try:
                    with map_errors("recv"):
                        parts = pipe.recv_nowait(frames=True)
                except Oversize as big:
                    self._drop_oversize(big)
                    continue
                if parts is None:
                    waiter = waiters.readable = pipe.loop.create_future()
                    try:
                        await waiter  # cancelled here: nothing was taken off the socket
                    finally:
                        waiters.readable = None
                    continue
                delivery = self._admit(parts)
                if delivery is not None:
                    self.stats.received += 1
                    return delivery

    def _admit(self, parts: list[zmq.Frame]) -> Delivery | None:
        if len(parts) < 2:
            self._drop_malformed("empty message")
            return None
        routing_id = parts[0].bytes
        if self._curve is not None:
            user = _user_id(parts[1])
            if user is None:
                self._drop_malformed("message without an authenticated identity")
                return None
            self._connections.delivered("router", parts[1], user)
            if self._routes.get(user) != routing_id and not self._bind_route(user, routing_id):
                return None
            peer: str = user
            authenticated: str | None = user
        else:
            # Plaintext: the routing id is whatever the client set; surrogateescape makes
            # any bytes round-trip through send(peer).
            peer = routing_id.decode("utf-8", "surrogateescape")
            authenticated = None
        return Delivery("direct", [p.bytes for p in parts[1:]], peer, authenticated)

    def _bind_route(self, user: str, routing_id: bytes) -> bool:
        """``user``'s key spoke on ``routing_id``: make it the route to ``user``, unless another key owns it."""
        owner = self._route_owner.get(routing_id)
        if owner is not None and owner != user:
            # Only a client that knew another's secret routing id gets here: refuse
            # it and forget the route, so nothing more of the owner's goes there.
            self.stats.spoofed_dropped += 1
            del self._route_owner[routing_id]
            if self._routes.get(owner) == routing_id:
                del self._routes[owner]
            if self._once.first(("spoof", user, owner)):
                log.warning("server %s dropped a message from %r on the route of %r and forgot that route",
                            self._name, user, owner)
            return False
        old = self._routes.get(user)
        if old is not None:
            self._route_owner.pop(old, None)  # a restarted client: its old connection is stale
        self._routes[user] = routing_id
        self._route_owner[routing_id] = user
        return True

    def _drop_oversize(self, big: Oversize) -> None:
        self.stats.oversize_dropped += 1
        who = "?"
        if big.head:
            rid = big.head[0].bytes
            if self._curve is None:
                who = rid.decode("utf-8", "backslashreplace")
            elif len(big.head) > 1:
                who = _user_id(big.head[1]) or self._route_owner.get(rid, "?")
                self._connections.delivered("router", big.head[1], _user_id(big.head[1]))
        if self._once.first(("oversize", who)):
            rid = len(big.head[0]) if big.head else 0  # the ROUTER's routing id frame is not the peer's
            log.warning("server %s dropped a message from %r of %d frames, %d bytes (limits: %d frames, %d bytes)",
                        self._name, who, big.frames - 1, big.size - rid, self._tuning.max_frames,
                        self._tuning.max_message_bytes)

    def route_of(self, peer: str) -> bytes | None:
        """The routing id ``peer``'s key last spoke on (None if it has not, or in plaintext)."""
        return self._routes.get(peer)

    async def send(self, peer: str, frames: FrameSeq) -> None:
        """Send ``frames`` to connected client ``peer``; PeerUnreachable if it is not connected.

        A full queue towards the peer (``sndhwm`` messages it has not read) is
        TransportError at once, never a wait.
        """
        pipe = self._pipe
        if self._closed or pipe is None:
            self._live_router(f"send to {peer!r}")  # raises
            return
        if self._curve is not None:
            route = self._routes.get(peer)
            if route is None:
                raise PeerUnreachable(f"send to {peer!r}: peer {peer!r} is not connected")
        else:
            route = peer.encode("utf-8", "surrogateescape")
        msg = [route, *frames]
        try:
            pipe.send_nowait(msg)
        except zmq.ZMQError as e:
            self._send_failed(peer, e)
        self.stats.sent += 1

    def _send_failed(self, peer: str, error: zmq.ZMQError) -> None:
        """Map a refused send. A full queue is not waited on: the sender is often the receive
        loop, and a peer that stops reading its replies must not stall everyone else's."""
        what = f"send to {peer!r}"
        if error.errno == zmq.EAGAIN:
            self.stats.extra["send-queue-full"] = self.stats.extra.get("send-queue-full", 0) + 1
            raise TransportError(f"{what}: its queue of {self._tuning.sndhwm} messages is full (it is not reading)") from error
        with map_errors(what, peer=peer):
            raise error

    async def publish(self, frames: FrameSeq) -> None:
        """Publish ``frames`` to every subscriber; a subscriber whose queue is full misses it."""
        if self._closed:
            raise TransportError("publish: transport is closed")
        if self._xpub is None:
            raise TransportError(f"publish: server {self._name!r} is not started")
        with map_errors("publish"):
            await send_nowait(self._xpub, list(frames))
        self.stats.published += 1

