"""The host backend: the device emulated with numpy and POSIX shared memory.

Private buffers are ordinary numpy arrays in the orchestrator's address space;
nothing can map them from outside. A hop's staging buffer is a ``/dev/shm``
file with a fresh 128-bit random name, created ``O_EXCL`` with mode 0600 and
mapped shared. The name is the capability to write the hop: it travels only
inside the sealed grant, and :meth:`HostDevice.revoke_staging` unlinks it so it
can never be opened again. (A holder that kept its mapping still sees the old
pages, which only ever hold its own ciphertext; the next hop gets a new file.)

Mode 0600 means holders must run as the orchestrator's user. Holders under
other users would need the file descriptor passed over a Unix socket instead.

``multiprocessing.shared_memory`` is deliberately not used: its resource
tracker unlinks segments and warns across unrelated processes.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import socket
import stat
import weakref
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final

import numpy as np

from gtbus.errors import ChannelError, DeviceError
from gtbus.gpu.channel import ChannelParams, SealSummary, SegmentContext, SegmentOpener, SegmentSealer
from gtbus.gpu.device import BufferHandle
from gtbus.gpu.measure import measure_model

SHM_DIR: Final = "/dev/shm"
HANDLE_PREFIX: Final = "gtbus-hop-"
_HANDLE_RE: Final = re.compile(r"gtbus-hop-[0-9a-f]{32}")
_OPEN_FLAGS: Final = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
# Populate page tables at map time: one batched kernel walk is several times
# cheaper than a page fault per 4 KiB on the hot write/decrypt path.
_MAP_FLAGS: Final = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _short(handle: str) -> str:
    # The handle is a live capability until revoked: never log it whole.
    return handle[: len(HANDLE_PREFIX) + 8] + "..."


@dataclass(eq=False)
class HostBuffer:
    """A buffer of the host device: a private numpy array or a shared staging mapping."""

    nbytes: int
    # A live capability: kept out of reprs so it does not end up in logs.
    handle: BufferHandle | None = field(default=None, repr=False)
    _array: np.ndarray | None = field(default=None, repr=False)
    _mmap: mmap.mmap | None = field(default=None, repr=False)
    _finalizer: weakref.finalize | None = field(default=None, repr=False)

    @property
    def released(self) -> bool:
        """True once the buffer has been released (or revoked)."""
        return self._array is None and self._mmap is None


class HostStagingMapping:
    """A holder's writable mapping of one staging file."""

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

    def write_raw(self, data: bytes, offset: int = 0) -> None:
        """Copy raw bytes into the staging buffer (drills only: bypasses the channel)."""
        self.view[offset : offset + len(data)] = data

    def read_raw(self, nbytes: int) -> bytes:
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

    def __enter__(self) -> HostStagingMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class HostDevice:
    """The device emulated on the CPU; implements :class:`gtbus.gpu.device.Device`."""

    name: str = "host"
    array_module: ModuleType = np

    def __init__(self) -> None:
        # Hostname and pid say which address space holds the model; the random
        # instance tag keeps a restarted process (or a recycled pid) from
        # matching reports made for an earlier one.
        self.device_id = f"host:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"

    def alloc(self, nbytes: int) -> HostBuffer:
        """A zeroed private buffer (never exportable)."""
        _check_size(nbytes, minimum=0)
        return HostBuffer(nbytes=nbytes, _array=np.zeros(nbytes, dtype=np.uint8))

    def alloc_hop_staging(self, nbytes: int) -> tuple[HostBuffer, BufferHandle]:
        """A fresh shared staging file for one hop, mapped here, and its handle."""
        _check_size(nbytes, minimum=1)
        handle = BufferHandle(HANDLE_PREFIX + secrets.token_hex(16))
        path = os.path.join(SHM_DIR, handle)
        try:
            fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise DeviceError(f"cannot create staging in {SHM_DIR}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, nbytes)
            mapping = mmap.mmap(fd, nbytes, flags=_MAP_FLAGS)
        except OSError as exc:
            _unlink_quietly(path)
            raise DeviceError(f"cannot allocate {nbytes} bytes of staging: {exc.strerror}") from None
        finally:
            os.close(fd)
        buf = HostBuffer(nbytes=nbytes, handle=handle, _mmap=mapping)
        # If the buffer is dropped or the process exits without revoking, the
        # name must still disappear from /dev/shm.
        buf._finalizer = weakref.finalize(buf, _unlink_quietly, path)
        return buf, handle

    @classmethod
    def prepare_holder(cls, capacity: int) -> None:
        """Nothing to prepare: shared memory maps instantly."""

    @classmethod
    def map_staging(cls, handle: BufferHandle | str) -> HostStagingMapping:
        """Holder side, any process of the same user: map a staging buffer by handle."""
        if not isinstance(handle, str) or not _HANDLE_RE.fullmatch(handle):
            raise DeviceError("not a host staging handle")
        path = os.path.join(SHM_DIR, handle)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise DeviceError(f"staging {_short(handle)} is not exported (revoked or never issued)") from None
        except OSError as exc:
            raise DeviceError(f"cannot open staging {_short(handle)}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise DeviceError(f"staging {_short(handle)} is not a private file of this user")
            if st.st_size <= 0:
                raise DeviceError(f"staging {_short(handle)} is empty")
            mapping = mmap.mmap(fd, st.st_size, flags=_MAP_FLAGS)
        except OSError as exc:
            raise DeviceError(f"cannot map staging {_short(handle)}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return HostStagingMapping(handle, mapping)

    @staticmethod
    def unmap(mapping: HostStagingMapping) -> None:
        """Holder side: drop a mapping made by :meth:`map_staging`."""
        mapping.close()

    def discard_export(self, handle: BufferHandle | str) -> None:
        """Unlink a staging file a killed orchestrator left in /dev/shm (only well-formed gtbus handles)."""
        if _HANDLE_RE.fullmatch(str(handle)):
            _unlink_quietly(os.path.join(SHM_DIR, str(handle)))

    def revoke_staging(self, buf: HostBuffer) -> None:
        """Unlink the staging file and close our mapping. Idempotent."""
        if buf.handle is None:
            raise DeviceError("only staging buffers can be revoked; this one is private")
        # Unlink first: from here on no new mapping can be made, whatever happens next.
        if buf._finalizer is not None:
            buf._finalizer()
        if buf._mmap is not None:
            try:
                buf._mmap.close()
            except BufferError:
                raise DeviceError(
                    f"staging {_short(buf.handle)} is unlinked but views of it are still alive"
                ) from None
            buf._mmap = None

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
        SegmentOpener(params).open_into(mapping, array, ctx, count, nbytes)

    def scrub(self, buf: HostBuffer) -> None:
        """Overwrite the whole buffer with zeros."""
        if buf.handle is None:
            _private_array(buf, "buffer").fill(0)
            return
        view = np.frombuffer(_live_mmap(buf), dtype=np.uint8)
        view.fill(0)
        del view

    def verify_zero(self, buf: HostBuffer) -> bool:
        """True if every byte reads zero."""
        if buf.handle is None:
            return not _private_array(buf, "buffer").any()
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
        raise DeviceError("staging buffer was already revoked")
    return buf._mmap
