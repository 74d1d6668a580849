"""The signed training manifest: which holders' chunks trained the model, in which order, into which weights.

Rules:

* Written by the orchestrator when its run completes, as
  ``RUN/provenance/manifest.json`` (atomic, never through a symlink, 0644: it
  is meant to travel with the model), signed by its identity key under
  :data:`MANIFEST_DOMAIN` (:mod:`gtbus.provenance.document`).
* It lists every hop whose chunk is in the final model (outcome ``trained``
  and not discarded by a rollback), each with its epoch, round, holder, chunk
  index, lane, byte count, the holder's chunk commitment (the holder's signed
  claim from its ``token.return``: hiding, see
  :mod:`gtbus.provenance.commitment`) and the model digest before and after.
  Hops whose training was thrown away are listed apart (``discarded``), as
  are the epochs a restart lost (``lost``), so a reader of the logs can
  account for every hop the logs call trained.
* Model digests are ``device.measure`` over the trainer's parameters (the
  measurement each hop takes): the final one is what ``gtbus export`` checks
  the exported files against. With several lanes the merges are listed too.
* Checking a manifest yields findings, one line each; an empty list means it
  checks out. Nothing here reads a log: :class:`RecordedHops` folds messages
  that the caller read and verified (``gtbus export --check --logs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import blake3

from gtbus.messages.envelope import Header
from gtbus.messages.identity import PublicIdentity
from gtbus.messages.types import CHUNK_COMMITMENT_SIZE, AttestEvidence, HopRecord, TokenGrant, TokenReturn
from gtbus.provenance.document import ProvenanceError, SignedDocument
from gtbus.provenance.ledger import MergeRecord, ProvenanceLedger

FORMAT = "gtbus training manifest v1"
MANIFEST_DOMAIN = FORMAT.encode() + b"\x00"
MANIFEST_FILE = "manifest.json"
DIGEST_SIZE = 32
TRAINED = "trained"
EVIDENCE_DOMAIN = b"gtbus evidence digest v1\x00"


def evidence_digest(kind: str, blob: bytes, nonce: bytes) -> bytes:
    """The digest by which the manifest names one piece of evidence a holder appraised (kind, nonce and blob)."""
    k = kind.encode()
    return blake3.blake3(EVIDENCE_DOMAIN + len(k).to_bytes(1, "big") + k + nonce + blob).digest()


class HopLine(Protocol):
    """What the manifest reads of a hop's record (the orchestrator's HopResult)."""

    epoch: int
    round: int
    holder: str
    chunk: int
    lane: int
    nbytes: int
    outcome: str
    discarded: bool


@dataclass(frozen=True)
class ManifestHop:
    """One trained hop as the manifest lists it."""

    epoch: int
    round: int
    holder: str
    chunk: int
    lane: int
    nbytes: int
    commitment: bytes
    model_before: bytes
    model_after: bytes

    def to_json(self) -> dict[str, Any]:
        """The hop as a manifest (and receipt) entry."""
        return {
            "epoch": self.epoch, "round": self.round, "holder": self.holder, "chunk": self.chunk, "lane": self.lane,
            "nbytes": self.nbytes, "commitment": self.commitment.hex(), "model_before": self.model_before.hex(),
            "model_after": self.model_after.hex(), "outcome": TRAINED,
        }


def build_manifest_body(
    *,
    run_id: str,
    orchestrator: PublicIdentity,
    code_measurement: bytes,
    trainer: str,
    settings: dict[str, Any],
    attestation: dict[str, Any],
    ledger: ProvenanceLedger,
    hops: Iterable[HopLine],
    final_model: bytes,
) -> dict[str, Any]:
    """The manifest's body for a run that completed (the hops: every record of the run, any outcome)."""
    listed, discarded = [], []
    for h in sorted(hops, key=lambda h: h.epoch):
        if h.outcome != TRAINED:
            continue
        if h.discarded:
            discarded.append({"epoch": h.epoch, "round": h.round, "holder": h.holder, "chunk": h.chunk})
            continue
        p = ledger.hops.get(h.epoch)
        if p is None:  # trained with no provenance: a checkpoint of an older gtbus resumed; say so, do not invent
            raise ProvenanceError(f"hop {h.epoch} ({h.holder} chunk {h.chunk}) trained but has no provenance record (resumed from an older checkpoint?)")
        listed.append(ManifestHop(h.epoch, h.round, h.holder, h.chunk, h.lane, h.nbytes, p.commitment, p.model_before, p.model_after).to_json())
    return {
        "format": FORMAT,
        "run_id": run_id,
        "orchestrator": {"name": orchestrator.name, "ed25519": orchestrator.ed25519.hex()},
        "code_measurement": code_measurement.hex(),
        "trainer": trainer,
        "settings": settings,
        "attestation": attestation,
        "initial_model": ledger.initial_model.hex(),
        "hops": listed,
        "merges": [{"merge": m.merge, "epoch": m.epoch, "epochs": list(m.epochs), "model": m.model.hex()} for m in ledger.merges],
        "discarded": discarded,
        "lost": [{"checkpoint_epoch": a, "last_issued": b} for a, b in ledger.resumes],
        "final_model": final_model.hex(),
    }


# -- reading -------------------------------------------------------------------------------


def typed_field(d: Any, key: str, kind: type, where: str) -> Any:
    """``d[key]``, which must be of ``kind`` (an int is never a bool); ProvenanceError naming it otherwise."""
    if not isinstance(d, dict) or key not in d:
        raise ProvenanceError(f"{where}: missing {key!r}")
    v = d[key]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ProvenanceError(f"{where}: {key!r} is not an integer")
    if not isinstance(v, kind):
        raise ProvenanceError(f"{where}: {key!r} is not a {kind.__name__}")
    return v


def hex_field(d: Any, key: str, size: int, where: str) -> bytes:
    """``d[key]`` as exactly ``size`` bytes of lowercase hex; ProvenanceError naming it otherwise."""
    v = typed_field(d, key, str, where)
    try:
        raw = bytes.fromhex(v)
    except ValueError:
        raise ProvenanceError(f"{where}: {key!r} is not hex") from None
    if len(raw) != size or raw.hex() != v:
        raise ProvenanceError(f"{where}: {key!r} is not {size} bytes of lowercase hex")
    return raw


def count_field(d: Any, key: str, where: str) -> int:
    """``d[key]`` as a non-negative integer below 2**63."""
    v = typed_field(d, key, int, where)
    if not 0 <= v < 1 << 63:
        raise ProvenanceError(f"{where}: {key!r} out of range")
    return int(v)


def parse_hop(d: Any, where: str) -> ManifestHop:
    """One hop entry of a manifest or receipt (every field typed and bounded)."""
    if isinstance(d, dict) and d.get("outcome") != TRAINED:
        raise ProvenanceError(f"{where}: outcome is not {TRAINED!r}")
    holder = typed_field(d, "holder", str, where)
    if not 0 < len(holder) <= 63:
        raise ProvenanceError(f"{where}: holder name of bad length")
    return ManifestHop(
        epoch=count_field(d, "epoch", where), round=count_field(d, "round", where), holder=holder,
        chunk=count_field(d, "chunk", where), lane=count_field(d, "lane", where), nbytes=count_field(d, "nbytes", where),
        commitment=hex_field(d, "commitment", CHUNK_COMMITMENT_SIZE, where),
        model_before=hex_field(d, "model_before", DIGEST_SIZE, where), model_after=hex_field(d, "model_after", DIGEST_SIZE, where),
    )


@dataclass(frozen=True)
class Manifest:
    """A manifest read from its signed document, every field checked for type and size."""

    doc: SignedDocument
    run_id: str
    orchestrator: str
    orchestrator_key: bytes
    trainer: str
    initial_model: bytes
    final_model: bytes
    hops: tuple[ManifestHop, ...]
    merges: tuple[MergeRecord, ...]
    discarded: tuple[tuple[int, str, int, int], ...]  # (epoch, holder, chunk, round)
    lost: tuple[tuple[int, int], ...]
    settings: dict[str, Any] = field(default_factory=dict)
    evidence: tuple[tuple[str, str, bytes], ...] = ()  # (holder, kind, digest) of the evidence each holder was given

    @property
    def body(self) -> dict[str, Any]:
        """The signed body, as read."""
        return self.doc.body


def parse_manifest(doc: SignedDocument, source: str) -> Manifest:
    """The manifest in ``doc`` (its signature not yet checked); ProvenanceError naming ``source`` and the field."""
    b = doc.body
    if b.get("format") != FORMAT:
        raise ProvenanceError(f"{source}: not a {FORMAT} (format {str(b.get('format'))[:40]!r})")
    orch = typed_field(b, "orchestrator", dict, source)
    hops = typed_field(b, "hops", list, source)
    merges = typed_field(b, "merges", list, source)
    discarded = typed_field(b, "discarded", list, source)
    lost = typed_field(b, "lost", list, source)
    attestation = typed_field(b, "attestation", dict, source)
    evidence = typed_field(attestation, "evidence", list, f"{source}: attestation")
    return Manifest(
        doc=doc,
        run_id=typed_field(b, "run_id", str, source),
        orchestrator=typed_field(orch, "name", str, f"{source}: orchestrator"),
        orchestrator_key=hex_field(orch, "ed25519", 32, f"{source}: orchestrator"),
        trainer=typed_field(b, "trainer", str, source),
        initial_model=hex_field(b, "initial_model", DIGEST_SIZE, source),
        final_model=hex_field(b, "final_model", DIGEST_SIZE, source),
        hops=tuple(parse_hop(h, f"{source}: hop {i}") for i, h in enumerate(hops)),
        merges=tuple(
            MergeRecord(count_field(m, "merge", w), count_field(m, "epoch", w),
                        tuple(int(e) for e in typed_field(m, "epochs", list, w) if isinstance(e, int) and not isinstance(e, bool)),
                        hex_field(m, "model", DIGEST_SIZE, w))
            for i, m in enumerate(merges) for w in [f"{source}: merge {i}"]
        ),
        discarded=tuple(
            (count_field(d, "epoch", w), typed_field(d, "holder", str, w), count_field(d, "chunk", w), count_field(d, "round", w))
            for i, d in enumerate(discarded) for w in [f"{source}: discarded {i}"]
        ),
        lost=tuple((count_field(x, "checkpoint_epoch", w), count_field(x, "last_issued", w)) for i, x in enumerate(lost) for w in [f"{source}: lost {i}"]),
        settings=typed_field(b, "settings", dict, source),
        evidence=tuple(
            (typed_field(e, "holder", str, w), typed_field(e, "kind", str, w), hex_field(e, "digest", DIGEST_SIZE, w))
            for i, e in enumerate(evidence) for w in [f"{source}: attestation evidence {i}"]
        ),
    )


# -- checks ----------------------------------------------------------------------------------


def check_signature(m: Manifest, pinned: bytes | None = None) -> list[str]:
    """The signature verifies under the key the manifest names, and that key is ``pinned`` (when given)."""
    findings = []
    if pinned is not None and pinned != m.orchestrator_key:
        findings.append(f"manifest is signed for orchestrator key {m.orchestrator_key.hex()[:16]}..., not the pinned {pinned.hex()[:16]}...")
    if not m.doc.verify(MANIFEST_DOMAIN, m.orchestrator_key):
        findings.append(f"manifest signature does not verify under orchestrator {m.orchestrator!r}'s key (the manifest was changed, or not signed by it)")
    return findings


def check_consistency(m: Manifest) -> list[str]:
    """What a manifest must say of itself: each chunk once per round, epochs unique, every model digest explained."""
    findings = []
    seen: set[tuple[int, str, int]] = set()
    epochs: set[int] = set()
    for h in m.hops:
        key = (h.round, h.holder, h.chunk)
        if key in seen:
            findings.append(f"manifest lists {h.holder} chunk {h.chunk} twice in round {h.round}")
        seen.add(key)
        if h.epoch in epochs:
            findings.append(f"manifest lists epoch {h.epoch} twice")
        epochs.add(h.epoch)
    # Every model a hop started from is the initial model, an earlier listed hop's result, or a merge.
    known = {m.initial_model}
    merges = sorted(m.merges, key=lambda r: r.epoch)
    mi = 0
    for h in sorted(m.hops, key=lambda h: h.epoch):
        while mi < len(merges) and merges[mi].epoch < h.epoch:
            known.add(merges[mi].model)
            mi += 1
        if h.model_before not in known:
            findings.append(f"hop {h.epoch} ({h.holder} chunk {h.chunk}) starts from model {h.model_before.hex()[:16]}..., which no earlier hop or merge produced")
        known.add(h.model_after)
    known.update(r.model for r in merges)
    if m.final_model not in known:
        findings.append(f"final model {m.final_model.hex()[:16]}... is not the result of any listed hop or merge")
    return findings


def check_model(m: Manifest, model_digest: bytes) -> list[str]:
    """The model file's digest (recomputed from the files) is the manifest's final model."""
    if model_digest != m.final_model:
        return [f"model digest {model_digest.hex()[:16]}... is not the manifest's final model {m.final_model.hex()[:16]}... (the model file was changed, or is another run's)"]
    return []


@dataclass
class RecordedHop:
    """One hop as the orchestrator's log records it: its grant, the holder's first return, the published outcome."""

    epoch: int
    run_id: str
    holder: str
    chunk: int
    returned: TokenReturn | None = None
    outcome: str | None = None


class RecordedHops:
    """Folds the orchestrator's verified message records, in order, into the hops the logs prove.

    Only what the orchestrator sent, or accepted from the holder the epoch was
    granted to, counts; the caller reads and verifies the logs.
    """

    def __init__(self) -> None:
        self.hops: dict[int, RecordedHop] = {}
        self.evidence: set[tuple[str, str, bytes]] = set()  # (holder, kind, digest) of every attest.evidence sent

    def feed(self, direction: str, header: Header, msg: object) -> None:
        """One accepted record: ``direction`` is ``in`` or ``out`` of the orchestrator."""
        if isinstance(msg, TokenGrant) and direction == "out":
            self.hops.setdefault(header.epoch, RecordedHop(header.epoch, msg.run_id, msg.holder, msg.chunk_index))
        elif isinstance(msg, TokenReturn) and direction == "in":
            hop = self.hops.get(header.epoch)
            if hop is not None and hop.returned is None and header.sender == hop.holder:
                hop.returned = msg
        elif isinstance(msg, HopRecord) and direction == "out":
            hop = self.hops.get(msg.epoch)
            if hop is not None and hop.outcome is None:
                hop.outcome = msg.outcome
        elif isinstance(msg, AttestEvidence) and direction == "out":
            e = msg.evidence
            kind, blob, nonce = e.get("kind"), e.get("blob"), e.get("nonce")
            if isinstance(kind, str) and isinstance(blob, bytes) and isinstance(nonce, bytes):
                self.evidence.add((header.recipient, kind, evidence_digest(kind, blob, nonce)))


def check_logs(m: Manifest, recorded: RecordedHops) -> list[str]:
    """Every listed hop is a holder-signed return the logs hold, and every hop the logs call trained is accounted for."""
    findings = []
    listed = {h.epoch for h in m.hops}
    for h in m.hops:
        r = recorded.hops.get(h.epoch)
        where = f"hop {h.epoch} ({h.holder} chunk {h.chunk})"
        if r is None:
            findings.append(f"{where}: no grant of epoch {h.epoch} in the logs")
            continue
        if (r.holder, r.chunk, r.run_id) != (h.holder, h.chunk, m.run_id):
            findings.append(f"{where}: the logs granted epoch {h.epoch} to {r.holder} chunk {r.chunk} of run {r.run_id}")
            continue
        if r.returned is None:
            findings.append(f"{where}: no token.return from {h.holder} for epoch {h.epoch} in the logs")
        elif r.returned.chunk_commitment != h.commitment:
            findings.append(f"{where}: commitment {h.commitment.hex()[:16]}... is not the {r.returned.chunk_commitment.hex()[:16]}... {h.holder} signed")
        elif r.returned.nbytes != h.nbytes or r.returned.chunk_index != h.chunk:
            findings.append(f"{where}: {h.nbytes} bytes, but {h.holder} returned {r.returned.nbytes} bytes of chunk {r.returned.chunk_index}")
        if r.outcome != TRAINED:
            findings.append(f"{where}: the logs' hop record says {r.outcome or 'nothing'}, not {TRAINED}")
    accounted = listed | {d[0] for d in m.discarded}
    for r in sorted(recorded.hops.values(), key=lambda r: r.epoch):
        if r.outcome != TRAINED or r.epoch in accounted:
            continue
        if any(a < r.epoch <= b for a, b in m.lost):
            continue  # trained before a crash the checkpoint did not hold: not in the model, and the manifest says so
        findings.append(f"hop {r.epoch} ({r.holder} chunk {r.chunk}) trained according to the logs, but the manifest does not list it")
    for epoch, holder, chunk, _ in m.discarded:
        r = recorded.hops.get(epoch)
        if r is None or r.outcome != TRAINED or (r.holder, r.chunk) != (holder, chunk):
            findings.append(f"discarded hop {epoch} ({holder} chunk {chunk}) is not a trained hop of the logs")
    for holder, kind, digest in m.evidence:
        if (holder, kind, digest) not in recorded.evidence:
            findings.append(f"the {kind[:32]!r} evidence the manifest says {holder} appraised ({digest.hex()[:16]}...) was never sent to it in the logs")
    return findings
