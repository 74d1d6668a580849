"""Handing a file descriptor to one process, once, over a Unix socket (``SCM_RIGHTS``).

The host backend's hop staging is an anonymous sealed memfd: it has no name
in any file system, so the only way to it is a descriptor, and this module is
how the granted holder gets one. Rules it keeps:

- The broker listens on an abstract Unix socket with a random name: no file
  to plant, unlink or leave behind, and it is gone with the process.
- A descriptor is offered under a fresh 256-bit ticket (:meth:`FdBroker.offer`).
  The ticket is the capability; it travels only inside the sealed grant.
- A ticket is single use. The first fetch takes the descriptor off offer;
  :meth:`FdBroker.withdraw` (the hop's revocation) takes it off unfetched.
  After either, that ticket is answered ``NO`` like one never issued.
- The kernel, not the peer, says who connected (``SO_PEERCRED``): a peer of a
  uid the broker does not serve is answered ``NO`` whatever it sends.
- The broker never waits on a peer: every socket is non-blocking, a peer gets
  :data:`DEADLINE_S` to send its request, at most :data:`MAX_PEERS` peers are
  served at once (a new one makes the oldest go, after whatever it sent was
  served, so idle peers cannot lock the granted holder out), and a request is a fixed
  :data:`REQUEST_SIZE` bytes, so nothing it reads grows with what a peer sends.
- One thread serves the socket. :meth:`FdBroker.close` stops it and closes
  every descriptor still on offer.

Wire: the peer sends ``MAGIC || ticket``; the broker answers ``OK`` with the
descriptor attached, or ``NO``, and closes the connection.
"""

from __future__ import annotations

import logging
import os
import secrets
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Final

from gtbus.errors import DeviceError

MAGIC: Final = b"gtbus-fd/1"
TICKET_SIZE: Final = 32
REQUEST_SIZE: Final = len(MAGIC) + TICKET_SIZE
ADDRESS_PREFIX: Final = "gtbus-fd-"
DEADLINE_S: Final = 2.0
"""How long a connected peer has to send its request before the broker hangs up."""
MAX_PEERS: Final = 16
"""Peers being served at once; a holder fetches once per hop, so this is far above need."""
FETCH_TIMEOUT_S: Final = 5.0
_FETCH_ATTEMPTS: Final = 8

_OK: Final = b"OK"
_NO: Final = b"NO"
_UCRED: Final = struct.Struct("3i")  # pid, uid, gid
_FD: Final = struct.Struct("i")

log = logging.getLogger("gtbus.gpu.fd_passing")


class NotOnOffer(DeviceError):
    """The broker answered: nothing is on offer under that ticket (withdrawn, already fetched, or never issued)."""


def _peer_uid(sock: socket.socket) -> int:
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid


@dataclass
class _Peer:
    sock: socket.socket
    deadline: float
    request: bytearray = field(default_factory=bytearray)


class FdBroker:
    """Offers descriptors under single-use tickets to peers of the allowed uids; serves on its own thread."""

    def __init__(self, *, uids: frozenset[int] | None = None) -> None:
        self.address = ADDRESS_PREFIX + secrets.token_hex(16)
        self._uids = uids if uids is not None else frozenset({os.getuid()})
        self._offers: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self.served = 0
        """Descriptors handed out."""
        self.refused = 0
        """Peers answered ``NO`` or hung up on (bad uid, ticket or request, past the deadline, or made room for)."""
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            self._listener.bind("\0" + self.address)
            # A deep backlog: a burst of connections waits to be accepted (and
            # turned away or served) instead of being refused by the kernel.
            self._listener.listen(socket.SOMAXCONN)
        except OSError as exc:
            self._listener.close()
            raise DeviceError(f"cannot start the staging descriptor broker: {exc.strerror}") from None
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="gtbus-fd-broker", daemon=True)
        self._thread.start()

    # -- the owner's side --------------------------------------------------------------------

    def offer(self, fd: int) -> bytes:
        """Put a duplicate of ``fd`` on offer; returns its ticket (the caller keeps and closes ``fd``)."""
        ticket = secrets.token_bytes(TICKET_SIZE)
        dup = os.dup(fd)  # non-inheritable, like every descriptor Python makes
        with self._lock:
            if self._closed:
                os.close(dup)
                raise DeviceError("the staging descriptor broker is closed")
            self._offers[ticket] = dup
        return ticket

    def withdraw(self, ticket: bytes) -> None:
        """Take a ticket's descriptor off offer if it is still there (idempotent)."""
        with self._lock:
            fd = self._offers.pop(ticket, None)
        if fd is not None:
            os.close(fd)

    def on_offer(self) -> int:
        """Descriptors offered and neither fetched nor withdrawn yet."""
        with self._lock:
            return len(self._offers)

    def close(self) -> None:
        """Stop serving and close every descriptor still on offer (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            offers, self._offers = self._offers, {}
        for fd in offers.values():
            os.close(fd)
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the serving thread ------------------------------------------------------------------

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        peers: dict[socket.socket, _Peer] = {}
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while True:
                now = time.monotonic()
                timeout = min((p.deadline for p in peers.values()), default=now + 60.0) - now
                for key, _ in sel.select(max(0.0, timeout)):
                    if key.fileobj is self._wake_r:
                        return
                    if key.fileobj is self._listener:
                        self._accept(sel, peers)
                    else:
                        # A peer in this batch may have been hung up on already (a full
                        # broker drops its oldest peer while accepting): skip it, or the
                        # KeyError would end the broker for the rest of the run.
                        peer = peers.get(key.fileobj)  # type: ignore[call-overload]
                        if peer is not None:
                            self._read(sel, peers, peer)
                now = time.monotonic()
                for peer in [p for p in peers.values() if p.deadline <= now]:
                    self._hang_up(sel, peers, peer, "sent no complete request in time")
        finally:
            for peer in list(peers.values()):
                self._hang_up(sel, peers, peer, "broker closed")
            sel.close()
            for s in (self._listener, self._wake_r, self._wake_w):
                s.close()

    def _accept(self, sel: selectors.BaseSelector, peers: dict[socket.socket, _Peer]) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of descriptors: refuse this one, keep serving
                log.warning("staging broker could not accept a peer: %s", exc.strerror)
                return
            sock.setblocking(False)
            if _peer_uid(sock) not in self._uids:
                self._answer(sock, _NO, None, "peer runs as a uid this device does not serve")
                continue
            if len(peers) >= MAX_PEERS:
                # Full: the oldest peer goes, not the newest, so peers that sit idle
                # cannot lock the granted holder out; whatever it sent is served first.
                oldest = next(iter(peers.values()))
                self._read(sel, peers, oldest)
                if oldest.sock in peers:
                    self._hang_up(sel, peers, oldest, f"more than {MAX_PEERS} peers at once; the oldest makes room")
            peer = _Peer(sock, time.monotonic() + DEADLINE_S)
            peers[sock] = peer
            sel.register(sock, selectors.EVENT_READ)
            self._read(sel, peers, peer)  # a holder sends its request right after connecting

    def _read(self, sel: selectors.BaseSelector, peers: dict[socket.socket, _Peer], peer: _Peer) -> None:
        try:
            chunk = peer.sock.recv(REQUEST_SIZE - len(peer.request))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._hang_up(sel, peers, peer, "closed before a complete request")
            return
        peer.request += chunk
        if len(peer.request) < REQUEST_SIZE:
            return
        sel.unregister(peer.sock)
        del peers[peer.sock]
        request = bytes(peer.request)
        if not request.startswith(MAGIC):
            self._answer(peer.sock, _NO, None, "not a descriptor request")
            return
        with self._lock:
            fd = self._offers.pop(request[len(MAGIC) :], None)
        if fd is None:
            self._answer(peer.sock, _NO, None, "ticket not on offer (withdrawn, already fetched, or never issued)")
            return
        try:
            self._answer(peer.sock, _OK, fd, "")
        finally:
            os.close(fd)

    def _answer(self, sock: socket.socket, word: bytes, fd: int | None, why: str) -> None:
        try:
            if fd is None:
                sock.send(word)
            else:
                socket.send_fds(sock, [word], [fd])
        except OSError:
            # The peer left: an offered descriptor stays taken, the ticket was single use.
            word, why = _NO, why or "peer left before the descriptor was sent"
        # Counted before the peer sees the connection close, so a peer that saw it can read the count.
        if word == _OK:
            self.served += 1
        else:
            self._note_refusal(f"refused a peer: {why}")
        sock.close()

    def _hang_up(self, sel: selectors.BaseSelector, peers: dict[socket.socket, _Peer], peer: _Peer, why: str) -> None:
        sel.unregister(peer.sock)
        del peers[peer.sock]
        self._note_refusal(f"hung up on a peer: {why}")
        peer.sock.close()

    def _note_refusal(self, what: str) -> None:
        # A peer picks how often it is refused: log the 1st, 2nd, 4th, 8th... only,
        # so a flood of connections grows the log by a few lines, not one per peer.
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:
            log.info("staging broker %s (%d refused so far)", what, self.refused)


def fetch_fd(address: str, ticket: bytes, *, timeout: float = FETCH_TIMEOUT_S) -> int:
    """Fetch the descriptor offered under ``ticket`` from the broker at ``address`` (DeviceError if refused)."""
    if len(ticket) != TICKET_SIZE:
        raise DeviceError("not a descriptor ticket")
    end = time.monotonic() + timeout
    # A broker crowded by other peers may hang up before reading our request
    # (it makes room by its oldest peer): that is no answer, so ask again.
    for attempt in range(_FETCH_ATTEMPTS):
        msg, fds, truncated = _ask(address, ticket, max(0.001, end - time.monotonic()), timeout)
        if msg or fds or time.monotonic() + 0.01 * attempt >= end:
            break
        time.sleep(0.01 * attempt)  # let the crowd thin out (this runs off the event loop)
    if msg == _OK and len(fds) == 1 and not truncated:
        return fds[0]
    for fd in fds:
        os.close(fd)
    if not msg:
        raise DeviceError(f"the staging broker hung up {_FETCH_ATTEMPTS} times without an answer")
    raise NotOnOffer("not on offer")


def _ask(address: str, ticket: bytes, timeout: float, total: float) -> tuple[bytes, list[int], bool]:
    """One request: (answer word, descriptors received, whether control data was cut)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect("\0" + address)
            # Only our own user's broker may hand us memory to write our ciphertext into.
            if _peer_uid(sock) != os.getuid():
                raise DeviceError("the staging broker runs as another user")
            try:
                sock.sendall(MAGIC + ticket)
            except BrokenPipeError:
                pass  # it answered (or hung up) before reading: the answer is still there to read
            # Not socket.recv_fds: it drops its flags argument (3.11), and a
            # descriptor received without MSG_CMSG_CLOEXEC leaks into children.
            msg, ancdata, flags, _ = sock.recvmsg(len(_OK), socket.CMSG_SPACE(_FD.size), socket.MSG_CMSG_CLOEXEC)
        except ConnectionRefusedError:
            raise DeviceError("no staging broker at that address (its device is gone)") from None
        except BlockingIOError:
            return b"", [], False  # its backlog is full: no answer, ask again
        except TimeoutError:
            raise DeviceError(f"the staging broker did not answer within {total:g}s") from None
        except OSError as exc:
            raise DeviceError(f"cannot fetch staging: {exc.strerror or exc}") from None
    fds = [
        fd
        for level, kind, data in ancdata
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
        for (fd,) in _FD.iter_unpack(data[: len(data) - len(data) % _FD.size])
    ]
    return msg, fds, bool(flags & socket.MSG_CTRUNC)
