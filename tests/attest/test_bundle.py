"""The offline bundle: strict reading, validity per file, and revocation from signed CRLs and OCSP responses."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gtbus.attest.bundle import (
    MANIFEST_NAME,
    BundleFile,
    BundleRevocation,
    read_bundle,
    validity_of,
    write_bundle,
)
from gtbus.attest.verifier import AttestationError, CertState

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
DER = serialization.Encoding.DER


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Pki:
    """A real CA (P-256), a leaf it issued, a CRL and OCSP responses it signs."""

    def __init__(self, cn: str = "Test Root CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(1)
            .not_valid_before(T0)
            .not_valid_after(T0 + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, serial: int, eku: x509.ObjectIdentifier | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(f"device {serial}"))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(T0)
            .not_valid_after(T0 + dt.timedelta(days=365))
        )
        if eku is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        return b.sign(self.key, hashes.SHA256()), key

    def crl(self, revoked: list[int], days: int = 30, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
        b = x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject).last_update(T0).next_update(T0 + dt.timedelta(days=days))
        for serial in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(T0).build()
            )
        return b.sign(key or self.key, hashes.SHA256()).public_bytes(DER)

    def ocsp(
        self,
        cert: x509.Certificate,
        status: ocsp.OCSPCertStatus,
        days: int = 7,
        responder: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ) -> bytes:
        b = ocsp.OCSPResponseBuilder().add_response(
            cert=cert,
            issuer=self.cert,
            algorithm=hashes.SHA1(),
            cert_status=status,
            this_update=T0,
            next_update=T0 + dt.timedelta(days=days),
            revocation_time=T0 if status is ocsp.OCSPCertStatus.REVOKED else None,
            revocation_reason=None,
        )
        signer_cert, signer_key = responder or (self.cert, self.key)
        b = b.responder_id(ocsp.OCSPResponderEncoding.HASH, signer_cert)
        if responder:
            b = b.certificates([signer_cert])
        return b.sign(signer_key, hashes.SHA256()).public_bytes(DER)


def entry(name: str, kind: str, data: bytes) -> BundleFile:
    nb, na = validity_of(kind, data, name)
    return BundleFile(name, kind, f"https://example.test/{name}", T0.timestamp(), nb, na, data)


def at(days: float) -> float:
    return (T0 + dt.timedelta(days=days)).timestamp()


@pytest.fixture
def pki() -> Pki:
    return Pki()


def test_written_bundle_reads_back_private(tmp_path: Path, pki: Pki) -> None:
    crl = pki.crl([7])
    root = write_bundle(tmp_path / "b", [entry("root.crl", "crl", crl), entry("root.der", "cert", pki.cert.public_bytes(DER))])
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    for p in root.iterdir():
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    b = read_bundle(root)
    assert [f.name for f in b.files] == ["root.crl", "root.der"]
    assert b.of_kind("crl")[0].data == crl
    assert b.files[0].not_after == at(30)


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST_NAME).read_text())


def _rewrite(root: Path, doc: object) -> None:
    (root / MANIFEST_NAME).write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r, m: (r / "root.crl").unlink(), "file root.crl is missing"),
        (lambda r, m: (r / "root.crl").write_bytes((r / "root.crl").read_bytes()[:-1] + b"\x00"), "root.crl does not match its BLAKE3"),
        (lambda r, m: (r / "root.crl").write_bytes(b"x" * 10), "root.crl is 10 bytes, the manifest says"),
        (lambda r, m: _rewrite(r, {**m, "version": 2}), "version 2, this gtbus reads 1"),
        (lambda r, m: _rewrite(r, {**m, "extra": 1}), "exactly version and files"),
        (lambda r, m: _rewrite(r, [1, 2]), "exactly version and files"),
        (lambda r, m: (r / MANIFEST_NAME).write_bytes(b"{not json"), "manifest.json is not JSON"),
        (lambda r, m: (r / MANIFEST_NAME).unlink(), "manifest manifest.json is missing"),
        (lambda r, m: _rewrite(r, {**m, "files": [{**m["files"][0], "name": "../etc/passwd"}]}), "must be a plain file name"),
        (lambda r, m: _rewrite(r, {**m, "files": [m["files"][0], m["files"][0]]}), "root.crl is listed twice"),
        (lambda r, m: _rewrite(r, {**m, "files": [{**m["files"][0], "kind": "pdf"}]}), "kind 'pdf' is not one of"),
        (lambda r, m: _rewrite(r, {**m, "files": [{**m["files"][0], "size": 1 << 40}]}), "size must be an integer"),
        (lambda r, m: _rewrite(r, {**m, "files": [{**m["files"][0], "size": True}]}), "size must be an integer"),
        (lambda r, m: _rewrite(r, {**m, "files": [{**m["files"][0], "not_after": "soon"}]}), "not_after must be a finite number"),
        (lambda r, m: _rewrite(r, {**m, "files": [{**m["files"][0], "not_after": 0}]}), "not_after is before not_before"),
        (lambda r, m: _rewrite(r, {**m, "files": [{**m["files"][0], "blake3": "AB"}]}), "blake3 must be 64 lowercase hex"),
        (lambda r, m: _rewrite(r, {**m, "files": [{k: v for k, v in m["files"][0].items() if k != "source"}]}), "must have exactly"),
        (lambda r, m: _rewrite(r, {**m, "files": [{}] * 300}), "at most 256"),
        (lambda r, m: (r / MANIFEST_NAME).write_bytes(b" " * ((1 << 20) + 1)), "over the 1048576-byte limit"),
    ],
)
def test_tampered_bundle_refused_with_one_line(tmp_path: Path, pki: Pki, mutate, match: str) -> None:
    root = write_bundle(tmp_path / "b", [entry("root.crl", "crl", pki.crl([]))])
    mutate(root, _manifest(root))
    with pytest.raises(AttestationError, match=match) as err:
        read_bundle(root)
    assert "\n" not in str(err.value)


def test_symlinked_file_is_refused(tmp_path: Path, pki: Pki) -> None:
    root = write_bundle(tmp_path / "b", [entry("root.crl", "crl", pki.crl([]))])
    real = tmp_path / "elsewhere.crl"
    (root / "root.crl").rename(real)
    (root / "root.crl").symlink_to(real)
    with pytest.raises(AttestationError, match="bundle: file root.crl: cannot read"):
        read_bundle(root)


def test_ocsp_without_next_update_cannot_bound_validity(pki: Pki) -> None:
    cert, _ = pki.issue(5)
    b = ocsp.OCSPResponseBuilder().add_response(
        cert=cert, issuer=pki.cert, algorithm=hashes.SHA1(), cert_status=ocsp.OCSPCertStatus.GOOD,
        this_update=T0, next_update=None, revocation_time=None, revocation_reason=None,
    )
    data = b.responder_id(ocsp.OCSPResponderEncoding.HASH, pki.cert).sign(pki.key, hashes.SHA256()).public_bytes(DER)
    with pytest.raises(AttestationError, match="x.ocsp: OCSP response has no nextUpdate"):
        validity_of("ocsp", data, "x.ocsp")
    unauthorized = ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED).public_bytes(DER)
    with pytest.raises(AttestationError, match="OCSP response status is UNAUTHORIZED, not SUCCESSFUL"):
        validity_of("ocsp", unauthorized, "x.ocsp")


def test_validity_of_rejects_garbage(pki: Pki) -> None:
    with pytest.raises(AttestationError, match="x.crl: not a valid crl"):
        validity_of("crl", b"\x30\x03\x02\x01\x01", "x.crl")
    with pytest.raises(AttestationError, match="not a TDX collateral JSON"):
        validity_of("tdx-collateral", b'{"tcb_info": "{}"}', "c.json")
    no_next = (
        x509.CertificateRevocationListBuilder().issuer_name(pki.cert.subject).last_update(T0).next_update(T0)
    )  # cryptography requires nextUpdate; an equal one still bounds validity to an instant
    nb, na = validity_of("crl", no_next.sign(pki.key, hashes.SHA256()).public_bytes(DER), "x.crl")
    assert nb == na


def revocation(tmp_path: Path, files: list[BundleFile], grace_s: float = 0.0) -> BundleRevocation:
    return BundleRevocation(read_bundle(write_bundle(tmp_path / "b", files)), grace_s)


def test_crl_good_revoked_and_expired(tmp_path: Path, pki: Pki) -> None:
    good, _ = pki.issue(5)
    bad, _ = pki.issue(7)
    src = revocation(tmp_path, [entry("root.crl", "crl", pki.crl([7]))])
    issuer = pki.cert.public_bytes(DER)
    st = src.status(good.public_bytes(DER), issuer, at(1))
    assert st.state is CertState.GOOD and st.source == "root.crl"
    st = src.status(bad.public_bytes(DER), issuer, at(1))
    assert (st.state, st.source, st.reason) == (CertState.REVOKED, "root.crl", "serial 7 revoked 2026-01-01")
    with pytest.raises(AttestationError, match="root.crl expired at 2026-01-31T00:00:00Z"):
        src.status(good.public_bytes(DER), issuer, at(31))


def test_grace_period_bounds_an_expired_crl(tmp_path: Path, pki: Pki) -> None:
    good, _ = pki.issue(5)
    src = revocation(tmp_path, [entry("root.crl", "crl", pki.crl([]))], grace_s=2 * 86400)
    issuer = pki.cert.public_bytes(DER)
    assert src.status(good.public_bytes(DER), issuer, at(31)).state is CertState.GOOD
    with pytest.raises(AttestationError, match=r"expired at 2026-01-31T00:00:00Z \+ grace 172800 s"):
        src.status(good.public_bytes(DER), issuer, at(32.5))
    with pytest.raises(AttestationError, match="grace_s must be"):
        BundleRevocation(read_bundle(tmp_path / "b"), float("nan"))


def test_crl_signed_by_another_key_says_nothing(tmp_path: Path, pki: Pki) -> None:
    forger = ec.generate_private_key(ec.SECP256R1())
    good, _ = pki.issue(5)
    # A planted CRL with the issuer's name but another key would "revoke" or "clear" at will: ignored.
    src = revocation(tmp_path, [entry("forged.crl", "crl", pki.crl([5], key=forger))])
    st = src.status(good.public_bytes(DER), pki.cert.public_bytes(DER), at(1))
    assert st.state is CertState.UNKNOWN


def test_ocsp_good_revoked_and_delegated_responder(tmp_path: Path, pki: Pki) -> None:
    good, _ = pki.issue(5)
    bad, _ = pki.issue(7)
    responder = pki.issue(99, ExtendedKeyUsageOID.OCSP_SIGNING)
    files = [
        entry("good.ocsp", "ocsp", pki.ocsp(good, ocsp.OCSPCertStatus.GOOD, responder=responder)),
        entry("bad.ocsp", "ocsp", pki.ocsp(bad, ocsp.OCSPCertStatus.REVOKED)),
    ]
    src = revocation(tmp_path, files)
    issuer = pki.cert.public_bytes(DER)
    st = src.status(good.public_bytes(DER), issuer, at(1))
    assert (st.state, st.source, st.next_update) == (CertState.GOOD, "good.ocsp", at(7))
    st = src.status(bad.public_bytes(DER), issuer, at(1))
    assert (st.state, st.source) == (CertState.REVOKED, "bad.ocsp")
    with pytest.raises(AttestationError, match="good.ocsp expired at 2026-01-08"):
        src.status(good.public_bytes(DER), issuer, at(8))


def test_ocsp_from_a_responder_without_the_issuers_blessing_says_nothing(tmp_path: Path, pki: Pki) -> None:
    good, _ = pki.issue(5)
    other = Pki("Other CA")
    rogue = other.issue(99, ExtendedKeyUsageOID.OCSP_SIGNING)  # right EKU, wrong issuer
    no_eku = pki.issue(98)  # right issuer, no OCSP signing EKU
    files = [
        entry("rogue.ocsp", "ocsp", pki.ocsp(good, ocsp.OCSPCertStatus.REVOKED, responder=rogue)),
        entry("noeku.ocsp", "ocsp", pki.ocsp(good, ocsp.OCSPCertStatus.REVOKED, responder=no_eku)),
    ]
    st = revocation(tmp_path, files).status(good.public_bytes(DER), pki.cert.public_bytes(DER), at(1))
    assert st.state is CertState.UNKNOWN


def test_unparseable_certificate_is_one_line(tmp_path: Path, pki: Pki) -> None:
    src = revocation(tmp_path, [entry("root.crl", "crl", pki.crl([]))])
    with pytest.raises(AttestationError, match="revocation: certificate does not parse"):
        src.status(b"\x30\x00", pki.cert.public_bytes(DER), at(1))
