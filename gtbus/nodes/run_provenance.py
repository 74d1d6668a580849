"""The orchestrator's end of a run's provenance: the signed manifest written, each holder's receipt sent.

Rules (the formats are :mod:`gtbus.provenance`'s):

* The manifest is written once the run completed, after the last merge and
  checkpoint, as ``RUN/provenance/manifest.json``; its final model digest is
  ``device.measure`` over the serving replica's parameters at that point,
  which is the model the checkpoint (and so ``gtbus export``) holds.
* The attestation binding says what the holders appraised: the evidence kinds
  this orchestrator gives, its platform key, the code measurement and the
  report data binding the run. Only the emulated platform key exists here; the
  manifest says ``emulated: true`` until a hardware kind is wired in.
* Each holder of the run is sent its receipt directly (never broadcast),
  before the run's end is announced; a holder that cannot be reached is
  logged and skipped: the run does not wait for receipts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gtbus.attest import run_binding
from gtbus.errors import GtbusError
from gtbus.messages.envelope import Limits
from gtbus.messages.types import RunReceipt
from gtbus.provenance.document import sign_document, write_document
from gtbus.provenance.manifest import MANIFEST_DOMAIN, MANIFEST_FILE, Manifest, build_manifest_body, parse_manifest
from gtbus.provenance.receipt import RECEIPT_DOMAIN, receipt_body
from gtbus.training.trainer import StepsPer

if TYPE_CHECKING:  # the shell whose run this is; imported for types only
    from gtbus.nodes.orchestrator import Orchestrator


#: The most hops one receipt message may carry (the wire's longest array).
MAX_RECEIPT_HOPS = Limits().max_array


def manifest_path(run_dir: Path) -> Path:
    """Where a run's signed manifest is written."""
    return run_dir / "provenance" / MANIFEST_FILE


def run_settings(orch: Orchestrator) -> dict[str, Any]:
    """The training settings the manifest states (integers and strings only)."""
    cfg = orch.config
    steps = cfg.steps_per_hop
    return {
        "chunk_tokens": cfg.chunk_tokens,
        "steps_per_hop": f"per:{steps.tokens}" if isinstance(steps, StepsPer) else str(steps),
        "rounds": cfg.rounds,
        "mode": cfg.mode,
        "suite": cfg.suite,
        "segment_size": cfg.segment,
        "gpus": len(orch.lanes),
        "merge": orch.merge.name,
        "merge_every": cfg.merge_interval,
        "checkpoint_every": cfg.checkpoint_every,
        "backend": orch.device.array_module.__name__,
    }


def attestation_binding(orch: Orchestrator) -> dict[str, Any]:
    """What the holders appraised before provisioning, bound into the signed manifest."""
    kinds = sorted(orch.evidence.attesters)
    return {
        "kinds": kinds,
        "emulated": kinds == ["emulated"],  # a software platform key: no TEE hardware vouches for it
        "platform_key": orch.platform.public_key.hex(),
        "measurements": {"code": orch.code_hash.hex()},
        "report_data": run_binding(orch.run_id).hex(),
        # the evidence each holder of the run was last given for its own nonce (and appraised before its first hop)
        "evidence": [{"holder": h, "kind": k, "digest": d.hex()} for (h, k), d in sorted(orch.evidence.given.items()) if h in orch.config.holders],
    }


def write_run_manifest(orch: Orchestrator) -> Manifest:
    """Sign and write the completed run's manifest; return it as read back."""
    live = next(lane for lane in orch.lanes if lane.failed is None)
    body = build_manifest_body(
        run_id=orch.run_id,
        orchestrator=orch.rt.identity.public,
        code_measurement=orch.code_hash,
        trainer=orch.config.trainer,
        settings=run_settings(orch),
        attestation=attestation_binding(orch),
        ledger=orch.provenance,
        hops=orch.hops,
        final_model=live.measure_model(),
    )
    doc = sign_document(orch.rt.identity, MANIFEST_DOMAIN, body)
    path = manifest_path(orch.config.run_dir)
    write_document(path, doc)
    orch.log.info("wrote the signed training manifest %s: %d trained hops", path, len(body["hops"]))
    return parse_manifest(doc, str(path))


async def send_receipts(orch: Orchestrator, manifest: Manifest) -> None:
    """Send each holder of the run its own receipt (no answer is awaited)."""
    for holder in orch.config.holders:
        body = receipt_body(manifest, holder)
        if len(body["hops"]) > MAX_RECEIPT_HOPS:
            orch.log.warning("no receipt for %s: %d hops do not fit one message (it can check the manifest with its data)", holder, len(body["hops"]))
            continue
        doc = sign_document(orch.rt.identity, RECEIPT_DOMAIN, body)
        try:
            await orch.rt.send(RunReceipt(doc.to_json()), holder)
        except GtbusError as exc:  # gone (refused the run, killed): it can still check the manifest with its data
            orch.log.warning("receipt not delivered to %s: %s", holder, exc)
