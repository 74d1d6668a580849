"""A holder's side of streaming a hop's segments: to the orchestrator (ship mode) or the device agent (remote travel).

Every segment is its own signed ``ship.segment`` message carrying one blob (the
signature covers the blob's digest, DESIGN section 4). The stream is built to
keep the network busy, as a sceptic of the ship baseline would build it:

* segments are sealed ahead of the sender, on every core (``cryptography``
  releases the GIL), each into its own buffer, at most :data:`AHEAD_PER_CORE`
  per core ahead: the first segment leaves as soon as it is sealed, not after
  the whole chunk, and memory stays bounded by that window;
* a sealed buffer is handed to the transport as it is (frames of 64 KiB and
  more are sent zero-copy), and never written again: each segment has its
  own buffer, so nothing can change under libzmq while it still reads it;
* the ciphertext digest the return carries (BLAKE3 over the segments in order,
  as :func:`~gtbus.gpu.channel.ciphertext_digest` computes it over staging) is
  computed in order on one thread beside the stream.

Nonces: each index is sealed exactly once under this hop's params, as
:class:`~gtbus.gpu.channel.SegmentSealer` guarantees for travel; a call seals
one hop (the holder's machine starts one provisioning per grant).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import blake3

from gtbus.gpu.channel import TAG_SIZE, ChannelParams, SealSummary, SegmentCipher, SegmentContext, segment_bounds
from gtbus.messages.types import ShipSegment
from gtbus.nodes.runtime import NodeRuntime
from gtbus.nodes.ship_receiver import ship_pool

__all__ = ["AHEAD_PER_CORE", "stream_segments"]

#: Segments sealed ahead of the sender, per core: enough to keep every core busy while one is sent.
AHEAD_PER_CORE = 2

_digest_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gtbus-ship-digest")  # one thread: in order


async def stream_segments(
    rt: NodeRuntime,
    token_id: str,
    epoch: int,
    params: ChannelParams,
    plain: memoryview,
    ctx: SegmentContext,
    still_current: Callable[[], bool],
) -> SealSummary:
    """Seal ``plain`` segment by segment and send each as a ``ship.segment`` over ``rt``; the return's summary.

    Stops sending (and returns what it has) when ``still_current()`` turns false:
    the hop was revoked and nothing more of it may go out.
    """
    seg, nbytes, count = params.segment_size, len(plain), ctx.count
    cipher = SegmentCipher(params.suite, params.key)
    pool = ship_pool()  # the process's worker threads, one per core
    ahead = max(1, AHEAD_PER_CORE * pool._max_workers)  # noqa: SLF001 - the pool is ours

    def seal(i: int) -> bytearray:
        p, _, n = segment_bounds(i, nbytes, seg)
        out = bytearray(n + TAG_SIZE)
        cipher.seal_segment(params.nonce(i), plain[p : p + n], ctx.associated_data(i), out)
        return out

    hasher = blake3.blake3()
    sealing: deque[Future[bytearray]] = deque()
    hashed: Future[object] | None = None
    submitted = 0
    try:
        for i in range(count):
            while submitted < count and submitted < i + ahead:
                sealing.append(pool.submit(seal, submitted))
                submitted += 1
            blob = await asyncio.wrap_future(sealing.popleft())
            if not still_current():
                break
            hashed = _digest_pool.submit(hasher.update, blob)
            await rt.send(ShipSegment(token_id, i, count), epoch=epoch, blobs=[blob])
    finally:
        for f in sealing:
            f.cancel()
    if hashed is not None:
        await asyncio.wrap_future(hashed)
    return SealSummary(count, nbytes, hasher.digest())
