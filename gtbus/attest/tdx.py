"""Intel TDX quotes appraised offline with ``dcap-qvl``, collateral from a bundle.

The orchestrator's TD binds two things into the quote's 64-byte ``report_data``:

* ``report_data[:32]`` = SHA-256 of the orchestrator's measurement report (the
  bytes of :meth:`gtbus.gpu.attestation.MeasurementReport.to_bytes`). SHA-256,
  not BLAKE3, so that a third party checks the binding with stock tools
  (``sha256sum``) next to Intel's own verifiers.
* ``report_data[32:]`` = the appraiser's 32-byte nonce: the quote is fresh.

What appraisal checks, in order (each failure one line):

1. the evidence's kind and nonce envelope; the quote's size before parsing;
2. the quote's signature chain to Intel's SGX root, the QE report, TCB info and
   QE identity signatures, and the PCK CRLs: all by dcap-qvl, at ``now``, with
   the TDX collateral of the quote's FMSPC taken from the bundle (whose
   issueDate..nextUpdate is also enforced here, naming the file);
3. the root: dcap-qvl checks Intel's root; when the policy lists roots, the
   quote's chain must end in one of them;
4. ``report_data[32:]`` is the nonce; ``report_data[:32]`` equals the policy's
   pinned ``report-data`` when it pins one;
5. the TCB status is at least the policy's ``tcb-status`` (order below) and the
   TCB evaluation data number at least ``tcb-eval``;
6. each pinned measurement (``mrtd``, ``rtmr0``..``rtmr3``, ``mrseam``,
   ``mrconfigid``, ``mrowner``, ``report-data``) equals the quote's, and the
   versions the policy names (``tcb-eval``, ``tee-tcb-svn``) are at least its minimums.

``dcap-qvl`` is an optional extra (``pip install gtbus[attest-tdx]``); without
it :class:`TdxVerifier` raises one line saying so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from typing import Any, Final

from gtbus.attest.bundle import Bundle, BundleFile
from gtbus.attest.verifier import (
    NONCE_SIZE,
    AttestationError,
    Claims,
    Evidence,
    Policy,
    RevocationSource,
    require_min_versions,
    require_nonce,
    require_pinned,
)

KIND: Final = "tdx"
# A v4/v5 TDX quote: 48-byte header, a 584..648-byte TD report, then a signature section with the PCK chain (~5 KiB).
MIN_QUOTE_SIZE: Final = 48 + 584
MAX_QUOTE_SIZE: Final = 16 * 1024
REPORT_DATA_SIZE: Final = 64
# Intel's TCB statuses, best first (Intel SGX/TDX DCAP: TCB status of a TCB level).
TCB_ORDER: Final = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
MEASUREMENTS: Final = {
    "mrtd": "mr_td",
    "rtmr0": "rt_mr0",
    "rtmr1": "rt_mr1",
    "rtmr2": "rt_mr2",
    "rtmr3": "rt_mr3",
    "mrseam": "mr_seam",
    "mrconfigid": "mr_config_id",
    "mrowner": "mr_owner",
}

__all__ = ["KIND", "TCB_ORDER", "TdxVerifier", "bind_report_data", "report_digest"]


def report_digest(report_bytes: bytes) -> bytes:
    """The 32 bytes a TD puts in ``report_data[:32]``: SHA-256 of the measurement report's bytes."""
    return hashlib.sha256(report_bytes).digest()


def bind_report_data(report_bytes: bytes, nonce: bytes) -> bytes:
    """The 64-byte ``report_data`` an orchestrator's TD asks its quote for."""
    if len(nonce) != NONCE_SIZE:
        raise AttestationError(f"tdx: nonce must be {NONCE_SIZE} bytes")
    return report_digest(report_bytes) + nonce


def _dcap() -> Any:
    """The dcap_qvl module, or one line saying how to get it."""
    try:
        import dcap_qvl  # type: ignore[import-untyped]  # a Rust extension without py.typed
    except ImportError:
        raise AttestationError("tdx: dcap-qvl is not installed (pip install 'gtbus[attest-tdx]')") from None
    return dcap_qvl


def _first_line(exc: BaseException) -> str:
    """dcap-qvl's errors carry a 'Caused by' trail; the first line names what failed."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class TdxVerifier:
    """Appraises TDX quotes offline; collateral comes from ``bundle`` (files of kind ``tdx-collateral``)."""

    kind = KIND

    def __init__(self, bundle: Bundle) -> None:
        self._bundle = bundle

    def collect(self, nonce: bytes) -> Evidence:
        """Not available here: quoting needs a TD with the TDX guest driver (configfs-tsm)."""
        raise AttestationError("tdx: collecting a quote is not available on this host (no TDX guest)")

    def appraise(
        self, evidence: Evidence, nonce: bytes, policy: Policy, now: float, revocation: RevocationSource
    ) -> Claims:
        """Claims of a genuine, fresh TDX quote that ``policy`` accepts at ``now``; else one-line AttestationError.

        Revocation of the PCK chain is checked by dcap-qvl from the CRLs in the
        collateral (the bundle's, carried in), so ``revocation`` is not asked.
        """
        require_nonce(evidence, nonce, KIND)
        if policy.kind != KIND:
            raise AttestationError(f"tdx: the policy is for kind {policy.kind!r}")
        raw = evidence.blob
        if not MIN_QUOTE_SIZE <= len(raw) <= MAX_QUOTE_SIZE:
            raise AttestationError(f"tdx: quote is {len(raw)} bytes, expected {MIN_QUOTE_SIZE}..{MAX_QUOTE_SIZE}")
        dcap = _dcap()
        try:
            quote = dcap.parse_quote(raw)
        except (ValueError, RuntimeError) as exc:
            raise AttestationError(f"tdx: quote does not parse: {_first_line(exc)}") from None
        if not quote.is_tdx():
            raise AttestationError(f"tdx: quote is {quote.quote_type()}, not TDX")
        fmspc = str(quote.fmspc()).upper()
        source = self._collateral_for(fmspc)
        source.require_valid(now)
        try:
            collateral = dcap.QuoteCollateralV3.from_json(source.data.decode())
            report = dcap.verify(raw, collateral, int(now))
        except (ValueError, RuntimeError, UnicodeDecodeError) as exc:
            raise AttestationError(f"tdx: quote verification failed ({source.name}): {_first_line(exc)}") from None
        if policy.roots:
            self._require_root(quote, policy)
        body = quote.report
        report_data = bytes(body.report_data)
        if len(report_data) != REPORT_DATA_SIZE or not hmac.compare_digest(report_data[32:], nonce):
            raise AttestationError("tdx: report_data[32:] is not the nonce sent (a replayed or foreign quote)")
        status = str(report.status)
        _require_tcb_status(status, policy)
        measurements = {name: bytes(getattr(body, attr)) for name, attr in MEASUREMENTS.items()}
        # The binding is checked like any pinned measurement: the policy pins "report-data" to the report's digest.
        measurements["report-data"] = report_data[:32]
        require_pinned(measurements, policy)
        versions = {
            "tcb-status": status,
            "tcb-eval": str(_tcb_eval_number(collateral)),
            "tee-tcb-svn": bytes(body.tee_tcb_svn).hex(),
            "fmspc": fmspc,
        }
        require_min_versions({k: v for k, v in versions.items() if k != "tcb-status"}, _without_status(policy))
        return Claims(
            kind=KIND,
            measurements=measurements,
            versions=versions,
            report_data=report_data[:32],
            not_after=source.not_after,
        )

    def _collateral_for(self, fmspc: str) -> BundleFile:
        """The bundle's TDX collateral whose TCB info is for ``fmspc``."""
        candidates = self._bundle.of_kind("tdx-collateral")
        for f in candidates:
            try:
                tcb_info = json.loads(json.loads(f.data)["tcb_info"])
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(tcb_info, dict) and str(tcb_info.get("fmspc", "")).upper() == fmspc:
                return f
        raise AttestationError(f"tdx: the bundle has no TDX collateral for FMSPC {fmspc} ({len(candidates)} collateral files)")

    @staticmethod
    def _require_root(quote: Any, policy: Policy) -> None:
        """The quote's PCK chain ends in one of the policy's roots (DER)."""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        pem = quote.cert_chain_pem_bytes()
        try:
            chain = x509.load_pem_x509_certificates(pem or b"")
        except ValueError as exc:
            raise AttestationError(f"tdx: the quote's certificate chain does not parse: {exc}") from None
        if not chain:
            raise AttestationError("tdx: the quote carries no certificate chain")
        if chain[-1].public_bytes(Encoding.DER) not in set(policy.roots):
            raise AttestationError(f"tdx: the quote's chain ends in {chain[-1].subject.rfc4514_string()}, not a root the policy allows")


def _tcb_eval_number(collateral: Any) -> int:
    """The TCB evaluation data number of the collateral's TCB info (which Intel bumps as advisories land)."""
    try:
        number = json.loads(collateral.tcb_info)["tcbEvaluationDataNumber"]
    except (ValueError, KeyError, TypeError):
        raise AttestationError("tdx: collateral TCB info has no tcbEvaluationDataNumber") from None
    if isinstance(number, bool) or not isinstance(number, int):
        raise AttestationError("tdx: collateral tcbEvaluationDataNumber is not an integer")
    return number


def _require_tcb_status(status: str, policy: Policy) -> None:
    """The TCB status is at least the policy's ``tcb-status`` (default UpToDate), in Intel's order."""
    want = policy.min_versions.get("tcb-status", "UpToDate")
    if want not in TCB_ORDER:
        raise AttestationError(f"tdx: policy tcb-status {want!r} is not one of {', '.join(TCB_ORDER)}")
    if status not in TCB_ORDER or TCB_ORDER.index(status) > TCB_ORDER.index(want):
        raise AttestationError(f"tdx: TCB status {status} is below the policy's minimum {want}")


def _without_status(policy: Policy) -> Policy:
    """The policy less its ``tcb-status`` (an ordered name, not a dotted version)."""
    return dataclasses.replace(policy, min_versions={k: v for k, v in policy.min_versions.items() if k != "tcb-status"})
