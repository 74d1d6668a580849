"""What the zmq server and client share: names, endpoint rules, the context and its sockets.

Plaintext (no CURVE) is allowed on ``inproc://`` and ``ipc://`` only, unless
``insecure=True`` is passed; that exists for the raw-pyzmq benchmark baseline
and nothing else (:func:`check_endpoint`). A transport dropped without
``close()`` has its sockets closed by a finalizer (:func:`open_context`), and a
serving task that dies unexpectedly is logged, not silent (:func:`background`).
Rejections that a peer can repeat at will are logged once per kind
(:class:`OnceLog`), so a flood is one line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Coroutine, Sequence
from typing import Any

import zmq
import zmq.asyncio

from gtbus.errors import ConfigError, TransportError
from gtbus.transport.base import AsyncStartClose

__all__ = [
    "MAX_NAME_BYTES",
    "OnceLog",
    "ZmqEndpoint",
    "background",
    "check_endpoint",
    "check_name",
    "send_nowait",
    "stop_watching",
]

log = logging.getLogger("gtbus.transport")

#: The longest node name, and routing id, libzmq takes.
MAX_NAME_BYTES = 255
_LOGGED_ONCE_LIMIT = 1024


def check_name(name: str, what: str = "node name") -> bytes:
    """``name`` as UTF-8 if it can name a node (libzmq's limits), else ConfigError."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} must be a non-empty string")
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME_BYTES or raw[0] == 0:
        raise ConfigError(f"{what} {name!r} must be 1-{MAX_NAME_BYTES} UTF-8 bytes, not starting with NUL")
    return raw


def check_endpoint(endpoint: str, *, secure: bool, insecure: bool) -> None:
    """ConfigError unless ``endpoint`` is tcp/ipc/inproc, and CURVE-``secure`` on tcp (or ``insecure``)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest or scheme not in ("tcp", "ipc", "inproc"):
        raise ConfigError(f"unsupported endpoint {endpoint!r}: use tcp://, ipc:// or inproc://")
    if scheme == "tcp" and not secure and not insecure:
        raise ConfigError(
            f"refusing plaintext on {endpoint}: give a CURVE config "
            "(insecure=True exists only for the raw benchmark baseline)"
        )


class OnceLog:
    """Log a given key once (bounded), so a flood of rejections is one line each."""

    def __init__(self) -> None:
        self._seen: set[object] = set()

    def first(self, key: object) -> bool:
        """True the first time ``key`` is seen (False for all once the bound is reached)."""
        if key in self._seen or len(self._seen) >= _LOGGED_ONCE_LIMIT:
            return False
        self._seen.add(key)
        return True



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


def open_context(
    given: zmq.asyncio.Context | None, owner: object, sockets: list[zmq.asyncio.Socket]
) -> tuple[zmq.asyncio.Context, weakref.finalize]:  # type: ignore[type-arg]
    """The context to use (ours unless given), with a finalizer that cleans up after a leak."""
    ctx = given or zmq.asyncio.Context()
    finalizer = weakref.finalize(owner, _release_leaked, None if given else ctx, sockets)
    return ctx, finalizer


def background(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
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


async def stop_watching(
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


async def send_nowait(sock: zmq.asyncio.Socket, msg: Sequence[Any]) -> None:
    """Send ``msg`` on an asyncio socket now, or raise (zmq.Again if it cannot be queued)."""
    # NOBLOCK through the asyncio socket (not a shadow) keeps pyzmq's edge-triggered
    # event bookkeeping right for pending receives on the same socket.
    await sock.send_multipart(msg, flags=zmq.NOBLOCK, copy=False)


class ZmqEndpoint(AsyncStartClose):
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
        self._ctx, self._finalizer = open_context(self._given_ctx, self, self._sockets)
        try:
            self._start_sockets()
        except BaseException:
            await self._teardown()
            raise

    async def close(self) -> None:
        """Close the sockets (a server's ROUTER and XPUB before its ZAP handler) and release the ports.

        A pending recv or send wakes with TransportError; closing twice does nothing.
        """
        if self._closed:
            return
        self._closed = True
        await self._teardown()

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

