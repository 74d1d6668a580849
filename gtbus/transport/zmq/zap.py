"""The ZAP handler (RFC 27): which CURVE keys a server admits, and under what name.

Every socket on TCP speaks CurveZMQ, and the server side of each socket (the
orchestrator's ROUTER and XPUB) is a CURVE server. libzmq asks this handler,
on ``inproc://zeromq.zap.01`` of the server's context, about every handshake:
it admits a connection only if the client's CURVE public key is in the
deployment's ``allowed`` map, and tells libzmq the node name bound to that key
as the connection's ``User-Id`` (the only name the server ever routes by).
Anything else (unknown key, other mechanism, other ZAP domain, other version)
is refused and counted. A key's handshakes are admitted at ``per_s`` with a
burst of ``burst`` (:class:`~gtbus.transport.budget.TokenBucket`): each one
costs the server a CURVE handshake. The server's sockets enforce the ZAP
domain (:func:`~gtbus.transport.zmq.options.apply_curve_server`), so a missing
handler fails closed.

:meth:`ZapHandler.reply` decides with no I/O (time passed in);
:meth:`ZapHandler.serve` answers a bound socket.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Mapping
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils import z85

from gtbus.errors import ConfigError
from gtbus.transport.base import TransportStats
from gtbus.transport.budget import TokenBucket
from gtbus.transport.zmq.endpoint import OnceLog, check_name, send_nowait
from gtbus.transport.zmq.errors import map_errors
from gtbus.transport.zmq.keys import CURVE_KEY_BYTES, check_raw_key

__all__ = ["ZAP_DOMAIN", "ZAP_ENDPOINT", "ZapHandler", "bind_zap"]

log = logging.getLogger("gtbus.transport")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"gtbus"


def bind_zap(sock: zmq.Socket[Any]) -> None:
    """Bind ``sock`` (a ROUTER) where libzmq looks for its context's ZAP handler."""
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(ZAP_ENDPOINT)
    except zmq.ZMQError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                "a ZAP handler already runs in this zmq context: give each CURVE ZmqServer its own context"
            ) from e
        with map_errors(f"cannot bind {ZAP_ENDPOINT}", config=True):
            raise


class ZapHandler:
    """Admits the ``allowed`` CURVE keys, each as its node name, at a bounded handshake rate.

    ``stats`` and ``once`` are the owning server's: admissions and refusals are
    counted there (``auth_accepted``, ``auth_rejected`` and ``auth-<reason>``).
    """

    def __init__(self, stats: TransportStats, once: OnceLog, *, per_s: float, burst: int) -> None:
        self._stats = stats
        self._once = once
        self._per_s = per_s
        self._burst = burst
        self._allowed: dict[bytes, str] = {}
        self._handshakes: dict[bytes, TokenBucket] = {}  # per admitted key: bounded by the allowed map

    def set_allowed(self, allowed: Mapping[bytes, str]) -> None:
        """Replace the admitted keys (raw public key -> node name); affects new connections only."""
        checked: dict[bytes, str] = {}
        for key, node in allowed.items():
            check_raw_key(key, f"allowed CURVE key of {node!r}")
            check_name(node)
            checked[bytes(key)] = node
        self._allowed = checked

    async def serve(self, sock: zmq.asyncio.Socket) -> None:
        """Answer the requests arriving on ``sock`` (bound with :func:`bind_zap`) until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            request = await sock.recv_multipart()
            try:
                reply = self.reply(request, loop.time())
                if reply is not None:
                    await send_nowait(sock, reply)
            except zmq.ZMQError as e:
                # The handshake that asked simply times out (HANDSHAKE_IVL) and is refused;
                # the handler must stay up for everyone else.
                log.warning("zap: could not answer a request: %s", e)

    def reply(self, request: list[bytes], now: float) -> list[bytes] | None:
        """The answer to one ZAP request at time ``now`` (None: malformed, not answered)."""
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
        bucket = self._handshakes.setdefault(key, TokenBucket(self._per_s, self._burst, now))
        if not bucket.take(1, now):
            self._reject("connection-rate", peer_addr, key)
            return answer(b"400", b"too many connections")
        self._stats.auth_accepted += 1
        return answer(b"200", b"OK", node.encode("utf-8"))

    def _reject(self, reason: str, address: str, key: bytes) -> None:
        stats = self._stats
        stats.auth_rejected += 1
        stats.extra[f"auth-{reason}"] = stats.extra.get(f"auth-{reason}", 0) + 1
        # Once per reason, and per key only for deployment members (connection-rate): a
        # stream of made-up keys must not fill the server's shared once-log and so
        # silence every later first-time warning.
        if self._once.first(("zap", reason, key if reason != "unknown-key" else b"")):
            shown = z85.encode(key).decode() if len(key) == CURVE_KEY_BYTES else "-"
            log.warning("zap: refused connection from %s: %s (key %s)", address, reason, shown)
