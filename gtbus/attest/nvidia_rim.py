"""NVIDIA reference integrity manifests (RIMs): the golden measurements of a GPU's driver and VBIOS.

NVIDIA publishes one RIM per driver version and one per VBIOS build, each a
SWID tag (ISO/IEC 19770-2, TCG RIM information model) signed with an enveloped
XML signature whose ``KeyInfo/X509Data`` carries the signing chain, leaf first,
up to NVIDIA's RIM root (the "NVIDIA CoRIM signing Root CA")::

    SoftwareIdentity
      Meta      colloquialVersion="96.00.5E.00.01"   the driver or VBIOS version it is for
      Payload
        Resource type="Measurement" index="1" active="True" size="48"
                 alternatives="2" sha384:Hash0="..." sha384:Hash1="..."
      ds:Signature  (URI="", enveloped; ECDSA P-384 / SHA-384 in NVIDIA's)

Resource ``index`` N is the report's measurement block N + 1 (the policy's
``gpu-measurement-(N+1)``). A resource marked active must be in the evidence
with one of its alternative values; inactive ones are not judged. The driver
RIM and the VBIOS RIM cover different indices: an index active in both is
refused, as NVIDIA's own verifier does.

Appraising a RIM (:func:`verify_rim`) checks, failing with one line naming the
RIM (driver or VBIOS) and what failed: its size, then its XML parsed without
a DTD, entities or network access; the signing chain up to one of the policy's
RIM roots, every certificate valid at ``now``, and their revocation through
the same offline bundle the device chain uses; the XML signature with the
chain's leaf (``signxml``, the optional extra ``attest-nvidia-rim``); and only
then the measurements, read from the part the signature covers.
:func:`check_rims` compares them and the versions with the evidence.

Not done: NVIDIA's verifier skips index 35 when the report's opaque data says
NVDEC0 is disabled; here an active index is always judged.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from cryptography import x509

from gtbus.attest.nvidia import MAX_CHAIN_LENGTH, check_revocation, check_validity, chain_to_root, load_cert
from gtbus.attest.verifier import AttestationError, RevocationSource

if TYPE_CHECKING:
    from lxml import etree

__all__ = [
    "EXTRA",
    "RIM_KINDS",
    "RIM_SERVICE_URL",
    "GoldenMeasurement",
    "Rim",
    "check_rims",
    "parse_rim",
    "require_extra",
    "rim_from_service",
    "rim_validity",
    "verify_rim",
]

#: The RIM kinds, and the evidence version each must match (see ``nvidia._versions``).
RIM_KINDS: Final = {"driver": "gpu-driver", "vbios": "gpu-firmware"}
EXTRA: Final = "pip install 'gtbus[attest-nvidia-rim]'"
#: Where NVIDIA's verifier fetches RIMs: + NV_GPU_DRIVER_GH100_<driver version>, or
#: + NV_GPU_VBIOS_<project>_<project SKU>_<chip SKU>_<VBIOS version>; the answer is JSON {"rim": base64}.
RIM_SERVICE_URL: Final = "https://rim.attestation.nvidia.com/v1/rim/"
# NVIDIA's RIMs are ~20 KiB (64 resources and a 4-certificate chain).
MAX_RIM_SIZE: Final = 256 * 1024
MAX_RESOURCES: Final = 256
MAX_ALTERNATIVES: Final = 16
MAX_INDEX: Final = 254  # the report's block index (index + 1) is one byte, 0xFF means "all"
SWID_NS: Final = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
DS_NS: Final = "http://www.w3.org/2000/09/xmldsig#"
SHA384_NS: Final = "http://www.w3.org/2001/04/xmlenc#sha384"
SHA384_SIZE: Final = 48


@dataclass(frozen=True)
class GoldenMeasurement:
    """One Resource of a RIM: the values its measurement may take."""

    index: int  # the RIM's index; the report's block index is index + 1
    name: str
    active: bool
    values: tuple[bytes, ...]


@dataclass(frozen=True)
class Rim:
    """A RIM: which component it is for, the version, its golden measurements and how long its chain is valid."""

    which: str  # "driver" or "vbios"
    version: str
    measurements: Mapping[int, GoldenMeasurement]
    not_after: float  # the earliest notAfter (or revocation nextUpdate + grace) of its signing chain


def _what(which: str) -> str:
    return f"nvidia-gpu {which} RIM"


def require_extra() -> None:
    """AttestationError of one line naming the extra to install unless signxml (and its lxml) can be imported."""
    try:
        import lxml.etree  # noqa: F401
        import signxml  # noqa: F401
    except ImportError:
        raise AttestationError(f"nvidia-gpu RIMs need signxml and lxml: {EXTRA}") from None


def _etree() -> Any:
    """lxml's etree, which signxml brings."""
    require_extra()
    from lxml import etree

    return etree


def _parse_xml(data: bytes, which: str) -> etree._Element:
    """The RIM's root element, parsed with no DTD, no entity expansion and no network; AttestationError otherwise."""
    what = _what(which)
    if not isinstance(data, bytes) or not 0 < len(data) <= MAX_RIM_SIZE:
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise AttestationError(f"{what}: must be 1..{MAX_RIM_SIZE} bytes of XML, got {size}")
    etree = _etree()
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, dtd_validation=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise AttestationError(f"{what}: not well-formed XML ({str(exc).splitlines()[0][:120]})") from None
    # A RIM has no DTD; refusing any keeps entity expansion (XML bombs) and external fetches out.
    docinfo = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.externalDTD is not None or docinfo.doctype:
        raise AttestationError(f"{what}: has a DTD (DOCTYPE); a RIM has none, and entities are refused")
    if root.tag != f"{{{SWID_NS}}}SoftwareIdentity":
        raise AttestationError(f"{what}: the root element is {_short(root.tag)}, not a SWID SoftwareIdentity")
    return root


def _short(tag: object) -> str:
    text = str(tag)
    return repr(text.rsplit("}", 1)[-1][:60])


def _elements(parent: etree._Element, path: str, least: int, most: int, what: str) -> list[etree._Element]:
    """The ``least``..``most`` elements at ``path`` (``ns:Name/ns:Name``) under ``parent``; AttestationError otherwise."""
    found = parent.findall(path, {"ds": DS_NS, "swid": SWID_NS})
    if not least <= len(found) <= most:
        expected = str(least) if least == most else f"{least}..{most}"
        raise AttestationError(f"{what}: has {len(found)} {path} elements, expected {expected}")
    return found


def _signing_chain(root: etree._Element, which: str) -> list[x509.Certificate]:
    """The certificates of the signature's KeyInfo/X509Data, leaf first."""
    what = _what(which)
    signature = _elements(root, "ds:Signature", 1, 1, what)[0]
    texts = _elements(signature, "ds:KeyInfo/ds:X509Data/ds:X509Certificate", 1, MAX_CHAIN_LENGTH, what)
    chain = []
    for position, element in enumerate(texts):
        try:
            der = base64.b64decode("".join((element.text or "").split()), validate=True)
        except (binascii.Error, ValueError):
            raise AttestationError(f"{what}: X509Certificate {position} is not base64") from None
        chain.append(load_cert(der, f"{which} RIM's certificate {position}"))
    return chain


def _version(root: etree._Element, which: str) -> str:
    version = _elements(root, "swid:Meta", 1, 1, _what(which))[0].get("colloquialVersion")
    if not version or len(version) > 64 or not version.isprintable():
        raise AttestationError(f"{_what(which)}: Meta has no colloquialVersion (the version the RIM is for)")
    return version


def _measurements(root: etree._Element, which: str) -> dict[int, GoldenMeasurement]:
    """The Payload's Resource elements, each typed and bounded."""
    what = _what(which)
    payload = _elements(root, "swid:Payload", 1, 1, what)[0]
    resources = _elements(payload, "swid:Resource", 1, MAX_RESOURCES, what)
    golden: dict[int, GoldenMeasurement] = {}
    for position, r in enumerate(resources):
        index = _int_attr(r, "index", 0, MAX_INDEX, f"{what}: Resource {position}")
        where = f"{what}: measurement index {index}"
        if index in golden:
            raise AttestationError(f"{where} appears twice")
        if r.get("type") != "Measurement":
            raise AttestationError(f"{where}: type must be Measurement, not {str(r.get('type'))[:20]!r}")
        active = r.get("active")
        if active not in ("True", "False"):
            raise AttestationError(f"{where}: active must be True or False, not {str(active)[:20]!r}")
        count = _int_attr(r, "alternatives", 1, MAX_ALTERNATIVES, where)
        size = _int_attr(r, "size", SHA384_SIZE, SHA384_SIZE, where)
        values = []
        for i in range(count):
            text = r.get(f"{{{SHA384_NS}}}Hash{i}")
            try:
                value = bytes.fromhex(text or "")
            except ValueError:
                value = b""
            if len(value) != size:
                raise AttestationError(f"{where}: Hash{i} must be {size} bytes of hex in the SHA-384 namespace")
            values.append(value)
        golden[index] = GoldenMeasurement(index, str(r.get("name", ""))[:64], active == "True", tuple(values))
    return golden


def _int_attr(element: etree._Element, name: str, least: int, most: int, where: str) -> int:
    text = element.get(name) or ""
    if not text.isdigit() or len(text) > 4 or not least <= int(text) <= most:
        raise AttestationError(f"{where}: {name} must be an integer {least}..{most}, not {text[:20]!r}")
    return int(text)


def parse_rim(data: bytes, which: str) -> Rim:
    """A RIM's contents WITHOUT checking its signature: for a policy's early checks and for display only."""
    if which not in RIM_KINDS:
        raise AttestationError(f"nvidia-gpu RIM: kind {which!r} is not one of {', '.join(RIM_KINDS)}")
    root = _parse_xml(data, which)
    chain = _signing_chain(root, which)
    return Rim(which, _version(root, which), _measurements(root, which), min(c.not_valid_after_utc.timestamp() for c in chain))


def rim_validity(data: bytes, name: str) -> tuple[float, float]:
    """When a RIM file's signing chain is valid (for a bundle's manifest); AttestationError naming ``name``."""
    try:
        root = _parse_xml(data, "bundled")
        chain = _signing_chain(root, "bundled")
    except AttestationError as exc:
        raise AttestationError(f"bundle: {name}: {exc}") from None
    return max(c.not_valid_before_utc.timestamp() for c in chain), min(c.not_valid_after_utc.timestamp() for c in chain)


def rim_from_service(data: bytes) -> bytes:
    """The RIM XML from what NVIDIA's RIM service answers (JSON ``{"rim": base64, ...}``), or ``data`` if it is XML already."""
    if not data.lstrip().startswith(b"{"):
        return data
    try:
        doc = json.loads(data)
        rim = base64.b64decode(doc["rim"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise AttestationError("nvidia-gpu RIM: a JSON answer without a base64 'rim' field (not NVIDIA's RIM service)") from None
    return rim


def _check_signature(data: bytes, leaf: x509.Certificate, which: str, now: float) -> etree._Element:
    """The element the XML signature covers, checked with ``leaf``'s key; AttestationError naming the RIM otherwise."""
    what = _what(which)
    etree = _etree()
    from signxml import SignatureConfiguration, XMLVerifier
    from signxml.exceptions import SignXMLException

    at = dt.datetime.fromtimestamp(now, dt.timezone.utc)
    # location "./": the signature must enclose the whole SoftwareIdentity, one reference, no SHA-1.
    config = SignatureConfiguration(location="./", expect_references=1, verification_time=at)
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    try:
        result = XMLVerifier().verify(data, x509_cert=leaf, parser=parser, expect_config=config)
    except (SignXMLException, ValueError, TypeError, etree.LxmlError) as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise AttestationError(f"{what}: XML signature does not verify with its signing certificate ({detail})") from None
    signed = result.signed_xml if not isinstance(result, list) else None  # one reference expected, so one result
    if signed is None or signed.tag != f"{{{SWID_NS}}}SoftwareIdentity":
        raise AttestationError(f"{what}: the signature does not cover the whole SoftwareIdentity")
    return signed


def verify_rim(
    data: bytes, which: str, roots: Sequence[bytes], now: float, revocation: RevocationSource, grace_s: float
) -> Rim:
    """The RIM if its chain ends at one of ``roots``, is valid and not revoked at ``now``, and its signature verifies."""
    what = _what(which)
    if which not in RIM_KINDS:
        raise AttestationError(f"nvidia-gpu RIM: kind {which!r} is not one of {', '.join(RIM_KINDS)}")
    if not roots:
        raise AttestationError(f"{what}: the policy names no rim_roots to check it against")
    root = _parse_xml(data, which)
    chain = chain_to_root(_signing_chain(root, which), roots, what)
    not_after = check_validity(chain, now, what)
    not_after = min(not_after, check_revocation(chain, revocation, grace_s, now, what))
    signed = _check_signature(data, chain[0], which, now)
    # Read only what the signature covers: content outside it (a wrapping attack) is never seen.
    return Rim(which, _version(signed, which), _measurements(signed, which), not_after)


def check_rims(rims: Sequence[Rim], measurements: Mapping[int, bytes], versions: Mapping[str, str]) -> None:
    """Each RIM is for the evidence's version, and every active golden measurement is in the evidence with one of its values.

    ``measurements`` are the report's blocks by block index (RIM index + 1).
    One AttestationError naming the RIM and every index that does not match.
    """
    owner: dict[int, str] = {}
    for rim in rims:
        got_version = versions.get(RIM_KINDS[rim.which])
        if got_version is None:
            raise AttestationError(f"{_what(rim.which)}: the evidence states no {rim.which} version to match its {rim.version}")
        if got_version.lower() != rim.version.lower():
            raise AttestationError(
                f"{_what(rim.which)} is for version {rim.version}, the evidence's {rim.which} is {got_version}"
            )
        for index, golden in rim.measurements.items():
            if golden.active:
                if index in owner:
                    raise AttestationError(f"nvidia-gpu RIMs: measurement index {index} is active in both the {owner[index]} and the {rim.which} RIM")
                owner[index] = rim.which
    missing, wrong = [], []
    for rim in rims:
        for index, golden in sorted(rim.measurements.items()):
            if not golden.active:
                continue
            got = measurements.get(index + 1)
            if got is None:
                missing.append(f"{index} ({rim.which} RIM)")
            elif not any(hmac.compare_digest(got, want) for want in golden.values):
                wrong.append(f"{index} ({rim.which} RIM, {got.hex()[:16]}...)")
    if missing:
        raise AttestationError(
            f"nvidia-gpu RIMs: measurement index {', '.join(missing)} is active in the RIM but not in the evidence"
        )
    if wrong:
        raise AttestationError(
            f"nvidia-gpu RIMs: measurement index {', '.join(wrong)} matches none of the RIM's values"
        )
