"""A hostile orchestrator's receipts against a real holder process: each refused in one line, nothing stored.

The orchestrator here is scripted from gtbus's own classes with the
deployment's real orchestrator key, platform key and ZeroMQ server transport
(so its Welcome, evidence and receipts are as authentic as an honest one's:
only the values are hostile). The holder is the real ``gtbus holder`` process.
It registers, appraises the evidence, and then gets receipts: for another
run, for another holder's chunks, a list longer than its chunks allow, wrong
types, a commitment it did not make, another signing key, another addressee.
Each is refused with one line in its log and no file; then an honest receipt
is stored, so the holder was listening all along, and a second, different
one does not replace it. Its peak memory stays
under a stated cap.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy
import pytest
from process_memory import peak_rss_bytes
from scripted_holder import wait_for_text
from scripted_orchestrator import ScriptedOrchestrator
from travel_kit import Travel

from gtbus.messages.identity import NodeIdentity, load_identity
from gtbus.messages.types import RunReceipt, Shutdown
from gtbus.provenance.commitment import chunk_commitment, commitment_key
from gtbus.provenance.document import read_document, sign_document
from gtbus.provenance.receipt import RECEIPT_DOMAIN
from gtbus.testing import eventually, run_async
from gtbus.training.shards import Dataset

pytestmark = pytest.mark.slow

RUN_ID = "hostile-receipts-1"
CHUNK = 16384
#: The holder process's memory cap while it judges every receipt (its Python, numpy and sockets take ~120 MiB).
HOLDER_RSS_CAP = 400 << 20
REFUSED = "h1: refused the orchestrator's receipt: "


def hop(chunk: int, commitment: bytes, **more: Any) -> dict[str, Any]:
    entry = {"epoch": 1 + chunk, "round": 0, "holder": "h1", "chunk": chunk, "lane": 0, "nbytes": CHUNK * 2,
             "commitment": commitment.hex(), "model_before": "aa" * 32, "model_after": "bb" * 32, "outcome": "trained"}
    entry.update(more)
    return entry


def body(hops: list[Any], **more: Any) -> dict[str, Any]:
    b = {"format": "gtbus holder receipt v1", "run_id": RUN_ID, "holder": "h1", "orchestrator": {"name": "orch", "ed25519": ""},
         "manifest": "cc" * 32, "final_model": "bb" * 32, "outcome": "run complete", "hops": hops}
    b.update(more)
    return b


class ReceiptOrchestrator(ScriptedOrchestrator):
    """Signs receipts as the deployment's orchestrator (or as ``key``)."""

    def signed(self, b: dict[str, Any], key: NodeIdentity | None = None) -> dict[str, Any]:
        signer = key or self.identity
        if not b.get("orchestrator", {}).get("ed25519") and isinstance(b.get("orchestrator"), dict):
            b["orchestrator"]["ed25519"] = signer.public.ed25519.hex()
        return sign_document(signer, RECEIPT_DOMAIN, b).to_json()


def test_hostile_receipts_are_refused_and_nothing_is_stored(travel: Any) -> None:
    t: Travel = travel(holders=2, chunk_tokens=CHUNK, bytes_per_holder=32 * 1024)  # h1: two chunks
    h1_key = load_identity(t.dep.keys / "h1.key")
    tokens = Dataset([t.dep.shards[0]]).chunk(0, CHUNK)
    own = chunk_commitment(commitment_key(bytes(h1_key.signing_key), RUN_ID), memoryview(numpy.ascontiguousarray(tokens, dtype="<u2")).cast("B"))
    err = t.run_dir / "h1.err"
    receipts = t.run_dir / "receipts" / "h1"
    forger = NodeIdentity.generate("orch", "orchestrator")

    async def scenario() -> None:
        orch = ReceiptOrchestrator(t, RUN_ID, CHUNK)
        await orch.rt.start()
        proc = t.dep.start_holder(0)
        try:
            await wait_for_text(err, "evidence appraised")
            hostile: list[tuple[str, dict[str, Any]]] = [
                ("is for run", orch.signed(body([hop(0, own)], run_id="another-run"))),
                ("names holder 'h2', not h1", orch.signed(body([hop(0, own, holder="h2")]))),
                ("more than this holder's 2 chunks", orch.signed(body([hop(0, own, epoch=i) for i in range(2000)]))),
                ("is not a list", orch.signed(body("x"))),  # type: ignore[arg-type]
                ("'epoch' is not an integer", orch.signed(body([hop(0, own, epoch="1")]))),
                ("'commitment' is not 32 bytes", orch.signed(body([hop(0, own[:31])]))),
                ("'epoch' out of range", orch.signed(body([hop(0, own, epoch=-1)]))),
                ("h1 computes from its data", orch.signed(body([hop(1, own)]))),  # chunk 1 with chunk 0's commitment
                ("has no chunk 9", orch.signed(body([hop(9, own)]))),
                ("listed twice in round 0", orch.signed(body([hop(0, own), hop(0, own, epoch=7)]))),
                ("not signed by the orchestrator's pinned key", orch.signed(body([hop(0, own)]), key=forger)),
                ("addressed to 'h2'", orch.signed(body([], holder="h2"))),
                ("signature is not 64 bytes", {"body": body([]), "signature": 5}),
                ("not a signed gtbus document", {"receipt": "of nothing"}),
                ("signature is not 64 bytes", {"body": body([]), "signature": "00"}),
            ]
            edited = orch.signed(body([hop(0, own)]))
            edited["body"]["hops"][0]["nbytes"] = 2  # changed after signing
            hostile.append(("not signed by the orchestrator's pinned key", edited))
            for n, (expect, receipt) in enumerate(hostile, 1):
                await orch.rt.send(RunReceipt(receipt), "h1")
                await eventually(lambda: err.read_text(errors="replace").count(REFUSED) >= n, timeout=30, what=f"refusal {n} ({expect})")
                last = [line for line in err.read_text(errors="replace").splitlines() if line.startswith(REFUSED)][-1]
                assert expect in last, (expect, last)
                assert not receipts.exists() or not any(receipts.iterdir())
            assert peak_rss_bytes(proc.pid) < HOLDER_RSS_CAP
            # An honest receipt after all that: the holder checks it and keeps it.
            honest = orch.signed(body([hop(0, own)]))
            await orch.rt.send(RunReceipt(honest), "h1")
            await wait_for_text(err, f"receipt of run {RUN_ID} checked and stored")
            # A second, different receipt of the run, signed all the same, does not replace the first.
            await orch.rt.send(RunReceipt(orch.signed(body([]))), "h1")
            await wait_for_text(err, f"a different receipt of run {RUN_ID} is already stored")
            await orch.rt.publish(Shutdown("test over"))
            await eventually(lambda: proc.poll() is not None, timeout=30, what="the holder's exit")
        finally:
            await orch.rt.close()

    run_async(scenario(), timeout=120)
    stored = list(receipts.iterdir())
    assert [p.name for p in stored] == [f"{RUN_ID}.json"]
    assert stored[0].stat().st_mode & 0o777 == 0o600
    assert json.loads(stored[0].read_text()) == read_document(stored[0]).to_json()
    assert read_document(stored[0]).body["hops"][0]["commitment"] == own.hex()
    assert "Traceback" not in err.read_text(errors="replace")
