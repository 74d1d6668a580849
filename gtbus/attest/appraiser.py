"""An appraiser ready to use: the verifier of the policy's kind, the policy, and where revocation comes from.

:func:`appraiser_for` turns a :class:`~gtbus.attest.policy.PolicySettings`
into one: the emulated kind needs nothing more; a hardware kind reads the
offline bundle the policy names (collateral and revocation files, with their
validity). A holder holds one and appraises the orchestrator's evidence with it
before its first provisioning (:mod:`gtbus.nodes.holder`).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gtbus.attest.emulated import EmulatedVerifier
from gtbus.attest.policy import PolicySettings
from gtbus.attest.verifier import (
    AttestationError,
    Claims,
    Evidence,
    NoRevocation,
    Policy,
    RevocationSource,
    Verifier,
    run_binding,
)
from gtbus.errors import ConfigError

if TYPE_CHECKING:
    from gtbus.attest.bundle import Bundle


@dataclass(frozen=True)
class Appraiser:
    """Appraises one kind of evidence against one policy."""

    verifier: Verifier
    policy: Policy
    revocation: RevocationSource

    def appraise(self, evidence: Evidence, nonce: bytes, run_id: str, now: float) -> Claims:
        """The verifier's claims, still valid at ``now`` and, for the emulated kind, made for run ``run_id``."""
        claims = self.verifier.appraise(evidence, nonce, self.policy, now, self.revocation)
        if claims.not_after < now:
            raise AttestationError(f"{claims.kind} evidence: valid only until {claims.not_after:.0f}, now is {now:.0f}")
        # gtbus's own attester binds the run; the hardware kinds bind their own
        # report data (e.g. tdx.bind_report_data), checked by their verifier.
        if claims.kind == "emulated" and not hmac.compare_digest(claims.report_data, run_binding(run_id)):
            raise AttestationError(f"emulated evidence: made for another run than {run_id[:40]!r}")
        return claims


def _tdx(bundle: Any, settings: PolicySettings) -> Verifier:
    from gtbus.attest.tdx import TdxVerifier

    return TdxVerifier(bundle)


def nvidia_rims(settings: PolicySettings, bundle: Bundle) -> dict[str, bytes]:
    """The NVIDIA RIMs to appraise against: the bundle's (driver-rim, vbios-rim files), then the policy's, which win."""
    rims: dict[str, bytes] = {}
    for which in ("driver", "vbios"):
        files = bundle.of_kind(f"{which}-rim")
        if len(files) > 1:
            raise AttestationError(f"bundle: holds {len(files)} {which}-rim files ({', '.join(f.name for f in files)}); keep one")
        if files:
            rims[which] = files[0].data
    return {**rims, **settings.rims}


def _nvidia(bundle: Any, settings: PolicySettings) -> Verifier:
    from gtbus.attest.nvidia import NvidiaVerifier

    return NvidiaVerifier(nvidia_rims(settings, bundle), settings.rim_roots)


#: The hardware kinds, imported only when a policy asks for one (they need cryptography, dcap-qvl).
_HARDWARE: dict[str, Callable[[Any, PolicySettings], Verifier]] = {"tdx": _tdx, "nvidia-gpu": _nvidia}


def appraiser_for(settings: PolicySettings) -> Appraiser:
    """The appraiser a policy calls for; ConfigError (one line) if a hardware kind has no bundle to read."""
    policy = settings.policy
    if policy.kind == "emulated":
        return Appraiser(EmulatedVerifier(), policy, NoRevocation())
    if settings.bundle is None:
        raise ConfigError(f"a {policy.kind} policy needs bundle = the folder `gtbus attest fetch` wrote")
    from gtbus.attest.bundle import BundleRevocation, read_bundle

    bundle = read_bundle(settings.bundle)
    return Appraiser(_HARDWARE[policy.kind](bundle, settings), policy, BundleRevocation(bundle, policy.grace_s))
