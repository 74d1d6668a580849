"""The orchestrator's side of a ship hop: each segment decrypted as it arrives, and on to the device.

Ship mode is the conventional path kept as the baseline that travel is held to
(DESIGN section 10: it must be honest, >= 0.5 x a raw CurveZMQ stream). So it
is built the way a sceptic would build it, not the slow way:

* the :class:`~gtbus.protocol.hop.HopMachine` checks every ``ship.segment``
  (hop, epoch, sender, index, count, exact size, no duplicate) before a byte
  is used; only then does the hop shell hand its blob to :meth:`ShipReceiver.accept`;
* the blob (the transport's own copy of the frame: private, immutable) is
  authenticated and decrypted at once on a worker thread, all cores
  (``cryptography`` releases the GIL), into that thread's pinned bounce
  buffer, whose host-to-device copy is queued on the thread's own stream
  (:mod:`gtbus.gpu.bounce`): when the return arrives, only the last segments
  are left to do;
* nothing grows with a peer's claim: the blobs waiting for a thread are the
  ones the machine accepted, at most the granted chunk's segments; bounces are
  sized by the run's segment size.

Rules kept from :class:`~gtbus.gpu.channel.SegmentOpener`: the machine, not
this module, decides when all segments are in; :meth:`ShipReceiver.finish`
then fails the hop if any segment did not authenticate (naming the lowest),
and in that case zeroes the device buffer before saying so. Plaintext never
outlives the hop: :meth:`ShipReceiver.close` (the hop's epilogue, whatever the
outcome) stops the work still queued, waits for what runs, and zeroes every
bounce; the shell then scrubs the device buffer as for any hop.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from gtbus.errors import ChannelError, DeviceError
from gtbus.gpu.bounce import BounceSet
from gtbus.gpu.channel import ChannelParams, SegmentCipher, SegmentContext, segment_bounds

__all__ = ["ShipReceiver", "ship_pool"]

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def ship_pool() -> ThreadPoolExecutor:
    """The process's ship worker threads, one per core: opening segments on an orchestrator, sealing them on a holder."""
    global _pool
    with _pool_lock:
        if _pool is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            _pool = ThreadPoolExecutor(max_workers=max(1, cores), thread_name_prefix="gtbus-ship")
        return _pool


class ShipReceiver:
    """One ship hop's segments on their way from the network to the device buffer ``data``."""

    def __init__(self, params: ChannelParams, ctx: SegmentContext, chunk_bytes: int, device: Any, data: Any, bounces: BounceSet) -> None:
        if bounces.segment_size < params.segment_size:
            raise DeviceError(f"bounce buffers of {bounces.segment_size} bytes cannot hold {params.segment_size}-byte segments")
        self._cipher = SegmentCipher(params.suite, params.key)
        self._nonce = params.nonce
        self._segment_size = params.segment_size
        self.ctx = ctx
        self.chunk_bytes = chunk_bytes
        self._dst = device.as_array(data, np.uint8)
        if self._dst.size < chunk_bytes:
            raise DeviceError(f"device buffer of {self._dst.size} bytes cannot hold a {chunk_bytes}-byte chunk")
        self._bounces = bounces
        self._lock = threading.Lock()
        self._futures: list[Future[None]] = []
        self._opened = 0
        self._first_bad: int | None = None
        self._closed = False

    def accept(self, index: int, blob: Any) -> None:
        """Decrypt segment ``index`` (its number and size already checked by the hop machine) as soon as a thread is free."""
        if not self._closed:
            self._futures.append(ship_pool().submit(self._open_one, index, blob))

    def _open_one(self, index: int, blob: Any) -> None:
        with self._lock:
            # After a failure the verdict can only get a lower index: later segments are skipped.
            if self._closed or (self._first_bad is not None and index > self._first_bad):
                return
        p, _, n = segment_bounds(index, self.chunk_bytes, self._segment_size)
        bounce = self._bounces.mine()
        half, out = bounce.take()
        try:
            self._cipher.open_segment(self._nonce(index), blob, self.ctx.associated_data(index), out[:n])
        except ChannelError:
            out[:n] = bytes(n)  # unauthenticated bytes never reach the device, nor stay here
            with self._lock:
                if self._first_bad is None or index < self._first_bad:
                    self._first_bad = index
            return
        bounce.upload(half, self._dst, p, n)
        with self._lock:
            self._opened += 1

    def _wait(self) -> None:
        wait(self._futures)
        for f in self._futures:
            if not f.cancelled() and f.exception() is not None:
                raise DeviceError(f"decrypting a shipped segment failed: {f.exception()}")

    def finish(self, ctx: SegmentContext, segments: int, nbytes: int) -> None:
        """All segments are in (the machine said so): wait for the last ones; ChannelError if any failed."""
        if ctx != self.ctx or segments != ctx.count or nbytes != self.chunk_bytes:
            raise ChannelError(f"the return ({segments} segments, {nbytes} bytes) is not the hop the segments were opened for")
        try:
            self._wait()
            self._bounces.drain()  # the device buffer holds every uploaded segment from here on
        except BaseException:
            self._dst.fill(0)
            raise
        if self._first_bad is not None or self._opened != segments:
            self._dst.fill(0)
            if self._first_bad is None:
                raise ChannelError(f"{segments - self._opened} of {segments} segments were never opened")
            raise ChannelError(f"segment {self._first_bad} of {segments} did not authenticate "
                               f"(run {ctx.run_id!r}, epoch {ctx.epoch}, holder {ctx.holder!r})")

    def close(self) -> bool:
        """End of the hop, whatever its outcome: drop queued work, wait for running work, zero every bounce.

        Idempotent. Returns whether every bounce reads zero afterwards.
        """
        self._closed = True
        for f in self._futures:
            f.cancel()
        wait(self._futures)
        self._futures.clear()
        return self._bounces.scrub()
