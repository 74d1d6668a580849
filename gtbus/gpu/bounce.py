"""Bounce buffers: bytes a CPU thread produced (decrypted plaintext) copied into a device buffer.

This is the last step of the conventional path (ship mode): the orchestrator's
CPU decrypts a segment that came over the network, and the plaintext must reach
the GPU. A competent implementation decrypts into pinned host memory and
queues an asynchronous host-to-device copy on a stream of its own, so that the
next segment is decrypted while this one is copied. Rules:

- Each thread that uploads has its own :class:`Bounce`: two halves of one
  segment each in pinned memory (plain memory on the host backend), and one
  CUDA stream, made on the destination buffer's device. A half is written again only after its previous copy finished.
- Nothing is sized by a peer: a bounce holds ``segment_size`` bytes (the run's),
  twice.
- A bounce holds plaintext: :meth:`BounceSet.scrub` waits for every copy and
  zeroes every half. Callers scrub at the end of each hop.
- Pinning is slow (about 0.4 s per GiB on an H200 host), so bounces are made
  once per thread and kept for the process's life.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["Bounce", "BounceSet"]


class Bounce:
    """One thread's two pinned halves and its copy stream."""

    def __init__(self, xp: ModuleType, segment_size: int) -> None:
        self._xp = xp
        self._on_gpu = xp is not np
        self.segment_size = segment_size
        if self._on_gpu:
            mem = xp.cuda.alloc_pinned_memory(2 * segment_size)
            self._host = np.frombuffer(mem, dtype=np.uint8, count=2 * segment_size)
            self._keep = mem
        else:
            self._host = np.zeros(2 * segment_size, dtype=np.uint8)
        self._stream: Any = None  # made on the destination's device at the first upload
        self._copied: list[Any] = [None, None]
        self._next = 0

    def take(self) -> tuple[int, memoryview]:
        """The next free half (its previous copy is done) as ``(half, writable view of segment_size bytes)``."""
        k = self._next
        self._next ^= 1
        ev = self._copied[k]
        if ev is not None:
            ev.synchronize()
            self._copied[k] = None
        s = self.segment_size
        return k, memoryview(self._host[k * s : (k + 1) * s])

    def upload(self, half: int, dst: Any, offset: int, nbytes: int) -> None:
        """Copy the first ``nbytes`` of ``half`` into ``dst[offset:offset + nbytes]`` (a flat uint8 device view)."""
        s = self.segment_size
        src = self._host[half * s : half * s + nbytes]
        if not self._on_gpu:
            dst[offset : offset + nbytes] = src
            return
        xp = self._xp
        with dst.device:
            if self._stream is None:
                self._stream = xp.cuda.Stream(non_blocking=True)
            xp.cuda.runtime.memcpyAsync(dst.data.ptr + offset, src.ctypes.data, nbytes,
                                        xp.cuda.runtime.memcpyHostToDevice, self._stream.ptr)
            ev = xp.cuda.Event(disable_timing=True)
            ev.record(self._stream)
        self._copied[half] = ev

    def drain(self) -> None:
        """Wait for both halves' copies."""
        for k, ev in enumerate(self._copied):
            if ev is not None:
                ev.synchronize()
                self._copied[k] = None

    def scrub(self) -> None:
        """Wait for the copies, then zero both halves."""
        self.drain()
        self._host.fill(0)

    def is_zero(self) -> bool:
        """Whether both halves read zero."""
        return not self._host.any()


class BounceSet:
    """The bounces of every thread that uploads for one device, made on first use and kept."""

    def __init__(self, xp: ModuleType, segment_size: int) -> None:
        self.xp = xp
        self.segment_size = segment_size
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[Bounce] = []

    def mine(self) -> Bounce:
        """The calling thread's bounce."""
        b: Bounce | None = getattr(self._local, "bounce", None)
        if b is None:
            b = Bounce(self.xp, self.segment_size)
            self._local.bounce = b
            with self._lock:
                self._all.append(b)
        return b

    def drain(self) -> None:
        """Wait for every queued copy of every thread (the device buffer then holds what was uploaded)."""
        with self._lock:
            bounces = list(self._all)
        for b in bounces:
            b.drain()

    def scrub(self) -> bool:
        """Wait for every copy and zero every bounce; True if all read zero afterwards."""
        with self._lock:
            bounces = list(self._all)
        for b in bounces:
            b.scrub()
        return all(b.is_zero() for b in bounces)
