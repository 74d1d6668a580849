"""ZeroMQ transport: ROUTER + XPUB on the server, DEALER + SUB on clients.

This is the only module of gtbus that imports zmq.

Security model
--------------
* Every socket on TCP speaks CurveZMQ. The server side of each socket (the
  orchestrator's ROUTER and XPUB) is a CURVE server; a ZAP handler (RFC 27)
  that this module runs on ``inproc://zeromq.zap.01`` admits a connection only
  if the client's CURVE public key is in the deployment's ``allowed`` map, and
  tells libzmq the node name bound to that key as the connection's
  ``User-Id``. Anything else (unknown key, other mechanism, other ZAP domain)
  gets status 400 and is counted. ``ZAP_ENFORCE_DOMAIN`` is set, so a missing
  handler fails closed instead of admitting everyone (CURVE without ZAP admits
  any key).
* A route belongs to the key that authenticated it. With CURVE, a client's
  DEALER routing id is 16 random bytes of its own (never its name, never
  shown to anyone), and the server keeps its own map from each authenticated
  ``User-Id`` to the routing id of the connection that last spoke under that
  key. ``send(peer)`` goes to that route only, so a member that connects
  under another member's name, or connects first to pre-empt it, receives
  nothing of the victim's: the name it chose is not a route. A reconnect of the
  same client reuses its routing id (``ROUTER_HANDOVER`` lets it take over its
  own half-dead connection); a restarted client gets a new one, learnt from
  its first message. A routing id that speaks under a key other than the one
  it was bound to is dropped and counted, and the route is forgotten.
* libzmq (4.3.5) aborts the process (``Assertion failed: ok
  (socket_base.cpp)``) when a ROUTER's auto-generated routing id for a client
  that set none collides with an id another client chose, and the
  auto-generated ids start from C ``rand()`` with its default seed: predictable.
  :func:`_seed_auto_routing_ids` seeds it from ``os.urandom`` before every
  ROUTER is made, so a member holding a valid key can only guess (about one in
  2**31 per connection, each one a CURVE handshake the ZAP handler counts).
* Inbound messages are read frame by frame: a message with more frames or
  bytes than :class:`SocketTuning` allows (the envelope's
  :class:`~gtbus.messages.envelope.Limits`) is drained without copying a byte
  and dropped (counted as ``oversize_dropped``). libzmq itself delivers a
  multipart message only when its last frame has arrived and has no limit on
  the frame count (``MAXMSGSIZE``, the largest frame the pipeline accepts,
  bounds each frame); until then it holds what the peer sent. So the server
  watches each TCP connection (:mod:`gtbus.transport.conn_guard`): bytes the
  kernel received from it since its last whole message, past its queue of
  ``server_rcvhwm`` messages plus one (one, before its first message), get
  the connection shut down, and libzmq drops the unfinished message. A
  connection must speak within ``first_message_s``, at most 32 connections
  that have not spoken are kept (the oldest goes), a key keeps at most two
  connections per socket, and the ZAP handler admits a key's handshakes at
  ``handshake_per_s`` (burst ``handshake_burst``).
* Plaintext (no CURVE) is allowed on ``inproc://`` and ``ipc://`` only, unless
  ``insecure=True`` is passed; that exists for the raw-pyzmq benchmark
  baseline and nothing else::

      server = ZmqServer("orch", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", None, insecure=True)
      client = ZmqClient("h1", *server.endpoints, None, insecure=True)

CURVE keys
----------
Keys are passed around as **raw 32-byte Curve25519 keys** (``bytes``), the
same bytes as ``bytes(nacl.public.PrivateKey)`` and
``bytes(nacl.public.PrivateKey.public_key)``: libzmq's CURVE is libsodium's
X25519, so an identity's PyNaCl box key is usable as is. This module converts
to Z85 (40 ASCII characters) only when handing keys to libzmq; the ``allowed``
map and the ZAP handler use raw public keys. :func:`curve_public_key`,
:func:`generate_curve_keypair` and :func:`z85_key` are the helpers.

Socket options (DESIGN §5) live in :class:`SocketTuning`. ``max_frame_bytes``
(libzmq ``MAXMSGSIZE``) limits each *frame*; a peer that sends a larger frame
is disconnected by libzmq and the message is lost, while everyone else is
served on. Its default, ``max_frames`` and ``max_message_bytes`` are the
envelope's :data:`~gtbus.messages.envelope.DEFAULT_LIMITS`: what the receive
pipeline accepts, no more. Frames of 64 KiB or more are sent zero-copy (pyzmq's copy
threshold); received frames are returned as ``bytes`` (one copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import weakref
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from nacl.public import PrivateKey
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from gtbus.errors import ConfigError, PeerUnreachable, TransportError
from gtbus.messages.envelope import DEFAULT_LIMITS
from gtbus.transport.budget import TokenBucket
from gtbus.transport.conn_guard import ConnectionGuard, Kick, TcpConnections
from gtbus.transport.base import (
    AsyncStartClose,
    Channel,
    Delivery,
    FrameSeq,
    SubscribeHook,
    Subscription,
    TransportStats,
)

__all__ = [
    "CURVE_KEY_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "ZAP_DOMAIN",
    "CurveClientConfig",
    "CurveServerConfig",
    "SocketTuning",
    "ZmqClient",
    "ZmqServer",
    "curve_public_key",
    "generate_curve_keypair",
    "z85_key",
]

log = logging.getLogger("gtbus.transport")

CURVE_KEY_BYTES = 32
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"gtbus"
#: The largest frame the receive pipeline accepts (one ship segment with its tag).
DEFAULT_MAX_FRAME_BYTES = DEFAULT_LIMITS.largest_frame
_MAX_NAME_BYTES = 255
#: libzmq checks MAXMSGSIZE against a frame as it is on the wire, which under CURVE is a
#: MESSAGE command: 8 bytes of name, an 8-byte nonce, a flags byte and a 16-byte MAC.
_CURVE_FRAME_OVERHEAD = 8 + 8 + 1 + 16
#: Random bytes of a client's routing id under CURVE (see the security model above).
ROUTING_ID_BYTES = 16
_LOGGED_ONCE_LIMIT = 1024


# --------------------------------------------------------------------------- keys


def _check_raw_key(key: bytes, what: str) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != CURVE_KEY_BYTES:
        raise ConfigError(f"{what} must be {CURVE_KEY_BYTES} raw bytes (a Curve25519 key)")
    return bytes(key)


def curve_public_key(secret_key: bytes) -> bytes:
    """Derive the raw 32-byte Curve25519 public key of a raw 32-byte secret key."""
    secret = _check_raw_key(secret_key, "CURVE secret key")
    return bytes(PrivateKey(secret).public_key)


def generate_curve_keypair() -> tuple[bytes, bytes]:
    """Return a fresh ``(secret, public)`` pair of raw 32-byte Curve25519 keys."""
    sk = PrivateKey.generate()
    return bytes(sk), bytes(sk.public_key)


def z85_key(raw_key: bytes) -> bytes:
    """Encode a raw 32-byte key as the 40-character Z85 text libzmq options take."""
    return z85.encode(_check_raw_key(raw_key, "CURVE key"))


@dataclass(frozen=True)
class CurveServerConfig:
    """The server's own CURVE key pair (raw 32-byte keys; the secret is never printed)."""

    secret_key: bytes = field(repr=False)
    public_key: bytes

    def __post_init__(self) -> None:
        _check_raw_key(self.public_key, "CURVE public key")
        if curve_public_key(self.secret_key) != self.public_key:
            raise ConfigError("CURVE public key does not belong to the secret key")

    @classmethod
    def from_secret(cls, secret_key: bytes) -> CurveServerConfig:
        """Build from the secret key alone, deriving the public key."""
        return cls(bytes(secret_key), curve_public_key(secret_key))


@dataclass(frozen=True)
class CurveClientConfig:
    """A client's CURVE key pair and the server public key it pins (all raw 32 bytes)."""

    secret_key: bytes = field(repr=False)
    public_key: bytes
    server_public_key: bytes

    def __post_init__(self) -> None:
        _check_raw_key(self.public_key, "CURVE public key")
        _check_raw_key(self.server_public_key, "server CURVE public key")
        if curve_public_key(self.secret_key) != self.public_key:
            raise ConfigError("CURVE public key does not belong to the secret key")

    @classmethod
    def from_secret(cls, secret_key: bytes, server_public_key: bytes) -> CurveClientConfig:
        """Build from the client's secret key and the server's public key."""
        return cls(bytes(secret_key), curve_public_key(secret_key), bytes(server_public_key))


# ------------------------------------------------------------------------ tuning


@dataclass(frozen=True)
class SocketTuning:
    """Socket options applied to every socket (DESIGN §5). Times in milliseconds."""

    #: how long close() waits to flush queued messages
    linger_ms: int = 100
    #: a CURVE handshake must finish within this (also bounds a slow ZAP reply)
    handshake_ivl_ms: int = 5000
    #: first reconnect delay, doubled up to ``reconnect_ivl_max_ms``
    reconnect_ivl_ms: int = 100
    reconnect_ivl_max_ms: int = 5000
    #: libzmq MAXMSGSIZE: largest inbound frame; larger ones drop the connection
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    #: most frames of one inbound message (after the ROUTER's routing id); more: drained and dropped
    max_frames: int = DEFAULT_LIMITS.max_frames
    #: most bytes of one inbound message, all frames together; more: drained and dropped
    max_message_bytes: int = DEFAULT_LIMITS.max_total
    #: ZMTP heartbeats: ping every ivl, drop the connection after timeout without traffic
    heartbeat_ivl_ms: int = 1000
    heartbeat_timeout_ms: int = 5000
    #: tells the peer to drop us after this long without traffic
    heartbeat_ttl_ms: int = 10000
    #: queue limits in messages, per connection
    sndhwm: int = 1000
    rcvhwm: int = 1000
    #: the server's ROUTER receive queue per client, in messages: what one client can make the
    #: server hold is about this many times ``max_message_bytes`` (a full queue stops reading
    #: its socket); enough to keep a ship hop's segments streaming
    server_rcvhwm: int = 16
    #: a key may open this many connections at once, then one a second more (CURVE handshakes)
    handshake_burst: int = 32
    handshake_per_s: float = 8.0
    #: how often the server compares each connection's received bytes with its messages
    guard_interval_s: float = 0.05
    #: a new connection must send its first message within this
    first_message_s: float = 10.0
    #: how long a client's send may wait for a full queue to drain before TransportError
    #: (the server never waits: a peer that does not read must not stall the others)
    send_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "linger_ms",
            "handshake_ivl_ms",
            "reconnect_ivl_ms",
            "reconnect_ivl_max_ms",
            "heartbeat_ivl_ms",
            "heartbeat_timeout_ms",
            "heartbeat_ttl_ms",
            "sndhwm",
            "rcvhwm",
            "server_rcvhwm",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"socket option {name} must not be negative")
        for name in ("max_frame_bytes", "max_frames", "max_message_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"socket option {name} must be positive")
        if self.send_timeout_s <= 0:
            raise ConfigError("send_timeout_s must be positive")


DEFAULT_TUNING = SocketTuning()


def _apply_tuning(sock: zmq.Socket[Any], t: SocketTuning, endpoint: str) -> None:
    if "[" in endpoint:  # tcp://[::1]:port needs IPv6 enabled on the socket
        sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.LINGER, t.linger_ms)
    sock.setsockopt(zmq.HANDSHAKE_IVL, t.handshake_ivl_ms)
    sock.setsockopt(zmq.RECONNECT_IVL, t.reconnect_ivl_ms)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, t.reconnect_ivl_max_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, t.max_frame_bytes + _CURVE_FRAME_OVERHEAD)
    sock.setsockopt(zmq.HEARTBEAT_IVL, t.heartbeat_ivl_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, t.heartbeat_timeout_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, t.heartbeat_ttl_ms)
    sock.setsockopt(zmq.SNDHWM, t.sndhwm)
    sock.setsockopt(zmq.RCVHWM, t.rcvhwm)


def _apply_curve_server(sock: zmq.Socket[Any], cfg: CurveServerConfig) -> None:
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, z85_key(cfg.secret_key))
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    # Fail closed: without a ZAP handler, refuse instead of admitting any key.
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def _apply_curve_client(sock: zmq.Socket[Any], cfg: CurveClientConfig) -> None:
    sock.setsockopt(zmq.CURVE_SERVERKEY, z85_key(cfg.server_public_key))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, z85_key(cfg.public_key))
    sock.setsockopt(zmq.CURVE_SECRETKEY, z85_key(cfg.secret_key))


# ------------------------------------------------------------------------ errors

_ERRNO_TEXT = {
    errno.EADDRINUSE: "address already in use",
    errno.EADDRNOTAVAIL: "address not available on this host",
    errno.EINVAL: "invalid endpoint",
    errno.ENODEV: "no such network interface",
    errno.EACCES: "permission denied",
    errno.ENOENT: "no such file or directory",
    zmq.EPROTONOSUPPORT: "transport not supported",
    zmq.ENOCOMPATPROTO: "transport not compatible with this socket type",
}


@contextlib.contextmanager
def _map_errors(action: str, *, peer: str | None = None, config: bool = False) -> Iterator[None]:
    """Turn zmq and OS errors into gtbus errors, once, with one clear line.

    ``action`` starts the message (``"cannot bind tcp://..."``, ``"send to 'h1'"``);
    ``config`` marks setup calls whose failure is the user's configuration.
    """
    try:
        yield
    except zmq.ZMQError as e:
        if e.errno == zmq.EHOSTUNREACH and peer is not None:
            raise PeerUnreachable(f"{action}: peer {peer!r} is not connected") from e
        if e.errno in (zmq.ETERM, zmq.ENOTSOCK):
            raise TransportError(f"{action}: transport is closed") from e
        if e.errno == zmq.EAGAIN:
            raise TransportError(f"{action}: timed out, the peer is not reading") from e
        text = _ERRNO_TEXT.get(e.errno or 0, e.strerror or str(e))
        if config:
            raise ConfigError(f"{action}: {text}") from e
        raise TransportError(f"{action}: {text}") from e
    except OSError as e:
        raise TransportError(f"{action}: {e.strerror or e}") from e


def _check_name(name: str, what: str = "node name") -> bytes:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} must be a non-empty string")
    raw = name.encode("utf-8")
    if len(raw) > _MAX_NAME_BYTES or raw[0] == 0:
        raise ConfigError(f"{what} {name!r} must be 1-{_MAX_NAME_BYTES} UTF-8 bytes, not starting with NUL")
    return raw


def _check_endpoint(endpoint: str, *, secure: bool, insecure: bool) -> None:
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest or scheme not in ("tcp", "ipc", "inproc"):
        raise ConfigError(f"unsupported endpoint {endpoint!r}: use tcp://, ipc:// or inproc://")
    if scheme == "tcp" and not secure and not insecure:
        raise ConfigError(
            f"refusing plaintext on {endpoint}: give a CURVE config "
            "(insecure=True exists only for the raw benchmark baseline)"
        )


def _user_id(frame: zmq.Frame) -> str | None:
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) and value else None


def _seed_auto_routing_ids() -> None:
    """Seed C ``rand()``, where libzmq draws a ROUTER's first auto-generated routing id.

    Unseeded, the ids are the same in every process, so a client could pick the
    id libzmq will give the next client that sets none, and the collision
    aborts the process inside libzmq (see the security model above).
    """
    try:
        libc = ctypes.CDLL(None)
        libc.srand(ctypes.c_uint(int.from_bytes(os.urandom(4), "big")))
    except (OSError, AttributeError) as e:  # no C library to seed: say so, run on
        log.warning("could not seed libzmq's routing ids: %s", e)


def _new_routing_id() -> bytes:
    """A client's secret routing id: random, never starting with NUL (libzmq reserves those)."""
    rid = bytearray(os.urandom(ROUTING_ID_BYTES))
    rid[0] = rid[0] | 1
    return bytes(rid)


class _OnceLog:
    """Log a given key once (bounded), so a flood of rejections is one line each."""

    def __init__(self) -> None:
        self._seen: set[object] = set()

    def first(self, key: object) -> bool:
        if key in self._seen or len(self._seen) >= _LOGGED_ONCE_LIMIT:
            return False
        self._seen.add(key)
        return True


# Hot-path socket I/O. pyzmq's asyncio sockets build a future (and walk enum flags)
# for every send and receive; on the signed round trip that was the largest cost
# of this module. The direct-message sockets are instead driven by hand: a plain
# (shadow) socket used with NOBLOCK, and one reader callback per socket on
# libzmq's notification FD that wakes whoever waits.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_COPY_THRESHOLD = zmq.COPY_THRESHOLD  # frames this big or bigger are sent zero-copy
_SRCFD = int(zmq.SRCFD)  # a received frame's source connection (deprecated in libzmq, still served)
_bsend = zmq.backend.Socket.send
_brecv = zmq.backend.Socket.recv
_bget = zmq.backend.Socket.get


class _Wakeup:
    """The futures a transport's callers wait on: one reader (recv holds a lock), any writers."""

    __slots__ = ("readable", "writable")

    def __init__(self) -> None:
        self.readable: asyncio.Future[None] | None = None
        self.writable: list[asyncio.Future[None]] = []  # only while a queue is full: rare

    def wake(self, events: int) -> None:
        if events & _POLLIN:
            w = self.readable
            if w is not None and not w.done():
                w.set_result(None)
        if events & _POLLOUT and self.writable:
            for w in self.writable:
                if not w.done():
                    w.set_result(None)

    def wake_all(self) -> None:
        self.wake(_POLLIN | _POLLOUT)


class _Oversize(Exception):
    """A received message had more frames or bytes than allowed; it was drained, not kept."""

    def __init__(self, head: list[Any], frames: int, size: int) -> None:
        super().__init__(f"{frames} frames, {size} bytes")
        self.head = head  # its first two frames (a ROUTER's: routing id and first frame)
        self.frames = frames
        self.size = size


class _Pipe:
    """Non-blocking send/receive on one zmq socket, woken by the event loop.

    libzmq's FD is edge-triggered and its signal is consumed by *any* operation
    on the socket that processes libzmq's commands (``ZMQ_EVENTS``, a send, a
    receive): a send may swallow the news of an incoming message. So every such
    operation here records what it learnt in ``state``: 0 the socket was seen
    empty (new messages will signal the FD), 1 it may hold a message (look
    before waiting), 2 it was seen readable. The reader callback re-checks
    ``ZMQ_EVENTS`` (which also clears the FD); a send re-checks when a reader is
    waiting. ``ZMQ_EVENTS`` and ``RCVMORE`` are not read through
    ``Socket.get``, which builds an enum per call; a received frame's ``more``
    says the same. A receiver cancelled while waiting loses nothing: messages
    stay in libzmq until someone reads them, and libzmq's queue limits apply.
    """

    __slots__ = ("fd", "loop", "max_bytes", "max_frames", "sock", "state", "waiters")

    def __init__(self, sock: zmq.asyncio.Socket, waiters: _Wakeup, max_frames: int, max_bytes: int) -> None:
        # A plain socket over the same libzmq socket; the asyncio wrapper's own
        # future machinery is never used for this socket.
        self.sock: zmq.Socket[Any] = zmq.Socket.shadow(sock.underlying)
        self.fd: int = self.sock.getsockopt(zmq.FD)
        self.state = 1
        self.waiters = waiters
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.fd, self._on_fd)

    def poll(self) -> int:
        """``ZMQ_EVENTS`` now; records readability and wakes a waiting reader if there is a message."""
        try:
            events: int = _bget(self.sock, _EVENTS)
        except zmq.ZMQError:
            self.waiters.wake_all()  # closed under us: wake everyone, they will see it
            return 0
        if events & _POLLIN:
            self.state = 2
            self.waiters.wake(_POLLIN)
        else:
            self.state = 0
        return events

    def _on_fd(self) -> None:
        events = self.poll()
        if events & _POLLOUT and self.waiters.writable:
            self.waiters.wake(_POLLOUT)

    def recv_nowait(self, frames: bool = False) -> list[Any] | None:
        """One whole multipart message (bytes, or zmq.Frame objects), or None if none is waiting.

        A message over ``max_frames`` or ``max_bytes`` is read to its end frame by
        frame, keeping nothing but its first two frames, and raises
        :class:`_Oversize`: nothing it carried is copied.
        """
        sock = self.sock
        while True:
            state = self.state
            if state == 0 or (state == 1 and not self.poll() & _POLLIN):
                return None  # state is 0 now: a new message will signal the FD
            try:
                f = _brecv(sock, _NOBLOCK, False)
                break
            except zmq.Again:  # seen readable, but gone (a peer's pipe was dropped): look again
                self.state = 1
        self.state = 1  # there may be more
        parts = [f]
        size = len(f)
        more = f.more
        max_frames, max_bytes = self.max_frames, self.max_bytes
        while more:  # the rest of a multipart message is always there with its first frame
            f = _brecv(sock, _NOBLOCK, False)
            more = f.more
            size += len(f)
            if len(parts) >= max_frames or size > max_bytes:
                count = len(parts) + 1
                while more:  # drain: each frame is released as soon as it is read
                    f = _brecv(sock, _NOBLOCK, False)
                    more = f.more
                    size += len(f)
                    count += 1
                raise _Oversize(parts[:2], count, size)
            parts.append(f)
        return parts if frames else [p.bytes for p in parts]

    def send_nowait(self, frames: Sequence[Any]) -> None:
        """Send a multipart message now (zmq.Again if it cannot be queued), then re-arm readers."""
        sock = self.sock
        last = len(frames) - 1
        try:
            for i, f in enumerate(frames):
                n = len(f) if isinstance(f, bytes) else memoryview(f).nbytes
                _bsend(sock, f, _NOBLOCK if i == last else _SNDMORE_NOBLOCK, n < _COPY_THRESHOLD)
        finally:
            # The send may have consumed the FD's signal of an incoming message.
            if self.waiters.readable is not None:
                self.poll()
            elif self.state == 0:
                self.state = 1

    def detach(self) -> None:
        """Stop watching the FD (before the socket closes: the number may be reused)."""
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.fd)


def _release_leaked(ctx: zmq.asyncio.Context | None, sockets: list[zmq.asyncio.Socket]) -> None:
    """Last resort for a transport dropped without ``close()``: close its sockets now.

    Otherwise pyzmq's ``Context.__del__`` may run later in the same GC pass, after
    the sockets' weakrefs were cleared, and block forever in ``term()``.
    """
    for sock in sockets:
        with contextlib.suppress(Exception):
            sock.close(linger=0)
    if ctx is not None:
        with contextlib.suppress(Exception):
            ctx.term()


def _open_context(
    given: zmq.asyncio.Context | None, owner: object, sockets: list[zmq.asyncio.Socket]
) -> tuple[zmq.asyncio.Context, weakref.finalize]:  # type: ignore[type-arg]
    """The context to use (ours unless given), with a finalizer that cleans up after a leak."""
    ctx = given or zmq.asyncio.Context()
    finalizer = weakref.finalize(owner, _release_leaked, None if given else ctx, sockets)
    return ctx, finalizer


def _background(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Start a socket-serving task whose unexpected death is logged, not silent."""
    task = asyncio.create_task(coro, name=name)

    def report(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            exc = t.exception()
            if isinstance(exc, zmq.ZMQError) and exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
                return  # socket closed under it: normal shutdown
            log.error("transport task %s died: %r", name, exc)

    task.add_done_callback(report)
    return task


async def _stop_watching(
    tasks: list[asyncio.Task[None]], sockets: Sequence[zmq.asyncio.Socket | None], monitors: list[zmq.asyncio.Socket]
) -> None:
    """Cancel the tasks reading socket monitors, then detach the monitors from ``sockets`` and close them."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    tasks.clear()
    for sock in sockets:
        if sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
    for monitor in monitors:
        monitor.close(linger=0)
    monitors.clear()


async def _send_nowait(sock: zmq.asyncio.Socket, msg: Sequence[Any]) -> None:
    # NOBLOCK through the asyncio socket (not a shadow) keeps pyzmq's edge-triggered
    # event bookkeeping right for pending receives on the same socket.
    await sock.send_multipart(msg, flags=zmq.NOBLOCK, copy=False)


# ------------------------------------------------------------------------ server


class _ZmqEndpoint(AsyncStartClose):
    """What ZmqServer and ZmqClient share: their sockets and the context they end."""

    _ctx: zmq.asyncio.Context | None
    _given_ctx: zmq.asyncio.Context | None
    _sockets: list[Any]
    _finalizer: Any

    _role: str  # "server" or "client", for messages
    _name: str
    _closed: bool

    def _running(self) -> bool:
        raise NotImplementedError

    def _start_sockets(self) -> None:
        raise NotImplementedError

    async def _teardown(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Open the context and the sockets (server: ZAP handler first, then bind; client: connect)."""
        if self._closed:
            raise TransportError(f"{self._role} {self._name!r} is closed")
        if self._running():
            return
        self._ctx, self._finalizer = _open_context(self._given_ctx, self, self._sockets)
        try:
            self._start_sockets()
        except BaseException:
            await self._teardown()
            raise

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        assert self._ctx is not None
        sock = self._ctx.socket(kind)
        self._sockets.append(sock)
        return sock

    async def _release_context(self) -> None:
        # Terminate only a context we made (a given one is shared), off the event loop:
        # term blocks until every socket is closed.
        ctx, self._ctx = self._ctx, None
        if ctx is not None and ctx is not self._given_ctx:
            await asyncio.to_thread(ctx.term)
        if self._finalizer is not None:
            self._finalizer.detach()
        self._sockets.clear()


class ZmqServer(_ZmqEndpoint):
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
        _check_name(name)
        if not zmq.has("curve") and curve is not None:
            raise ConfigError("this libzmq was built without CURVE support")
        if curve is None and allowed:
            raise ConfigError("an allowed-keys map needs a CURVE config")
        for ep in (router_endpoint, pub_endpoint):
            _check_endpoint(ep, secure=curve is not None, insecure=insecure)
        self._name = name
        self._requested = (router_endpoint, pub_endpoint)
        self._curve = curve
        self._allowed: dict[bytes, str] = {}
        self.set_allowed(allowed or {})
        self._tuning = tuning
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
        self._pipe: _Pipe | None = None  # the ROUTER's hot path
        # Under CURVE: authenticated name -> routing id of the connection that last spoke
        # under that key, and back. Bounded by the admitted keys.
        self._routes: dict[str, bytes] = {}
        self._route_owner: dict[bytes, str] = {}
        # Under CURVE on tcp://: per socket, the rules and the kernel's view of its connections.
        self._guards: dict[str, tuple[ConnectionGuard, TcpConnections]] = {}
        self._guard_tasks: list[asyncio.Task[None]] = []
        self._guard_monitors: list[zmq.asyncio.Socket] = []
        self._handshakes: dict[bytes, TokenBucket] = {}  # per admitted key: bounded by the allowed map
        self._waiters = _Wakeup()
        self._recv_lock = asyncio.Lock()
        self._closed = False
        self._once = _OnceLog()
        self.stats = TransportStats()

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
        checked: dict[bytes, str] = {}
        for key, node in allowed.items():
            _check_raw_key(key, f"allowed CURVE key of {node!r}")
            _check_name(node)
            checked[bytes(key)] = node
        self._allowed = checked

    # -- lifecycle

    def _running(self) -> bool:
        return self._router is not None

    def _start_sockets(self) -> None:
        assert self._ctx is not None
        t = self._tuning
        if self._curve is not None:
            self._zap = self._socket(zmq.ROUTER)
            self._zap.setsockopt(zmq.LINGER, 0)
            try:
                self._zap.bind(ZAP_ENDPOINT)
            except zmq.ZMQError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        "a ZAP handler already runs in this zmq context: give each CURVE ZmqServer its own context"
                    ) from e
                with _map_errors(f"cannot bind {ZAP_ENDPOINT}", config=True):
                    raise
            self._tasks.append(_background(self._serve_zap(), f"{self._name}-zap"))

        _seed_auto_routing_ids()
        router = self._router = self._socket(zmq.ROUTER)
        _apply_tuning(router, t, self._requested[0])
        router.setsockopt(zmq.RCVHWM, t.server_rcvhwm)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        xpub = self._xpub = self._socket(zmq.XPUB)
        _apply_tuning(xpub, t, self._requested[1])
        xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # report every subscribe, so late joiners are seen
        if self._curve is not None:
            _apply_curve_server(router, self._curve)
            _apply_curve_server(xpub, self._curve)
        for sock, ep in ((router, self._requested[0]), (xpub, self._requested[1])):
            with _map_errors(f"cannot bind {ep}", config=True):
                sock.bind(ep)
        self._endpoints = (
            router.getsockopt_string(zmq.LAST_ENDPOINT),
            xpub.getsockopt_string(zmq.LAST_ENDPOINT),
        )
        # The routing id frame comes first: one frame and up to 255 bytes more.
        self._pipe = _Pipe(router, self._waiters, t.max_frames + 1, t.max_message_bytes + _MAX_NAME_BYTES)
        self._tasks.append(_background(self._serve_subscriptions(), f"{self._name}-xpub"))
        if self._curve is not None:
            self._start_guards()
        log.debug("server %s bound %s", self._name, self._endpoints)

    # -- what one connection may make us hold (see gtbus.transport.conn_guard)

    def _start_guards(self) -> None:
        assert self._router is not None and self._xpub is not None and self._endpoints is not None
        t = self._tuning
        # The ROUTER may hold its queue of whole messages plus one unfinished; before its
        # first message a connection may hold one. The XPUB only ever gets subscriptions.
        limits = {
            "router": ((t.server_rcvhwm + 2) * t.max_message_bytes, t.max_message_bytes),
            "xpub": (1 << 20, 1 << 20),
        }
        for label, sock, endpoint in (("router", self._router, self._endpoints[0]), ("xpub", self._xpub, self._endpoints[1])):
            if not endpoint.startswith("tcp://"):
                continue
            limit, first = limits[label]
            guard = ConnectionGuard(limit, first, first_within=t.first_message_s)
            self._guards[label] = (guard, TcpConnections(int(endpoint.rsplit(":", 1)[1])))
            monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
            self._sockets.append(monitor)
            self._guard_monitors.append(monitor)
            self._guard_tasks.append(_background(self._watch_connections(monitor, label), f"{self._name}-{label}-conns"))
        if self._guards:
            self._guard_tasks.append(_background(self._police(), f"{self._name}-guard"))

    async def _watch_connections(self, monitor: zmq.asyncio.Socket, label: str) -> None:
        guard, conns = self._guards[label]
        loop = asyncio.get_running_loop()
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                if conns.watch(fd):
                    kick = guard.accepted(fd, loop.time())
                    if kick is not None:
                        self._kick(label, kick)
            else:
                guard.closed(fd)
                conns.forget(fd)

    async def _police(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._tuning.guard_interval_s)
            for label, (guard, conns) in self._guards.items():
                for kick in guard.check(loop.time(), conns):
                    self._kick(label, kick)

    def _delivered(self, label: str, frame: zmq.Frame, key: str | None) -> None:
        """A message came out of ``label``'s socket: its connection is in good standing."""
        guarded = self._guards.get(label)
        if guarded is None:
            return
        try:
            fd = frame.get(_SRCFD)
        except zmq.ZMQError:
            return
        kick = guarded[0].delivered(fd, key)
        if kick is not None:
            self._kick(label, kick)

    def _kick(self, label: str, kick: Kick) -> None:
        self._guards[label][1].shut(kick.fd)
        self.stats.extra["connections-shut"] = self.stats.extra.get("connections-shut", 0) + 1
        what = "held" if kick.reason[0].isdigit() else kick.reason  # "N bytes since ...": once, whatever N
        if self._once.first(("kick", label, what)):
            log.warning("server %s shut a connection to its %s: %s", self._name, label, kick.reason)

    async def close(self) -> None:
        """Close sockets (ROUTER and XPUB before the ZAP handler) and release the ports."""
        if self._closed:
            return
        self._closed = True
        await self._teardown()

    async def _teardown(self) -> None:
        if self._pipe is not None:
            self._pipe.detach()
            self._pipe = None  # a plain shadow socket must never touch a closed libzmq socket
        self._waiters.wake_all()  # a pending recv wakes and finds the transport closed
        await _stop_watching(self._guard_tasks, (self._router, self._xpub) if self._guards else (), self._guard_monitors)
        for _, conns in self._guards.values():
            conns.close()
        self._guards.clear()
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

    # -- ZAP (RFC 27)

    async def _serve_zap(self) -> None:
        assert self._zap is not None
        while True:
            request = await self._zap.recv_multipart()
            try:
                reply = self._zap_reply(request)
                if reply is not None:
                    await _send_nowait(self._zap, reply)
            except zmq.ZMQError as e:
                # The handshake that asked simply times out (HANDSHAKE_IVL) and is refused;
                # the handler must stay up for everyone else.
                log.warning("zap: could not answer a request: %s", e)

    def _zap_reply(self, request: list[bytes]) -> list[bytes] | None:
        # [pipe id, delimiter, version, request id, domain, address, identity, mechanism, *credentials]
        if len(request) < 8 or request[1] != b"":
            log.warning("zap: malformed request (%d frames) ignored", len(request))
            return None
        pipe, _, version, request_id, domain, address, _identity, mechanism, *creds = request

        def answer(status: bytes, text: bytes, user: bytes = b"") -> list[bytes]:
            return [pipe, b"", b"1.0", request_id, status, text, user, b""]

        peer_addr = address.decode("ascii", "replace")
        if version != b"1.0":
            self._reject("bad-version", peer_addr, b"")
            return answer(b"500", b"unsupported ZAP version")
        if domain != ZAP_DOMAIN:
            self._reject("bad-domain", peer_addr, b"")
            return answer(b"400", b"unknown domain")
        if mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != CURVE_KEY_BYTES:
            self._reject("bad-mechanism", peer_addr, b"")
            return answer(b"400", b"CURVE required")
        key = creds[0]
        node = self._allowed.get(key)
        if node is None:
            self._reject("unknown-key", peer_addr, key)
            return answer(b"400", b"unknown CURVE key")
        t = self._tuning
        now = asyncio.get_running_loop().time()
        bucket = self._handshakes.setdefault(key, TokenBucket(t.handshake_per_s, t.handshake_burst, now))
        if not bucket.take(1, now):
            self._reject("connection-rate", peer_addr, key)
            return answer(b"400", b"too many connections")
        self.stats.auth_accepted += 1
        return answer(b"200", b"OK", node.encode("utf-8"))

    def _reject(self, reason: str, address: str, key: bytes) -> None:
        self.stats.auth_rejected += 1
        self.stats.extra[f"auth-{reason}"] = self.stats.extra.get(f"auth-{reason}", 0) + 1
        if self._once.first(("zap", reason, key)):
            shown = z85.encode(key).decode() if len(key) == CURVE_KEY_BYTES else "-"
            log.warning("zap: refused connection from %s: %s (key %s)", address, reason, shown)

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
            self._delivered("xpub", parts[0], peer)
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

    def _live_router(self, what: str) -> _Pipe:
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
                    with _map_errors("recv"):
                        parts = pipe.recv_nowait(frames=True)
                except _Oversize as big:
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
            self._delivered("router", parts[1], user)
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

    def _drop_oversize(self, big: _Oversize) -> None:
        self.stats.oversize_dropped += 1
        who = "?"
        if big.head:
            rid = big.head[0].bytes
            if self._curve is None:
                who = rid.decode("utf-8", "backslashreplace")
            elif len(big.head) > 1:
                who = _user_id(big.head[1]) or self._route_owner.get(rid, "?")
                self._delivered("router", big.head[1], _user_id(big.head[1]))
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
        with _map_errors(what, peer=peer):
            raise error

    async def publish(self, frames: FrameSeq) -> None:
        """Publish ``frames`` to every subscriber; a subscriber whose queue is full misses it."""
        if self._closed:
            raise TransportError("publish: transport is closed")
        if self._xpub is None:
            raise TransportError(f"publish: server {self._name!r} is not started")
        with _map_errors("publish"):
            await _send_nowait(self._xpub, list(frames))
        self.stats.published += 1


# ------------------------------------------------------------------------ client

_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
)


class ZmqClient(_ZmqEndpoint):
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
        raw_name = _check_name(name)
        if routing_id is not None and len(routing_id) > _MAX_NAME_BYTES:
            raise ConfigError(f"routing id must be at most {_MAX_NAME_BYTES} bytes")
        if routing_id is None:
            routing_id = _new_routing_id() if curve is not None else raw_name
        self._routing_id = routing_id  # b"": none (libzmq's ROUTER makes one up)
        if not zmq.has("curve") and curve is not None:
            raise ConfigError("this libzmq was built without CURVE support")
        for ep in (router_endpoint, pub_endpoint):
            _check_endpoint(ep, secure=curve is not None, insecure=insecure)
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
        self._direct: _Pipe | None = None  # DEALER and SUB, driven by hand (see _Pipe)
        self._event: _Pipe | None = None
        self._waiters = _Wakeup()  # shared by both sockets (only the DEALER ever reports POLLOUT)
        self._prefer_event = False
        self._recv_lock = asyncio.Lock()
        self._connected = {"direct": asyncio.Event(), "event": asyncio.Event()}
        self._closed = False
        self._once = _OnceLog()
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
            _apply_tuning(sock, self._tuning, ep)
            if self._curve is not None:
                _apply_curve_client(sock, self._curve)
        if self._routing_id:
            dealer.setsockopt(zmq.ROUTING_ID, self._routing_id)
        dealer.setsockopt(zmq.SNDTIMEO, int(self._tuning.send_timeout_s * 1000))
        for topic in self._topics:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        for channel, sock in (("direct", dealer), ("event", sub)):
            monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
            self._sockets.append(monitor)
            self._monitors.append(monitor)
            self._tasks.append(_background(self._watch(monitor, channel), f"{self._name}-{channel}-monitor"))
        for sock, ep in ((dealer, self._endpoints[0]), (sub, self._endpoints[1])):
            with _map_errors(f"cannot connect to {ep}", config=True):
                sock.connect(ep)
        t = self._tuning
        self._direct = _Pipe(dealer, self._waiters, t.max_frames, t.max_message_bytes)
        self._event = _Pipe(sub, self._waiters, t.max_frames, t.max_message_bytes)

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

    async def close(self) -> None:
        """Close the sockets; a pending recv wakes with TransportError."""
        if self._closed:
            return
        self._closed = True
        await self._teardown()

    async def _teardown(self) -> None:
        for pipe in (self._direct, self._event):
            if pipe is not None:
                pipe.detach()
        self._direct = self._event = None  # a plain shadow socket must never touch a closed libzmq socket
        self._waiters.wake_all()  # a pending recv or send wakes and finds the transport closed
        await _stop_watching(self._tasks, (self._dealer, self._sub), self._monitors)
        for sock in (self._dealer, self._sub):
            if sock is not None:
                sock.close(linger=self._tuning.linger_ms)
        await self._release_context()

    def _live(self, what: str) -> tuple[_Pipe, _Pipe]:
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
            with _map_errors(what):
                raise first
        loop = asyncio.get_running_loop()
        waiters = self._waiters
        try:
            async with asyncio.timeout(self._tuning.send_timeout_s):
                while True:
                    direct, _ = self._live(what)
                    if direct.poll() & _POLLOUT:
                        try:
                            with _map_errors(what):
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
                except _Oversize as big:
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

    def _next_parts(self, direct: _Pipe, event: _Pipe) -> tuple[list[bytes] | None, Channel]:
        """The next waiting message of either socket (fairly: the other one first next time)."""
        first, second = (event, direct) if self._prefer_event else (direct, event)
        with _map_errors("recv"):
            parts = first.recv_nowait()
            if parts is not None:
                return parts, "event" if first is event else "direct"
            return second.recv_nowait(), "event" if second is event else "direct"
