"""A holder's receipt of its own hops, how the holder accepts one, and how it checks a manifest with it.

Rules:

* At the end of a run the orchestrator sends each holder, directly, a
  ``run.receipt``: a document signed on its own under
  :data:`RECEIPT_DOMAIN` (the envelope's signature is not portable), holding
  that holder's trained hops only (epoch, round, chunk, byte count, its chunk
  commitment, the model digests around the hop), the run id, the final
  model's digest and the digest of the manifest it goes with. Nothing of
  another holder's hops.
* The holder accepts a receipt only if every value checks: signed by the
  orchestrator key it pins, for the run it registered with, addressed to it,
  no more entries than its chunks times the rounds (checked before any entry
  is read), each entry its own chunk, no chunk twice in a round, and each
  commitment the one it computes from its own data. Otherwise it refuses
  with one line and keeps nothing; accepted, the receipt is stored atomically.
* The holder's check of a manifest (``gtbus holder-receipt check``): both
  signatures, the receipt's manifest digest, every hop of the receipt listed
  in the manifest with the same commitment, no hop of this holder in the
  manifest that the receipt lacks, none of its chunks twice in a round, none
  it does not have, and every commitment recomputed from its data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import blake3

from gtbus.provenance.commitment import CommitmentOf
from gtbus.provenance.document import ProvenanceError, SignedDocument, canonical, document_from_json
from gtbus.provenance.manifest import (
    DIGEST_SIZE,
    MANIFEST_DOMAIN,
    Manifest,
    ManifestHop,
    typed_field,
    hex_field,
    parse_hop,
)

FORMAT = "gtbus holder receipt v1"
RECEIPT_DOMAIN = FORMAT.encode() + b"\x00"
#: Run ids a holder names a receipt file after (anything else is refused: the id is the orchestrator's word).
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def manifest_digest(m: SignedDocument) -> bytes:
    """The digest a receipt names its manifest by: BLAKE3 over the manifest's domain and canonical body."""
    return blake3.blake3(MANIFEST_DOMAIN + canonical(m.body)).digest()


def receipt_body(manifest: Manifest, holder: str) -> dict[str, Any]:
    """``holder``'s receipt of ``manifest`` (its own hops only)."""
    return {
        "format": FORMAT,
        "run_id": manifest.run_id,
        "holder": holder,
        "orchestrator": {"name": manifest.orchestrator, "ed25519": manifest.orchestrator_key.hex()},
        "manifest": manifest_digest(manifest.doc).hex(),
        "final_model": manifest.final_model.hex(),
        "outcome": "run complete",
        "hops": [h.to_json() for h in manifest.hops if h.holder == holder],
    }


@dataclass(frozen=True)
class Receipt:
    """A receipt read from its signed document, every field checked for type and size (not yet its signature)."""

    doc: SignedDocument
    run_id: str
    holder: str
    orchestrator_key: bytes
    manifest: bytes
    final_model: bytes
    hops: tuple[ManifestHop, ...]


def parse_receipt(doc: SignedDocument, source: str, *, max_hops: int) -> Receipt:
    """The receipt in ``doc``; ProvenanceError naming the field. ``max_hops`` is checked before any entry is read."""
    b = doc.body
    if b.get("format") != FORMAT:
        raise ProvenanceError(f"{source}: not a {FORMAT} (format {str(b.get('format'))[:40]!r})")
    hops = typed_field(b, "hops", list, source)
    if len(hops) > max_hops:
        raise ProvenanceError(f"{source}: {len(hops)} hops, more than this holder's {max_hops} chunks times rounds")
    orch = typed_field(b, "orchestrator", dict, source)
    return Receipt(
        doc=doc,
        run_id=typed_field(b, "run_id", str, source),
        holder=typed_field(b, "holder", str, source),
        orchestrator_key=hex_field(orch, "ed25519", 32, f"{source}: orchestrator"),
        manifest=hex_field(b, "manifest", DIGEST_SIZE, source),
        final_model=hex_field(b, "final_model", DIGEST_SIZE, source),
        hops=tuple(parse_hop(h, f"{source}: hop {i}") for i, h in enumerate(hops)),
    )


def _own_hop_findings(hops: Sequence[ManifestHop], holder: str, commitment_of: CommitmentOf, what: str) -> list[str]:
    findings = []
    seen: set[tuple[int, int]] = set()
    for h in hops:
        where = f"{what} hop {h.epoch} (chunk {h.chunk}, round {h.round})"
        if h.holder != holder:
            findings.append(f"{where} names holder {h.holder[:63]!r}, not {holder}")
            continue
        if (h.round, h.chunk) in seen:
            findings.append(f"{where}: chunk {h.chunk} listed twice in round {h.round}")
        seen.add((h.round, h.chunk))
        own = commitment_of(h.chunk)
        if own is None:
            findings.append(f"{where}: {holder} has no chunk {h.chunk}")
        elif own != h.commitment:
            findings.append(f"{where}: commitment {h.commitment.hex()[:16]}... is not the {own.hex()[:16]}... {holder} computes from its data")
    return findings


def accept_receipt(
    data: Any, *, holder: str, run_id: str, orchestrator_key: bytes, max_hops: int, commitment_of: CommitmentOf
) -> Receipt:
    """The receipt a holder was sent, if it checks out in every value; else ProvenanceError (one line)."""
    if not RUN_ID_RE.fullmatch(run_id):
        raise ProvenanceError(f"run id {run_id[:40]!r} cannot name a receipt file")
    r = parse_receipt(document_from_json(data, "receipt"), "receipt", max_hops=max_hops)
    # The signature before anything that costs more: the commitments hash the holder's data.
    if r.orchestrator_key != orchestrator_key or not r.doc.verify(RECEIPT_DOMAIN, orchestrator_key):
        raise ProvenanceError("receipt is not signed by the orchestrator's pinned key")
    if r.run_id != run_id:
        raise ProvenanceError(f"receipt is for run {r.run_id[:40]!r}, not {run_id}")
    if r.holder != holder:
        raise ProvenanceError(f"receipt is addressed to {r.holder[:63]!r}, not {holder}")
    findings = _own_hop_findings(r.hops, holder, commitment_of, "receipt")
    if findings:
        raise ProvenanceError(findings[0] + (f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""))
    return r


def check_with_receipt(manifest: Manifest, receipt: Receipt, holder: str, orchestrator_key: bytes, commitment_of: CommitmentOf) -> list[str]:
    """A holder's check of ``manifest`` against its ``receipt`` and its own data: one line per finding."""
    findings = []
    if receipt.orchestrator_key != orchestrator_key or not receipt.doc.verify(RECEIPT_DOMAIN, orchestrator_key):
        findings.append("receipt signature does not verify under the orchestrator's pinned key")
    if manifest.orchestrator_key != orchestrator_key or not manifest.doc.verify(MANIFEST_DOMAIN, orchestrator_key):
        findings.append("manifest signature does not verify under the orchestrator's pinned key")
    if receipt.holder != holder:
        findings.append(f"receipt is addressed to {receipt.holder[:63]!r}, not {holder}")
    if receipt.run_id != manifest.run_id:
        findings.append(f"receipt is for run {receipt.run_id[:40]!r}, the manifest for run {manifest.run_id[:40]!r}")
    if receipt.manifest != manifest_digest(manifest.doc):
        findings.append("receipt names another manifest (its manifest digest differs)")
    if receipt.final_model != manifest.final_model:
        findings.append("receipt and manifest name different final models")
    mine = [h for h in manifest.hops if h.holder == holder]
    findings += _own_hop_findings(receipt.hops, holder, commitment_of, "receipt")
    findings += _own_hop_findings(mine, holder, commitment_of, "manifest")
    got = {h.epoch: h for h in mine}
    for h in receipt.hops:
        m = got.get(h.epoch)
        if m is None:
            findings.append(f"receipt hop {h.epoch} (chunk {h.chunk}) is not in the manifest")
        elif m != h:
            findings.append(f"receipt hop {h.epoch} (chunk {h.chunk}) differs from the manifest's")
    receipted = {h.epoch for h in receipt.hops}
    for h in mine:
        if h.epoch not in receipted:
            findings.append(f"manifest hop {h.epoch} (chunk {h.chunk}, round {h.round}) names {holder} but is not in its receipt")
    return findings
