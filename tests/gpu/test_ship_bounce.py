"""The ship path's last step on a real GPU: segments decrypted on the CPU, copied in through pinned bounces.

Skipped cleanly where cupy or a GPU is absent (as in CI). The same checks as
tests/nodes/test_ship_receiver.py, with the device buffer in GPU memory and
the copies queued on each worker thread's own stream.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from cuda_guard import cupy_or_skip

cupy = cupy_or_skip()

from gtbus.errors import ChannelError  # noqa: E402
from gtbus.gpu.bounce import BounceSet  # noqa: E402
from gtbus.gpu.channel import TAG_SIZE, ChannelParams, SegmentContext, SegmentSealer, segment_bounds, segment_count, staging_size  # noqa: E402
from gtbus.gpu.cupy_backend import CupyDevice  # noqa: E402
from gtbus.nodes.ship_receiver import ShipReceiver  # noqa: E402

pytestmark = pytest.mark.gpu

SEG = 1 << 20
CHUNK = 37 * SEG + 4321


def _blobs(params: ChannelParams, ctx: SegmentContext, plain: bytes) -> list[bytes]:
    staging = bytearray(staging_size(len(plain), SEG))
    SegmentSealer(params).seal_into(plain, staging, ctx)
    out = []
    for i in range(ctx.count):
        _, s, n = segment_bounds(i, len(plain), SEG)
        out.append(bytes(staging[s : s + n + TAG_SIZE]))
    return out


@pytest.mark.parametrize("tamper", [None, 17])
def test_shipped_segments_reach_gpu_memory_exactly_or_not_at_all(tamper: int | None) -> None:
    dev = CupyDevice()
    bounces = BounceSet(cupy, SEG)
    params = ChannelParams.generate("ship", 40 * SEG, segment_size=SEG)
    ctx = SegmentContext("run", 3, "h1", segment_count(CHUNK, SEG))
    plain = os.urandom(CHUNK)
    blobs = _blobs(params, ctx, plain)
    if tamper is not None:
        blobs[tamper] = blobs[tamper][:-1] + bytes([blobs[tamper][-1] ^ 1])
    data = dev.alloc(40 * SEG)
    rx = ShipReceiver(params, ctx, CHUNK, dev, data, bounces)
    order = list(range(ctx.count))
    random.Random(2).shuffle(order)
    for i in order:
        rx.accept(i, blobs[i])
    view = dev.as_array(data, np.uint8)
    if tamper is None:
        rx.finish(ctx, ctx.count, CHUNK)
        assert view[:CHUNK].get().tobytes() == plain
    else:
        with pytest.raises(ChannelError, match=f"segment {tamper} of"):
            rx.finish(ctx, ctx.count, CHUNK)
        assert not bool(view.any())
    assert rx.close()
    dev.release(data)
