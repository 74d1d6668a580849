"""The attestation interface: evidence, the appraiser's policy, and what appraisal establishes.

One :class:`Verifier` per kind of evidence ("emulated", "tdx", "nvidia-gpu").
The attester calls :meth:`Verifier.collect` with the appraiser's nonce; the
appraiser calls :meth:`Verifier.appraise` with the evidence, the nonce it chose,
its :class:`Policy`, the time, and a :class:`RevocationSource`. Appraisal either
returns :class:`Claims` or raises :class:`AttestationError` with one line naming
what failed (which certificate, which measurement, which date).

Evidence comes from a peer, so its size and shape are checked when it is built
(:class:`Evidence` refuses anything over :data:`MAX_EVIDENCE_SIZE`), before any
verifier parses it. This module is sans-I/O: time comes in as ``now``; files
and networks stay with the revocation sources and the CLI.
"""

from __future__ import annotations

import hmac
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, Protocol

from gtbus.gpu.attestation import AttestationError
from gtbus.gpu.measure import tagged_hash

NONCE_SIZE: Final = 32
RUN_BINDING_DOMAIN: Final = b"gtbus/attest/run/v1"
# A TDX quote with its PCK chain is ~5 KiB; an NVIDIA GPU report with its chain
# ~10 KiB. 64 KiB leaves room for both and bounds what a peer can make us hold.
MAX_EVIDENCE_SIZE: Final = 64 * 1024
MAX_KIND_SIZE: Final = 32
KINDS: Final = ("emulated", "tdx", "nvidia-gpu")

__all__ = [
    "KINDS",
    "MAX_EVIDENCE_SIZE",
    "NONCE_SIZE",
    "AttestationError",
    "CertState",
    "CertStatus",
    "Claims",
    "Evidence",
    "NoRevocation",
    "Policy",
    "Revocation",
    "RevocationSource",
    "Verifier",
    "require_min_versions",
    "require_nonce",
    "require_pinned",
    "run_binding",
    "version_at_least",
]


class Revocation(str, Enum):
    """Where revocation status comes from."""

    OFFLINE = "offline"  # only the files of a bundle carried in
    CACHED = "cached"  # cached files, each within its validity (plus the policy's grace)
    ONLINE = "online"  # fetched now (only where a network exists)


@dataclass(frozen=True)
class Evidence:
    """What :meth:`Verifier.collect` returns: opaque bytes whose format the kind defines."""

    kind: str
    blob: bytes = field(repr=False)
    nonce: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not 0 < len(self.kind) <= MAX_KIND_SIZE:
            raise AttestationError(f"evidence: kind must be 1..{MAX_KIND_SIZE} characters")
        if not isinstance(self.blob, bytes) or not 0 < len(self.blob) <= MAX_EVIDENCE_SIZE:
            size = len(self.blob) if isinstance(self.blob, bytes) else type(self.blob).__name__
            raise AttestationError(f"evidence: blob must be 1..{MAX_EVIDENCE_SIZE} bytes, got {size}")
        if not isinstance(self.nonce, bytes) or len(self.nonce) != NONCE_SIZE:
            raise AttestationError(f"evidence: nonce must be {NONCE_SIZE} bytes")

    def to_wire(self) -> dict[str, object]:
        """A plain dict of msgpack-able values."""
        return {"kind": self.kind, "blob": self.blob, "nonce": self.nonce}

    @classmethod
    def from_wire(cls, wire: object) -> Evidence:
        """Rebuild from :meth:`to_wire` output; AttestationError on any other shape."""
        if not isinstance(wire, dict) or set(wire) != {"kind", "blob", "nonce"}:
            raise AttestationError("evidence: expected a map with kind, blob and nonce")
        return cls(wire["kind"], wire["blob"], wire["nonce"])


@dataclass(frozen=True)
class Policy:
    """What the appraiser accepts: from the runbook's [attestation] table or `gtbus holder` options."""

    pinned: Mapping[str, bytes]  # measurement name -> expected value ("code", "mrtd", "rtmr0", ...)
    min_versions: Mapping[str, str]  # e.g. {"tcb": "...", "gpu-firmware": "96.00.5E.00.01"}
    roots: Sequence[bytes]  # allowed root certificates (DER), or platform public keys (emulated)
    revocation: Revocation = Revocation.OFFLINE
    grace_s: float = 0.0  # how long past a revocation file's nextUpdate it still counts (0: fail closed)
    kind: str = "emulated"  # the kind of evidence the appraiser expects

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AttestationError(f"policy: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for name, value in self.pinned.items():
            if not isinstance(name, str) or not isinstance(value, bytes) or not value:
                raise AttestationError(f"policy: pinned {name!r} must be a non-empty byte string")
        for name, version in self.min_versions.items():
            if not isinstance(name, str) or not isinstance(version, str) or not version:
                raise AttestationError(f"policy: min version {name!r} must be a non-empty string")
        if not all(isinstance(r, bytes) and r for r in self.roots):
            raise AttestationError("policy: every root must be non-empty bytes")
        if not isinstance(self.revocation, Revocation):
            raise AttestationError("policy: revocation must be offline, cached or online")
        if not isinstance(self.grace_s, (int, float)) or not math.isfinite(self.grace_s) or self.grace_s < 0:
            raise AttestationError("policy: grace_s must be a finite number >= 0")


@dataclass(frozen=True)
class Claims:
    """What appraisal established about the attester."""

    kind: str
    measurements: Mapping[str, bytes]
    versions: Mapping[str, str]
    report_data: bytes  # what the attester bound into its evidence (e.g. a measurement-report digest)
    not_after: float  # when the earliest of the certificates and collateral used expires


class CertState(str, Enum):
    """A certificate's revocation state as a source reports it."""

    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class CertStatus:
    """One revocation answer, with the validity of what it came from (an OCSP response or a CRL)."""

    state: CertState
    source: str  # the file or URL that said so, for the one-line error
    this_update: float
    next_update: float
    reason: str = ""


class RevocationSource(Protocol):
    """Gives a certificate's revocation status (offline bundle, cached files, or online)."""

    def status(self, cert_der: bytes, issuer_der: bytes, now: float) -> CertStatus:
        """The status of ``cert_der`` as issued by ``issuer_der`` at ``now``; AttestationError if none can be given."""
        ...


class NoRevocation:
    """A source with no revocation data: every certificate is UNKNOWN (fine for the emulated kind)."""

    def status(self, cert_der: bytes, issuer_der: bytes, now: float) -> CertStatus:
        """Always UNKNOWN; verifiers of certificate chains treat that as a failure."""
        return CertStatus(CertState.UNKNOWN, "no revocation source", now, now, "no revocation data given")


class Verifier(Protocol):
    """Collects (attester side) and appraises (appraiser side) one kind of evidence."""

    kind: str

    def collect(self, nonce: bytes) -> Evidence:
        """Evidence bound to ``nonce``; AttestationError "not available on this host" where it cannot."""
        ...

    def appraise(
        self, evidence: Evidence, nonce: bytes, policy: Policy, now: float, revocation: RevocationSource
    ) -> Claims:
        """Claims if the evidence is genuine, fresh for ``nonce`` and accepted by ``policy``; else AttestationError."""
        ...


def require_nonce(evidence: Evidence, nonce: bytes, kind: str) -> None:
    """Check the evidence is of ``kind`` and answers ``nonce`` (its envelope; the blob must bind it too)."""
    if evidence.kind != kind:
        raise AttestationError(f"evidence: kind {evidence.kind!r}, expected {kind!r}")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        raise AttestationError(f"evidence: the appraiser's nonce must be {NONCE_SIZE} bytes")
    if not hmac.compare_digest(evidence.nonce, nonce):
        raise AttestationError("evidence: nonce does not match the one sent (replayed or for another request)")


def require_pinned(measurements: Mapping[str, bytes], policy: Policy) -> None:
    """Every measurement the policy pins is present and equal (constant-time); AttestationError naming the first that is not."""
    for name, want in sorted(policy.pinned.items()):
        got = measurements.get(name)
        if got is None:
            raise AttestationError(f"measurement {name!r} is pinned but the evidence has none")
        if not hmac.compare_digest(got, want):
            raise AttestationError(f"measurement {name!r} is {got.hex()[:16]}..., pinned {want.hex()[:16]}...")


def version_at_least(got: str, least: str) -> bool:
    """Is dotted version ``got`` at least ``least``? Parts compare as numbers: hex when either version
    has a hex letter and both are all hex ("96.00.5E.00.01" vs "96.00.60.00.01"), decimal otherwise;
    a part that is no number compares as text, after every number."""
    split = lambda v: re.split(r"[._-]", v)  # noqa: E731
    a, b = split(got), split(least)
    all_hex = all(re.fullmatch(r"[0-9A-Fa-f]+", p) for p in a + b)
    base = 16 if all_hex and any(re.search(r"[A-Fa-f]", p) for p in a + b) else 10

    def key(parts: list[str]) -> list[tuple[int, int | str]]:
        return [(0, int(p, base)) if re.fullmatch(r"[0-9A-Fa-f]+" if base == 16 else r"[0-9]+", p) else (1, p) for p in parts]

    return key(a) >= key(b)


def require_min_versions(versions: Mapping[str, str], policy: Policy) -> None:
    """Every version the policy names is present and at least its minimum; AttestationError naming the first that is not."""
    for name, least in sorted(policy.min_versions.items()):
        got = versions.get(name)
        if got is None:
            raise AttestationError(f"version {name!r} has a minimum ({least}) but the evidence states none")
        if not version_at_least(got, least):
            raise AttestationError(f"version {name!r} is {got}, below the minimum {least}")


def run_binding(run_id: str) -> bytes:
    """The 32 bytes an orchestrator puts in its evidence's report_data: the run it attests for.

    A holder checks the claims' report_data against the run of its Welcome, so
    evidence from another run (or another orchestrator's platform) is refused.
    """
    return tagged_hash(RUN_BINDING_DOMAIN, [run_id.encode()])
