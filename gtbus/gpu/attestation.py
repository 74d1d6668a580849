"""Per-hop measurement reports and their verification.

A *platform key* (Ed25519) signs a :class:`MeasurementReport` that binds code,
model, device, the hop's channel key, run and epoch; every grant carries one,
and :class:`EmulatedReportVerifier` checks it (it binds the hop key, so it
stays whatever attests the platform).

Attesting the platform itself is :mod:`gtbus.attest`: one
:class:`gtbus.attest.Verifier` interface (``collect(nonce)`` / ``appraise``)
with the emulated kind (this platform key, over evidence for an appraiser's
nonce, under :data:`EVIDENCE_DOMAIN`) and the hardware kinds (Intel TDX quotes,
NVIDIA GPU evidence) appraised offline. Holders appraise the orchestrator's
evidence at registration, before their first provisioning.

What a good report proves: the code measured is the pinned code; the model is
the expected one; the report was made by this device for this run and epoch;
and the device holds the channel key of this hop (through its commitment), so
the report cannot be replayed onto another hop.
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass, field
from typing import Final, Protocol

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from gtbus.clock import SYSTEM_CLOCK, Clock
from gtbus.errors import DeviceError
from gtbus.gpu.measure import DIGEST_SIZE, tagged_hash

ATTEST_DOMAIN: Final = b"gtbus/attest/v1"
# Evidence for an appraiser's nonce (gtbus.attest.emulated), kept apart from the
# per-hop reports: neither signature can be passed off as the other.
EVIDENCE_DOMAIN: Final = b"gtbus/attest/evidence/v1"
KEY_COMMITMENT_DOMAIN: Final = b"gtbus/channel-key-commitment/v1"
ED25519_KEY_SIZE: Final = 32
ED25519_SIGNATURE_SIZE: Final = 64
MAX_REPORT_SIZE: Final = 4096


class AttestationError(DeviceError):
    """A measurement report is forged, malformed, stale, or does not match what is pinned."""


def channel_key_commitment(key: bytes) -> bytes:
    """A 32-byte commitment to a hop's channel key that reveals nothing about it."""
    return tagged_hash(KEY_COMMITMENT_DOMAIN, [key])


@dataclass(frozen=True)
class MeasurementReport:
    """What the device states about itself at one point of a run."""

    code_hash: bytes
    model_hash: bytes
    device_id: str
    key_commitment: bytes
    run_id: str
    epoch: int
    timestamp: float

    def __post_init__(self) -> None:
        for name in ("code_hash", "model_hash", "key_commitment"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != DIGEST_SIZE:
                raise AttestationError(f"measurement report: {name} must be {DIGEST_SIZE} bytes")
        for name in ("device_id", "run_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not 0 < len(value) <= 255:
                raise AttestationError(f"measurement report: {name} must be 1..255 characters")
        if type(self.epoch) is not int or not 0 <= self.epoch < 1 << 64:
            raise AttestationError("measurement report: epoch must be an integer in [0, 2**64)")
        if not isinstance(self.timestamp, float) or not math.isfinite(self.timestamp):
            raise AttestationError("measurement report: timestamp must be a finite float")

    def to_bytes(self) -> bytes:
        """Canonical encoding: a msgpack array in field order."""
        return msgpack.packb(
            [self.code_hash, self.model_hash, self.device_id, self.key_commitment,
             self.run_id, self.epoch, self.timestamp],
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, body: bytes) -> MeasurementReport:
        """Decode :meth:`to_bytes` output; AttestationError if malformed."""
        try:
            fields = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
        except (ValueError, msgpack.UnpackException):
            raise AttestationError("measurement report: body is not valid msgpack") from None
        if not isinstance(fields, list) or len(fields) != 7:
            raise AttestationError("measurement report: body must be a 7-element array")
        return cls(*fields)


@dataclass(frozen=True)
class SignedReport:
    """A report body and the platform's signature over ``ATTEST_DOMAIN || body``."""

    body: bytes
    signature: bytes = field(repr=False)

    def to_wire(self) -> dict[str, bytes]:
        """A plain dict of msgpack-able values."""
        return {"body": self.body, "signature": self.signature}

    @classmethod
    def from_wire(cls, wire: object) -> SignedReport:
        """Rebuild from :meth:`to_wire` output (shape only; :class:`Verifier` checks the rest)."""
        if not isinstance(wire, dict) or set(wire) != {"body", "signature"}:
            raise AttestationError("signed report: expected a map with body and signature")
        body, signature = wire["body"], wire["signature"]
        if not isinstance(body, bytes) or not isinstance(signature, bytes):
            raise AttestationError("signed report: body and signature must be bytes")
        return cls(body, signature)


class PlatformSigner:
    """The emulated platform: signs measurement reports with an Ed25519 key."""

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != ED25519_KEY_SIZE:
            raise AttestationError("platform signing seed must be 32 bytes")
        self._key = SigningKey(seed)

    @classmethod
    def generate(cls) -> PlatformSigner:
        """A signer with a fresh random key."""
        return cls(bytes(SigningKey.generate()))

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 key verifiers pin."""
        return bytes(self._key.verify_key)

    def sign(self, report: MeasurementReport) -> SignedReport:
        """Sign a report under the attestation domain tag."""
        body = report.to_bytes()
        return SignedReport(body, self._key.sign(ATTEST_DOMAIN + body).signature)

    def sign_evidence(self, body: bytes) -> bytes:
        """Sign an evidence body (:mod:`gtbus.attest.emulated`) under its own domain tag."""
        return self._key.sign(EVIDENCE_DOMAIN + body).signature


class ReportVerifier(Protocol):
    """Checks a signed per-hop measurement report against what the caller expects."""

    def verify(
        self,
        signed: SignedReport,
        *,
        model_hash: bytes | None = None,
        device_id: str | None = None,
        channel_key: bytes | None = None,
        run_id: str | None = None,
        epoch: int | None = None,
    ) -> MeasurementReport:
        """Return the report if it is genuine and matches every expectation given; raise AttestationError."""
        ...


class EmulatedReportVerifier:
    """Verifies reports of :class:`PlatformSigner` against a pinned platform key and code."""

    def __init__(
        self,
        platform_public_key: bytes,
        pinned_code_hash: bytes,
        pinned_model_hash: bytes | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        max_age_s: float | None = None,
    ) -> None:
        if not isinstance(platform_public_key, bytes) or len(platform_public_key) != ED25519_KEY_SIZE:
            raise AttestationError("platform public key must be 32 bytes")
        self._key = VerifyKey(platform_public_key)
        self.pinned_code_hash = pinned_code_hash
        self.pinned_model_hash = pinned_model_hash
        self._clock = clock
        self._max_age_s = max_age_s

    def verify(
        self,
        signed: SignedReport,
        *,
        model_hash: bytes | None = None,
        device_id: str | None = None,
        channel_key: bytes | None = None,
        run_id: str | None = None,
        epoch: int | None = None,
    ) -> MeasurementReport:
        """Check signature, then code, model (``model_hash`` or the pinned one), and every other expectation given."""
        if len(signed.body) > MAX_REPORT_SIZE or len(signed.signature) != ED25519_SIGNATURE_SIZE:
            raise AttestationError("measurement report: bad size of body or signature")
        try:
            self._key.verify(ATTEST_DOMAIN + signed.body, signed.signature)
        except BadSignatureError:
            raise AttestationError("measurement report: signature does not verify under the platform key") from None
        # Only now, with the platform vouching for the bytes, is the body parsed.
        report = MeasurementReport.from_bytes(signed.body)

        _expect("code hash", report.code_hash, self.pinned_code_hash)
        expected_model = model_hash if model_hash is not None else self.pinned_model_hash
        if expected_model is not None:
            _expect("model hash", report.model_hash, expected_model)
        if device_id is not None and report.device_id != device_id:
            raise AttestationError(f"measurement report: device {report.device_id!r}, expected {device_id!r}")
        if channel_key is not None:
            _expect("channel key commitment", report.key_commitment, channel_key_commitment(channel_key))
        if run_id is not None and report.run_id != run_id:
            raise AttestationError(f"measurement report: run {report.run_id!r}, expected {run_id!r}")
        if epoch is not None and report.epoch != epoch:
            raise AttestationError(f"measurement report: epoch {report.epoch}, expected {epoch}")
        if self._max_age_s is not None:
            age = self._clock.time() - report.timestamp
            if not -self._max_age_s <= age <= self._max_age_s:
                raise AttestationError(f"measurement report: timestamp is {age:.1f} s off, limit {self._max_age_s} s")
        return report


#: The names these had before gtbus.attest took "Verifier" for platform evidence (kept for callers).
Verifier = ReportVerifier
EmulatedVerifier = EmulatedReportVerifier


def _expect(what: str, got: bytes, want: bytes) -> None:
    if not hmac.compare_digest(got, want):
        raise AttestationError(f"measurement report: {what} {got.hex()[:16]}... does not match pinned {want.hex()[:16]}...")
