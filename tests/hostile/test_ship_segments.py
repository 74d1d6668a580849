"""Class 2 (ship mode): a holder's segments are decrypted as they arrive, and a bad one loses only its hop.

A real orchestrator process in ship mode with one honest holder process (h1)
and one scripted holder (h2: a real node with a valid key) whose chunk takes
two 4 MiB segments. h2 first ships its chunk with one ciphertext byte flipped
in segment 1, then (on the retry) ships it honestly, sending segment 0 twice
and segment 0 again after its return (refused
whenever it lands: while the hop opens, or as another hop's or a stale epoch). The tampered hop is refused naming the
segment, nothing of it is trained, the duplicate and the late segment are
refused and counted, the honest retry is trained, h1's chunks are trained, and
the orchestrator's peak RSS stays under ``RSS_CAP``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from process_memory import peak_rss_bytes
from scripted_holder import ScriptedHolder, honest_manifest, wait_for_text

from gtbus.gpu.channel import TAG_SIZE, SegmentContext, SegmentSealer, segment_bounds, segment_count, staging_size
from gtbus.messages.types import ShipSegment, TokenAck, TokenDecline, TokenReturn, Welcome
from gtbus.testing import eventually, run_async

pytestmark = pytest.mark.slow

RSS_CAP = 400 << 20
CHUNK = 3 << 20  # tokens: 6 MiB, two segments of at most 4 MiB
#: How a segment sent after its hop's return is refused, depending on how far the hop got.
LATE = ("ship-segment-after-the-return", "ship-segment-of-another-hop", "stale-epoch")


def _seal(params: Any, run_id: str, epoch: int, holder: str, plain: bytes) -> tuple[list[bytes], Any]:
    """The chunk's segments exactly as an honest holder seals them, and the seal summary."""
    ctx = SegmentContext(run_id, epoch, holder, segment_count(len(plain), params.segment_size))
    staging = bytearray(staging_size(len(plain), params.segment_size))
    summary = SegmentSealer(params).seal_into(plain, staging, ctx)
    blobs = []
    for i in range(ctx.count):
        _, s, n = segment_bounds(i, len(plain), params.segment_size)
        blobs.append(bytes(staging[s : s + n + TAG_SIZE]))
    return blobs, summary


def test_a_tampered_segment_fails_only_its_hop_and_out_of_phase_segments_are_refused(travel: Any, tmp_path: Any) -> None:
    t = travel(holders=2, chunk_tokens=CHUNK, mode="ship", lease=60.0, steps="2", bytes_per_holder=2 * CHUNK)
    t.start_orchestrator()
    t.dep.start_holder(0)
    plain = (np.arange(CHUNK) % 256).astype("<u2").tobytes()  # byte tokens, as the run trains
    rss: list[int] = []

    async def scenario() -> None:
        async with ScriptedHolder(t, "h2", tmp_path / "h2") as h2:
            welcome = await h2.register(honest_manifest(CHUNK))
            assert isinstance(welcome, Welcome)
            # 1. Segment 1 tampered: the hop is refused, naming it.
            g, epoch, params = await h2.next_grant()
            await h2.send(TokenAck(g.token_id), epoch)
            blobs, s = _seal(params, welcome.run_id, epoch, "h2", plain)
            assert s.count == 2
            bad = bytearray(blobs[1])
            bad[100] ^= 0x01
            for i, blob in enumerate([blobs[0], bytes(bad)]):
                await h2.send(ShipSegment(g.token_id, i, s.count), epoch, blobs=[blob])
            await h2.send(TokenReturn(g.token_id, g.chunk_index, s.count, s.nbytes, s.ciphertext_digest, bytes(32)), epoch)
            await wait_for_text(t.run_dir / "orchestrator.err", "segment 1 of 2 did not authenticate")
            # 2. The retry, honest, with a duplicate segment and one after the return.
            g, epoch, params = await h2.next_grant()
            await h2.send(TokenAck(g.token_id), epoch)
            blobs, s = _seal(params, welcome.run_id, epoch, "h2", plain)
            for i in (0, 0, 1):
                await h2.send(ShipSegment(g.token_id, i, s.count), epoch, blobs=[blobs[i]])
            await h2.send(TokenReturn(g.token_id, g.chunk_index, s.count, s.nbytes, s.ciphertext_digest, bytes(32)), epoch)
            await h2.send(ShipSegment(g.token_id, 0, s.count), epoch, blobs=[blobs[0]])
            # Refused whenever it lands: while the hop opens, or after it (another hop's, or fenced).
            err = t.run_dir / "orchestrator.err"
            await eventually(lambda: any(f"from h2: {r}" in err.read_text(errors="replace") for r in LATE), timeout=60, what="the late segment refused")
            rss.append(peak_rss_bytes(t.orchestrator.pid))
            await h2.decline_until_done()

    run_async(scenario(), timeout=150)
    summary = t.finish()
    assert summary["hops_trained"] == 3, summary  # h1's two chunks and h2's honest retry
    assert summary["outcomes"].get("rejected") == 1, summary  # the tampered hop, nothing of it trained
    err = t.stderr()
    assert "refused a message from h2: ship-segment-duplicate" in err
    print(f"orchestrator peak RSS after tampered and out-of-phase ship segments: {rss[0] >> 20} MiB")
    assert rss[0] < RSS_CAP, f"orchestrator peak RSS {rss[0] >> 20} MiB"
