"""The host backend: the device emulated with numpy and sealed anonymous memory.

Private buffers are ordinary numpy arrays in the orchestrator's address space;
nothing can map them from outside. A hop's staging buffer is an anonymous
``memfd`` (no name in ``/dev/shm`` or anywhere else) sealed with
``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`` before anyone else can reach it,
and mapped shared here. No process holding it can change its size, add or
remove seals, or swap it for another file, so the orchestrator's mapping can
never fault (SIGBUS) on what a holder does: the worst a holder can do to its
staging is write into it, which fails its own hop's authentication.

The memfd reaches the granted holder only as a descriptor, over a Unix socket
(:mod:`gtbus.gpu.fd_passing`), against a single-use ticket. The handle carries
the broker's address and the ticket; it travels only inside the sealed grant.
:meth:`HostDevice.revoke_staging` withdraws the ticket, so once a hop is over
no process can obtain a new mapping of its staging. (A holder that kept its
mapping still sees the old pages, which only ever hold its own ciphertext,
scrubbed; the next hop gets a new memfd.) Memfds and the broker end with the
process: a killed orchestrator leaves nothing behind.

The broker serves this user only (``SO_PEERCRED``), so holders run as the
orchestrator's user, as they did with the ``/dev/shm`` files this replaces.
Same-user processes could otherwise reach a process's descriptors and memory
through ``/proc/PID/fd`` and ``/proc/PID/mem`` (one holder writing another
hop's staging, or reading the device's plaintext): a process that exports
staging, and a holder once it prepares to write, makes itself non-dumpable
(``PR_SET_DUMPABLE`` 0), which closes those to everyone but root, as a real
GPU's memory is closed to its host.

Staging is writable by a party without the hop key (the device agent writes
remote holders' ciphertext), so :meth:`HostDevice.open_segments` copies each
segment privately before it authenticates and decrypts it: the bytes the tag
covers are the bytes decrypted, whatever is written to staging meanwhile.
Scrubbing staging zeroes it and then lets go of it: a holder may go on
writing its pages through the mapping it kept, but the device never reads
them again, so no check of the device's can be failed that way.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import re
import secrets
import socket
import stat
import threading
import weakref
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final

import numpy as np

from gtbus.errors import ChannelError, DeviceError
from gtbus.gpu.channel import ChannelParams, SealSummary, SegmentContext, SegmentOpener, SegmentSealer
from gtbus.gpu.device import BufferHandle, check_staging_write
from gtbus.gpu.fd_passing import ADDRESS_PREFIX, FdBroker, NotOnOffer, fetch_fd
from gtbus.gpu.measure import measure_model

HANDLE_PREFIX: Final = "gtbus-memfd:"
_HANDLE_RE: Final = re.compile(r"gtbus-memfd:(" + ADDRESS_PREFIX + r"[0-9a-f]{32}):([0-9a-f]{64})")
STAGING_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""Seals on every staging memfd: its size is fixed and no one can add or remove a seal."""
# Staging files of gtbus versions before the sealed memfd; a restart still removes them.
SHM_DIR: Final = "/dev/shm"
_LEGACY_HANDLE_RE: Final = re.compile(r"gtbus-hop-[0-9a-f]{32}")
# Populate page tables at map time: one batched kernel walk is several times
# cheaper than a page fault per 4 KiB on the hot write/decrypt path.
_MAP_FLAGS: Final = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _short(handle: str) -> str:
    # The handle holds a live ticket until revoked: never log it whole.
    return handle[: len(HANDLE_PREFIX) + len(ADDRESS_PREFIX) + 8] + "..."


@dataclass(eq=False)
class HostBuffer:
    """A buffer of the host device: a private numpy array or a shared staging mapping."""

    nbytes: int
    # A live capability: kept out of reprs so it does not end up in logs.
    handle: BufferHandle | None = field(default=None, repr=False)
    _array: np.ndarray | None = field(default=None, repr=False)
    _mmap: mmap.mmap | None = field(default=None, repr=False)
    _finalizer: weakref.finalize | None = field(default=None, repr=False)
    _scrubbed: bool = field(default=False, repr=False)  # staging only: zeroed and let go of

    @property
    def released(self) -> bool:
        """True once the buffer has been released (or revoked, or, if staging, scrubbed)."""
        return self._array is None and self._mmap is None


class HostStagingWriter:
    """A writable mapping of one hop's staging memfd (:class:`gtbus.gpu.device.StagingWriter`)."""

    def __init__(self, handle: str, mapping: mmap.mmap) -> None:
        self.handle = handle
        self._mmap: mmap.mmap | None = mapping
        self._view: memoryview | None = memoryview(mapping)

    @property
    def view(self) -> memoryview:
        """Writable bytes of the staging buffer."""
        if self._view is None:
            raise DeviceError(f"staging {_short(self.handle)} is already unmapped")
        return self._view

    @property
    def nbytes(self) -> int:
        """Size of the staging buffer."""
        return len(self.view)

    def seal_into(self, plaintext: memoryview, params: ChannelParams, ctx: SegmentContext) -> SealSummary:
        """Seal the holder's plaintext straight into the mapped staging (all cores)."""
        return SegmentSealer(params).seal_into(plaintext, self.view, ctx)

    def write_ciphertext(self, offset: int, data: bytes) -> None:
        """Copy ciphertext sealed elsewhere into staging at ``offset`` (checked against the memfd's real size)."""
        check_staging_write(self.nbytes, offset, len(data))
        self.view[offset : offset + len(data)] = data

    def read_back(self, nbytes: int) -> bytes:
        """Read back staging bytes (drills only)."""
        return bytes(self.view[:nbytes])

    def close(self) -> None:
        """Unmap. Raises DeviceError if views derived from :attr:`view` are still alive."""
        if self._mmap is None:
            return
        try:
            if self._view is not None:
                self._view.release()
                self._view = None
            self._mmap.close()
        except BufferError:
            raise DeviceError(
                f"staging {_short(self.handle)} still has live views; drop them before unmapping"
            ) from None
        self._mmap = None

    def __enter__(self) -> HostStagingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_PR_SET_DUMPABLE: Final = 4


def _close_proc_entries() -> None:
    """Make this process non-dumpable: its ``/proc`` fds, maps and memory open to root only."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise DeviceError(f"cannot keep other processes out of this one's memory: {os.strerror(err)}")


def _sealed_memfd(nbytes: int) -> int:
    """A new anonymous file of exactly ``nbytes``, sealed so no holder of it can change its size."""
    fd = os.memfd_create("gtbus-hop", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, STAGING_SEALS)
    except OSError:
        os.close(fd)
        raise
    return fd


class HostStaging:
    """The host backend's holder side (:class:`gtbus.gpu.device.HolderStaging`): staging by handle."""

    @classmethod
    def prepare_holder(cls, capacity: int) -> None:
        """Keep other processes out of this holder's plaintext and staging (shared memory maps instantly)."""
        _close_proc_entries()

    @classmethod
    def map_staging(cls, handle: BufferHandle | str) -> HostStagingWriter:
        """Holder side, any process of the orchestrator's user: fetch the hop's memfd by handle and map it."""
        match = _HANDLE_RE.fullmatch(handle) if isinstance(handle, str) else None
        if match is None:
            raise DeviceError("not a host staging handle")
        try:
            fd = fetch_fd(match[1], bytes.fromhex(match[2]))
        except NotOnOffer:
            raise DeviceError(f"staging {_short(handle)} is not exported (revoked or never issued), or was mapped once already") from None
        except DeviceError as exc:
            raise DeviceError(f"staging {_short(handle)} is not exported: {exc}") from None
        try:
            st = os.fstat(fd)
            # Refuse anything but the sealed memfd a device makes: then this
            # mapping cannot fault on a size change either.
            if not stat.S_ISREG(st.st_mode) or fcntl.fcntl(fd, fcntl.F_GET_SEALS) & STAGING_SEALS != STAGING_SEALS:
                raise DeviceError(f"staging {_short(handle)} is not a sealed staging buffer")
            if st.st_size <= 0:
                raise DeviceError(f"staging {_short(handle)} is empty")
            mapping = mmap.mmap(fd, st.st_size, flags=_MAP_FLAGS)
        except OSError as exc:
            raise DeviceError(f"cannot map staging {_short(handle)}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return HostStagingWriter(handle, mapping)

    @staticmethod
    def unmap(mapping: HostStagingWriter) -> None:
        """Holder side: drop a mapping made by :meth:`map_staging`."""
        mapping.close()


class HostDevice(HostStaging):
    """The device emulated on the CPU; implements :class:`gtbus.gpu.device.Device` (and, inherited, its holder side)."""

    name: str = "host"
    array_module: ModuleType = np
    exports_outlive_process: bool = False
    frees_staging_while_mapped: bool = True

    def __init__(self) -> None:
        # Hostname and pid say which address space holds the model; the random
        # instance tag keeps a restarted process (or a recycled pid) from
        # matching reports made for an earlier one.
        self.device_id = f"host:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"
        self._broker: FdBroker | None = None
        self._broker_lock = threading.Lock()  # the next hop's staging is allocated on another thread

    def _staging_broker(self) -> FdBroker:
        # Started with the first staging buffer and stopped with the device, so a
        # device that never exports (a holder's, a test's) runs no thread.
        with self._broker_lock:
            if self._broker is None:
                _close_proc_entries()
                self._broker = FdBroker()
                weakref.finalize(self, self._broker.close)
            return self._broker

    def close(self) -> None:
        """Stop handing out staging: every ticket still on offer is withdrawn (idempotent)."""
        with self._broker_lock:
            if self._broker is not None:
                self._broker.close()

    def alloc(self, nbytes: int) -> HostBuffer:
        """A zeroed private buffer (never exportable)."""
        _check_size(nbytes, minimum=0)
        return HostBuffer(nbytes=nbytes, _array=np.zeros(nbytes, dtype=np.uint8))

    def alloc_hop_staging(self, nbytes: int) -> tuple[HostBuffer, BufferHandle]:
        """A fresh sealed memfd for one hop, mapped here and put on offer; its handle names the ticket."""
        _check_size(nbytes, minimum=1)
        broker = self._staging_broker()
        try:
            fd = _sealed_memfd(nbytes)
        except OSError as exc:
            raise DeviceError(f"cannot allocate {nbytes} bytes of staging: {exc.strerror}") from None
        try:
            mapping = mmap.mmap(fd, nbytes, flags=_MAP_FLAGS)
            ticket = broker.offer(fd)
        except OSError as exc:
            raise DeviceError(f"cannot allocate {nbytes} bytes of staging: {exc.strerror}") from None
        finally:
            os.close(fd)  # the mapping and the broker's duplicate keep the memory
        handle = BufferHandle(f"{HANDLE_PREFIX}{broker.address}:{ticket.hex()}")
        buf = HostBuffer(nbytes=nbytes, handle=handle, _mmap=mapping)
        # If the buffer is dropped without being revoked, its ticket must still go.
        buf._finalizer = weakref.finalize(buf, broker.withdraw, ticket)
        return buf, handle

    def discard_export(self, handle: BufferHandle | str) -> None:
        """Unlink a ``/dev/shm`` staging file an earlier gtbus version left behind.

        Memfd staging needs nothing: it ends with the process that made it.
        """
        if _LEGACY_HANDLE_RE.fullmatch(str(handle)):
            _unlink_quietly(os.path.join(SHM_DIR, str(handle)))

    def revoke_staging(self, buf: HostBuffer) -> None:
        """Withdraw the staging ticket and close our mapping. Idempotent."""
        if buf.handle is None:
            raise DeviceError("only staging buffers can be revoked; this one is private")
        # Withdraw first: from here on no new mapping can be made, whatever happens next.
        if buf._finalizer is not None:
            buf._finalizer()
        _close_mapping(buf)

    def open_segments(
        self,
        staging: HostBuffer,
        out: HostBuffer,
        params: ChannelParams,
        ctx: SegmentContext,
        count: int,
        nbytes: int,
    ) -> None:
        """Authenticate and decrypt a hop's segments from staging into a private buffer."""
        if staging.handle is None:
            raise DeviceError("open_segments reads from a staging buffer, got a private one")
        if params.buffer_handle != staging.handle:
            raise ChannelError("channel params name another staging buffer than this one")
        mapping = _live_mmap(staging)
        array = _private_array(out, "output")
        # The opener's views are gone when open_into returns, so revoke can close the mapping.
        SegmentOpener(params).open_into(mapping, array, ctx, count, nbytes, private_copy=True)

    def scrub(self, buf: HostBuffer) -> None:
        """Overwrite the whole buffer with zeros; staging is then let go of (idempotent for staging)."""
        if buf.handle is None:
            _private_array(buf, "buffer").fill(0)
            return
        if buf._scrubbed:
            return
        mapping = _live_mmap(buf)
        view = np.frombuffer(mapping, dtype=np.uint8)
        view.fill(0)
        del view
        # The holder may keep writing these pages for as long as it keeps its own
        # mapping. From here on they are not the device's: nothing written there
        # can reach the device again, or fail a check of the device's.
        _close_mapping(buf)
        buf._scrubbed = True

    def verify_zero(self, buf: HostBuffer) -> bool:
        """True if every byte the device can read of the buffer is zero (of scrubbed staging: none)."""
        if buf.handle is None:
            return not _private_array(buf, "buffer").any()
        if buf._scrubbed:
            return True
        view = np.frombuffer(_live_mmap(buf), dtype=np.uint8)
        result = not view.any()
        del view
        return result

    def release(self, buf: HostBuffer) -> None:
        """Free the buffer; staging is revoked first."""
        if buf.handle is not None:
            self.revoke_staging(buf)
        buf._array = None

    def measure(self, *parts: Any) -> bytes:
        """Model measurement (see :func:`gtbus.gpu.measure.measure_model`) of buffers or arrays."""
        return measure_model([_private_array(p, "buffer") if isinstance(p, HostBuffer) else p for p in parts])

    def active(self) -> contextlib.nullcontext[None]:
        """Nothing to make current: host memory is one address space (:meth:`gtbus.gpu.device.Device.active`)."""
        return contextlib.nullcontext()

    def as_array(self, buf: HostBuffer, dtype: Any) -> np.ndarray:
        """A flat numpy view of a private buffer as ``dtype``."""
        array = _private_array(buf, "buffer")
        try:
            return array.view(np.dtype(dtype))
        except (TypeError, ValueError) as exc:
            raise DeviceError(f"cannot view {buf.nbytes} bytes as {dtype}: {exc}") from None


def _check_size(nbytes: object, *, minimum: int) -> None:
    if type(nbytes) is not int or nbytes < minimum:
        raise DeviceError(f"buffer size must be an integer >= {minimum}, got {nbytes!r}")


def _private_array(buf: HostBuffer, what: str) -> np.ndarray:
    if buf.handle is not None:
        raise DeviceError(f"{what} must be a private buffer, got hop staging")
    if buf._array is None:
        raise DeviceError(f"{what} was already released")
    return buf._array


def _live_mmap(buf: HostBuffer) -> mmap.mmap:
    if buf._mmap is None:
        raise DeviceError("staging buffer was already scrubbed" if buf._scrubbed else "staging buffer was already revoked")
    return buf._mmap


def _close_mapping(buf: HostBuffer) -> None:
    if buf._mmap is not None:
        try:
            buf._mmap.close()
        except BufferError:
            raise DeviceError(f"staging {_short(str(buf.handle))} is still viewed here; drop the views first") from None
        buf._mmap = None
