"""NvidiaVerifier on NVIDIA's published Hopper sample evidence (nvtrust), appraised offline.

The sample's certificates never expire (notAfter 9999-12-31) and nvtrust ships
no OCSP responses or CRLs for them, so two things are done besides the sample
itself: expiry and revocation are also tested on a small chain these tests make
(root -> intermediate -> leaf, P-384, the leaf carrying the sample's FWID) that
re-signs the sample report, with real CRLs in a real bundle read by
BundleRevocation. Every refusal must be an AttestationError of one line.
"""

from __future__ import annotations

import calendar
import datetime as dt
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography import x509
from cryptography.x509 import ocsp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from gtbus.attest.bundle import BundleFile, BundleRevocation, read_bundle, validity_of, write_bundle
from gtbus.attest.nvidia import (
    FWID_SIZE,
    MAX_CHAIN_LENGTH,
    MAX_REPORT_SIZE,
    OPAQUE_FWID,
    NvidiaVerifier,
    evidence_from_nvidia_files,
    pack_evidence,
    parse_report,
)
from gtbus.attest.verifier import (
    MAX_EVIDENCE_SIZE,
    AttestationError,
    CertState,
    CertStatus,
    Claims,
    Evidence,
    NoRevocation,
    Policy,
    RevocationSource,
)

DATA = Path(__file__).parent / "data" / "nvtrust"
REPORT = bytes.fromhex((DATA / "hopperAttestationReport.txt").read_text().strip())
CHAIN = [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates((DATA / "hopperCertChain.txt").read_bytes())]
NVIDIA_ROOT = x509.load_pem_x509_certificate((DATA / "verifier_device_root.pem").read_bytes()).public_bytes(Encoding.DER)
NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
NOW = float(calendar.timegm(time.strptime("2026-06-01", "%Y-%m-%d")))  # inside every sample certificate's validity
SAMPLE = parse_report(REPORT)
FWID = SAMPLE.opaque[OPAQUE_FWID]
SIGNATURE_AT = len(REPORT) - 96
RECORD_AT = 37 + 8  # the first measurement block, inside the signed response
VERIFIER = NvidiaVerifier()


class SaysGood:
    """Stands in for a bundle of NVIDIA's OCSP responses saying good, which nvtrust does not publish.

    Used only with the NVIDIA sample; revocation itself is tested below with real
    CRLs from the tests' own chain, through BundleRevocation.
    """

    def __init__(self) -> None:
        self.asked: list[str] = []

    def status(self, cert_der: bytes, issuer_der: bytes, now: float) -> CertStatus:
        self.asked.append(x509.load_der_x509_certificate(cert_der).subject.rfc4514_string())
        return CertStatus(CertState.GOOD, "nvidia-ocsp-stand-in", now - 3600, now + 3600)


def policy(**kw: object) -> Policy:
    """An nvidia-gpu policy pinning two of the sample's measurements; keyword arguments replace fields."""
    fields: dict[str, object] = {
        "pinned": {"gpu-measurement-02": SAMPLE.measurements[2], "gpu-measurement-09": SAMPLE.measurements[9]},
        "min_versions": {"gpu-driver": "550.54.14", "gpu-firmware": "96.00.5E.00.01"},
        "roots": [NVIDIA_ROOT],
        "kind": "nvidia-gpu",
    }
    fields.update(kw)
    return Policy(**fields)  # type: ignore[arg-type]


def appraise(
    blob: bytes, *, nonce: bytes = NONCE, pol: Policy | None = None, now: float = NOW,
    revocation: RevocationSource | None = None,
) -> Claims:
    """Appraise ``blob`` as evidence answering ``nonce``."""
    evidence = Evidence("nvidia-gpu", blob, nonce)
    return VERIFIER.appraise(evidence, nonce, pol or policy(), now, revocation or SaysGood())


def refused(match: str, call: Callable[[], object]) -> str:
    """``call`` raises one AttestationError of one line matching ``match``; returns the line."""
    with pytest.raises(AttestationError, match=match) as info:
        call()
    line = str(info.value)
    assert "\n" not in line and "Traceback" not in line
    return line


def flipped(data: bytes, at: int) -> bytes:
    """``data`` with one byte inverted."""
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


# --- NVIDIA's sample ------------------------------------------------------------------------------


def test_the_sample_appraises_with_its_nonce_and_claims_what_it_states() -> None:
    revocation = SaysGood()
    claims = appraise(pack_evidence(REPORT, CHAIN), revocation=revocation)
    assert claims.kind == "nvidia-gpu"
    assert claims.report_data == NONCE
    assert claims.versions == {"gpu-driver": "550.90.07", "gpu-firmware": "96.00.9F.00.01"}
    assert len(SAMPLE.measurements) == 64 and all(len(v) == 48 for v in SAMPLE.measurements.values())
    assert claims.measurements["gpu-measurement-02"].hex().startswith("8048dfd18fe229bf")
    assert claims.measurements["gpu-fwid"] == FWID and len(FWID) == FWID_SIZE
    assert claims.not_after == NOW + 3600  # the revocation answers expire before the certificates (9999)
    # Every certificate below the root was asked about, leaf first.
    assert revocation.asked[0].startswith("CN=GH100 A01 GSP FMC LF") and len(revocation.asked) == len(CHAIN) - 1


def test_the_chain_may_stop_below_the_root_the_policy_names() -> None:
    claims = appraise(pack_evidence(REPORT, CHAIN[:-1]))
    assert claims.versions["gpu-driver"] == "550.90.07"


def test_without_revocation_data_the_sample_is_refused_naming_the_leaf(tmp_path: Path) -> None:
    write_bundle(tmp_path / "empty", [])
    empty = BundleRevocation(read_bundle(tmp_path / "empty"))
    line = refused(r"status of certificate 'GH100 A01 GSP FMC LF' is unknown", lambda: appraise(pack_evidence(REPORT, CHAIN), revocation=empty))
    assert "no CRL or OCSP response" in line
    refused("is unknown", lambda: appraise(pack_evidence(REPORT, CHAIN), revocation=NoRevocation()))


@pytest.mark.parametrize(
    "at, where",
    [(RECORD_AT + 7, "measurement 1"), (RECORD_AT + 55 * 2 + 20, "measurement 3"), (SIGNATURE_AT - 300, "opaque data"),
     (SIGNATURE_AT - 1, "opaque data end"), (SIGNATURE_AT, "signature r"), (len(REPORT) - 1, "signature s")],
)
def test_a_flipped_byte_in_the_report_breaks_its_signature(at: int, where: str) -> None:
    bad = flipped(REPORT, at)
    refused(r"signature does not verify with the key of 'GH100 A01 GSP FMC LF'", lambda: appraise(pack_evidence(bad, CHAIN)))


def test_a_flipped_fwid_is_caught_by_the_signature_first() -> None:
    at = REPORT.index(FWID) + 5
    refused("signature does not verify", lambda: appraise(pack_evidence(flipped(REPORT, at), CHAIN)))


def test_a_wrong_nonce_is_refused() -> None:
    other = bytes(32)
    refused(r"its nonce is not the appraiser's", lambda: appraise(pack_evidence(REPORT, CHAIN), nonce=other))
    # Evidence whose envelope names another nonce than the appraiser's is refused before it is parsed.
    evidence = Evidence("nvidia-gpu", pack_evidence(REPORT, CHAIN), NONCE)
    refused("nonce does not match", lambda: VERIFIER.appraise(evidence, other, policy(), NOW, SaysGood()))
    # A report whose request nonce was edited to the appraiser's no longer verifies.
    forged = REPORT[:4] + other + REPORT[36:]
    refused("signature does not verify", lambda: appraise(pack_evidence(forged, CHAIN), nonce=other))


def test_a_time_past_the_certificates_notafter_is_refused_naming_the_certificate() -> None:
    after = float(calendar.timegm((9999, 12, 31, 23, 59, 59))) + DAY
    refused(r"certificate 'GH100 A01 GSP FMC LF' expired at 9999-12-31T23:59:59Z", lambda: appraise(pack_evidence(REPORT, CHAIN), now=after))
    before = float(calendar.timegm(time.strptime("2021-06-01", "%Y-%m-%d")))
    refused(r"certificate 'NVIDIA GH100 Provisioner ICA 1' is not valid before 2022-03-01", lambda: appraise(pack_evidence(REPORT, CHAIN), now=before))
    for bad in (float("nan"), float("inf")):
        refused("finite", lambda: appraise(pack_evidence(REPORT, CHAIN), now=bad))


def test_a_chain_to_another_root_is_refused() -> None:
    pki = Pki.make()
    refused(r"ends at 'NVIDIA Device Identity CA'.*not one of the policy's roots", lambda: appraise(pack_evidence(REPORT, CHAIN), pol=policy(roots=[pki.root_der])))
    refused(r"ends at 'NVIDIA GH100 Identity'.*not one of the policy's roots", lambda: appraise(pack_evidence(REPORT, CHAIN[:-1]), pol=policy(roots=[pki.root_der])))
    # A chain whose links do not sign each other.
    broken = [CHAIN[0], CHAIN[2], CHAIN[3], CHAIN[4]]
    refused(r"'GH100 A01 GSP FMC LF' is not signed by 'NVIDIA GH100 Provisioner ICA 1'", lambda: appraise(pack_evidence(REPORT, broken)))


def test_a_report_cannot_be_moved_under_a_chain_the_attacker_holds() -> None:
    pki = Pki.make()
    refused(r"signature does not verify with the key of 'test leaf'", lambda: appraise(pack_evidence(REPORT, pki.chain), pol=policy(roots=[pki.root_der])))


def test_measurements_and_versions_are_appraised_against_the_policy() -> None:
    blob = pack_evidence(REPORT, CHAIN)
    refused(r"gpu-measurement-02.*pinned", lambda: appraise(blob, pol=policy(pinned={"gpu-measurement-02": bytes(48)})))
    refused(r"gpu-measurement-99.*pinned but the evidence has none", lambda: appraise(blob, pol=policy(pinned={"gpu-measurement-99": bytes(48)})))
    refused(r"pins no gpu-measurement-NN", lambda: appraise(blob, pol=policy(pinned={"gpu-fwid": FWID})))
    refused(r"gpu-firmware.*96.00.9F.00.01, below the minimum 96.00.A0.00.01", lambda: appraise(blob, pol=policy(min_versions={"gpu-firmware": "96.00.A0.00.01"})))
    refused(r"gpu-driver.*550.90.07, below the minimum 550.127.05", lambda: appraise(blob, pol=policy(min_versions={"gpu-driver": "550.127.05"})))
    refused(r"'tcb'.*states none", lambda: appraise(blob, pol=policy(min_versions={"tcb": "1"})))
    refused(r"no root certificate", lambda: appraise(blob, pol=policy(roots=[])))
    refused(r"policy is for kind 'tdx'", lambda: VERIFIER.appraise(Evidence("nvidia-gpu", blob, NONCE), NONCE, policy(kind="tdx"), NOW, SaysGood()))


# --- hostile and malformed evidence ---------------------------------------------------------------


def test_oversized_evidence_is_refused_before_it_is_parsed() -> None:
    refused(r"blob must be 1..65536 bytes", lambda: Evidence("nvidia-gpu", b"\x00" * (MAX_EVIDENCE_SIZE + 1), NONCE))
    too_long = REPORT + b"\x00" * (MAX_REPORT_SIZE - len(REPORT) + 1)
    refused(r"not a msgpack map", lambda: appraise(pack_evidence(too_long, CHAIN)))
    refused(r"not a msgpack map", lambda: appraise(pack_evidence(REPORT, CHAIN * 2)))
    assert len(CHAIN * 2) > MAX_CHAIN_LENGTH


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"\xc1", "not a msgpack map"),
        (b"garbage that is no evidence", "not a msgpack map"),
        (msgpack.packb([REPORT, CHAIN]), "expected a map with report and chain"),
        (msgpack.packb({"report": REPORT}), "expected a map with report and chain"),
        (msgpack.packb({"report": "text", "chain": CHAIN}), "report must be bytes"),
        (msgpack.packb({"report": REPORT, "chain": []}), "chain a non-empty list"),
        (msgpack.packb({"report": REPORT, "chain": [b"not a certificate"]}), "certificate 0 of the evidence's chain is not a well-formed DER X.509"),
        (msgpack.packb({"report": REPORT, "chain": [CHAIN[0], 7]}), "certificate 1 must be"),
        (msgpack.packb({"report": REPORT, "chain": [CHAIN[0][:-1]]}), "certificate 0 of the evidence's chain is not a well-formed DER X.509"),
        (pack_evidence(b"\x11\xe0\x01\xff", CHAIN), "must be 38..16384 bytes"),
        (pack_evidence(b"\x12" + REPORT[1:], CHAIN), "GET_MEASUREMENTS request"),
        (pack_evidence(REPORT[:2] + b"\x00" + REPORT[3:], CHAIN), "signed SPDM 1.1 GET_MEASUREMENTS"),
        (pack_evidence(REPORT[:38] + b"\x61" + REPORT[39:], CHAIN), "not an SPDM 1.1 MEASUREMENTS response"),
        (pack_evidence(REPORT + b"\x00", CHAIN), "97 bytes after the opaque data"),
    ],
)
def test_malformed_evidence_gets_one_line(blob: bytes, match: str) -> None:
    refused(match, lambda: appraise(blob))


def test_every_truncation_and_many_corruptions_give_one_line() -> None:
    for n in range(0, len(REPORT), 7):
        with pytest.raises(AttestationError) as info:
            appraise(pack_evidence(REPORT[:n], CHAIN))
        assert "\n" not in str(info.value)
    # Corrupt the framing fields (counts and lengths) to their largest and smallest values.
    opaque_length_at = 37 + 8 + len(b"".join(b"x" * 55 for _ in range(64))) + 32
    for at in (37 + 4, 37 + 5, 37 + 6, 37 + 7, RECORD_AT + 2, RECORD_AT + 3, RECORD_AT + 5, opaque_length_at, opaque_length_at + 1):
        for value in (0x00, 0xFF):
            bad = REPORT[:at] + bytes([value]) + REPORT[at + 1 :]
            if bad != REPORT:
                with pytest.raises(AttestationError) as info:
                    appraise(pack_evidence(bad, CHAIN))
                assert "\n" not in str(info.value)


@settings(max_examples=150, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(REPORT) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.integers(0, 64), tail=st.binary(max_size=64))
def test_random_edits_never_pass_and_never_escape_as_another_error(edits: list[tuple[int, int]], cut: int, tail: bytes) -> None:
    report = bytearray(REPORT)
    for at, value in edits:
        report[at] = value
    mutated = bytes(report[: len(report) - cut]) + tail
    if mutated == REPORT:
        return
    with pytest.raises(AttestationError) as info:
        appraise(pack_evidence(mutated, CHAIN))
    assert "\n" not in str(info.value)


def test_evidence_of_another_kind_is_refused() -> None:
    evidence = Evidence("tdx", pack_evidence(REPORT, CHAIN), NONCE)
    refused(r"kind 'tdx', expected 'nvidia-gpu'", lambda: VERIFIER.appraise(evidence, NONCE, policy(), NOW, SaysGood()))


def test_collect_says_it_is_not_available_here() -> None:
    refused("not available on this host", lambda: VERIFIER.collect(NONCE))


# --- the tests' own chain: expiry, the FWID binding, and revocation from real CRLs in a bundle -----


DAY = 86400.0


def _der(tag: int, content: bytes) -> bytes:
    assert len(content) < 0x10000
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    if len(content) < 0x100:
        return bytes([tag, 0x81, len(content)]) + content
    return bytes([tag, 0x82]) + len(content).to_bytes(2, "big") + content


def dice_extension(fwid: bytes) -> x509.UnrecognizedExtension:
    """A DICE TcbInfo-like extension carrying one SHA-384 FWID: SEQUENCE { [6] { SEQUENCE { OID, OCTET } } }."""
    sha384 = bytes.fromhex("0609608648016503040202")
    fwids = _der(0xA6, _der(0x30, sha384 + _der(0x04, fwid)))
    return x509.UnrecognizedExtension(x509.ObjectIdentifier("2.23.133.5.4.1"), _der(0x30, fwids))


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def _cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, issuer_key: ec.EllipticCurvePrivateKey,
    *, ca: bool, not_before: float, not_after: float, extra: x509.ExtensionType | None = None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if extra is not None:
        builder = builder.add_extension(extra, critical=False)
    return builder.sign(issuer_key, hashes.SHA384())


@dataclass
class Pki:
    """Root -> intermediate -> leaf on P-384, the leaf certifying ``fwid``; it re-signs the sample report."""

    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    middle: x509.Certificate
    middle_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey

    @classmethod
    def make(cls, *, leaf_until: float = NOW + 365 * DAY, fwid: bytes = FWID) -> Pki:
        root_key, middle_key, leaf_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(3))
        since = NOW - 30 * DAY
        root = _cert("test root", root_key, None, root_key, ca=True, not_before=since, not_after=NOW + 3650 * DAY)
        middle = _cert("test intermediate", middle_key, root, root_key, ca=True, not_before=since, not_after=NOW + 3650 * DAY)
        leaf = _cert("test leaf", leaf_key, middle, middle_key, ca=False, not_before=since, not_after=leaf_until, extra=dice_extension(fwid))
        return cls(root, root_key, middle, middle_key, leaf, leaf_key)

    @property
    def root_der(self) -> bytes:
        return self.root.public_bytes(Encoding.DER)

    @property
    def chain(self) -> list[bytes]:
        return [c.public_bytes(Encoding.DER) for c in (self.leaf, self.middle, self.root)]

    def sign(self, report: bytes = REPORT) -> bytes:
        """``report`` with its signature replaced by the leaf's (raw r || s, SHA-384)."""
        body = report[:SIGNATURE_AT]
        r, s = decode_dss_signature(self.leaf_key.sign(body, ec.ECDSA(hashes.SHA384())))
        return body + r.to_bytes(48, "big") + s.to_bytes(48, "big")

    def crl(self, issuer: str, *, this: float, until: float, revoked: x509.Certificate | None = None) -> bytes:
        """A CRL of ``issuer`` ("root" or "middle"), optionally revoking ``revoked``."""
        cert, key = (self.root, self.root_key) if issuer == "root" else (self.middle, self.middle_key)
        builder = x509.CertificateRevocationListBuilder().issuer_name(cert.subject).last_update(_utc(this)).next_update(_utc(until))
        if revoked is not None:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(revoked.serial_number).revocation_date(_utc(this)).build()
            )
        return builder.sign(key, hashes.SHA384()).public_bytes(Encoding.DER)

    def policy(self, **kw: object) -> Policy:
        fields: dict[str, object] = {"roots": [self.root_der]}
        fields.update(kw)
        return policy(**fields)

    def ocsp_for_leaf(self, status: ocsp.OCSPCertStatus, *, this: float, until: float) -> bytes:
        """An OCSP response about the leaf, signed by its issuer (the intermediate)."""
        revoked_at = _utc(this) if status is ocsp.OCSPCertStatus.REVOKED else None
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response(self.leaf, self.middle, hashes.SHA384(), status, _utc(this), _utc(until), revoked_at, None)
            .responder_id(ocsp.OCSPResponderEncoding.HASH, self.middle)
        )
        return builder.sign(self.middle_key, hashes.SHA384()).public_bytes(Encoding.DER)


def bundle_of(tmp_path: Path, revocation_files: dict[str, bytes]) -> BundleRevocation:
    """A real bundle holding ``revocation_files`` (name -> DER; a name ending .ocsp is an OCSP response, else a CRL)."""
    kinds = {name: "ocsp" if name.endswith(".ocsp") else "crl" for name in revocation_files}
    files = [
        BundleFile(name, kinds[name], f"https://crl.example/{name}", NOW, *validity_of(kinds[name], data, name), data)
        for name, data in revocation_files.items()
    ]
    write_bundle(tmp_path / "bundle", files)
    return BundleRevocation(read_bundle(tmp_path / "bundle"))


def test_our_chain_with_current_crls_appraises(tmp_path: Path) -> None:
    pki = Pki.make()
    crls = {"middle.crl": pki.crl("middle", this=NOW - DAY, until=NOW + 7 * DAY), "root.crl": pki.crl("root", this=NOW - DAY, until=NOW + 30 * DAY)}
    claims = appraise(pack_evidence(pki.sign(), pki.chain), pol=pki.policy(), revocation=bundle_of(tmp_path, crls))
    assert claims.not_after == NOW + 7 * DAY  # the earliest: the intermediate's CRL
    assert claims.measurements["gpu-fwid"] == FWID


@pytest.mark.parametrize("status, outcome", [(ocsp.OCSPCertStatus.GOOD, None), (ocsp.OCSPCertStatus.REVOKED, "certificate 'test leaf' is revoked")])
def test_an_ocsp_response_for_the_leaf_decides_its_status(tmp_path: Path, status: ocsp.OCSPCertStatus, outcome: str | None) -> None:
    pki = Pki.make()
    files = {"leaf.ocsp": pki.ocsp_for_leaf(status, this=NOW - DAY, until=NOW + 2 * DAY), "root.crl": pki.crl("root", this=NOW - DAY, until=NOW + 30 * DAY)}
    blob = pack_evidence(pki.sign(), pki.chain)
    if outcome is None:
        assert appraise(blob, pol=pki.policy(), revocation=bundle_of(tmp_path, files)).not_after == NOW + 2 * DAY
    else:
        refused(outcome, lambda: appraise(blob, pol=pki.policy(), revocation=bundle_of(tmp_path, files)))


def test_an_expired_leaf_is_refused_naming_it() -> None:
    pki = Pki.make(leaf_until=NOW - DAY)
    line = refused(r"certificate 'test leaf' expired at ", lambda: appraise(pack_evidence(pki.sign(), pki.chain), pol=pki.policy()))
    assert _utc(NOW - DAY).strftime("%Y-%m-%dT%H:%M:%SZ") in line


def test_a_leaf_certifying_another_fwid_is_refused() -> None:
    pki = Pki.make(fwid=bytes(48))
    refused(r"FWID f5c384aebb579217\.\.\. is not the one 'test leaf' certifies", lambda: appraise(pack_evidence(pki.sign(), pki.chain), pol=pki.policy()))


def test_a_revoked_leaf_is_refused_naming_it_and_the_crl(tmp_path: Path) -> None:
    pki = Pki.make()
    crls = {
        "middle.crl": pki.crl("middle", this=NOW - DAY, until=NOW + 7 * DAY, revoked=pki.leaf),
        "root.crl": pki.crl("root", this=NOW - DAY, until=NOW + 30 * DAY),
    }
    refused(r"certificate 'test leaf' is revoked .*middle.crl", lambda: appraise(pack_evidence(pki.sign(), pki.chain), pol=pki.policy(), revocation=bundle_of(tmp_path, crls)))


def test_a_crl_past_its_next_update_fails_closed_unless_within_grace(tmp_path: Path) -> None:
    pki = Pki.make()
    crls = {"middle.crl": pki.crl("middle", this=NOW - 8 * DAY, until=NOW - DAY), "root.crl": pki.crl("root", this=NOW - DAY, until=NOW + 30 * DAY)}
    revocation = bundle_of(tmp_path, crls)
    blob = pack_evidence(pki.sign(), pki.chain)
    refused(r"middle.crl expired at", lambda: appraise(blob, pol=pki.policy(), revocation=revocation))
    # The appraiser holds the policy's grace too: a source answering from a stale file is refused.
    graced = BundleRevocation(read_bundle(tmp_path / "bundle"), grace_s=2 * DAY)
    refused(r"status of 'test leaf' from middle.crl is valid .* \(grace 0 s\), not at", lambda: appraise(blob, pol=pki.policy(), revocation=graced))
    claims = appraise(blob, pol=pki.policy(grace_s=2 * DAY), revocation=graced)
    assert claims.not_after == NOW + DAY  # the CRL's nextUpdate plus the grace


def test_a_crl_signed_by_someone_else_says_nothing(tmp_path: Path) -> None:
    pki, other = Pki.make(), Pki.make()
    # Same issuer names, other keys: the planted CRLs do not verify, so the status stays unknown.
    crls = {"middle.crl": other.crl("middle", this=NOW - DAY, until=NOW + 7 * DAY), "root.crl": other.crl("root", this=NOW - DAY, until=NOW + 30 * DAY)}
    refused(r"status of certificate 'test leaf' is unknown", lambda: appraise(pack_evidence(pki.sign(), pki.chain), pol=pki.policy(), revocation=bundle_of(tmp_path, crls)))


def test_a_certificate_issued_by_a_leaf_is_refused() -> None:
    pki = Pki.make()
    key = ec.generate_private_key(ec.SECP384R1())
    under_leaf = _cert("under the leaf", key, pki.leaf, pki.leaf_key, ca=False, not_before=NOW - DAY, not_after=NOW + DAY, extra=dice_extension(FWID))
    chain = [under_leaf.public_bytes(Encoding.DER), *pki.chain]
    refused(r"'test leaf' signs 'under the leaf' but is not a CA", lambda: appraise(pack_evidence(REPORT, chain), pol=pki.policy()))


# --- NVIDIA's own file formats, and `gtbus attest check` as a real process -------------------------


def test_evidence_from_nvidias_files_is_the_same_blob() -> None:
    report_txt, chain_pem = (DATA / "hopperAttestationReport.txt").read_bytes(), (DATA / "hopperCertChain.txt").read_bytes()
    assert evidence_from_nvidia_files(report_txt, chain_pem) == pack_evidence(REPORT, CHAIN)
    refused("not a report in hex", lambda: evidence_from_nvidia_files(b"zz" + report_txt, chain_pem))
    refused("not a report in hex", lambda: evidence_from_nvidia_files(b"\xff\xfe", chain_pem))
    refused("over 16384 bytes of report", lambda: evidence_from_nvidia_files(b"00" * (MAX_REPORT_SIZE + 1), chain_pem))
    refused("not PEM certificates", lambda: evidence_from_nvidia_files(report_txt, b"no certificates here"))
    refused("more than 8 certificates", lambda: evidence_from_nvidia_files(report_txt, chain_pem * 2))
    refused("too large", lambda: evidence_from_nvidia_files(report_txt, b"x" * (MAX_CHAIN_LENGTH * 2 * 8192 + 1)))


def attest_check(tmp_path: Path, blob: bytes, roots: list[bytes], bundle: Path) -> subprocess.CompletedProcess[str]:
    """Run `gtbus attest check` on ``blob`` with a policy file pinning two sample measurements."""
    (tmp_path / "evidence.bin").write_bytes(blob)
    for i, root in enumerate(roots):
        (tmp_path / f"root{i}.der").write_bytes(root)
    names = ", ".join(f'"root{i}.der"' for i in range(len(roots)))
    (tmp_path / "policy.toml").write_text(
        f'kind = "nvidia-gpu"\nroots = [{names}]\nrevocation = "offline"\n'
        f'[pinned]\ngpu-measurement-02 = "{SAMPLE.measurements[2].hex()}"\ngpu-fwid = "{FWID.hex()}"\n'
        '[min_versions]\ngpu-firmware = "96.00.5E.00.01"\ngpu-driver = "535.104.05"\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "gtbus", "attest", "check", str(tmp_path / "evidence.bin"), "--bundle", str(bundle),
         "--policy", str(tmp_path / "policy.toml"), "--nonce", NONCE.hex(), "--now", "2026-06-01T00:00:00Z"],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_attest_check_appraises_our_chain_and_fails_closed_on_the_sample(tmp_path: Path) -> None:
    pki = Pki.make()
    crls = {"middle.crl": pki.crl("middle", this=NOW - DAY, until=NOW + 7 * DAY), "root.crl": pki.crl("root", this=NOW - DAY, until=NOW + 30 * DAY)}
    bundle_of(tmp_path, crls)
    good = attest_check(tmp_path, pack_evidence(pki.sign(), pki.chain), [pki.root_der], tmp_path / "bundle")
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"ok   pinned gpu-fwid = {FWID.hex()}" in good.stdout
    assert "ok   version gpu-firmware = 96.00.9F.00.01" in good.stdout
    assert f"ok   report_data = {NONCE.hex()}" in good.stdout
    # NVIDIA's sample through the same command: nvtrust publishes no revocation data, so offline it fails closed.
    sample = attest_check(tmp_path, pack_evidence(REPORT, CHAIN), [NVIDIA_ROOT], tmp_path / "bundle")
    assert sample.returncode == 1
    fails = [line for line in sample.stdout.splitlines() if line.startswith("FAIL")]
    assert fails == ["FAIL nvidia-gpu revocation: status of certificate 'GH100 A01 GSP FMC LF' is unknown "
                     "(no CRL or OCSP response in the bundle covers CN=GH100 A01 GSP FMC LF,O=NVIDIA Corporation,"
                     "C=US,2.5.4.5=53C22BA15E5D68088282DA074ED9FB37AA585771)"], sample.stdout
    garbage = attest_check(tmp_path, b"\x00garbage", [NVIDIA_ROOT], tmp_path / "bundle")
    assert garbage.returncode == 1 and "FAIL nvidia-gpu evidence: not a msgpack map" in garbage.stdout
    assert "Traceback" not in sample.stderr + garbage.stderr + good.stderr


def _rewritten(cert: x509.Certificate, old: bytes, new: bytes) -> bytes:
    """``cert``'s DER with one byte string replaced by another of the same length (the signature no longer matters)."""
    der = cert.public_bytes(Encoding.DER)
    assert len(old) == len(new) and der.count(old) == 1
    return der.replace(old, new)


def test_certificates_with_repeated_or_malformed_extensions_are_one_line() -> None:
    pki = Pki.make()
    key = ec.generate_private_key(ec.SECP384R1())
    # An extension's OID made into basicConstraints' (2.5.29.19), which the certificate already has.
    basic_oid = bytes.fromhex("0603551d13")
    twice = _cert("twice", key, pki.middle, pki.middle_key, ca=False, not_before=NOW - DAY, not_after=NOW + DAY,
                  extra=x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x30\x00"))
    repeated = _rewritten(twice, bytes.fromhex("06032a0304"), basic_oid)
    refused(r"certificate 0 of the evidence's chain is not a well-formed", lambda: appraise(pack_evidence(REPORT, [repeated, *pki.chain[1:]]), pol=pki.policy()))
    # An extension whose value is not what its OID defines (an OCTET STRING where basicConstraints is a SEQUENCE).
    odd = _cert("odd", key, pki.middle, pki.middle_key, ca=False, not_before=NOW - DAY, not_after=NOW + DAY,
                extra=x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x04\x01\xff"))
    malformed = _rewritten(odd, bytes.fromhex("06032a0304"), bytes.fromhex("0603551d11"))  # subjectAltName
    refused(r"certificate 0 of the evidence's chain is not a well-formed", lambda: appraise(pack_evidence(REPORT, [malformed, *pki.chain[1:]]), pol=pki.policy()))
    refused(r"a root certificate of the policy is not a well-formed", lambda: appraise(pack_evidence(REPORT, pki.chain[:-1]), pol=pki.policy(roots=[repeated])))
