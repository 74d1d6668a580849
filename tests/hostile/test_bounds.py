"""Class 2 and 10: every number a holder sends is bounded before it sizes anything.

Each test runs a real orchestrator process with one honest holder process (h1)
and one scripted holder (h2, a real node with a valid key, from gtbus's own
classes) that sends hostile *values*. The run must go on: h1's chunks are
trained, nothing of h2's is, and the orchestrator's peak RSS stays under
``RSS_CAP``.
"""

from __future__ import annotations

from typing import Any

import pytest
from process_memory import peak_rss_bytes
from scripted_holder import ScriptedHolder, honest_manifest, wait_for_text
from travel_kit import Travel

from gtbus.messages.types import Refusal, ShipSegment, TokenAck, TokenDecline, TokenReturn, Welcome
from gtbus.testing import run_async

pytestmark = pytest.mark.slow

#: The orchestrator's peak resident memory, hostile peer or not.
RSS_CAP = 400 << 20
CHUNK = 4096  # tokens per chunk: small hops, fast test


def _start(travel: Any, mode: str) -> Travel:
    t: Travel = travel(holders=2, chunk_tokens=CHUNK, mode=mode, lease=60.0, steps="5", bytes_per_holder=2 * CHUNK)
    t.start_orchestrator()
    t.dep.start_holder(0)  # h1 is honest; h2 is the scripted one
    return t


HOSTILE_MANIFESTS = [
    # (A manifest that is not a map never reaches admission: the registry refuses the body's type.)
    ("'total_tokens' must be an integer", {**honest_manifest(2 * CHUNK), "total_tokens": "8192"}),
    ("'total_tokens' is 1000000000000", {**honest_manifest(2 * CHUNK), "total_tokens": 10**12}),
    ("'total_tokens' is -1", {**honest_manifest(2 * CHUNK), "total_tokens": -1}),
    ("'total_tokens' must be an integer", {**honest_manifest(2 * CHUNK), "total_tokens": True}),
    ("'max_token' is 70000", {**honest_manifest(2 * CHUNK), "max_token": 70000}),
    ("--trainer gpt2", honest_manifest(2 * CHUNK, max_token=50255)),
    ("uint16", {**honest_manifest(2 * CHUNK), "token_dtype": "uint32"}),
    ("blake3 digest", {**honest_manifest(2 * CHUNK), "digest": "zz"}),
    ("'name' must be a string", {**honest_manifest(2 * CHUNK), "name": "x" * 1000}),
    ("no tokens", honest_manifest(0)),
]


def test_hostile_manifests_are_refused_at_registration_and_a_fitting_one_is_admitted(travel: Any, tmp_path: Any) -> None:
    t = _start(travel, "travel")

    async def scenario() -> None:
        async with ScriptedHolder(t, "h2", tmp_path / "h2") as h2:
            for expected, manifest in HOSTILE_MANIFESTS:
                answer = await h2.register(manifest)
                assert isinstance(answer, Refusal), (expected, answer)
                assert expected in answer.reason, answer.reason
                assert "\n" not in answer.reason
            assert isinstance(await h2.register(honest_manifest(2 * CHUNK)), Welcome)
            # Registering again with other data mid-run is refused too (the run was scheduled with the first).
            g, epoch, _ = await h2.next_grant()
            assert isinstance(await h2.register(honest_manifest(5 * CHUNK)), Refusal)
            await h2.send(TokenDecline(g.token_id, "scripted"), epoch)
            await h2.decline_until_done()  # the run must still end

    run_async(scenario(), timeout=120)
    summary = t.finish()
    assert summary["hops_trained"] == 2  # h1's two chunks
    assert "refused the registration of h2" in t.stderr()


def _huge_return(g: Any) -> TokenReturn:
    return TokenReturn(g.token_id, g.chunk_index, 2**40, 2**62, b"\0" * 32, bytes(32))


@pytest.mark.parametrize("mode", ["travel", "ship"])
def test_hostile_returns_and_segments_are_refused_before_they_size_anything(travel: Any, tmp_path: Any, mode: str) -> None:
    t = _start(travel, mode)
    rss: list[int] = []

    async def scenario() -> None:
        async with ScriptedHolder(t, "h2", tmp_path / "h2") as h2:
            assert isinstance(await h2.register(honest_manifest(2 * CHUNK)), Welcome)
            g, epoch, params = await h2.next_grant()
            await h2.send(TokenAck(g.token_id), epoch)
            seg = params.segment_size
            # Segments that do not fit this hop: wrong count, index past it, oversize blob, and
            # (in a travel hop) any ship.segment at all. None may be stored.
            for index, count, size in [(0, 10**9, 64), (10**9 - 1, 10**9, 64), (0, 1, seg + 4096), (5, 1, 16), (0, 1, 8 * CHUNK + 16)]:
                await h2.send(ShipSegment(g.token_id, index, count), epoch, blobs=[bytes(size)])
            await h2.send(_huge_return(g), epoch)
            await wait_for_text(t.run_dir / "orchestrator.err", f"returned {2**62} bytes")  # hop refused, run on
            g, epoch, _ = await h2.next_grant()  # its retry
            rss.append(peak_rss_bytes(t.orchestrator.pid))  # the orchestrator waits on our lease: it is alive
            await h2.send(TokenDecline(g.token_id, "scripted"), epoch)
            await h2.decline_until_done()

    run_async(scenario(), timeout=150)
    summary = t.finish()
    assert summary["hops_trained"] == 2, summary  # h1's chunks; none of h2's
    err = t.stderr()
    expected = ["ship-segment-outside-a-ship-hop"] if mode == "travel" else ["ship-segment-index-or-count-out-of-range", "ship-segment-wrong-size"]
    for reason in expected:
        assert reason in err, reason
    print(f"orchestrator peak RSS after hostile {mode} returns and segments: {rss[0] >> 20} MiB")
    assert rss[0] < RSS_CAP, f"orchestrator peak RSS {rss[0] >> 20} MiB"
