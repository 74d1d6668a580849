"""The orchestrator's ship path (gtbus.nodes.ship_receiver): segments decrypted as they arrive, on to the device.

Real AEAD (``cryptography``), the real host device and its buffers, the real
thread pool; the blobs are what an honest (or tampering) holder would send.
Checked: any arrival order gives the chunk exactly; a tampered or missing
segment fails the hop naming the lowest bad index, with the device buffer
zeroed; a return that is not this hop's is refused; closing (the hop's
epilogue, whatever its outcome) leaves every bounce buffer zero, also when
segments were still queued.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from gtbus.errors import ChannelError
from gtbus.gpu.bounce import BounceSet
from gtbus.gpu.channel import ChannelParams, SegmentContext, SegmentSealer, segment_bounds, segment_count, staging_size, TAG_SIZE
from gtbus.gpu.host import HostDevice
from gtbus.nodes.ship_receiver import ShipReceiver

SEG = 64 * 1024
CHUNK = 10 * SEG + 1234  # a short last segment


@pytest.fixture
def device() -> HostDevice:
    dev = HostDevice()
    yield dev
    dev.close()


def _sealed(params: ChannelParams, ctx: SegmentContext, plain: bytes) -> list[bytes]:
    """The chunk's segments as a holder ships them: one blob per segment."""
    staging = bytearray(staging_size(len(plain), params.segment_size))
    SegmentSealer(params).seal_into(plain, staging, ctx)
    blobs = []
    for i in range(ctx.count):
        _, s, n = segment_bounds(i, len(plain), params.segment_size)
        blobs.append(bytes(staging[s : s + n + TAG_SIZE]))
    return blobs


def _hop(device: HostDevice, bounces: BounceSet, epoch: int = 7) -> tuple[ShipReceiver, SegmentContext, list[bytes], bytes, object]:
    params = ChannelParams.generate("ship", 16 * SEG, segment_size=SEG)
    ctx = SegmentContext("run-1", epoch, "h1", segment_count(CHUNK, SEG))
    plain = os.urandom(CHUNK)
    data = device.alloc(16 * SEG)
    return ShipReceiver(params, ctx, CHUNK, device, data, bounces), ctx, _sealed(params, ctx, plain), plain, data


def test_segments_in_any_order_land_exactly_and_the_bounces_end_zero(device: HostDevice) -> None:
    bounces = BounceSet(np, SEG)
    rx, ctx, blobs, plain, data = _hop(device, bounces)
    order = list(range(len(blobs)))
    random.Random(1).shuffle(order)
    for i in order:
        rx.accept(i, blobs[i])
    rx.finish(ctx, ctx.count, CHUNK)
    view = device.as_array(data, np.uint8)
    assert view[:CHUNK].tobytes() == plain
    assert not view[CHUNK:].any()
    assert rx.close()
    assert bounces.scrub()  # every thread's bounce reads zero: no plaintext outlives the hop


@pytest.mark.parametrize("bad", [[3], [8, 2], [10]])
def test_a_tampered_segment_fails_the_hop_naming_the_lowest_and_zeroes_the_device_buffer(device: HostDevice, bad: list[int]) -> None:
    bounces = BounceSet(np, SEG)
    rx, ctx, blobs, _, data = _hop(device, bounces)
    for i in bad:
        b = bytearray(blobs[i])
        b[5] ^= 1
        blobs[i] = bytes(b)
    for i, blob in enumerate(blobs):
        rx.accept(i, blob)
    with pytest.raises(ChannelError, match=f"segment {min(bad)} of {ctx.count} did not authenticate"):
        rx.finish(ctx, ctx.count, CHUNK)
    assert not device.as_array(data, np.uint8).any()
    assert rx.close()


def test_a_segment_sealed_for_another_hop_does_not_authenticate(device: HostDevice) -> None:
    bounces = BounceSet(np, SEG)
    rx, ctx, blobs, _, _ = _hop(device, bounces, epoch=7)
    other, octx, oblobs, _, _ = _hop(device, bounces, epoch=8)
    blobs[4] = oblobs[4]  # same size, another hop's key and AAD
    for i, blob in enumerate(blobs):
        rx.accept(i, blob)
    with pytest.raises(ChannelError, match="segment 4 of"):
        rx.finish(ctx, ctx.count, CHUNK)
    assert rx.close() and other.close()


def test_a_return_that_is_not_this_hops_is_refused(device: HostDevice) -> None:
    bounces = BounceSet(np, SEG)
    rx, ctx, blobs, _, data = _hop(device, bounces)
    for i, blob in enumerate(blobs):
        rx.accept(i, blob)
    with pytest.raises(ChannelError, match="not the hop"):
        rx.finish(SegmentContext("run-1", ctx.epoch + 1, "h1", ctx.count), ctx.count, CHUNK)
    with pytest.raises(ChannelError, match="not the hop"):
        rx.finish(ctx, ctx.count, CHUNK - 1)
    assert rx.close()


def test_missing_segments_fail_the_hop(device: HostDevice) -> None:
    bounces = BounceSet(np, SEG)
    rx, ctx, blobs, _, data = _hop(device, bounces)
    for i, blob in enumerate(blobs[:-2]):
        rx.accept(i, blob)
    with pytest.raises(ChannelError, match=f"2 of {ctx.count} segments were never opened"):
        rx.finish(ctx, ctx.count, CHUNK)
    assert not device.as_array(data, np.uint8).any()
    assert rx.close()


def test_closing_mid_stream_stops_the_work_and_leaves_nothing_behind(device: HostDevice) -> None:
    # A hop revoked while its segments stream: the epilogue closes the receiver, then
    # scrubs the device buffer; nothing may be written into it after the close returns.
    bounces = BounceSet(np, SEG)
    rx, ctx, blobs, _, data = _hop(device, bounces)
    for i, blob in enumerate(blobs):
        rx.accept(i, blob)
    assert rx.close()
    view = device.as_array(data, np.uint8)
    view.fill(0)  # what the epilogue's scrub does
    rx.accept(0, blobs[0])  # a late segment after the close is dropped
    assert rx.close()
    assert not view.any()
