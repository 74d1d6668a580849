"""NVIDIA GPU evidence (Hopper), appraised offline on ``cryptography``.

The evidence of one GPU is its *attestation report* and the certificate chain
of its attestation key. The report is an SPDM 1.1 transcript: the
GET_MEASUREMENTS request the driver sent (with the appraiser's nonce) followed
by the GPU's MEASUREMENTS response, signed by the device key::

    request   0  SPDMVersion 0x11 | 1 code 0xE0 | 2 param1 (bit 0: sign) | 3 param2 (0xFF: all)
              4  nonce (32)       | 36 slot id                                  = 37 bytes
    response  0  SPDMVersion 0x11 | 1 code 0x60 | 2 param1 | 3 param2
              4  number of blocks (1) | 5 record length L1 (3, little-endian)
              8  measurement record (L1): blocks of
                   index (1) | specification (1, bit 0 = DMTF) | size (2)
                   | DMTF value type (1) | value size (2) | value
              8+L1   responder nonce (32)
              40+L1  opaque length L2 (2) | opaque data (L2): [type (2) | size (2) | data]*
              42+L1+L2  signature: ECDSA P-384 r||s (96) over SHA-384 of
                        request || response-without-signature

The opaque data carries the driver version (type 3), the VBIOS version
(type 6) and the firmware id (FWID, type 20), which must equal the FWID the
device certificate carries in its TCG DICE extension (2.23.133.5.4.1): that
ties the running firmware to the key that signed.

Appraisal checks, in this order, and fails with one line naming what failed:
sizes and shape before anything is parsed; the request nonce is the
appraiser's; each certificate is signed by the next and the chain ends at one
of the policy's roots (the NVIDIA Device Identity CA); every certificate is
valid at ``now``; the report's signature with the leaf's key; the FWID; the
revocation status of every certificate below the root (fail closed: unknown is
refused; a status past its nextUpdate plus the policy's grace is refused);
the policy's pinned measurements and minimum versions.

Evidence blob (kind ``nvidia-gpu``): a msgpack map ``{"report": bytes,
"chain": [DER, ...]}``, leaf first. :func:`pack_evidence` builds it;
:func:`evidence_from_nvidia_files` builds it from the report (hex) and chain
(PEM) files NVIDIA's tools write.

Collecting needs a GPU in confidential-computing mode and NVIDIA's driver
library; this module does not talk to the driver, so :meth:`NvidiaVerifier.collect`
says it is not available. Reference values come from NVIDIA's reference
integrity manifests (RIMs) of the driver and the VBIOS, given to
:class:`NvidiaVerifier` (from the policy's ``driver_rim``/``vbios_rim`` or the
bundle) and appraised by :mod:`gtbus.attest.nvidia_rim` (signed up to the
policy's ``rim_roots``; every active measurement must match, and each RIM's
version must be the evidence's), and/or from the policy's pinned values
(``gpu-measurement-NN``, NN the block index, and ``gpu-fwid``); the two
combine: a pinned value must match too. A policy with neither is refused.
Measurements no RIM marks active and the policy does not pin are reported in
the claims, not judged.
"""

from __future__ import annotations

import datetime as dt
import hmac
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from gtbus.attest.verifier import (
    NONCE_SIZE,
    AttestationError,
    CertState,
    Claims,
    Evidence,
    Policy,
    RevocationSource,
    require_min_versions,
    require_nonce,
    require_pinned,
)

__all__ = ["KIND", "NvidiaVerifier", "SpdmReport", "evidence_from_nvidia_files", "pack_evidence", "parse_report"]

KIND: Final = "nvidia-gpu"
SPDM_VERSION: Final = 0x11
GET_MEASUREMENTS: Final = 0xE0
MEASUREMENTS: Final = 0x60
REQUEST_SIZE: Final = 37
SIGNATURE_SIZE: Final = 96  # ECDSA P-384, r || s
# A Hopper report is ~4 KiB (64 blocks of 48-byte digests and ~400 bytes of opaque data).
MAX_REPORT_SIZE: Final = 16 * 1024
MAX_CHAIN_LENGTH: Final = 8
MAX_CERT_SIZE: Final = 8 * 1024
DMTF_SPECIFICATION: Final = 0x01
OPAQUE_DRIVER_VERSION: Final = 3
OPAQUE_VBIOS_VERSION: Final = 6
OPAQUE_FWID: Final = 20
DICE_TCB_INFO: Final = x509.ObjectIdentifier("2.23.133.5.4.1")
SHA384_OID_DER: Final = bytes.fromhex("0609608648016503040202")
FWID_SIZE: Final = 48
MEASUREMENT_PREFIX: Final = "gpu-measurement-"
FWID_NAME: Final = "gpu-fwid"


@dataclass(frozen=True)
class SpdmReport:
    """A parsed attestation report: what it says, and the bytes its signature covers."""

    nonce: bytes  # the requester's (appraiser's) nonce
    measurements: Mapping[int, bytes]  # block index -> DMTF measurement value
    opaque: Mapping[int, bytes]  # opaque field type -> data
    signed: bytes  # request || response without the signature
    signature: bytes


class _Reader:
    """Bounded little-endian reads; every overrun is one AttestationError naming the field."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data, self._pos, self._what = data, 0, what

    def take(self, n: int, field: str) -> bytes:
        if n > len(self._data) - self._pos:
            raise AttestationError(f"nvidia-gpu report: {self._what} ends inside {field}")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def uint(self, n: int, field: str) -> int:
        return int.from_bytes(self.take(n, field), "little")

    @property
    def left(self) -> int:
        return len(self._data) - self._pos


def parse_report(report: bytes) -> SpdmReport:
    """Parse an SPDM GET_MEASUREMENTS request + MEASUREMENTS response; AttestationError if malformed."""
    if not isinstance(report, bytes) or not REQUEST_SIZE < len(report) <= MAX_REPORT_SIZE:
        raise AttestationError(f"nvidia-gpu report: must be {REQUEST_SIZE + 1}..{MAX_REPORT_SIZE} bytes")
    request = _Reader(report[:REQUEST_SIZE], "the request")
    version, code, param1 = request.uint(1, "version"), request.uint(1, "code"), request.uint(1, "param1")
    request.take(1, "param2")
    nonce = request.take(NONCE_SIZE, "nonce")
    if (version, code) != (SPDM_VERSION, GET_MEASUREMENTS) or not param1 & 1:
        raise AttestationError("nvidia-gpu report: does not start with a signed SPDM 1.1 GET_MEASUREMENTS request")
    response = _Reader(report[REQUEST_SIZE:], "the response")
    if (response.uint(1, "version"), response.uint(1, "code")) != (SPDM_VERSION, MEASUREMENTS):
        raise AttestationError("nvidia-gpu report: the response is not an SPDM 1.1 MEASUREMENTS response")
    response.take(2, "params")
    count = response.uint(1, "block count")
    record = _Reader(response.take(response.uint(3, "record length"), "the measurement record"), "the record")
    measurements = _parse_blocks(record, count)
    response.take(NONCE_SIZE, "responder nonce")
    opaque = _parse_opaque(_Reader(response.take(response.uint(2, "opaque length"), "opaque data"), "opaque data"))
    if response.left != SIGNATURE_SIZE:
        raise AttestationError(
            f"nvidia-gpu report: {response.left} bytes after the opaque data, expected a {SIGNATURE_SIZE}-byte signature"
        )
    return SpdmReport(nonce, measurements, opaque, report[:-SIGNATURE_SIZE], report[-SIGNATURE_SIZE:])


def _parse_blocks(record: _Reader, count: int) -> dict[int, bytes]:
    blocks: dict[int, bytes] = {}
    for _ in range(count):
        index, spec = record.uint(1, "block index"), record.uint(1, "block specification")
        block = _Reader(record.take(record.uint(2, "block size"), f"block {index}"), f"block {index}")
        if spec != DMTF_SPECIFICATION or index in blocks:
            raise AttestationError(f"nvidia-gpu report: block {index} is repeated or not a DMTF measurement")
        block.take(1, "value type")
        blocks[index] = block.take(block.uint(2, "value size"), "value")
        if block.left:
            raise AttestationError(f"nvidia-gpu report: block {index} has bytes after its value")
    if not blocks:
        raise AttestationError("nvidia-gpu report: the measurement record holds no blocks")
    if record.left:
        raise AttestationError(f"nvidia-gpu report: the measurement record has bytes after its {count} blocks")
    return blocks


def _parse_opaque(opaque: _Reader) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    while opaque.left:
        kind = opaque.uint(2, "opaque type")
        if kind in fields:
            raise AttestationError(f"nvidia-gpu report: opaque field {kind} is repeated")
        fields[kind] = opaque.take(opaque.uint(2, "opaque size"), f"opaque field {kind}")
    return fields


def pack_evidence(report: bytes, chain: Sequence[bytes]) -> bytes:
    """The ``nvidia-gpu`` evidence blob: the report and the certificate chain (DER, leaf first)."""
    blob: bytes = msgpack.packb({"report": report, "chain": list(chain)}, use_bin_type=True)
    return blob


def evidence_from_nvidia_files(report_hex: bytes, chain_pem: bytes) -> bytes:
    """The evidence blob from the files NVIDIA's tools write: the report in hex and the chain in PEM (leaf first)."""
    try:
        text = report_hex.decode("ascii").strip()
        if len(text) > 2 * MAX_REPORT_SIZE:
            raise AttestationError(f"nvidia-gpu report file: over {MAX_REPORT_SIZE} bytes of report")
        report = bytes.fromhex(text)
    except (UnicodeDecodeError, ValueError):
        raise AttestationError("nvidia-gpu report file: not a report in hex") from None
    if len(chain_pem) > MAX_CHAIN_LENGTH * 2 * MAX_CERT_SIZE:
        raise AttestationError("nvidia-gpu chain file: too large for a certificate chain")
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise AttestationError("nvidia-gpu chain file: not PEM certificates") from None
    if len(certs) > MAX_CHAIN_LENGTH:
        raise AttestationError(f"nvidia-gpu chain file: more than {MAX_CHAIN_LENGTH} certificates")
    return pack_evidence(report, [c.public_bytes(Encoding.DER) for c in certs])


def _unpack_evidence(blob: bytes) -> tuple[bytes, list[x509.Certificate]]:
    try:
        wire = msgpack.unpackb(
            blob, raw=False, strict_map_key=True, max_map_len=2, max_array_len=MAX_CHAIN_LENGTH,
            max_bin_len=MAX_REPORT_SIZE, max_str_len=16, max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException):
        raise AttestationError(
            f"nvidia-gpu evidence: not a msgpack map of a report and at most {MAX_CHAIN_LENGTH} certificates"
        ) from None
    if not isinstance(wire, dict) or set(wire) != {"report", "chain"}:
        raise AttestationError("nvidia-gpu evidence: expected a map with report and chain")
    report, chain = wire["report"], wire["chain"]
    if not isinstance(report, bytes) or not isinstance(chain, list) or not chain:
        raise AttestationError("nvidia-gpu evidence: report must be bytes and chain a non-empty list")
    certs = []
    for position, der in enumerate(chain):
        if not isinstance(der, bytes) or not 0 < len(der) <= MAX_CERT_SIZE:
            raise AttestationError(f"nvidia-gpu evidence: certificate {position} must be 1..{MAX_CERT_SIZE} bytes")
        certs.append(load_cert(der, f"certificate {position} of the evidence's chain"))
    return report, certs


def load_cert(der: bytes, what: str) -> x509.Certificate:
    """A DER certificate with its extensions parsed; AttestationError naming ``what`` if malformed."""
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.extensions  # parsed lazily: a malformed or repeated extension must fail here, not later
        cert.subject, cert.issuer  # so are the names (a malformed one would escape later as a ValueError)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise AttestationError(f"nvidia-gpu: {what} is not a well-formed DER X.509 certificate") from None
    return cert


def _name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return f"'{names[0].value!s}'" if names else f"'{cert.subject.rfc4514_string()}'"


def _iso(seconds: float) -> str:
    """A UTC date-time for error lines (seconds since the epoch where no calendar date fits)."""
    try:
        return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        return f"{seconds:.0f} s since the epoch"


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    """A CA by basicConstraints, and allowed to sign certificates where it states a keyUsage."""
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return bool(cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign)
    except x509.ExtensionNotFound:
        return True


def chain_to_root(certs: list[x509.Certificate], roots: Sequence[bytes], what: str = "nvidia-gpu") -> list[x509.Certificate]:
    """The chain leaf first, ending at a policy root (appended if the evidence stops below it); errors start with ``what``."""
    for cert, issuer in zip(certs, certs[1:]):
        if not _signed_by(cert, issuer):
            raise AttestationError(f"{what} chain: certificate {_name(cert)} is not signed by {_name(issuer)}")
        if not _is_ca(issuer):
            raise AttestationError(f"{what} chain: {_name(issuer)} signs {_name(cert)} but is not a CA")
    top = certs[-1]
    for der in roots:
        root = load_cert(der, "a root certificate of the policy")
        if root == top and _signed_by(top, top):
            return certs
        if root != top and _is_ca(root) and _signed_by(top, root):
            return [*certs, root]
    raise AttestationError(
        f"{what} chain: ends at {_name(top)} (issuer {top.issuer.rfc4514_string()}), which is not one of the policy's roots"
    )


def check_validity(chain: list[x509.Certificate], now: float, what: str = "nvidia-gpu") -> float:
    """Every certificate valid at ``now``; returns the earliest notAfter; errors start with ``what``."""
    for cert in chain:
        if now < cert.not_valid_before_utc.timestamp():
            raise AttestationError(
                f"{what} chain: certificate {_name(cert)} is not valid before {_iso(cert.not_valid_before_utc.timestamp())}"
            )
        if now > cert.not_valid_after_utc.timestamp():
            raise AttestationError(
                f"{what} chain: certificate {_name(cert)} expired at {_iso(cert.not_valid_after_utc.timestamp())}"
            )
    return min(cert.not_valid_after_utc.timestamp() for cert in chain)


def _check_signature(report: SpdmReport, leaf: x509.Certificate) -> None:
    try:
        key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise AttestationError(f"nvidia-gpu chain: leaf {_name(leaf)} does not hold an ECDSA P-384 key")
    half = SIGNATURE_SIZE // 2
    r = int.from_bytes(report.signature[:half], "big")
    s = int.from_bytes(report.signature[half:], "big")
    try:
        key.verify(encode_dss_signature(r, s), report.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError(
            f"nvidia-gpu report: signature does not verify with the key of {_name(leaf)}"
        ) from None


def _der_children(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """The (tag, whole TLV, contents) items of a DER byte string, one level deep."""
    items, pos = [], 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise ValueError("truncated")
        tag, size, head = data[pos], data[pos + 1], 2
        if size & 0x80:
            width = size & 0x7F
            if not 0 < width <= 3 or pos + 2 + width > len(data):
                raise ValueError("bad length")
            size, head = int.from_bytes(data[pos + 2 : pos + 2 + width], "big"), 2 + width
        if pos + head + size > len(data):
            raise ValueError("truncated")
        items.append((tag, data[pos : pos + head + size], data[pos + head : pos + head + size]))
        pos += head + size
    return items


def _cert_fwids(leaf: x509.Certificate) -> set[bytes]:
    """The SHA-384 FWIDs in the leaf's DICE extension: SEQUENCEs of (OID sha384, OCTET STRING)."""
    try:
        ext = leaf.extensions.get_extension_for_oid(DICE_TCB_INFO).value
    except x509.ExtensionNotFound:
        raise AttestationError(f"nvidia-gpu chain: leaf {_name(leaf)} has no DICE extension with an FWID") from None
    raw = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    found: set[bytes] = set()
    pending = [raw]
    try:
        while pending:
            for tag, _, contents in _der_children(pending.pop()):
                if tag & 0x20:  # constructed: look inside
                    inner = _der_children(contents)
                    if len(inner) == 2 and inner[0][1] == SHA384_OID_DER and inner[1][0] == 0x04:
                        found.add(inner[1][2])
                    pending.append(contents)
    except ValueError:
        raise AttestationError(f"nvidia-gpu chain: leaf {_name(leaf)} has a malformed DICE extension") from None
    return found


def _check_fwid(report: SpdmReport, leaf: x509.Certificate) -> bytes:
    fwid = report.opaque.get(OPAQUE_FWID)
    if fwid is None or len(fwid) != FWID_SIZE:
        raise AttestationError(f"nvidia-gpu report: no {FWID_SIZE}-byte FWID in the opaque data")
    if fwid not in _cert_fwids(leaf):
        raise AttestationError(f"nvidia-gpu report: FWID {fwid.hex()[:16]}... is not the one {_name(leaf)} certifies")
    return fwid


def check_revocation(
    chain: list[x509.Certificate], revocation: RevocationSource, grace_s: float, now: float, what: str = "nvidia-gpu"
) -> float:
    """Each certificate below the root is known good at ``now``; returns the earliest nextUpdate + grace; errors start with ``what``."""
    earliest = float("inf")
    for cert, issuer in zip(chain, chain[1:]):
        status = revocation.status(cert.public_bytes(Encoding.DER), issuer.public_bytes(Encoding.DER), now)
        if status.state is CertState.REVOKED:
            raise AttestationError(
                f"{what} revocation: certificate {_name(cert)} is revoked ({status.reason or 'no reason given'}; {status.source})"
            )
        if status.state is not CertState.GOOD:
            raise AttestationError(
                f"{what} revocation: status of certificate {_name(cert)} is unknown ({status.reason or status.source})"
            )
        until = status.next_update + grace_s
        if not status.this_update <= now <= until:
            raise AttestationError(
                f"{what} revocation: the status of {_name(cert)} from {status.source} is valid "
                f"{_iso(status.this_update)} .. {_iso(status.next_update)} (grace {grace_s:g} s), not at {_iso(now)}"
            )
        earliest = min(earliest, until)
    return earliest


def _versions(report: SpdmReport) -> dict[str, str]:
    versions = {}
    driver = report.opaque.get(OPAQUE_DRIVER_VERSION)
    if driver is not None:
        versions["gpu-driver"] = driver.split(b"\0", 1)[0].decode("ascii", "replace")
    vbios = report.opaque.get(OPAQUE_VBIOS_VERSION)
    if vbios is not None and len(vbios) >= 5:
        # Stored as a little-endian u32 (major.minor.x.y) then the OEM byte: 96.00.9F.00.01.
        word = int.from_bytes(vbios[:4], "little").to_bytes(4, "big")
        versions["gpu-firmware"] = ".".join(f"{b:02X}" for b in (*word, vbios[4]))
    return versions


def _require_reference(policy: Policy, rims: Mapping[str, bytes]) -> None:
    # Without reference values the measurements would be reported, not appraised.
    if not rims and not any(name.startswith(MEASUREMENT_PREFIX) for name in policy.pinned):
        raise AttestationError(
            f"nvidia-gpu policy: names no RIM and pins no {MEASUREMENT_PREFIX}NN value; measurements without reference values are refused"
        )


class NvidiaVerifier:
    """Appraises NVIDIA Hopper GPU evidence offline (see the module docstring for what is checked).

    ``rims``: RIM kind ("driver", "vbios") -> the RIM file's bytes; ``rim_roots``: the
    root certificates (DER) their signing chains must end at.
    """

    kind: str = KIND

    def __init__(self, rims: Mapping[str, bytes] | None = None, rim_roots: Sequence[bytes] = ()) -> None:
        self._rims = dict(rims or {})
        self._rim_roots = tuple(rim_roots)

    def collect(self, nonce: bytes) -> Evidence:
        """Not available: gtbus does not drive NVIDIA's confidential-computing driver interface."""
        raise AttestationError("nvidia-gpu evidence: not available on this host (collect it with NVIDIA's tools)")

    def appraise(
        self, evidence: Evidence, nonce: bytes, policy: Policy, now: float, revocation: RevocationSource
    ) -> Claims:
        """Claims about the GPU if its evidence is genuine, answers ``nonce`` and ``policy`` accepts it."""
        require_nonce(evidence, nonce, KIND)
        if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
            raise AttestationError("nvidia-gpu: the appraisal time must be a finite number of seconds")
        if policy.kind != KIND:
            raise AttestationError(f"nvidia-gpu: the policy is for kind {policy.kind!r}")
        if not policy.roots:
            raise AttestationError("nvidia-gpu policy: names no root certificate")
        _require_reference(policy, self._rims)
        report_bytes, certs = _unpack_evidence(evidence.blob)
        report = parse_report(report_bytes)
        if not hmac.compare_digest(report.nonce, nonce):
            raise AttestationError(
                "nvidia-gpu report: its nonce is not the appraiser's (replayed or for another request)"
            )
        chain = chain_to_root(certs, policy.roots)
        not_after = check_validity(chain, now)
        _check_signature(report, chain[0])
        fwid = _check_fwid(report, chain[0])
        not_after = min(not_after, check_revocation(chain, revocation, policy.grace_s, now))
        measurements = {f"{MEASUREMENT_PREFIX}{i:02d}": v for i, v in sorted(report.measurements.items())}
        measurements[FWID_NAME] = fwid
        versions = _versions(report)
        if self._rims:
            not_after = min(not_after, self._appraise_rims(report, versions, revocation, policy.grace_s, now))
        require_pinned(measurements, policy)
        require_min_versions(versions, policy)
        return Claims(KIND, measurements, versions, report.nonce, not_after)

    def _appraise_rims(
        self, report: SpdmReport, versions: Mapping[str, str], revocation: RevocationSource, grace_s: float, now: float
    ) -> float:
        """Each RIM genuine and matched by the report; the earliest end of their chains' validity."""
        from gtbus.attest.nvidia_rim import check_rims, verify_rim  # imports from this module: not at its top

        rims = [verify_rim(data, which, self._rim_roots, now, revocation, grace_s) for which, data in sorted(self._rims.items())]
        check_rims(rims, report.measurements, versions)
        return min(rim.not_after for rim in rims)
