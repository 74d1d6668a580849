"""Socket options (DESIGN §5): :class:`SocketTuning`, and how every socket gets them.

``max_frame_bytes`` (libzmq ``MAXMSGSIZE``) limits each *frame*; a peer that
sends a larger frame is disconnected by libzmq and the message is lost, while
everyone else is served on. Its default, ``max_frames`` and
``max_message_bytes`` are the envelope's
:data:`~gtbus.messages.envelope.DEFAULT_LIMITS`: what the receive pipeline
accepts, no more (:mod:`gtbus.transport.zmq.pipe` enforces the last two while
reading).

A CURVE server's sockets enforce the ZAP domain (``ZAP_ENFORCE_DOMAIN``), so a
missing handler fails closed instead of admitting everyone: CURVE without ZAP
admits any key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zmq

from gtbus.errors import ConfigError
from gtbus.messages.envelope import DEFAULT_LIMITS
from gtbus.transport.zmq.keys import CurveClientConfig, CurveServerConfig, z85_key
from gtbus.transport.zmq.zap import ZAP_DOMAIN

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_TUNING",
    "SocketTuning",
    "apply_curve_client",
    "apply_curve_server",
    "apply_tuning",
]

#: The largest frame the receive pipeline accepts (one ship segment with its tag).
DEFAULT_MAX_FRAME_BYTES = DEFAULT_LIMITS.largest_frame
#: libzmq checks MAXMSGSIZE against a frame as it is on the wire, which under CURVE is a
#: MESSAGE command: 8 bytes of name, an 8-byte nonce, a flags byte and a 16-byte MAC.
_CURVE_FRAME_OVERHEAD = 8 + 8 + 1 + 16



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


def apply_tuning(sock: zmq.Socket[Any], t: SocketTuning, endpoint: str) -> None:
    """Set ``t``'s options on ``sock``, which will bind or connect to ``endpoint``."""
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


def apply_curve_server(sock: zmq.Socket[Any], cfg: CurveServerConfig) -> None:
    """Make ``sock`` a CURVE server whose clients the ZAP handler must admit."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, z85_key(cfg.secret_key))
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    # Fail closed: without a ZAP handler, refuse instead of admitting any key.
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def apply_curve_client(sock: zmq.Socket[Any], cfg: CurveClientConfig) -> None:
    """Make ``sock`` a CURVE client with ``cfg``'s key pair, pinning the server's key."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, z85_key(cfg.server_public_key))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, z85_key(cfg.public_key))
    sock.setsockopt(zmq.CURVE_SECRETKEY, z85_key(cfg.secret_key))

