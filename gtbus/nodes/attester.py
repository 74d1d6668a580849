"""The orchestrator's side of attestation: answer a holder's attest.request with evidence for its nonce.

Each kind the orchestrator can give (``emulated`` always: its platform key; a
hardware kind where this host has it) is a :class:`~gtbus.attest.Verifier`
whose :meth:`collect` binds the holder's nonce. A kind this host cannot give, or
a collect that fails, is answered with a Refusal of one line, never silence:
the holder then stops with that reason instead of waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from gtbus.attest import AttestationError, Verifier
from gtbus.messages.pipeline import Accepted
from gtbus.messages.types import AttestEvidence, AttestRequest, Refusal
from gtbus.nodes.runtime import NodeRuntime
from gtbus.provenance.manifest import evidence_digest
from gtbus.transport.base import Delivery


class EvidenceServer:
    """Answers attest.request on ``runtime`` with the evidence of the kind asked for."""

    def __init__(self, runtime: NodeRuntime, attesters: Mapping[str, Verifier]) -> None:
        self.rt = runtime
        self.attesters = dict(attesters)
        self.log = logging.getLogger(f"gtbus.attester.{runtime.name}")
        # (node, kind) -> digest of the last evidence given to it: the training manifest binds them (bounded by roster x kinds)
        self.given: dict[tuple[str, str], bytes] = {}
        runtime.on(AttestRequest, self._on_request)

    async def _on_request(self, acc: Accepted[AttestRequest], delivery: Delivery) -> None:
        req, sender = acc.message, acc.header.sender
        attester = self.attesters.get(req.kind)
        try:
            if attester is None:
                raise AttestationError(f"this orchestrator gives no {req.kind[:32]!r} evidence (it gives: {', '.join(sorted(self.attesters))})")
            evidence = attester.collect(req.nonce)
        except AttestationError as exc:
            self.log.warning("no evidence for %s: %s", sender, exc)
            await self.rt.send(Refusal("attestation-unavailable", str(exc)[:300]), sender, parent=acc.header.id)
            return
        await self.rt.send(AttestEvidence(dict(evidence.to_wire())), sender, parent=acc.header.id)
        self.given[(sender, evidence.kind)] = evidence_digest(evidence.kind, evidence.blob, evidence.nonce)
