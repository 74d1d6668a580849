"""The cupy backend: the model on an NVIDIA GPU, hop staging travelling by CUDA IPC.

* Private buffers (model, optimizer, each hop's plaintext buffer) come from
  cupy's allocator and are never exported.
* Each hop's staging buffer is its **own** ``cudaMalloc`` (not a pool
  sub-allocation: an IPC handle exports the whole underlying allocation, so a
  pooled block could expose neighbouring memory). Its IPC handle is the
  capability; it travels only inside the sealed grant, and the buffer is
  freed when the hop ends, so an earlier hop's handle maps nothing.
* The holder maps the staging buffer in its own process and writes AEAD
  ciphertext into it: segments are sealed on all CPU cores into a pinned host
  buffer (a pool kept for the life of the process, since pinning is slow),
  double-buffered so sealing batch k overlaps the host-to-device copy of batch
  k-1. Plaintext never leaves the holder's process except as ciphertext.
* The device authenticates and decrypts all segments into the private buffer
  with the AES-256-GCM kernel (:mod:`gtbus.gpu.kernels.aes_gcm`), measures
  with the BLAKE3 kernel, and scrubs/verifies zero on the device.

What a holder can do to its staging here: write into it (its own hop then
fails authentication). It cannot resize it (the size is the device's own
``staging.nbytes``, never the handle's), and the device bounds every claim
against that. One gap is left, to be closed where a GPU can test it: CUDA
calls ``cudaFree`` of an allocation that another process still has open
through ``cudaIpcOpenMemHandle`` undefined behaviour, and the device cannot
make a holder close its mapping before the hop ends. The fix is staging from
the VMM API (``cuMemCreate``, exported as a POSIX descriptor and handed over
by :mod:`gtbus.gpu.fd_passing` as the host backend does), whose physical
memory lives until its last importer lets go: a holder that keeps its mapping
then keeps only its own pages.

Several GPUs in one process (a fleet's lanes, :func:`gtbus.gpu.backends.make_devices`):
cupy keeps the *current* device per thread, and allocations, kernels and
streams go to the current device. So every :class:`CupyDevice` method runs
with its own GPU current (:func:`_on_own_gpu`), whichever thread calls it, and
:meth:`CupyDevice.active` makes it current for code outside the device (a
trainer's steps). The staging handle names its GPU by PCI bus id
(:mod:`gtbus.gpu.ipc_handle`), and the holder opens and writes it with that
GPU current.
"""

from __future__ import annotations

import functools
import os
import socket
import secrets
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Concatenate, Final, ParamSpec, TypeVar

import numpy as np

from gtbus.errors import ChannelError, DeviceError
from gtbus.gpu.channel import (
    AES_256_GCM,
    TAG_SIZE,
    ChannelParams,
    SealSummary,
    SegmentCipher,
    SegmentContext,
    SegmentOpener,
    SegmentSealer,
    segment_bounds,
    segment_count,
    staging_size,
)
from gtbus.gpu.device import BufferHandle, check_staging_write
from gtbus.gpu.ipc_handle import IpcStagingHandle, canonical_bus_id
from gtbus.gpu.measure import PART_DIGESTS_MODEL_DOMAIN, tagged_hash

try:  # cupy is an optional extra; importing this module without it fails clearly
    import cupy
except ImportError as exc:  # pragma: no cover - exercised only without cupy
    raise ImportError("the cupy backend needs cupy (pip install 'gtbus[gpu]')") from exc

from gtbus.gpu.kernels.aes_gcm import GcmDecryptor, first_bad_segment
from gtbus.gpu.kernels.blake3 import blake3_digest_device
from gtbus.gpu.kernels.scrub import verify_zero_async

MODEL_DOMAIN: Final = PART_DIGESTS_MODEL_DOMAIN
_GROUP_BYTES: Final = 4 << 20  # segments sealed before their copy is queued: amortises the launch
# Hops at most this large are sealed and opened on one CPU thread with one copy
# each way: for them the thread pool, per-thread streams and the GCM and BLAKE3
# kernel launches with their synchronisation cost more than the work (measured
# on the H200 host: ~1.2 ms to seal and ~1.0 ms to open a 128-byte hop through
# the large-hop path, against tens of microseconds of AES-GCM).
SMALL_HOP_BYTES: Final = 1 << 20
_IPC_PAGE: Final = 2 << 20  # staging is allocated in whole pages of this size (see alloc_hop_staging)


@dataclass(eq=False)
class CupyBuffer:
    """A device buffer: private (``handle`` None) or a hop's exported staging allocation."""

    nbytes: int
    handle: BufferHandle | None = field(default=None, repr=False)
    _array: Any = field(default=None, repr=False)
    _memory: Any = field(default=None, repr=False)  # the dedicated cudaMalloc of a staging buffer
    _scrubbed: bool = field(default=False, repr=False)  # staging only: zeroed and let go of

    @property
    def released(self) -> bool:
        """True once the buffer was released or revoked."""
        return self._array is None


def _live(buf: CupyBuffer, what: str) -> Any:
    if buf._array is None:
        raise DeviceError(f"{what} was already released")
    return buf._array


class _PinnedPool:
    """One pinned host buffer per process, as large as the largest hop, kept for the process's life.

    Pinning is slow (about 0.4 s per GiB), so it is paid once, at
    :meth:`CupyDevice.prepare_holder`, not per hop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf: np.ndarray | None = None

    def get(self, nbytes: int) -> np.ndarray:
        with self._lock:
            if self._buf is None or self._buf.nbytes < nbytes:
                self._buf = None
                mem = cupy.cuda.alloc_pinned_memory(max(nbytes, 1))
                self._buf = np.frombuffer(mem, dtype=np.uint8, count=max(nbytes, 1))
            return self._buf


_PINNED = _PinnedPool()
_POOL_LOCK = threading.Lock()
_EXECUTOR: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    with _POOL_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="gtbus-seal")
        return _EXECUTOR


def on_gpu(ordinal: int) -> Any:
    """A context manager making GPU ``ordinal`` current on the calling thread, restoring the previous one after.

    A new ``cupy.cuda.Device`` each time: one instance keeps a single stack of
    the devices to restore, which two threads entering it at once would mix up.
    """
    return cupy.cuda.Device(ordinal)


def _open_ipc(ordinal: int, raw: bytes) -> int:
    # An IPC handle opens only in the context of the GPU that owns the memory, and
    # cupy's current device is per thread: this runs on a sealing worker.
    with on_gpu(ordinal):
        return int(cupy.cuda.runtime.ipcOpenMemHandle(raw))


def _opened(open_ipc: Callable[[], int]) -> int:
    """The mapped address ``open_ipc`` gives (the open, or a worker's result); DeviceError (one line) if the open failed."""
    try:
        return open_ipc()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise DeviceError(f"cannot map staging: {exc}") from None


class CupyStagingWriter:
    """Holder side: a hop's staging buffer mapped into this process through CUDA IPC, on the GPU that owns it."""

    def __init__(self, handle: IpcStagingHandle, gpu: int) -> None:
        self.handle = str(handle)
        self.nbytes = handle.nbytes
        self.gpu = gpu  # the staging's GPU (this process's ordinal); everything touching it runs with it current
        self._used = False
        self._array: Any = None
        self._opening: Future[int] | None = None
        self._ptr_value = 0
        if self.nbytes <= SMALL_HOP_BYTES:
            # A small hop is sealed on this thread, and its first copy needs the address at
            # once: a handoff to a worker and back cost more than the open itself (~0.1 ms)
            # on the H200 host.
            self._ptr_value = _opened(lambda: _open_ipc(gpu, handle.raw))
        else:
            # Opening an IPC handle takes milliseconds: do it beside the sealing, which
            # needs the device address only when its first copy is queued.
            self._opening = _executor().submit(_open_ipc, gpu, handle.raw)

    @property
    def _ptr(self) -> int:
        if not self._ptr_value and self._opening is not None:
            opening, self._opening = self._opening, None
            self._ptr_value = _opened(opening.result)
        return self._ptr_value

    @property
    def array(self) -> Any:
        """The staging buffer as a cupy array (drills and digests)."""
        if self._array is None:
            mem = cupy.cuda.memory.UnownedMemory(self._ptr, self.nbytes, self, device_id=self.gpu)
            self._array = cupy.ndarray((self.nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        return self._array

    @property
    def view(self) -> memoryview:
        """Not available: device memory is not host-addressable (use :meth:`seal_into`)."""
        raise DeviceError("a CUDA staging buffer has no host view; write it with seal_into")

    def write_ciphertext(self, offset: int, data: bytes) -> None:
        """Copy ciphertext sealed elsewhere into staging at ``offset`` (checked against the IPC buffer's real size)."""
        check_staging_write(self.nbytes, offset, len(data))
        with on_gpu(self.gpu):
            self.array[offset : offset + len(data)].set(np.frombuffer(data, dtype=np.uint8))

    def read_back(self, nbytes: int) -> bytes:
        """Read back staging bytes (drills only)."""
        with on_gpu(self.gpu):
            return self.array[:nbytes].get().tobytes()

    def seal_into(self, plaintext: memoryview, params: ChannelParams, ctx: SegmentContext) -> SealSummary:
        """Seal on every core into pinned memory; each core copies its groups in as soon as they are sealed."""
        if self._used:
            raise ChannelError("this hop's staging was already written; nonces would repeat")
        self._used = True
        seg = params.segment_size
        n = len(plaintext)
        if n > params.capacity:
            raise ChannelError(f"plaintext of {n} bytes exceeds hop capacity {params.capacity}")
        count = segment_count(n, seg)
        if ctx.count != count:
            raise ChannelError(f"context says {ctx.count} segments, {n} bytes need {count}")
        total = staging_size(n, seg)
        if total > self.nbytes:
            raise ChannelError(f"staging holds {self.nbytes} bytes, {total} needed")
        stride = seg + TAG_SIZE
        pinned = _PINNED.get(total)
        base = pinned.ctypes.data
        if total <= SMALL_HOP_BYTES:
            return self._seal_small(plaintext, params, ctx, pinned[:total])
        cipher = SegmentCipher(params.suite, params.key)
        pool = _executor()
        workers = max(1, min(pool._max_workers, count))  # noqa: SLF001 - the pool is ours
        group = max(1, _GROUP_BYTES // stride)
        def work(lo: int, hi: int) -> None:
            with on_gpu(self.gpu):  # the stream must be the staging GPU's
                seal_range(lo, hi)

        def seal_range(lo: int, hi: int) -> None:
            # No barrier between cores: each seals a contiguous range and queues the
            # copy of every group it finishes on its own stream, so sealing and
            # host-to-device copies overlap all the way.
            mv = memoryview(pinned)
            stream = cupy.cuda.Stream(non_blocking=True)
            for g in range(lo, hi, group):
                g_hi = min(hi, g + group)
                for i in range(g, g_hi):
                    p, _, ln = segment_bounds(i, n, seg)
                    o = i * stride
                    cipher.seal_segment(params.nonce(i), plaintext[p : p + ln], ctx.associated_data(i), mv[o : o + ln + TAG_SIZE])
                start = g * stride
                size = (g_hi - 1 - g) * stride + segment_bounds(g_hi - 1, n, seg)[2] + TAG_SIZE
                cupy.cuda.runtime.memcpyAsync(self._ptr + start, base + start, size, cupy.cuda.runtime.memcpyHostToDevice, stream.ptr)
            stream.synchronize()

        step = -(-count // workers)
        futures = [pool.submit(work, lo, min(count, lo + step)) for lo in range(0, count, step)]
        for f in futures:
            f.result()
        with on_gpu(self.gpu):
            digest = blake3_digest_device(self.array[:total]).get().astype("<u4").tobytes()
        return SealSummary(count=count, nbytes=n, ciphertext_digest=digest)

    def _seal_small(self, plaintext: memoryview, params: ChannelParams, ctx: SegmentContext, pinned: np.ndarray) -> SealSummary:
        # A small hop: seal here into pinned memory (the sealer's digest is BLAKE3 of
        # those bytes, as the kernel's would be), then one synchronous copy.
        summary = SegmentSealer(params).seal_into(plaintext, pinned, ctx)
        ptr = self._ptr
        with on_gpu(self.gpu):
            cupy.cuda.runtime.memcpy(ptr, pinned.ctypes.data, pinned.nbytes, cupy.cuda.runtime.memcpyHostToDevice)
        return summary

    def close(self) -> None:
        """Unmap (idempotent)."""
        try:
            ptr = self._ptr
        except DeviceError:
            return
        if ptr:
            self._array = None
            self._ptr_value = 0
            with on_gpu(self.gpu):
                cupy.cuda.runtime.ipcCloseMemHandle(ptr)


class CupyStaging:
    """The cupy backend's holder side (:class:`gtbus.gpu.device.HolderStaging`): staging by IPC handle."""

    @classmethod
    def prepare_holder(cls, capacity: int) -> None:
        """Create this process's CUDA contexts, the pinned pool for ``capacity`` bytes and the sealing threads.

        A context on every visible GPU: a fleet's lanes may grant this holder
        staging on any of them, and a context made inside a hop costs the hop
        hundreds of milliseconds.
        """
        for ordinal in reversed(range(cupy.cuda.runtime.getDeviceCount())):  # GPU 0 is left current, as before
            cupy.cuda.runtime.setDevice(ordinal)
            cupy.cuda.runtime.free(cupy.cuda.runtime.malloc(1))  # forces the context now, not in the first hop
            blake3_digest_device(cupy.zeros(16, dtype=cupy.uint8)).get()  # and the digest kernel's compile and load
        _PINNED.get(staging_size(capacity, 1 << 20) if capacity else 1)
        _executor()

    @classmethod
    def map_staging(cls, handle: BufferHandle | str) -> CupyStagingWriter:
        """Holder side: open a staging buffer's IPC handle on the GPU it names (DeviceError if malformed, absent or gone)."""
        parsed = IpcStagingHandle.parse(handle)
        try:
            ordinal = cupy.cuda.runtime.deviceGetByPCIBusId(parsed.bus_id)
        except cupy.cuda.runtime.CUDARuntimeError:
            raise DeviceError(f"staging lives on GPU {parsed.bus_id}, which this process cannot see (CUDA_VISIBLE_DEVICES?)") from None
        return CupyStagingWriter(parsed, ordinal)

    @staticmethod
    def unmap(mapping: CupyStagingWriter) -> None:
        """Holder side: close the IPC mapping."""
        mapping.close()


_Device = TypeVar("_Device", bound="CupyDevice")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _on_own_gpu(method: Callable[Concatenate[_Device, _P], _R]) -> Callable[Concatenate[_Device, _P], _R]:
    """Run a device method with the device's GPU current, on whatever thread calls it.

    cupy allocates, launches and picks the current stream on the calling
    thread's current device; the orchestrator calls a lane's device from the
    event loop and from the staging pool's worker thread alike.
    """

    @functools.wraps(method)
    def run(self: _Device, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with on_gpu(self.ordinal):
            return method(self, *args, **kwargs)

    return run


class CupyDevice(CupyStaging):
    """The device on a real NVIDIA GPU; implements :class:`gtbus.gpu.device.Device` (and, inherited, its holder side)."""

    name: str = "cupy"
    array_module: ModuleType = cupy
    exports_outlive_process: bool = False
    frees_staging_while_mapped: bool = False

    def __init__(self, device: int = 0) -> None:
        count = cupy.cuda.runtime.getDeviceCount()
        if type(device) is not int or not 0 <= device < count:
            raise DeviceError(f"no GPU {device!r} in this process ({count} visible)")
        self._dev = cupy.cuda.Device(device)  # for callers' properties (id, attributes); never entered: see on_gpu
        self.ordinal = device
        """The GPU's ordinal in this process (CUDA_VISIBLE_DEVICES numbering)."""
        self.bus_id = canonical_bus_id(cupy.cuda.runtime.deviceGetPCIBusId(device))
        """The GPU's PCI bus id: how staging handles name it to other processes."""
        props = cupy.cuda.runtime.getDeviceProperties(device)
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        uuid = props.get("uuid", b"")
        uuid_s = bytes(uuid).hex() if isinstance(uuid, (bytes, bytearray)) else str(uuid)
        self.card = gpu
        self.device_id = f"cuda:{socket.gethostname()}:{gpu}:{uuid_s[:16]}:{os.getpid()}:{secrets.token_hex(8)}"
        self._warm_up()

    def active(self) -> Any:
        """A context manager making this device's GPU current on the calling thread (restoring the previous one after)."""
        return on_gpu(self.ordinal)

    @_on_own_gpu
    def _warm_up(self) -> None:
        # Compile (or load from cupy's cache) every kernel now: a first compile takes
        # seconds and must not land inside a hop's transfer time.
        from gtbus.gpu.kernels.aes_gcm import decrypt_segments

        dummy = cupy.zeros(64, dtype=cupy.uint8)
        decrypt_segments(bytes(32), bytes(4), dummy, cupy.zeros(16, dtype=cupy.uint8), 16, 0, [b""])
        blake3_digest_device(dummy).get()
        verify_zero_async(dummy).get()

    @_on_own_gpu
    def alloc(self, nbytes: int) -> CupyBuffer:
        """A zeroed private buffer (pooled; never exported)."""
        _check_size(nbytes)
        return CupyBuffer(nbytes, _array=cupy.zeros(nbytes, dtype=cupy.uint8))

    @_on_own_gpu
    def alloc_hop_staging(self, nbytes: int) -> tuple[CupyBuffer, BufferHandle]:
        """A fresh dedicated allocation for one hop, and its IPC handle."""
        _check_size(nbytes, minimum=1)
        try:
            # Its own cudaMalloc, in whole 2 MiB pages: the driver packs smaller
            # allocations into shared pages, and an IPC handle exports the page, so a
            # small staging could share one with other buffers and its handle could
            # still map after the free (seen on the H200 host with a 1 KiB staging).
            mem = cupy.cuda.memory.Memory(-(-nbytes // _IPC_PAGE) * _IPC_PAGE)
        except cupy.cuda.memory.OutOfMemoryError as exc:
            raise DeviceError(f"cannot allocate {nbytes} bytes of staging: {exc}") from None
        arr = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        raw = cupy.cuda.runtime.ipcGetMemHandle(mem.ptr)
        handle = BufferHandle(str(IpcStagingHandle(self.bus_id, nbytes, bytes(raw))))
        return CupyBuffer(nbytes, handle=handle, _array=arr, _memory=mem), handle

    def discard_export(self, handle: BufferHandle | str) -> None:
        """Nothing to do: device memory and its IPC exports end with the process that made them."""

    @_on_own_gpu
    def revoke_staging(self, buf: CupyBuffer) -> None:
        """Free the dedicated allocation: its handle can never be opened again. Idempotent."""
        if buf.handle is None:
            raise DeviceError("only staging buffers can be revoked; this one is private")
        cupy.cuda.get_current_stream().synchronize()
        buf._array = None
        buf._memory = None  # cudaFree

    @_on_own_gpu
    def open_segments(
        self, staging: CupyBuffer, out: CupyBuffer, params: ChannelParams, ctx: SegmentContext, count: int, nbytes: int
    ) -> None:
        """Authenticate and decrypt every segment on the GPU into the private buffer."""
        if staging.handle is None:
            raise DeviceError("open_segments reads from a staging buffer, got a private one")
        if params.buffer_handle != staging.handle:
            raise ChannelError("channel params name another staging buffer than this one")
        if params.suite != AES_256_GCM:
            raise ChannelError(f"the cupy backend decrypts {AES_256_GCM} only, not {params.suite}")
        if type(nbytes) is not int or not 0 <= nbytes <= params.capacity or nbytes > out.nbytes:
            raise ChannelError(f"claimed {nbytes} bytes, hop capacity is {params.capacity}")
        expected = segment_count(nbytes, params.segment_size)
        if count != expected or ctx.count != expected:
            raise ChannelError(f"claimed {count} segments (context {ctx.count}), {nbytes} bytes make {expected}")
        if staging_size(nbytes, params.segment_size) > staging.nbytes:
            raise ChannelError("claimed segments do not fit the staging buffer")
        src, dst = _live(staging, "staging"), _live(out, "output")
        if staging_size(nbytes, params.segment_size) <= SMALL_HOP_BYTES:
            self._open_small(src, dst, params, ctx, count, nbytes)
            return
        aads = [ctx.associated_data(i) for i in range(count)]
        with GcmDecryptor(params.key) as dec:
            ok = dec.decrypt_segments(params.nonce_prefix, src, dst, params.segment_size, nbytes, aads)
            bad = first_bad_segment(ok)
        if bad is not None:
            dst.fill(0)
            raise ChannelError(f"segment {bad} failed authentication; output scrubbed")

    @staticmethod
    def _open_small(src: Any, dst: Any, params: ChannelParams, ctx: SegmentContext, count: int, nbytes: int) -> None:
        # A small hop: read the ciphertext back once and open it on this CPU (the
        # orchestrator's, inside the trust boundary, as ship does), then one copy in.
        # The host copies are private to this call (no holder maps them, so no
        # private_copy is needed) and are zeroed before they are let go.
        sealed = staging_size(nbytes, params.segment_size)
        host = np.empty(sealed + nbytes, dtype=np.uint8)
        try:
            cupy.cuda.runtime.memcpy(host.ctypes.data, src.data.ptr, sealed, cupy.cuda.runtime.memcpyDeviceToHost)
            try:
                SegmentOpener(params).open_into(host[:sealed], host[sealed:], ctx, count, nbytes)
            except ChannelError:
                dst.fill(0)
                raise
            if nbytes:
                cupy.cuda.runtime.memcpy(dst.data.ptr, host.ctypes.data + sealed, nbytes, cupy.cuda.runtime.memcpyHostToDevice)
        finally:
            host.fill(0)

    @_on_own_gpu
    def scrub(self, buf: CupyBuffer) -> None:
        """Zero the buffer on the device; staging is then let go of (idempotent for staging)."""
        if buf.handle is not None and buf._scrubbed:
            return
        _live(buf, "buffer").fill(0)
        if buf.handle is not None:
            # A holder may keep writing through its IPC mapping until the memory is
            # freed: from here on the device reads none of it, so nothing it writes
            # can fail a check of the device's.
            cupy.cuda.get_current_stream().synchronize()
            buf._array = None
            buf._scrubbed = True

    @_on_own_gpu
    def verify_zero(self, buf: CupyBuffer) -> bool:
        """True if every byte the device can read of the buffer is zero (of scrubbed staging: none)."""
        if buf.handle is not None and buf._scrubbed:
            return True
        return int(verify_zero_async(_live(buf, "buffer")).get()[0]) == 0

    @_on_own_gpu
    def release(self, buf: CupyBuffer) -> None:
        """Free a buffer (revoking it first if it is staging). Idempotent."""
        if buf.handle is not None and buf._memory is not None:
            self.revoke_staging(buf)
        buf._array = None

    @_on_own_gpu
    def measure(self, *parts: Any) -> bytes:
        """BLAKE3 of each part on the GPU, combined with its dtype and shape into one measurement."""
        pieces: list[Any] = []
        digests = []
        for p in parts:
            arr = p._array if isinstance(p, CupyBuffer) else p
            if isinstance(arr, cupy.ndarray):
                flat = arr if arr.flags.c_contiguous else cupy.ascontiguousarray(arr)
                pieces.append(f"{flat.dtype.str}{list(flat.shape)}".encode())
                digests.append(blake3_digest_device(flat.reshape(-1).view(cupy.uint8)))
                pieces.append(len(digests) - 1)
            else:
                pieces.append(b"bytes")
                pieces.append(bytes(memoryview(p)))
        words = cupy.stack(digests).get() if digests else None
        resolved = [words[x].astype("<u4").tobytes() if isinstance(x, int) else x for x in pieces]
        return tagged_hash(MODEL_DOMAIN, resolved)

    @_on_own_gpu
    def as_array(self, buf: CupyBuffer, dtype: Any) -> Any:
        """A flat cupy view of a private buffer."""
        if buf.handle is not None:
            raise DeviceError("training reads private buffers only, not staging")
        arr = _live(buf, "buffer")
        itemsize = np.dtype(dtype).itemsize
        return arr[: (buf.nbytes // itemsize) * itemsize].view(dtype)


def _check_size(nbytes: int, minimum: int = 0) -> None:
    if type(nbytes) is not int or nbytes < minimum:
        raise DeviceError(f"buffer size must be an integer >= {minimum}, got {nbytes!r}")
