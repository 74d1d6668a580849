"""The server's watch over its TCP connections: the rules of :mod:`~gtbus.transport.zmq.conn_guard` applied.

libzmq delivers a multipart message only when its last frame has arrived and
has no limit on the frame count (``MAXMSGSIZE``, the largest frame the
pipeline accepts, bounds each frame); until then it holds what the peer sent.
So a CURVE server on tcp:// watches each connection of its ROUTER and XPUB:
the socket monitor reports each accepted connection's fd, every message read
off the socket names the connection it came from (its source fd), and a
periodic check compares that with the bytes the kernel received from it.
Bytes held since its last whole message, past its queue of ``server_rcvhwm``
messages plus one (one, before its first message), get the connection shut
down, and libzmq drops the unfinished message. A connection must speak within
``first_message_s``, at most 32 connections that have not spoken are kept
(the oldest goes), and a key keeps at most two connections per socket.
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from gtbus.transport.base import TransportStats
from gtbus.transport.zmq.conn_guard import ConnectionGuard, Kick, TcpConnections
from gtbus.transport.zmq.endpoint import OnceLog, background, stop_watching

__all__ = ["ConnectionWatch"]

log = logging.getLogger("gtbus.transport")

_SRCFD = int(zmq.SRCFD)  # a received frame's source connection (deprecated in libzmq, still served)
_CONNECTION_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


class ConnectionWatch:
    """One guard per watched socket (by label), fed by its monitor and by what the server reads.

    ``stats`` and ``once`` are the server's: shut connections are counted there
    (``connections-shut``) and logged once per kind.
    """

    def __init__(self, server: str, stats: TransportStats, once: OnceLog, interval_s: float) -> None:
        self._server = server
        self._stats = stats
        self._once = once
        self._interval_s = interval_s
        self._guards: dict[str, tuple[ConnectionGuard, TcpConnections]] = {}
        self._watched: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._monitors: list[zmq.asyncio.Socket] = []

    def watch(
        self, label: str, sock: zmq.asyncio.Socket, endpoint: str, guard: ConnectionGuard
    ) -> zmq.asyncio.Socket:
        """Apply ``guard`` to the connections of ``sock``, bound to tcp ``endpoint``; returns the monitor opened."""
        self._guards[label] = (guard, TcpConnections(int(endpoint.rsplit(":", 1)[1])))
        monitor: zmq.asyncio.Socket = sock.get_monitor_socket(_CONNECTION_EVENTS)
        self._watched.append(sock)
        self._monitors.append(monitor)
        self._tasks.append(background(self._follow(monitor, label), f"{self._server}-{label}-conns"))
        if len(self._guards) == 1:
            self._tasks.append(background(self._police(), f"{self._server}-guard"))
        return monitor

    async def _follow(self, monitor: zmq.asyncio.Socket, label: str) -> None:
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
            await asyncio.sleep(self._interval_s)
            for label, (guard, conns) in self._guards.items():
                for kick in guard.check(loop.time(), conns):
                    self._kick(label, kick)

    def delivered(self, label: str, frame: zmq.Frame, key: str | None) -> None:
        """A message (``frame`` is one of its frames) came out of ``label``'s socket: its connection is fine."""
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
        self._stats.extra["connections-shut"] = self._stats.extra.get("connections-shut", 0) + 1
        what = "held" if kick.reason[0].isdigit() else kick.reason  # "N bytes since ...": once, whatever N
        if self._once.first(("kick", label, what)):
            log.warning("server %s shut a connection to its %s: %s", self._server, label, kick.reason)

    async def stop(self) -> None:
        """Stop watching (before the watched sockets close) and let go of the kernel's connections."""
        await stop_watching(self._tasks, self._watched, self._monitors)
        self._watched.clear()
        for _, conns in self._guards.values():
            conns.close()
        self._guards.clear()
