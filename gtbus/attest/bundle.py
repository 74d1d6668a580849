"""The offline bundle: collateral and revocation files carried to an air-gapped site.

A bundle is a folder holding ``manifest.json`` and the files it names. The
manifest says, per file: its ``kind``, where it was fetched from (``source``),
when (``fetched_at``), the period it is valid for (``not_before`` ..
``not_after``, from the file itself: a CRL's thisUpdate/nextUpdate, an OCSP
response's, a certificate's, a TDX collateral's issueDate/nextUpdate, an
NVIDIA RIM's signing chain's), its
``size`` and its BLAKE3 hash.

Rules this module keeps:

* Read strictly: the manifest and every file are bounded in size before they
  are read; every field is typed; a file that is missing, of another size or
  hash than the manifest says is refused with one line naming it. A bundle is
  carried by hand across an air gap, so it is treated as hostile input.
* Validity is enforced at appraisal time (``now``), never at load time: the
  same bundle is good on Monday and refused once its nextUpdate has passed,
  plus the policy's grace (``grace_s``; 0 = fail closed).
* :class:`BundleRevocation` answers :class:`~gtbus.attest.verifier.RevocationSource`
  from the bundle's CRLs and OCSP responses, and only from those whose
  signature verifies with the issuer's key: a planted CRL says nothing.

Writing a bundle (``gtbus attest fetch``) goes through :func:`write_bundle`:
each file 0600, atomically, the manifest last, so a half-written bundle has no
manifest and is refused whole.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import blake3
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import ocsp

from gtbus.attest.verifier import AttestationError, CertState, CertStatus
from gtbus.bounded_read import read_bounded as _read_bounded
from gtbus.private_files import private_dir, write_private

MANIFEST_NAME: Final = "manifest.json"
MANIFEST_VERSION: Final = 1
MAX_MANIFEST_SIZE: Final = 1 << 20
MAX_FILE_SIZE: Final = 4 << 20  # a PCK CRL is ~3 KiB, a full TDX collateral ~16 KiB; 4 MiB is generous
MAX_FILES: Final = 256
# Kinds this module knows how to read the validity of (see :func:`validity_of`).
FILE_KINDS: Final = ("crl", "ocsp", "cert", "tdx-collateral", "driver-rim", "vbios-rim")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_ENTRY_FIELDS: Final = {"name", "kind", "source", "fetched_at", "not_before", "not_after", "size", "blake3"}

__all__ = [
    "Bundle",
    "BundleFile",
    "BundleRevocation",
    "FILE_KINDS",
    "MANIFEST_NAME",
    "read_bounded",
    "read_bundle",
    "validity_of",
    "write_bundle",
]


@dataclass(frozen=True)
class BundleFile:
    """One file of a bundle, as its manifest describes it, with its checked content."""

    name: str
    kind: str
    source: str
    fetched_at: float
    not_before: float
    not_after: float
    data: bytes

    def require_valid(self, now: float, grace_s: float = 0.0) -> None:
        """AttestationError naming this file and its date unless ``now`` is inside its validity (plus grace)."""
        if now < self.not_before:
            raise AttestationError(f"bundle: {self.name} is not valid before {_iso(self.not_before)} (now {_iso(now)})")
        if now > self.not_after + grace_s:
            extra = f" + grace {grace_s:g} s" if grace_s else ""
            raise AttestationError(f"bundle: {self.name} expired at {_iso(self.not_after)}{extra} (now {_iso(now)})")

    def manifest_entry(self) -> dict[str, object]:
        """This file's manifest entry."""
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "fetched_at": self.fetched_at,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "size": len(self.data),
            "blake3": blake3.blake3(self.data).hexdigest(),
        }


@dataclass(frozen=True)
class Bundle:
    """A bundle read and checked against its manifest."""

    path: Path
    files: tuple[BundleFile, ...]

    def of_kind(self, kind: str) -> tuple[BundleFile, ...]:
        """The files of ``kind``, in manifest order."""
        return tuple(f for f in self.files if f.kind == kind)


def _iso(t: float) -> str:
    """A UTC date-time for error lines."""
    try:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return repr(t)


def _utc(d: dt.datetime) -> float:
    """Seconds since the epoch of a datetime that is UTC whether or not it says so."""
    return (d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)).timestamp()


def read_bounded(path: Path, limit: int, what: str, shown: str | None = None, *, follow: bool = False) -> bytes:
    """:func:`gtbus.bounded_read.read_bounded`, failing as AttestationError (a bundle's files are never followed through links)."""
    return _read_bounded(path, limit, what, shown, follow=follow, error=AttestationError)


def _number(entry: Mapping[str, object], key: str, where: str) -> float:
    """A finite number field (bool is not a number here)."""
    v = entry[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AttestationError(f"bundle: {where}: {key} must be a finite number")
    return float(v)


def _string(entry: Mapping[str, object], key: str, where: str, limit: int = 2048) -> str:
    """A non-empty string field of bounded length."""
    v = entry[key]
    if not isinstance(v, str) or not 0 < len(v) <= limit:
        raise AttestationError(f"bundle: {where}: {key} must be a string of 1..{limit} characters")
    return v


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read a bundle folder strictly: manifest typed and bounded, every file present with its size and BLAKE3."""
    root = Path(path)
    if not root.is_dir():
        raise AttestationError(f"bundle: {root} is not a folder")
    raw = read_bounded(root / MANIFEST_NAME, MAX_MANIFEST_SIZE, "bundle: manifest", MANIFEST_NAME)
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AttestationError(f"bundle: {MANIFEST_NAME} is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or set(manifest) != {"version", "files"}:
        raise AttestationError(f"bundle: {MANIFEST_NAME} must be an object with exactly version and files")
    if manifest["version"] != MANIFEST_VERSION or isinstance(manifest["version"], bool):
        raise AttestationError(f"bundle: {MANIFEST_NAME} version {manifest['version']!r}, this gtbus reads {MANIFEST_VERSION}")
    entries = manifest["files"]
    if not isinstance(entries, list) or len(entries) > MAX_FILES:
        raise AttestationError(f"bundle: {MANIFEST_NAME} files must be a list of at most {MAX_FILES}")
    files: list[BundleFile] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{MANIFEST_NAME} file {i}"
        if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
            raise AttestationError(f"bundle: {where} must have exactly {', '.join(sorted(_ENTRY_FIELDS))}")
        name = _string(entry, "name", where, 100)
        if not _NAME_RE.fullmatch(name) or name == MANIFEST_NAME:
            raise AttestationError(f"bundle: {where}: name {name!r} must be a plain file name (letters, digits, . _ -)")
        if name in seen:
            raise AttestationError(f"bundle: {where}: {name} is listed twice")
        seen.add(name)
        where = f"{MANIFEST_NAME} entry {name}"
        kind = _string(entry, "kind", where, 32)
        if kind not in FILE_KINDS:
            raise AttestationError(f"bundle: {where}: kind {kind!r} is not one of {', '.join(FILE_KINDS)}")
        size = entry["size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_FILE_SIZE:
            raise AttestationError(f"bundle: {where}: size must be an integer 1..{MAX_FILE_SIZE}")
        digest = _string(entry, "blake3", where, 64)
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise AttestationError(f"bundle: {where}: blake3 must be 64 lowercase hex digits")
        data = read_bounded(root / name, MAX_FILE_SIZE, "bundle: file", name)
        if len(data) != size:
            raise AttestationError(f"bundle: {name} is {len(data)} bytes, the manifest says {size} (changed since fetched)")
        if blake3.blake3(data).hexdigest() != digest:
            raise AttestationError(f"bundle: {name} does not match its BLAKE3 in the manifest (changed since fetched)")
        f = BundleFile(
            name=name,
            kind=kind,
            source=_string(entry, "source", where),
            fetched_at=_number(entry, "fetched_at", where),
            not_before=_number(entry, "not_before", where),
            not_after=_number(entry, "not_after", where),
            data=data,
        )
        if f.not_after < f.not_before:
            raise AttestationError(f"bundle: {where}: not_after is before not_before")
        files.append(f)
    return Bundle(root, tuple(files))


def write_bundle(path: str | os.PathLike[str], files: list[BundleFile]) -> Path:
    """Write ``files`` and their manifest into folder ``path`` (0700): each file 0600 and atomic, the manifest last."""
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise AttestationError("bundle: two files share a name")
    for name in names:
        if not _NAME_RE.fullmatch(name) or name == MANIFEST_NAME:
            raise AttestationError(f"bundle: {name!r} is not a plain file name")
    root = private_dir(path)
    for f in files:
        write_private(root / f.name, f.data)
    manifest = {"version": MANIFEST_VERSION, "files": [f.manifest_entry() for f in files]}
    write_private(root / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return root


def validity_of(kind: str, data: bytes, name: str) -> tuple[float, float]:
    """The (not_before, not_after) a file of ``kind`` states about itself; AttestationError if it does not parse."""
    try:
        if kind == "crl":
            crl = _load_crl(data)
            if crl.next_update_utc is None:
                raise AttestationError(f"bundle: {name}: CRL has no nextUpdate (cannot bound its validity)")
            return _utc(crl.last_update_utc), _utc(crl.next_update_utc)
        if kind == "ocsp":
            singles = list(_load_ocsp(data, name).responses)
            if not singles or any(r.next_update_utc is None for r in singles):
                raise AttestationError(f"bundle: {name}: OCSP response has no nextUpdate (cannot bound its validity)")
            return max(_utc(r.this_update_utc) for r in singles), min(_utc(r.next_update_utc) for r in singles)  # type: ignore[arg-type]
        if kind == "cert":
            cert = _load_cert(data)
            return _utc(cert.not_valid_before_utc), _utc(cert.not_valid_after_utc)
        if kind == "tdx-collateral":
            return tdx_collateral_validity(data, name)
        if kind in ("driver-rim", "vbios-rim"):
            from gtbus.attest.nvidia_rim import rim_validity  # lxml: only for bundles that carry NVIDIA RIMs

            return rim_validity(data, name)
    except AttestationError:
        raise
    except (ValueError, TypeError) as exc:
        raise AttestationError(f"bundle: {name}: not a valid {kind}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    raise AttestationError(f"bundle: {name}: kind {kind!r} is not one of {', '.join(FILE_KINDS)}")


def tdx_collateral_validity(data: bytes, name: str) -> tuple[float, float]:
    """When every part of a TDX collateral JSON is valid: TCB info, QE identity, both CRLs, the issuer chains.

    The earliest end wins: Intel's PCK CRL typically expires minutes before
    the TCB info it came with, and dcap-qvl refuses the quote from then on.
    """
    try:
        doc = json.loads(data)
        starts, ends = [], []
        for key in ("tcb_info", "qe_identity"):
            body = json.loads(doc[key])
            starts.append(_parse_iso(body["issueDate"]))
            ends.append(_parse_iso(body["nextUpdate"]))
        for key in ("root_ca_crl", "pck_crl"):
            crl = x509.load_der_x509_crl(bytes.fromhex(doc[key]))
            if crl.next_update_utc is None:
                raise ValueError(f"{key} has no nextUpdate")
            starts.append(_utc(crl.last_update_utc))
            ends.append(_utc(crl.next_update_utc))
        for key in ("pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain"):
            for cert in x509.load_pem_x509_certificates(doc[key].encode()):
                starts.append(_utc(cert.not_valid_before_utc))
                ends.append(_utc(cert.not_valid_after_utc))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise AttestationError(
            f"bundle: {name}: not a TDX collateral JSON (tcb_info, qe_identity, CRLs, issuer chains): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    return max(starts), min(ends)


def _parse_iso(value: object) -> float:
    """Seconds since the epoch of an ISO 8601 UTC date-time such as ``2025-07-19T10:16:03Z``."""
    if not isinstance(value, str) or len(value) > 40:
        raise ValueError(f"date {value!r} is not an ISO date-time")
    return _utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))


def _load_cert(data: bytes) -> x509.Certificate:
    """A certificate from DER or PEM."""
    return x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----") else x509.load_der_x509_certificate(data)


def _load_crl(data: bytes) -> x509.CertificateRevocationList:
    """A CRL from DER or PEM."""
    return x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----") else x509.load_der_x509_crl(data)


def _load_ocsp(data: bytes, name: str) -> ocsp.OCSPResponse:
    """A successful OCSP response (a responder's error answer says nothing about any certificate)."""
    resp = ocsp.load_der_ocsp_response(data)
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise AttestationError(f"bundle: {name}: OCSP response status is {resp.response_status.name}, not SUCCESSFUL")
    return resp


def _signed_by(public_key: object, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None) -> bool:
    """Whether ``signature`` over ``data`` verifies with ``public_key`` (EC, RSA PKCS#1 v1.5 or Ed25519)."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey) and algorithm is not None:
            public_key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(public_key, rsa.RSAPublicKey) and algorithm is not None:
            public_key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


class BundleRevocation:
    """Revocation status from a bundle's CRLs and OCSP responses, each within its validity plus ``grace_s``."""

    def __init__(self, bundle: Bundle, grace_s: float = 0.0) -> None:
        if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or not math.isfinite(grace_s) or grace_s < 0:
            raise AttestationError("bundle: grace_s must be a finite number >= 0")
        self._bundle = bundle
        self._grace_s = float(grace_s)

    def status(self, cert_der: bytes, issuer_der: bytes, now: float) -> CertStatus:
        """The status of ``cert_der`` from the first OCSP response or CRL of its issuer that is signed and current.

        GOOD or REVOKED (the verifier decides what a revocation means and says
        so); a revocation file of this issuer that is signed but expired (past
        nextUpdate + grace) raises AttestationError naming it and its date:
        fail closed. No file of this issuer at all: UNKNOWN.
        """
        try:
            cert = x509.load_der_x509_certificate(cert_der)
            issuer = x509.load_der_x509_certificate(issuer_der)
        except ValueError as exc:
            raise AttestationError(f"revocation: certificate does not parse: {exc}") from None
        subject = cert.subject.rfc4514_string()
        for f in self._bundle.files:
            if f.kind == "ocsp":
                answer = self._from_ocsp(f, cert, issuer)
            elif f.kind == "crl":
                answer = self._from_crl(f, cert, issuer)
            else:
                continue
            if answer is None:
                continue
            f.require_valid(now, self._grace_s)
            return answer
        return CertStatus(CertState.UNKNOWN, "bundle", now, now, f"no CRL or OCSP response in the bundle covers {subject}")

    @staticmethod
    def _from_crl(f: BundleFile, cert: x509.Certificate, issuer: x509.Certificate) -> CertStatus | None:
        """The CRL's answer, or None when this CRL is not the issuer's (by name and signature)."""
        try:
            crl = _load_crl(f.data)
        except ValueError:
            return None
        try:
            signed = crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
        except (TypeError, ValueError):  # an issuer key type CRLs cannot be signed with
            signed = False
        if not signed:
            return None
        this, nxt = _utc(crl.last_update_utc), _utc(crl.next_update_utc) if crl.next_update_utc else f.not_after
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            return CertStatus(CertState.REVOKED, f.name, this, nxt, f"serial {cert.serial_number:x} revoked {entry.revocation_date_utc:%Y-%m-%d}")
        return CertStatus(CertState.GOOD, f.name, this, nxt)

    @staticmethod
    def _from_ocsp(f: BundleFile, cert: x509.Certificate, issuer: x509.Certificate) -> CertStatus | None:
        """The OCSP response's answer, or None when it is not about this certificate or not signed for its issuer."""
        try:
            resp = _load_ocsp(f.data, f.name)
        except (ValueError, AttestationError):
            return None
        # A response may carry several single responses (one per certificate asked about).
        single = next(
            (
                r
                for r in resp.responses
                if r.serial_number == cert.serial_number and r.issuer_key_hash == _issuer_key_hash(issuer, r.hash_algorithm)
            ),
            None,
        )
        if single is None or not _ocsp_signed_for(resp, issuer):
            return None
        nxt = _utc(single.next_update_utc) if single.next_update_utc else f.not_after
        state = {
            ocsp.OCSPCertStatus.GOOD: CertState.GOOD,
            ocsp.OCSPCertStatus.REVOKED: CertState.REVOKED,
        }.get(single.certificate_status, CertState.UNKNOWN)
        reason = f"serial {cert.serial_number:x} revoked per OCSP" if state is CertState.REVOKED else ""
        return CertStatus(state, f.name, _utc(single.this_update_utc), nxt, reason)


def _issuer_key_hash(issuer: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bytes:
    """The OCSP CertID issuerKeyHash: the hash of the issuer's subjectPublicKey bit string."""
    from cryptography.hazmat.primitives import serialization

    spki = issuer.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(algorithm)
    digest.update(_spki_bit_string(spki))
    return digest.finalize()


def _spki_bit_string(spki: bytes) -> bytes:
    """The subjectPublicKey BIT STRING content (without its unused-bits byte) of a DER SubjectPublicKeyInfo."""
    pos = 0

    def read_header(p: int) -> tuple[int, int, int]:
        tag = spki[p]
        length = spki[p + 1]
        p += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(spki[p : p + n], "big")
            p += n
        return tag, length, p

    _, _, pos = read_header(pos)  # SEQUENCE SubjectPublicKeyInfo
    _, alg_len, alg_at = read_header(pos)  # SEQUENCE AlgorithmIdentifier
    tag, bits_len, bits_at = read_header(alg_at + alg_len)
    if tag != 0x03:
        raise AttestationError("revocation: issuer key is not a BIT STRING")
    return spki[bits_at + 1 : bits_at + bits_len]


def _ocsp_signed_for(resp: ocsp.OCSPResponse, issuer: x509.Certificate) -> bool:
    """Whether the response is signed by the issuer, or by a responder certificate the issuer signed for OCSP."""
    algorithm = resp.signature_hash_algorithm
    if _signed_by(issuer.public_key(), resp.signature, resp.tbs_response_bytes, algorithm):
        return True
    for responder in resp.certificates:
        try:
            responder.verify_directly_issued_by(issuer)
            eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            continue
        if x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING in eku and _signed_by(
            responder.public_key(), resp.signature, resp.tbs_response_bytes, algorithm
        ):
            return True
    return False
