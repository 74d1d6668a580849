"""What one TCP connection may make the server hold before its message is complete.

libzmq hands a multipart message to the application only when its last frame
has arrived, and has no limit on the number of frames (``MAXMSGSIZE`` bounds
each frame). Until then it holds every frame in memory: one peer that never
ends a message grows the server as fast as it can send. The server cannot see
those frames, but the kernel counts the bytes each connection delivered
(``TCP_INFO``'s ``tcpi_bytes_received``), and every message libzmq hands out
names the connection it came from (its source fd). This module compares the
two:

* Each accepted connection (the socket monitor reports its fd) is watched
  through a duplicate of that fd, checked to be a connection of the watched
  socket's own port.
* A connection that handed out a message since the last check is in good
  standing, and its count starts again from there. Otherwise the bytes it
  delivered since then are held somewhere: the kernel's receive buffer,
  libzmq's queue of complete messages (``RCVHWM`` of them), or an unfinished
  message. Over ``limit`` plus the kernel buffer, the connection is shut down:
  libzmq drops it together with the unfinished message.
* A connection that has not handed out any message yet may hold far less
  (``first_limit``: one message), and must speak within ``first_within``
  seconds; at most ``max_silent`` such connections are kept (the oldest goes:
  their key is not known yet, and honest nodes speak at once); and one key
  keeps at most ``per_key`` connections (the oldest goes).

Clock and kernel readings are injected (``now``, :class:`Reading`), so the
rules are tested without sockets; :class:`TcpConnections` reads the kernel.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["ConnectionGuard", "Kick", "Reading", "TcpConnections"]

# struct tcp_info (linux/tcp.h): tcpi_bytes_received is a u64 at byte 128 (Linux >= 4.1).
_TCP_INFO_LEN = 136
_BYTES_RECEIVED_AT = 128


@dataclass(frozen=True)
class Kick:
    """A connection to shut down, and why (one line, for the log)."""

    fd: int
    reason: str


class Reading(Protocol):
    """The kernel's view of one watched connection."""

    def bytes_received(self, fd: int) -> int | None:
        """Bytes the connection has delivered so far; None if it is gone."""
        ...

    def receive_buffer(self, fd: int) -> int:
        """How much the kernel may buffer for it (its receive buffer)."""
        ...


@dataclass
class _Conn:
    since: float
    base: int | None = None  # bytes received when it last handed out a message (or when first read)
    fresh: bool = False  # handed out a message since the last check
    key: str | None = None  # the authenticated name of its first message


@dataclass
class ConnectionGuard:
    """The rules (no I/O): which connections hold too much, or say nothing, or are one too many."""

    limit: int
    first_limit: int
    first_within: float = 10.0
    per_key: int = 2
    max_silent: int = 32
    _conns: dict[int, _Conn] = field(default_factory=dict)

    def accepted(self, fd: int, now: float) -> Kick | None:
        """A new connection on ``fd`` (a reused number replaces what was there); a kick if one too many is silent."""
        self._conns[fd] = _Conn(now)
        silent = [(c.since, f) for f, c in self._conns.items() if c.key is None]
        if len(silent) <= self.max_silent:
            return None
        oldest = min(silent)[1]
        del self._conns[oldest]
        return Kick(oldest, f"more than {self.max_silent} connections that have not spoken; the oldest goes")

    def closed(self, fd: int) -> None:
        """The connection on ``fd`` is gone."""
        self._conns.pop(fd, None)

    def watched(self) -> list[int]:
        """The fds being watched."""
        return list(self._conns)

    def delivered(self, fd: int, key: str | None) -> Kick | None:
        """A message came from ``fd`` under ``key``; a kick if that key now has one connection too many."""
        c = self._conns.get(fd)
        if c is None:
            return None
        c.fresh = True
        if c.key is not None or key is None:
            return None
        c.key = key
        mine = sorted((o.since, f) for f, o in self._conns.items() if o.key == key)
        if len(mine) > self.per_key:
            oldest = mine[0][1]
            self._conns.pop(oldest)
            return Kick(oldest, f"{key!r} opened more than {self.per_key} connections; the oldest goes")
        return None

    def check(self, now: float, kernel: Reading) -> list[Kick]:
        """Look at every connection once; what to shut down."""
        kicks: list[Kick] = []
        for fd, c in list(self._conns.items()):
            received = kernel.bytes_received(fd)
            if received is None:
                self._conns.pop(fd)
                continue
            if c.fresh or c.base is None:
                c.base, c.fresh = received, False
                if c.key is None and now - c.since > self.first_within:
                    kicks.append(Kick(fd, f"no message in {self.first_within:g} s"))
                continue
            held = received - c.base
            allowed = (self.limit if c.key is not None else self.first_limit) + kernel.receive_buffer(fd)
            if held > allowed:
                kicks.append(Kick(fd, f"{held} bytes since its last whole message (limit {allowed})"))
            elif c.key is None and now - c.since > self.first_within:
                kicks.append(Kick(fd, f"no message in {self.first_within:g} s"))
        for k in kicks:
            self._conns.pop(k.fd, None)
        return kicks


class TcpConnections:
    """Duplicates of libzmq's accepted fds on one port: read their kernel counters, shut them down."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._socks: dict[int, socket.socket] = {}

    def watch(self, fd: int) -> bool:
        """Start watching ``fd`` if it is a TCP connection of our port (it may be gone, or reused)."""
        self.forget(fd)
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            return False
        try:
            ok = sock.type == socket.SOCK_STREAM and sock.getsockname()[1] == self.port
        except (OSError, IndexError, TypeError):
            ok = False
        if not ok:
            sock.close()
            return False
        self._socks[fd] = sock
        return True

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` (closes only our duplicate)."""
        sock = self._socks.pop(fd, None)
        if sock is not None:
            sock.close()

    def bytes_received(self, fd: int) -> int | None:
        sock = self._socks.get(fd)
        if sock is None:
            return None
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        except OSError:
            self.forget(fd)
            return None
        if len(info) < _BYTES_RECEIVED_AT + 8:
            return None  # an old kernel: nothing to compare
        return int(struct.unpack_from("=Q", info, _BYTES_RECEIVED_AT)[0])

    def receive_buffer(self, fd: int) -> int:
        sock = self._socks.get(fd)
        try:
            return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)) if sock is not None else 0
        except OSError:
            return 0

    def shut(self, fd: int) -> None:
        """Shut the connection down (libzmq sees it end and drops it) and stop watching it."""
        sock = self._socks.get(fd)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.forget(fd)

    def close(self) -> None:
        """Close every duplicate."""
        for fd in list(self._socks):
            self.forget(fd)
