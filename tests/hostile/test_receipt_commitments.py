"""Chunk commitments from a hostile holder, over real sockets: malformed ones are refused, and the manifest lists only what was trained.

A real orchestrator process, an honest holder process (h1) and a scripted
holder (h2, a real node with its own key) that answers its grant with
``token.return`` messages whose commitment is empty, short, long, a
megabyte, or text, all well signed. Each is refused by the receive pipeline
(``bad-body``) before any hop machine sees it; h2 then declines. The run goes
on: h1's chunks are trained and listed in the manifest with the commitments
h1 signed, nothing of h2's is, and the orchestrator's peak RSS stays under a cap.
"""

from __future__ import annotations

import dataclasses
import json
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


def raw_return(token_id: str, chunk: int, commitment: Any) -> TokenReturn:
    """A token.return carrying any commitment value: the constructor's check is what a hostile peer skips."""
    ret = object.__new__(TokenReturn)
    values = {"token_id": token_id, "chunk_index": chunk, "segments": 1, "nbytes": CHUNK * 2, "ciphertext_digest": bytes(32), "chunk_commitment": commitment}
    for f in dataclasses.fields(TokenReturn):
        object.__setattr__(ret, f.name, values[f.name])
    return ret


HOSTILE_COMMITMENTS = [b"", bytes(31), bytes(33), bytes(1 << 20), "ab" * 32, 7, None, [bytes(32)]]


def test_malformed_commitments_are_refused_and_only_trained_hops_are_listed(travel: Any, tmp_path: Any) -> None:
    t: Travel = travel(holders=2, chunk_tokens=CHUNK, lease=60.0, steps="5", bytes_per_holder=2 * CHUNK)
    t.start_orchestrator()
    t.dep.start_holder(0)
    rss: list[int] = []

    async def scenario() -> None:
        async with ScriptedHolder(t, "h2", tmp_path / "h2") as h2:
            assert isinstance(await h2.register(honest_manifest(2 * CHUNK)), Welcome)
            g, epoch, _ = await h2.next_grant()
            await h2.send(TokenAck(g.token_id), epoch)
            for commitment in HOSTILE_COMMITMENTS:
                await h2.send(raw_return(g.token_id, g.chunk_index, commitment), epoch)
            await h2.send(TokenDecline(g.token_id, "scripted"), epoch)
            await wait_for_text(t.run_dir / "orchestrator.err", "chunk_commitment")
            rss.append(peak_rss_bytes(t.orchestrator.pid))
            await h2.decline_until_done()

    run_async(scenario(), timeout=150)
    summary = t.finish()
    assert summary["hops_trained"] == 2, summary  # h1's two chunks, none of h2's
    # Every hostile return was refused on receipt; none reached a hop.
    refused = [m for m in t.messages() if m.dir == "in" and m.sender == "h2" and m.type == "token.return"]
    assert refused and all(m.verdict.startswith("rejected") for m in refused), [m.verdict for m in refused]
    manifest = json.loads((t.run_dir / "provenance" / "manifest.json").read_text())["body"]
    assert [h["holder"] for h in manifest["hops"]] == ["h1", "h1"]
    returns = {m.epoch: m.body["chunk_commitment"].hex() for m in t.messages() if m.dir == "in" and m.type == "token.return" and m.verdict == "accepted"}
    assert [h["commitment"] for h in manifest["hops"]] == [returns[h["epoch"]] for h in manifest["hops"]]
    assert rss[0] < RSS_CAP, f"orchestrator peak RSS {rss[0] >> 20} MiB"
