"""NVIDIA reference integrity manifests (RIMs): NVIDIA's own, and RIMs these tests sign, against real evidence.

NVIDIA's RIMs in nvtrust (tests/attest/data/nvtrust/README.md) are for other
driver and VBIOS versions than nvtrust's sample evidence, so NVIDIA's RIM
against NVIDIA's evidence can only be refused (for its version), and is.
The positive end-to-end case uses RIMs these tests build from NVIDIA's (same
active indices) with the sample's measured values and versions, signed with
signxml under a chain the tests make, its revocation from real CRLs in a real
bundle. Every refusal is one AttestationError (or ConfigError) of one line.
"""

from __future__ import annotations

import calendar
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("signxml")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402
from lxml import etree  # noqa: E402
from signxml import CanonicalizationMethod, DigestAlgorithm, SignatureMethod, XMLSigner  # noqa: E402
from test_nvidia import (  # noqa: E402  (the sample evidence and the test PKI of the device-chain tests)
    CHAIN,
    DAY,
    NONCE,
    NOW,
    NVIDIA_ROOT,
    REPORT,
    SAMPLE,
    Pki,
    SaysGood,
    bundle_of,
    refused,
)

from gtbus.attest.appraiser import appraiser_for  # noqa: E402
from gtbus.attest.bundle import BundleFile, BundleRevocation, read_bundle, validity_of, write_bundle  # noqa: E402
from gtbus.attest.nvidia import NvidiaVerifier, pack_evidence  # noqa: E402
from gtbus.attest.nvidia_rim import (  # noqa: E402
    MAX_RIM_SIZE,
    SHA384_NS,
    SWID_NS,
    check_rims,
    parse_rim,
    rim_from_service,
    verify_rim,
)
from gtbus.attest.policy import load_policy, policy_from_table, policy_toml  # noqa: E402
from gtbus.attest.verifier import AttestationError, Claims, Evidence, Policy, RevocationSource  # noqa: E402
from gtbus.errors import ConfigError  # noqa: E402

DATA = Path(__file__).parent / "data" / "nvtrust"
VBIOS_RIM = (DATA / "1010_0200_882_96005E0001_PROD.swidtag").read_bytes()
DRIVER_RIM = (DATA / "Driver_RIM_test_no_gpu.swidtag").read_bytes()
RIM_ROOT = x509.load_pem_x509_certificate((DATA / "verifier_RIM_root.pem").read_bytes()).public_bytes(Encoding.DER)
# NVIDIA's RIM signing leaves ('HCC RIM L4 Signer') are valid 2023-06-23 .. 2025-06-22.
RIM_NOW = float(calendar.timegm(time.strptime("2024-06-01", "%Y-%m-%d")))
SAMPLE_VERSIONS = {"driver": "550.90.07", "vbios": "96.00.9F.00.01"}


def appraise(verifier: NvidiaVerifier, *, report: bytes = REPORT, chain: list[bytes] = CHAIN, pol: Policy | None = None,
             now: float = RIM_NOW, revocation: RevocationSource | None = None) -> Claims:
    """``verifier``'s appraisal of the report and chain; by default NVIDIA's sample under a policy pinning nothing."""
    policy = pol or Policy({}, {}, [NVIDIA_ROOT], kind="nvidia-gpu")
    return verifier.appraise(Evidence("nvidia-gpu", pack_evidence(report, chain), NONCE), NONCE, policy, now, revocation or SaysGood())


def active_of(rim: bytes, which: str) -> set[int]:
    return {i for i, g in parse_rim(rim, which).measurements.items() if g.active}


# --- NVIDIA's RIMs ------------------------------------------------------------------------------------


def test_nvidias_rims_verify_up_to_nvidias_rim_root() -> None:
    revocation = SaysGood()
    vbios = verify_rim(VBIOS_RIM, "vbios", [RIM_ROOT], RIM_NOW, revocation, 0.0)
    assert vbios.version == "96.00.5E.00.01" and len(vbios.measurements) == 64
    assert active_of(VBIOS_RIM, "vbios") == {i for i, g in vbios.measurements.items() if g.active} == {0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12}
    assert len(vbios.measurements[12].values) == 4  # four alternatives for index 12
    assert vbios.measurements[1].values[0].hex().startswith("c3f65ef79a19c029")
    # The chain below NVIDIA's root was asked about, leaf first; the leaf's notAfter bounds the result.
    assert revocation.asked[0].startswith("CN=HCC RIM L4 Signer") and len(revocation.asked) == 3
    assert vbios.not_after == RIM_NOW + 3600
    driver = verify_rim(DRIVER_RIM, "driver", [RIM_ROOT], RIM_NOW, SaysGood(), 0.0)
    assert driver.version == "545.00" and not active_of(DRIVER_RIM, "driver") & active_of(VBIOS_RIM, "vbios")


def _hash_attribute_at(rim: bytes, index: int) -> int:
    """The offset of the first hex digit of Resource ``index``'s Hash0 value."""
    match = re.search(rb'index="%d" [^>]*?ns2:Hash0="' % index, rim)
    assert match is not None
    return match.end()


def _replaced(data: bytes, at: int, byte: bytes) -> bytes:
    assert data[at : at + 1] != byte
    return data[:at] + byte + data[at + 1 :]


def test_a_flipped_byte_in_a_measurement_or_the_signature_of_nvidias_rim_is_refused() -> None:
    at = _hash_attribute_at(VBIOS_RIM, 1)
    changed = _replaced(VBIOS_RIM, at, b"d")  # c3f6... -> d3f6...: still 48 bytes of hex
    assert parse_rim(changed, "vbios").measurements[1].values[0].hex().startswith("d3f6")
    refused(r"^nvidia-gpu vbios RIM: XML signature does not verify with its signing certificate \(",
            lambda: verify_rim(changed, "vbios", [RIM_ROOT], RIM_NOW, SaysGood(), 0.0))
    sig_at = VBIOS_RIM.index(b"<ds:SignatureValue>") + len(b"<ds:SignatureValue>") + 10
    bad_signature = _replaced(VBIOS_RIM, sig_at, b"A" if VBIOS_RIM[sig_at : sig_at + 1] != b"A" else b"B")
    refused(r"^nvidia-gpu vbios RIM: XML signature does not verify",
            lambda: verify_rim(bad_signature, "vbios", [RIM_ROOT], RIM_NOW, SaysGood(), 0.0))
    # A flipped byte in an inactive measurement is a change all the same.
    inactive = _replaced(VBIOS_RIM, _hash_attribute_at(VBIOS_RIM, 40), b"1")
    refused("XML signature does not verify", lambda: verify_rim(inactive, "vbios", [RIM_ROOT], RIM_NOW, SaysGood(), 0.0))


def test_nvidias_rim_under_another_root_when_expired_or_unknown_to_revocation_is_refused(tmp_path: Path) -> None:
    refused(r"^nvidia-gpu vbios RIM chain: ends at 'NVIDIA CoRIM signing Root CA' .*not one of the policy's roots",
            lambda: verify_rim(VBIOS_RIM, "vbios", [NVIDIA_ROOT], RIM_NOW, SaysGood(), 0.0))
    refused(r"^nvidia-gpu driver RIM chain: certificate 'HCC RIM L4 Signer' expired at 2025-06-2",
            lambda: verify_rim(DRIVER_RIM, "driver", [RIM_ROOT], NOW, SaysGood(), 0.0))
    write_bundle(tmp_path / "empty", [])
    refused(r"^nvidia-gpu vbios RIM revocation: status of certificate 'HCC RIM L4 Signer' is unknown",
            lambda: verify_rim(VBIOS_RIM, "vbios", [RIM_ROOT], RIM_NOW, BundleRevocation(read_bundle(tmp_path / "empty")), 0.0))
    refused("names no rim_roots", lambda: verify_rim(VBIOS_RIM, "vbios", [], RIM_NOW, SaysGood(), 0.0))


def test_nvidias_rim_against_nvidias_sample_evidence_is_refused_for_its_version() -> None:
    """The honest outcome: nvtrust's RIMs are for VBIOS 96.00.5E.00.01 and driver 545.00, the sample runs
    96.00.9F.00.01 and 550.90.07. Both RIMs verify; the versions do not match, and that is what is said."""
    vbios = NvidiaVerifier({"vbios": VBIOS_RIM}, [RIM_ROOT])
    refused(r"^nvidia-gpu vbios RIM is for version 96\.00\.5E\.00\.01, the evidence's vbios is 96\.00\.9F\.00\.01$", lambda: appraise(vbios))
    driver = NvidiaVerifier({"driver": DRIVER_RIM}, [RIM_ROOT])
    refused(r"^nvidia-gpu driver RIM is for version 545\.00, the evidence's driver is 550\.90\.07$", lambda: appraise(driver))


# --- RIMs these tests sign: the positive end to end ---------------------------------------------------


def make_rim(pki: Pki, which: str, *, version: str | None = None, values: dict[int, list[bytes]] | None = None,
             active: set[int] | None = None) -> bytes:
    """A RIM shaped as NVIDIA's of ``which`` (its active indices), golden values the sample's, signed by ``pki``'s leaf.

    ``values``: index -> alternatives replacing the sample's; ``active``: the active indices (default NVIDIA's).
    """
    source = VBIOS_RIM if which == "vbios" else DRIVER_RIM
    active = active_of(source, which) if active is None else active
    root = etree.fromstring(source, etree.XMLParser(resolve_entities=False, no_network=True))
    root.remove(root.find("{http://www.w3.org/2000/09/xmldsig#}Signature"))
    root.find(f"{{{SWID_NS}}}Meta").set("colloquialVersion", version or SAMPLE_VERSIONS[which])
    payload = root.find(f"{{{SWID_NS}}}Payload")
    for r in list(payload):
        payload.remove(r)
    for index in sorted(set(range(64)) | active):
        alternatives = (values or {}).get(index) or [SAMPLE.measurements.get(index + 1, bytes(48))]
        r = etree.SubElement(payload, f"{{{SWID_NS}}}Resource", type="Measurement", index=str(index),
                             active=str(index in active), alternatives=str(len(alternatives)), name=f"Measurement_{index}", size="48")
        for i, value in enumerate(alternatives):
            r.set(f"{{{SHA384_NS}}}Hash{i}", value.hex())
    return signed_by(pki, root)


def signed_by(pki: Pki, root: etree._Element) -> bytes:
    """``root`` signed as NVIDIA signs RIMs (enveloped, ECDSA P-384, SHA-384, C14N 1.1) by ``pki``'s leaf, its chain in KeyInfo."""
    signer = XMLSigner(signature_algorithm=SignatureMethod.ECDSA_SHA384, digest_algorithm=DigestAlgorithm.SHA384,
                       c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1)
    certs = [c.public_bytes(Encoding.PEM).decode() for c in (pki.leaf, pki.middle, pki.root)]
    return etree.tostring(signer.sign(root, key=pki.leaf_key, cert=certs))


def resigned(data: bytes, pki: Pki) -> bytes:
    """NVIDIA's RIM text ``data`` (edited) with NVIDIA's signature replaced by one of ``pki``: what is signed is the edit."""
    root = etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))
    root.remove(root.find("{http://www.w3.org/2000/09/xmldsig#}Signature"))
    return signed_by(pki, root)


class Deployment:
    """A device chain (re-signing the sample report) and a RIM signing chain, with current CRLs for both in one bundle."""

    def __init__(self, tmp_path: Path) -> None:
        self.device, self.rim = Pki.make(), Pki.make()
        crls = {f"{who}-{issuer}.crl": pki.crl(issuer, this=NOW - DAY, until=NOW + 7 * DAY)
                for who, pki in (("device", self.device), ("rim", self.rim)) for issuer in ("root", "middle")}
        self.revocation = bundle_of(tmp_path, crls)
        self.report = self.device.sign()

    def appraise(self, rims: dict[str, bytes], **kw: object) -> Claims:
        verifier = NvidiaVerifier(rims, [self.rim.root_der])
        pol = kw.pop("pol", None) or Policy({}, {}, [self.device.root_der], kind="nvidia-gpu")
        return appraise(verifier, report=self.report, chain=self.device.chain, pol=pol, now=NOW, revocation=self.revocation)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def rim_pki() -> Pki:
    return Pki.make()


def test_the_sample_passes_rims_of_its_own_values_signed_under_the_policys_rim_root(tmp_path: Path) -> None:
    d = Deployment(tmp_path)
    rims = {"driver": make_rim(d.rim, "driver"), "vbios": make_rim(d.rim, "vbios")}
    claims = d.appraise(rims)
    assert claims.versions == {"gpu-driver": "550.90.07", "gpu-firmware": "96.00.9F.00.01"}
    assert claims.not_after == NOW + 7 * DAY  # the CRLs' nextUpdate bounds both chains
    # One alternative of several is enough; the pinned values combine with the RIMs.
    alternatives = {"vbios": make_rim(d.rim, "vbios", values={3: [bytes(48), SAMPLE.measurements[4]]}), "driver": rims["driver"]}
    assert d.appraise(alternatives).kind == "nvidia-gpu"
    pinned = Policy({"gpu-measurement-02": SAMPLE.measurements[2]}, {}, [d.device.root_der], kind="nvidia-gpu")
    assert d.appraise(rims, pol=pinned).measurements["gpu-measurement-02"] == SAMPLE.measurements[2]
    wrong_pin = Policy({"gpu-measurement-02": bytes(48)}, {}, [d.device.root_der], kind="nvidia-gpu")
    refused(r"measurement 'gpu-measurement-02' is .*, pinned 000000", lambda: d.appraise(rims, pol=wrong_pin))


def test_a_changed_golden_value_is_refused_naming_the_index_and_the_rim(tmp_path: Path) -> None:
    d = Deployment(tmp_path)
    driver = make_rim(d.rim, "driver")
    index = min(active_of(DRIVER_RIM, "driver"))
    changed = make_rim(d.rim, "driver", values={index: [bytes(48)]})
    line = refused(rf"^nvidia-gpu RIMs: measurement index {index} \(driver RIM, {SAMPLE.measurements[index + 1].hex()[:16]}\.\.\.\) matches none of the RIM's values$",
                   lambda: d.appraise({"driver": changed, "vbios": make_rim(d.rim, "vbios")}))
    assert "vbios" not in line
    # Two wrong values in the VBIOS RIM: both named, in one line.
    two = make_rim(d.rim, "vbios", values={1: [bytes(48)], 9: [b"\x01" * 48]})
    refused(r"measurement index 1 \(vbios RIM, .*\), 9 \(vbios RIM, .*\) matches none", lambda: d.appraise({"driver": driver, "vbios": two}))
    # An inactive index with a wrong value is not judged.
    inactive = next(i for i in range(64) if i not in active_of(VBIOS_RIM, "vbios"))
    assert d.appraise({"vbios": make_rim(d.rim, "vbios", values={inactive: [bytes(48)]})}).kind == "nvidia-gpu"


def test_an_active_index_the_evidence_lacks_and_an_index_active_in_both_rims_are_refused(tmp_path: Path) -> None:
    d = Deployment(tmp_path)
    beyond = make_rim(d.rim, "vbios", active=active_of(VBIOS_RIM, "vbios") | {100}, values={100: [bytes(48)]})
    refused(r"^nvidia-gpu RIMs: measurement index 100 \(vbios RIM\) is active in the RIM but not in the evidence$",
            lambda: d.appraise({"vbios": beyond}))
    both = make_rim(d.rim, "driver", active=active_of(DRIVER_RIM, "driver") | {1})
    refused(r"measurement index 1 is active in both the driver and the vbios RIM", lambda: d.appraise({"driver": both, "vbios": make_rim(d.rim, "vbios")}))


def test_a_rim_of_another_version_or_signed_outside_the_rim_roots_or_revoked_is_refused(tmp_path: Path) -> None:
    d = Deployment(tmp_path)
    refused(r"^nvidia-gpu driver RIM is for version 550\.54\.14, the evidence's driver is 550\.90\.07$",
            lambda: d.appraise({"driver": make_rim(d.rim, "driver", version="550.54.14")}))
    # Signed by the device chain's leaf: a good signature, but not under the policy's RIM root.
    refused(r"nvidia-gpu vbios RIM chain: ends at 'test root'.*not one of the policy's roots", lambda: d.appraise({"vbios": make_rim(d.device, "vbios")}))
    # The RIM signing leaf revoked by its issuer's CRL in the same bundle the device chain uses.
    revoked = {"rim-middle.crl": d.rim.crl("middle", this=NOW - DAY, until=NOW + 7 * DAY, revoked=d.rim.leaf),
               "rim-root.crl": d.rim.crl("root", this=NOW - DAY, until=NOW + 7 * DAY),
               "device-middle.crl": d.device.crl("middle", this=NOW - DAY, until=NOW + 7 * DAY),
               "device-root.crl": d.device.crl("root", this=NOW - DAY, until=NOW + 7 * DAY)}
    d.revocation = bundle_of(tmp_path / "revoked", revoked)
    refused(r"^nvidia-gpu vbios RIM revocation: certificate 'test leaf' is revoked .*rim-middle\.crl", lambda: d.appraise({"vbios": make_rim(d.rim, "vbios")}))


def test_check_rims_compares_case_insensitive_versions_and_needs_a_version(rim_pki: Pki) -> None:
    rim = parse_rim(make_rim(rim_pki, "vbios", version="96.00.9f.00.01"), "vbios")
    check_rims([rim], SAMPLE.measurements, {"gpu-firmware": "96.00.9F.00.01"})
    refused(r"the evidence states no vbios version", lambda: check_rims([rim], SAMPLE.measurements, {}))


# --- hostile and broken RIM files ---------------------------------------------------------------------

BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;"><!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<SoftwareIdentity xmlns="http://standards.iso.org/iso/19770/-2/2015/schema.xsd"><Meta colloquialVersion="&lol4;"/></SoftwareIdentity>"""
EXTERNAL = b"""<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<SoftwareIdentity xmlns="http://standards.iso.org/iso/19770/-2/2015/schema.xsd"><Meta colloquialVersion="&x;"/></SoftwareIdentity>"""


def _edit(old: bytes, new: bytes, count: int = 1) -> bytes:
    assert old in VBIOS_RIM
    return VBIOS_RIM.replace(old, new, count)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"not xml at all", r"not well-formed XML"),
        (b"", r"must be 1\.\.262144 bytes"),
        (b"<a>" * (MAX_RIM_SIZE // 3 + 1), r"must be 1\.\.262144 bytes of XML, got 262146"),
        (BOMB, r"has a DTD \(DOCTYPE\)"),
        (EXTERNAL, r"not well-formed XML \(Attribute references external entity|has a DTD"),
        (b"<Other/>", r"root element is 'Other', not a SWID SoftwareIdentity"),
        (_edit(b"<ds:Signature ", b"<ds:Signature2 ").replace(b"</ds:Signature>", b"</ds:Signature2>"), r"has 0 ds:Signature elements, expected 1"),
        (_edit(b"colloquialVersion=", b"colloquialVersio="), r"Meta has no colloquialVersion"),
        (_edit(b"<ns0:Payload ", b"<ns0:Payloads ").replace(b"</ns0:Payload>", b"</ns0:Payloads>"), r"has 0 swid:Payload elements"),
        (_edit(b'index="3"', b'index="2"'), r"measurement index 2 appears twice"),
        (_edit(b'index="3"', b'index="-3"'), r"index must be an integer 0\.\.254, not '-3'"),
        (_edit(b'index="3"', b'index="99999"'), r"index must be an integer 0\.\.254"),
        (_edit(b'index="3" active="True" alternatives="1"', b'index="3" active="True" alternatives="2"'), r"index 3: Hash1 must be 48 bytes of hex"),
        (_edit(b'index="3" active="True" alternatives="1"', b'index="3" active="True" alternatives="100"'), r"alternatives must be an integer 1\.\.16"),
        (_edit(b'index="3" active="True"', b'index="3" active="yes"'), r"active must be True or False, not 'yes'"),
        (_edit(b'index="3" active="True" alternatives="1" ns2:Hash0="73', b'index="3" active="True" alternatives="1" ns2:Hash0="zz'), r"index 3: Hash0 must be 48 bytes of hex"),
        (_edit(b'name="HashedMeasurement_3_FSP" size="48"', b'name="HashedMeasurement_3_FSP" size="32"'), r"size must be an integer 48\.\.48"),
        (_edit(b'type="Measurement" index="3"', b'type="Other" index="3"'), r"type must be Measurement, not 'Other'"),
        (_edit(b"<ds:X509Certificate>MIIC", b"<ds:X509Certificate>!!IC"), r"X509Certificate 0 is not base64"),
        (_edit(b"<ds:X509Certificate>MIIC", b"<ds:X509Certificate>AAAA"), r"vbios RIM's certificate 0 is not a well-formed DER X.509"),
    ],
)
def test_broken_and_hostile_rim_files_get_one_line(data: bytes, match: str, rim_pki: Pki) -> None:
    """Each as NVIDIA signed it (the signature fails first where the edit is inside it) and re-signed (the
    structure is what fails): the content is read only after the signature, and only from what it covers."""
    line = refused(match, lambda: parse_rim(data, "vbios"))
    assert line.startswith("nvidia-gpu") and "vbios RIM" in line
    refused(rf"XML signature does not verify|{match}", lambda: verify_rim(data, "vbios", [RIM_ROOT], RIM_NOW, SaysGood(), 0.0))
    signature_intact = b"<ds:Signature " in data and data.count(b"<ds:X509Certificate>MIIC") == VBIOS_RIM.count(b"<ds:X509Certificate>MIIC")
    if signature_intact:  # the edit is in the signed content: sign it again
        again = resigned(data, rim_pki)
        refused(match, lambda: verify_rim(again, "vbios", [rim_pki.root_der], NOW, SaysGood(), 0.0))


def test_a_signature_moved_inside_the_payload_or_content_added_around_it_is_refused(rim_pki: Pki) -> None:
    good = make_rim(rim_pki, "vbios")
    root = etree.fromstring(good)
    signature = root.find("{http://www.w3.org/2000/09/xmldsig#}Signature")
    root.remove(signature)
    root.find(f"{{{SWID_NS}}}Payload").append(signature)
    moved = etree.tostring(root)
    refused(r"has 0 ds:Signature elements, expected 1", lambda: verify_rim(moved, "vbios", [rim_pki.root_der], NOW, SaysGood(), 0.0))
    # A second Payload (unsigned) next to the signed one: the signature no longer verifies.
    wrapped = good.replace(b"<ns0:Payload ", b'<ns0:Payload><ns0:Resource type="Measurement" index="1" active="False"/></ns0:Payload><ns0:Payload ', 1)
    refused(r"XML signature does not verify|has 2 swid:Payload", lambda: verify_rim(wrapped, "vbios", [rim_pki.root_der], NOW, SaysGood(), 0.0))
    assert verify_rim(good, "vbios", [rim_pki.root_der], NOW, SaysGood(), 0.0).version == "96.00.9F.00.01"


def test_the_rim_service_answer_is_decoded_and_anything_else_refused() -> None:
    import base64

    answer = json.dumps({"id": "NV_GPU_VBIOS_1010_0200_882_96005E0001", "rim": base64.b64encode(VBIOS_RIM).decode()}).encode()
    assert rim_from_service(answer) == VBIOS_RIM and rim_from_service(VBIOS_RIM) == VBIOS_RIM
    refused(r"JSON answer without a base64 'rim' field", lambda: rim_from_service(b'{"rim": "!!"}'))
    refused(r"JSON answer without a base64 'rim' field", lambda: rim_from_service(b'{"other": 1}'))


# --- the policy, the bundle, and the CLI --------------------------------------------------------------


def rim_policy_files(tmp_path: Path, d: Deployment, rims: dict[str, bytes], *, extra: str = "") -> Path:
    """A policy file naming the device root, the RIM root and the RIM files (no pinned values), and the bundle."""
    (tmp_path / "device-root.der").write_bytes(d.device.root_der)
    (tmp_path / "rim-root.pem").write_bytes(d.rim.root.public_bytes(Encoding.PEM))
    lines = ['kind = "nvidia-gpu"', 'roots = ["device-root.der"]', 'rim_roots = ["rim-root.pem"]', 'bundle = "bundle"']
    for which, data in rims.items():
        (tmp_path / f"{which}.swidtag").write_bytes(data)
        lines.append(f'{which}_rim = "{which}.swidtag"')
    (tmp_path / "policy.toml").write_text("\n".join(lines) + "\n" + extra)
    return tmp_path / "policy.toml"


def test_a_policy_names_rims_and_rim_roots_and_writes_them_inline(tmp_path: Path) -> None:
    d = Deployment(tmp_path)
    rims = {"driver": make_rim(d.rim, "driver"), "vbios": make_rim(d.rim, "vbios")}
    settings = load_policy(rim_policy_files(tmp_path, d, rims))
    assert settings.rims == rims and settings.rim_roots == (d.rim.root_der,) and not settings.policy.pinned
    appraiser = appraiser_for(settings)
    claims = appraiser.appraise(Evidence("nvidia-gpu", pack_evidence(d.report, d.device.chain), NONCE), NONCE, "run", NOW)
    assert claims.versions["gpu-driver"] == "550.90.07"
    # Written back with every file inline, it stands alone and says the same.
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "policy.toml").write_text(policy_toml(settings, "test"))
    again = load_policy(tmp_path / "alone" / "policy.toml")
    assert again.rims == rims and again.rim_roots == settings.rim_roots


@pytest.mark.parametrize(
    "table, match",
    [
        ({"kind": "emulated", "roots": [{"hex": "00" * 32}], "pinned": {"code": "00"}, "driver_rim": "x.swidtag"}, r"driver_rim is for kind nvidia-gpu, not emulated"),
        ({"vbios_rim": "missing.swidtag", "rim_roots": ["rim-root.pem"]}, r"vbios_rim .*missing.swidtag: no such file"),
        ({"vbios_rim": 3, "rim_roots": ["rim-root.pem"]}, r"vbios_rim must be a file name or"),
        ({"vbios_rim": {"hex": "zz"}, "rim_roots": ["rim-root.pem"]}, r"vbios_rim.hex is not hex"),
        ({"vbios_rim": {"hex": "3c612f3e"}, "rim_roots": ["rim-root.pem"]}, r"nvidia-gpu vbios RIM: the root element is 'a'"),
        ({"vbios_rim": "notxml.swidtag", "rim_roots": ["rim-root.pem"]}, r"nvidia-gpu vbios RIM: not well-formed XML"),
        ({"vbios_rim": "vbios.swidtag"}, r"rim_roots must be a non-empty list"),
        ({"vbios_rim": "vbios.swidtag", "rim_roots": ["notxml.swidtag"]}, r"root .*notxml.swidtag: not an X.509 certificate"),
        ({"vbios_rim": "huge.swidtag", "rim_roots": ["rim-root.pem"]}, r"huge.swidtag: over 262144 bytes"),
    ],
)
def test_bad_rim_settings_in_a_policy_are_one_line(tmp_path: Path, table: dict[str, object], match: str) -> None:
    (tmp_path / "vbios.swidtag").write_bytes(VBIOS_RIM)
    (tmp_path / "notxml.swidtag").write_bytes(b"\x00\x01 not xml")
    (tmp_path / "huge.swidtag").write_bytes(b" " * (MAX_RIM_SIZE + 1))
    (tmp_path / "rim-root.pem").write_bytes((DATA / "verifier_RIM_root.pem").read_bytes())
    full = {"kind": "nvidia-gpu", "roots": [str(DATA / "verifier_device_root.pem")], **table}
    with pytest.raises(ConfigError, match=match) as info:
        policy_from_table(full, tmp_path, "policy.toml")
    assert "\n" not in str(info.value) and str(info.value).startswith("policy.toml: ")


def test_without_signxml_a_policy_naming_rims_says_which_extra_to_install(tmp_path: Path) -> None:
    (tmp_path / "vbios.swidtag").write_bytes(VBIOS_RIM)
    (tmp_path / "policy.toml").write_text(
        f'kind = "nvidia-gpu"\nroots = ["{DATA / "verifier_device_root.pem"}"]\nrim_roots = ["{DATA / "verifier_RIM_root.pem"}"]\n'
        'vbios_rim = "vbios.swidtag"\n')
    # signxml made unimportable in a fresh interpreter: what a host without the extra sees.
    code = ("import sys; sys.modules['signxml'] = None\nfrom gtbus.attest.policy import load_policy\nfrom gtbus.errors import ConfigError\n"
            f"try:\n    load_policy({str(tmp_path / 'policy.toml')!r})\nexcept ConfigError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert out.endswith("nvidia-gpu RIMs need signxml and lxml: pip install 'gtbus[attest-nvidia-rim]'") and "\n" not in out


def test_a_bundle_carries_rims_fetched_from_files_and_the_appraiser_uses_them(tmp_path: Path) -> None:
    import base64

    d = Deployment(tmp_path)
    driver, vbios = make_rim(d.rim, "driver"), make_rim(d.rim, "vbios")
    # As NVIDIA's RIM service answers (JSON, base64) and as a plain file: `gtbus attest fetch` keeps the XML.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "driver.json").write_text(json.dumps({"id": "NV_GPU_DRIVER_GH100_550.90.07", "rim": base64.b64encode(driver).decode()}))
    (tmp_path / "src" / "vbios.swidtag").write_bytes(vbios)
    for name, data in ((f"{w}-{i}.crl", p.crl(i, this=NOW - DAY, until=NOW + 7 * DAY)) for w, p in (("device", d.device), ("rim", d.rim)) for i in ("root", "middle")):
        (tmp_path / "src" / name).write_bytes(data)
    sources = ['[[file]]\nname = "driver.swidtag"\nkind = "driver-rim"\npath = "driver.json"',
               '[[file]]\nname = "vbios.swidtag"\nkind = "vbios-rim"\npath = "vbios.swidtag"']
    sources += [f'[[file]]\nname = "{n}"\nkind = "crl"\npath = "{n}"' for n in ("device-root.crl", "device-middle.crl", "rim-root.crl", "rim-middle.crl")]
    (tmp_path / "src" / "sources.toml").write_text("\n".join(sources) + "\n")
    fetched = subprocess.run([sys.executable, "-m", "gtbus", "attest", "fetch", "--out", str(tmp_path / "fetched"), "--from", str(tmp_path / "src" / "sources.toml"), "--allow-stale"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert "fetched driver.swidtag (driver-rim)" in fetched.stdout
    bundle = read_bundle(tmp_path / "fetched")
    assert bundle.of_kind("driver-rim")[0].data == driver and bundle.of_kind("vbios-rim")[0].data == vbios
    # The policy names only rim_roots: the RIMs come from the bundle.
    (tmp_path / "rim-root.der").write_bytes(d.rim.root_der)
    (tmp_path / "device-root.der").write_bytes(d.device.root_der)
    (tmp_path / "policy.toml").write_text('kind = "nvidia-gpu"\nroots = ["device-root.der"]\nrim_roots = ["rim-root.der"]\nbundle = "fetched"\n')
    appraiser = appraiser_for(load_policy(tmp_path / "policy.toml"))
    evidence = Evidence("nvidia-gpu", pack_evidence(d.report, d.device.chain), NONCE)
    assert appraiser.appraise(evidence, NONCE, "run", NOW).versions["gpu-firmware"] == "96.00.9F.00.01"
    # A bundle whose RIM is not a RIM is refused when written, naming the file.
    with pytest.raises(AttestationError, match=r"^bundle: junk.swidtag: nvidia-gpu bundled RIM: not well-formed XML"):
        validity_of("vbios-rim", b"junk", "junk.swidtag")
    start, end = validity_of("vbios-rim", vbios, "vbios.swidtag")
    assert start == d.rim.leaf.not_valid_before_utc.timestamp() and end == d.rim.leaf.not_valid_after_utc.timestamp()
    # Two RIMs of one kind in a bundle: which one is meant is not guessed.
    second = BundleFile("vbios2.swidtag", "vbios-rim", "here", NOW, start, end, vbios)
    write_bundle(tmp_path / "two", [*bundle.files, second])
    with pytest.raises(AttestationError, match=r"holds 2 vbios-rim files \(vbios.swidtag, vbios2.swidtag\); keep one"):
        (tmp_path / "policy.toml").write_text('kind = "nvidia-gpu"\nroots = ["device-root.der"]\nrim_roots = ["rim-root.der"]\nbundle = "two"\n')
        appraiser_for(load_policy(tmp_path / "policy.toml")).appraise(evidence, NONCE, "run", NOW)


def attest_check(policy: Path, evidence: bytes) -> subprocess.CompletedProcess[str]:
    (policy.parent / "evidence.bin").write_bytes(evidence)
    return subprocess.run(
        [sys.executable, "-m", "gtbus", "attest", "check", str(policy.parent / "evidence.bin"), "--policy", str(policy),
         "--nonce", NONCE.hex(), "--now", "2026-06-01T00:00:00Z"],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_attest_check_with_a_policy_naming_rims(tmp_path: Path) -> None:
    d = Deployment(tmp_path)
    evidence = pack_evidence(d.report, d.device.chain)
    good = attest_check(rim_policy_files(tmp_path, d, {"driver": make_rim(d.rim, "driver"), "vbios": make_rim(d.rim, "vbios")}), evidence)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "ok   driver RIM: signed up to the policy's rim_roots, its version and every active measurement match" in good.stdout
    assert "ok   vbios RIM: signed up to the policy's rim_roots" in good.stdout
    index = 1  # index 0's golden value is all zeros, and so is the sample's block 1
    changed = rim_policy_files(tmp_path, d, {"driver": make_rim(d.rim, "driver"), "vbios": make_rim(d.rim, "vbios", values={index: [bytes(48)]})})
    bad = attest_check(changed, evidence)
    assert bad.returncode == 1
    fails = [line for line in bad.stdout.splitlines() if line.startswith("FAIL")]
    assert fails == [f"FAIL nvidia-gpu RIMs: measurement index {index} (vbios RIM, {SAMPLE.measurements[index + 1].hex()[:16]}...) matches none of the RIM's values"]
    # A policy whose RIM file is not XML: one line, no traceback, non-zero.
    (tmp_path / "vbios.swidtag").write_bytes(b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><x>&a;</x>")
    broken = attest_check(tmp_path / "policy.toml", evidence)
    assert broken.returncode != 0 and "has a DTD (DOCTYPE)" in broken.stdout + broken.stderr
    assert "Traceback" not in good.stderr + bad.stderr + broken.stderr
    assert len((broken.stdout + broken.stderr).strip().splitlines()) == 1


def test_random_edits_of_nvidias_rim_never_pass_and_never_escape_as_another_error() -> None:
    """Seeded edits anywhere in the file (bytes changed, runs cut): one line each, never accepted. Among them,
    a certificate in KeyInfo with a corrupted name, which once escaped as a ValueError."""
    import random

    rng = random.Random(3)
    signature_at = VBIOS_RIM.index(b"<ds:Signature ")
    for i in range(600):
        data = bytearray(VBIOS_RIM)
        start = signature_at if i % 2 else 0  # half inside the signature and its certificates
        if rng.random() < 0.6:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(start, len(data))] = rng.randrange(256)
        else:
            at = rng.randrange(start, len(data))
            del data[at : at + rng.randint(1, 200)]
        if bytes(data).rstrip() == VBIOS_RIM.rstrip():  # the same document (a trailing newline is outside it)
            continue
        with pytest.raises(AttestationError) as info:
            verify_rim(bytes(data), "vbios", [RIM_ROOT], RIM_NOW, SaysGood(), 0.0)
        assert "\n" not in str(info.value)


def test_a_keyinfo_certificate_with_a_malformed_name_is_one_line() -> None:
    import base64

    start = VBIOS_RIM.index(b"<ds:X509Certificate>") + len(b"<ds:X509Certificate>")
    end = VBIOS_RIM.index(b"</ds:X509Certificate>", start)
    der = base64.b64decode(b"".join(VBIOS_RIM[start:end].split()))
    assert der.count(b"HCC RIM L4 Signer") == 1
    broken = base64.b64encode(der.replace(b"HCC RIM L4 Signer", b"\xffCC RIM L4 Signer"))  # not UTF-8
    data = VBIOS_RIM[:start] + broken + VBIOS_RIM[end:]
    refused(r"^nvidia-gpu: vbios RIM's certificate 0 is not a well-formed DER X.509 certificate$",
            lambda: verify_rim(data, "vbios", [RIM_ROOT], RIM_NOW, SaysGood(), 0.0))


def test_evidence_whose_leaf_has_a_malformed_name_is_one_line_too() -> None:
    """The same lazy parse in the device chain a peer sends (fixed in ``nvidia.load_cert`` for both)."""
    assert CHAIN[0].count(b"GH100 A01 GSP FMC LF") == 1
    broken = CHAIN[0].replace(b"GH100 A01 GSP FMC LF", b"\xffH100 A01 GSP FMC LF")
    refused(r"^nvidia-gpu: certificate 0 of the evidence's chain is not a well-formed DER X.509 certificate$",
            lambda: appraise(NvidiaVerifier(), chain=[broken, *CHAIN[1:]], pol=Policy({"gpu-measurement-02": SAMPLE.measurements[2]}, {}, [NVIDIA_ROOT], kind="nvidia-gpu")))
