"""A holder of a fleet (``--gpus 2``) speaking for a lane it was not granted.

A real orchestrator process with two lanes, one honest holder process (h1) and
one scripted holder (h2, a real node with a valid key) that, holding a grant
of one lane, sends acks and returns that name the *other* lane's token, a
token of no lane (short, long, not a lane's name), its own token with a stale
or huge epoch. Each is ignored with the token's reason (the message goes to
the lane its token id names, and that lane's token fences it); h2's own hop
is unaffected until it declines. The run goes on: h1's chunks are trained,
nothing of h2's is, and the orchestrator's peak RSS stays under ``RSS_CAP``.
"""

from __future__ import annotations

from typing import Any

import pytest
from process_memory import peak_rss_bytes
from scripted_holder import ScriptedHolder, honest_manifest, wait_for_text
from travel_kit import Travel

from gtbus.messages.types import TokenAck, TokenDecline, TokenReturn, Welcome
from gtbus.testing import run_async

pytestmark = pytest.mark.slow

RSS_CAP = 400 << 20
CHUNK = 4096


def test_messages_naming_another_lane_or_no_lane_are_ignored(travel: Any, tmp_path: Any) -> None:
    t: Travel = travel(holders=2, chunk_tokens=CHUNK, lease=60.0, steps="5", bytes_per_holder=2 * CHUNK, gpus=2)
    t.start_orchestrator()
    t.dep.start_holder(0)  # h1 is honest; h2 is the scripted one
    rss: list[int] = []
    epoch_seen: list[int] = []

    async def scenario() -> None:
        async with ScriptedHolder(t, "h2", tmp_path / "h2") as h2:
            assert isinstance(await h2.register(honest_manifest(2 * CHUNK)), Welcome)
            g, epoch, _ = await h2.next_grant()
            epoch_seen.append(epoch)
            assert g.token_id in ("gpu0", "gpu1")
            other = "gpu1" if g.token_id == "gpu0" else "gpu0"
            await h2.send(TokenAck(g.token_id), epoch)
            right = (g.chunk_index, 1, 2 * CHUNK)
            for token_id, e in [(other, epoch), ("gpu2", epoch), ("x" * 4000, epoch), ("", epoch), (g.token_id, epoch - 1), (g.token_id, 2**62)]:
                await h2.send(TokenAck(token_id), e)
                await h2.send(TokenReturn(token_id, *right, b"\0" * 32, bytes(32)), e)
            await wait_for_text(t.run_dir / "orchestrator.err", "unknown token 'xxxxxxxxxxxxxxxx'")
            rss.append(peak_rss_bytes(t.orchestrator.pid))
            # Its own hop is still its own: the decline ends it (declined, not rejected or revoked).
            await h2.send(TokenDecline(g.token_id, "scripted"), epoch)
            await h2.decline_until_done()

    run_async(scenario(), timeout=150)
    summary = t.finish()
    hops = t.hops()
    assert summary["hops_trained"] == 2 and {h["holder"] for h in hops if h["outcome"] == "trained"} == {"h1"}
    assert {h["outcome"] for h in hops if h["holder"] == "h2"} == {"declined"}
    err = t.stderr()
    assert "ignored return from h2: unknown token 'gpu2'" in err
    assert "ignored return from h2: unknown token ''" in err
    # The other lane's token, its own token at a stale or huge epoch: each fenced by the token it names.
    assert err.count("ignored return from h2: epoch ") == 3 and f"epoch {2**62} is not the current epoch {epoch_seen[0]}" in err
    assert "x" * 17 not in err  # a peer's long token id is cut before it is logged
    assert "Traceback" not in err
    print(f"orchestrator peak RSS with a holder speaking for the other lane: {rss[0] >> 20} MiB")
    assert rss[0] < RSS_CAP
