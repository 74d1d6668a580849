"""Attestation: one :class:`~gtbus.attest.verifier.Verifier` interface and its implementations.

- ``verifier``: the interface and its value types (Evidence, Policy, Claims, revocation).
- ``emulated``: the platform-key verifier (an Ed25519 key stands in for hardware).
- ``policy``: the appraiser's policy file (TOML, strict).
- ``bundle``, ``tdx``, ``nvidia``: the offline bundle and the hardware kinds.

Lower layers (gpu, messages) never import this package; nodes and the CLI do.
"""

from gtbus.attest.verifier import (
    KINDS,
    MAX_EVIDENCE_SIZE,
    NONCE_SIZE,
    AttestationError,
    CertState,
    CertStatus,
    Claims,
    Evidence,
    NoRevocation,
    Policy,
    Revocation,
    RevocationSource,
    Verifier,
    require_min_versions,
    require_nonce,
    require_pinned,
    run_binding,
    version_at_least,
)

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
