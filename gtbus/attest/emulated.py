"""The emulated kind: the platform key (Ed25519) stands in for the hardware's attestation key.

Evidence is ``msgpack([body, signature])`` where ``body`` is
``msgpack([nonce, measurements, versions, report_data])`` and the signature is
the platform key's over ``EVIDENCE_DOMAIN || body`` (a domain apart from the
per-hop measurement reports). The appraiser's policy lists the platform public
keys it accepts as its ``roots`` and pins measurements by name (``code``: what
``gtbus measure`` prints).

Emulated evidence has no certificates, so there is nothing to revoke and its
claims never expire by themselves (``not_after`` is infinite); each appraisal
is made fresh by the nonce.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from gtbus.attest.verifier import (
    Claims,
    Evidence,
    Policy,
    RevocationSource,
    require_min_versions,
    require_nonce,
    require_pinned,
)
from gtbus.gpu.attestation import (
    ED25519_KEY_SIZE,
    ED25519_SIGNATURE_SIZE,
    EVIDENCE_DOMAIN,
    AttestationError,
    PlatformSigner,
)

KIND = "emulated"
EMULATED_VERSION = "1"
MAX_MEASUREMENTS = 16
MAX_MEASUREMENT_SIZE = 64  # a digest; TDX's 48-byte registers fit
MAX_NAME_SIZE = 32
MAX_REPORT_DATA = 64  # as in a TDX quote's report_data


class EmulatedVerifier:
    """Collects evidence with a platform signer (attester side) and appraises it against a policy (appraiser side).

    ``measurements`` and ``report_data`` are read at each :meth:`collect`: the
    orchestrator's code is measured only once it has loaded its trainer.
    """

    kind = KIND

    def __init__(
        self,
        signer: PlatformSigner | None = None,
        measurements: Callable[[], Mapping[str, bytes]] = dict,
        report_data: Callable[[], bytes] = bytes,
    ) -> None:
        self._signer = signer
        self._measurements = measurements
        self._report_data = report_data

    def collect(self, nonce: bytes) -> Evidence:
        """Evidence for ``nonce`` signed by the platform key; AttestationError if there is no key or nothing is measured yet."""
        if self._signer is None:
            raise AttestationError("emulated evidence is not available on this host (no platform key)")
        measurements = {k: bytes(v) for k, v in self._measurements().items()}
        if not measurements or not all(measurements.values()):
            raise AttestationError("emulated evidence: nothing measured yet")
        body = msgpack.packb([nonce, measurements, {KIND: EMULATED_VERSION}, self._report_data()], use_bin_type=True)
        return Evidence(KIND, msgpack.packb([body, self._signer.sign_evidence(body)], use_bin_type=True), nonce)

    def appraise(self, evidence: Evidence, nonce: bytes, policy: Policy, now: float, revocation: RevocationSource) -> Claims:
        """Signature under one of the policy's platform keys, the nonce inside the signed body, pins and versions."""
        require_nonce(evidence, nonce, KIND)
        if policy.kind != KIND:
            raise AttestationError(f"policy is for {policy.kind!r} evidence, not {KIND!r}")
        body, signature = _split(evidence.blob)
        _check_signature(body, signature, policy)
        # Only now, with a platform key vouching for the bytes, is the body parsed.
        signed_nonce, measurements, versions, report_data = _parse(body)
        if signed_nonce != nonce:
            raise AttestationError("emulated evidence: the signed nonce is not the one sent (replayed evidence)")
        require_pinned(measurements, policy)
        require_min_versions(versions, policy)
        return Claims(KIND, measurements, versions, report_data, math.inf)


def _unpack(data: bytes, what: str) -> object:
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True, max_bin_len=len(data), max_str_len=len(data))
    except (ValueError, TypeError, msgpack.UnpackException):
        raise AttestationError(f"emulated evidence: {what} is not valid msgpack") from None


def _split(blob: bytes) -> tuple[bytes, bytes]:
    outer = _unpack(blob, "blob")
    if not (isinstance(outer, list) and len(outer) == 2 and all(isinstance(x, bytes) for x in outer)):
        raise AttestationError("emulated evidence: blob must be [body, signature] as bytes")
    body, signature = outer
    if len(signature) != ED25519_SIGNATURE_SIZE:
        raise AttestationError(f"emulated evidence: signature is {len(signature)} bytes, not {ED25519_SIGNATURE_SIZE}")
    return body, signature


def _check_signature(body: bytes, signature: bytes, policy: Policy) -> None:
    for i, root in enumerate(policy.roots):
        if len(root) != ED25519_KEY_SIZE:
            raise AttestationError(f"policy root {i} is {len(root)} bytes, not a {ED25519_KEY_SIZE}-byte platform key")
    for root in policy.roots:
        try:
            VerifyKey(root).verify(EVIDENCE_DOMAIN + body, signature)
            return
        except BadSignatureError:
            continue
    raise AttestationError(f"emulated evidence: signature verifies under none of the policy's {len(policy.roots)} platform keys")


def _parse(body: bytes) -> tuple[bytes, dict[str, bytes], dict[str, str], bytes]:
    fields = _unpack(body, "body")
    if not (isinstance(fields, list) and len(fields) == 4):
        raise AttestationError("emulated evidence: body must be [nonce, measurements, versions, report_data]")
    nonce, measurements, versions, report_data = fields
    if not isinstance(nonce, bytes) or not isinstance(report_data, bytes) or len(report_data) > MAX_REPORT_DATA:
        raise AttestationError(f"emulated evidence: nonce and report_data must be bytes (report_data at most {MAX_REPORT_DATA})")
    if not (isinstance(measurements, dict) and len(measurements) <= MAX_MEASUREMENTS
            and all(isinstance(k, str) and len(k) <= MAX_NAME_SIZE and isinstance(v, bytes) and len(v) <= MAX_MEASUREMENT_SIZE
                    for k, v in measurements.items())):
        raise AttestationError("emulated evidence: measurements must be a small map of names to digests")
    if not (isinstance(versions, dict) and len(versions) <= MAX_MEASUREMENTS
            and all(isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_NAME_SIZE and len(v) <= MAX_NAME_SIZE
                    for k, v in versions.items())):
        raise AttestationError("emulated evidence: versions must be a small map of names to strings")
    return nonce, measurements, versions, report_data
