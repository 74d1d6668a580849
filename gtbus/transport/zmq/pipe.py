"""The edge-triggered pipe: non-blocking reads and writes on one socket, woken by the event loop.

pyzmq's asyncio sockets build a future (and walk enum flags) for every send
and receive; on the signed round trip that was the largest cost of the zmq
transport. The direct-message sockets (the server's ROUTER, a client's DEALER
and SUB) are instead driven by hand through a :class:`Pipe`: a plain (shadow)
socket used with NOBLOCK, and one reader callback per socket on libzmq's
notification FD that wakes whoever waits (:class:`Wakeup`).

Inbound messages are read frame by frame: a message with more frames or bytes
than :class:`~gtbus.transport.zmq.options.SocketTuning` allows (the envelope's
:class:`~gtbus.messages.envelope.Limits`) is drained without copying a byte and
raises :class:`Oversize` (the caller counts it as ``oversize_dropped``). libzmq
itself delivers a multipart message only when its last frame has arrived, and
holds what the peer sent until then: :mod:`gtbus.transport.zmq.connections`
bounds that. Frames of 64 KiB or more are sent zero-copy (pyzmq's copy
threshold); received frames are returned as ``bytes`` (one copy).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import zmq
import zmq.asyncio

__all__ = ["POLLIN", "POLLOUT", "Oversize", "Pipe", "Wakeup"]

_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
_EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
POLLOUT = int(zmq.POLLOUT)
_COPY_THRESHOLD = zmq.COPY_THRESHOLD  # frames this big or bigger are sent zero-copy
_bsend = zmq.backend.Socket.send
_brecv = zmq.backend.Socket.recv
#: ZMQ_EVENTS is an int; pyzmq types every option as ``int | bytes``.
_bget: Callable[[zmq.Socket[Any], int], int] = zmq.backend.Socket.get  # type: ignore[assignment]


class Wakeup:
    """The futures a transport's callers wait on: one reader (recv holds a lock), any writers."""

    __slots__ = ("readable", "writable")

    def __init__(self) -> None:
        self.readable: asyncio.Future[None] | None = None
        self.writable: list[asyncio.Future[None]] = []  # only while a queue is full: rare

    def wake(self, events: int) -> None:
        if events & POLLIN:
            w = self.readable
            if w is not None and not w.done():
                w.set_result(None)
        if events & POLLOUT and self.writable:
            for w in self.writable:
                if not w.done():
                    w.set_result(None)

    def wake_all(self) -> None:
        self.wake(POLLIN | POLLOUT)


class Oversize(Exception):
    """A received message had more frames or bytes than allowed; it was drained, not kept."""

    def __init__(self, head: list[Any], frames: int, size: int) -> None:
        super().__init__(f"{frames} frames, {size} bytes")
        self.head = head  # its first two frames (a ROUTER's: routing id and first frame)
        self.frames = frames
        self.size = size


class Pipe:
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

    def __init__(self, sock: zmq.asyncio.Socket, waiters: Wakeup, max_frames: int, max_bytes: int) -> None:
        # A plain socket over the same libzmq socket; the asyncio wrapper's own
        # future machinery is never used for this socket.
        self.sock: zmq.Socket[Any] = zmq.Socket.shadow(sock.underlying)
        self.fd = int(self.sock.get(zmq.FD))
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
        if events & POLLIN:
            self.state = 2
            self.waiters.wake(POLLIN)
        else:
            self.state = 0
        return events

    def _on_fd(self) -> None:
        events = self.poll()
        if events & POLLOUT and self.waiters.writable:
            self.waiters.wake(POLLOUT)

    def recv_nowait(self, frames: bool = False) -> list[Any] | None:
        """One whole multipart message (bytes, or zmq.Frame objects), or None if none is waiting.

        A message over ``max_frames`` or ``max_bytes`` is read to its end frame by
        frame, keeping nothing but its first two frames, and raises
        :class:`Oversize`: nothing it carried is copied.
        """
        sock = self.sock
        while True:
            state = self.state
            if state == 0 or (state == 1 and not self.poll() & POLLIN):
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
                raise Oversize(parts[:2], count, size)
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

