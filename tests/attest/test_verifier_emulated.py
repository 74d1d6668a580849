"""The emulated kind behind the Verifier interface: real Ed25519, real msgpack, every refusal one line."""

from __future__ import annotations

import math
import os

import msgpack
import pytest

from gtbus.attest import (
    MAX_EVIDENCE_SIZE,
    AttestationError,
    Evidence,
    NoRevocation,
    Policy,
    Verifier,
    require_min_versions,
    version_at_least,
)
from gtbus.attest.emulated import EmulatedVerifier
from gtbus.gpu.attestation import ATTEST_DOMAIN, PlatformSigner

NOW = 1_800_000_000.0
CODE = bytes(range(32))


@pytest.fixture
def signer() -> PlatformSigner:
    return PlatformSigner.generate()


def attester(signer: PlatformSigner, code: bytes = CODE) -> EmulatedVerifier:
    return EmulatedVerifier(signer, lambda: {"code": code}, lambda: b"r" * 32)


def policy(signer: PlatformSigner, **over: object) -> Policy:
    fields: dict[str, object] = {"pinned": {"code": CODE}, "min_versions": {}, "roots": [signer.public_key]}
    fields.update(over)
    return Policy(**fields)  # type: ignore[arg-type]


def appraise(ev: Evidence, nonce: bytes, pol: Policy) -> object:
    v: Verifier = EmulatedVerifier()
    return v.appraise(ev, nonce, pol, NOW, NoRevocation())


def test_collected_evidence_appraises_to_its_claims(signer: PlatformSigner) -> None:
    nonce = os.urandom(32)
    claims = appraise(attester(signer).collect(nonce), nonce, policy(signer))
    assert claims.kind == "emulated"  # type: ignore[attr-defined]
    assert claims.measurements == {"code": CODE}  # type: ignore[attr-defined]
    assert claims.report_data == b"r" * 32  # type: ignore[attr-defined]
    assert claims.not_after == math.inf  # type: ignore[attr-defined]


def test_a_second_root_is_accepted_too(signer: PlatformSigner) -> None:
    nonce = os.urandom(32)
    other = PlatformSigner.generate()
    appraise(attester(signer).collect(nonce), nonce, policy(signer, roots=[other.public_key, signer.public_key]))


def test_an_appraiser_cannot_collect() -> None:
    with pytest.raises(AttestationError, match="not available on this host"):
        EmulatedVerifier().collect(os.urandom(32))


def test_nothing_measured_yet_is_refused_by_the_attester(signer: PlatformSigner) -> None:
    with pytest.raises(AttestationError, match="nothing measured yet"):
        EmulatedVerifier(signer, lambda: {"code": b""}).collect(os.urandom(32))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s, n: (attester(s, b"\x01" * 32).collect(n), n), r"measurement 'code' is 0101010101010101\.\.\., pinned 0001020304050607\.\.\."),
        (lambda s, n: (attester(PlatformSigner.generate()).collect(n), n), "verifies under none of the policy's 1 platform keys"),
        (lambda s, n: (attester(s).collect(n), os.urandom(32)), "nonce does not match the one sent"),
    ],
    ids=["wrong-code", "other-platform", "wrong-nonce"],
)
def test_refusals_name_what_failed(signer: PlatformSigner, change: object, message: str) -> None:
    ev, nonce = change(signer, os.urandom(32))  # type: ignore[operator]
    with pytest.raises(AttestationError, match=message):
        appraise(ev, nonce, policy(signer))


def test_a_replayed_body_under_a_new_envelope_nonce_is_refused(signer: PlatformSigner) -> None:
    # The envelope says the new nonce, but the signed body holds the old one.
    old, new = os.urandom(32), os.urandom(32)
    ev = attester(signer).collect(old)
    with pytest.raises(AttestationError, match="signed nonce is not the one sent"):
        appraise(Evidence("emulated", ev.blob, new), new, policy(signer))


def test_every_flipped_byte_is_refused(signer: PlatformSigner) -> None:
    nonce = os.urandom(32)
    blob = attester(signer).collect(nonce).blob
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(AttestationError):
            appraise(Evidence("emulated", bytes(bad), nonce), nonce, policy(signer))


def test_a_measurement_report_signature_is_not_evidence(signer: PlatformSigner) -> None:
    # The same key signs per-hop reports under another domain: one cannot stand for the other.
    nonce = os.urandom(32)
    body = msgpack.packb([nonce, {"code": CODE}, {"emulated": "1"}, b""], use_bin_type=True)
    forged = msgpack.packb([body, signer._key.sign(ATTEST_DOMAIN + body).signature], use_bin_type=True)  # noqa: SLF001
    with pytest.raises(AttestationError, match="verifies under none"):
        appraise(Evidence("emulated", forged, nonce), nonce, policy(signer))


@pytest.mark.parametrize(
    "blob",
    [b"\xc1", msgpack.packb([b"x"]), msgpack.packb([b"body", b"short"]), msgpack.packb({"a": 1}), msgpack.packb([1, 2])],
    ids=["not-msgpack", "one-element", "short-signature", "map", "ints"],
)
def test_malformed_blobs_are_one_line(signer: PlatformSigner, blob: bytes) -> None:
    nonce = os.urandom(32)
    with pytest.raises(AttestationError) as info:
        appraise(Evidence("emulated", blob, nonce), nonce, policy(signer))
    assert "\n" not in str(info.value) and str(info.value).startswith("emulated evidence:")


def test_a_signed_but_malformed_body_is_refused(signer: PlatformSigner) -> None:
    nonce = os.urandom(32)
    for body in (msgpack.packb([nonce, {"code": 5}, {}, b""]), msgpack.packb([nonce, {}, {}, b"x" * 65]), msgpack.packb("str")):
        blob = msgpack.packb([body, signer.sign_evidence(body)], use_bin_type=True)
        with pytest.raises(AttestationError, match="emulated evidence:"):
            appraise(Evidence("emulated", blob, nonce), nonce, policy(signer))


def test_evidence_is_bounded_and_typed_when_built() -> None:
    nonce = os.urandom(32)
    with pytest.raises(AttestationError, match=f"1..{MAX_EVIDENCE_SIZE} bytes, got {MAX_EVIDENCE_SIZE + 1}"):
        Evidence("emulated", b"x" * (MAX_EVIDENCE_SIZE + 1), nonce)
    with pytest.raises(AttestationError, match="nonce must be 32 bytes"):
        Evidence("emulated", b"x", nonce[:31])
    with pytest.raises(AttestationError, match="kind must be"):
        Evidence("", b"x", nonce)
    with pytest.raises(AttestationError, match="got str"):
        Evidence("emulated", "x", nonce)  # type: ignore[arg-type]
    for wire in ({"kind": "emulated", "blob": b"x"}, [1], {"kind": 1, "blob": b"x", "nonce": nonce}):
        with pytest.raises(AttestationError, match="evidence:"):
            Evidence.from_wire(wire)
    ev = Evidence("tdx", b"q", nonce)
    assert Evidence.from_wire(ev.to_wire()) == ev


def test_evidence_of_another_kind_is_refused(signer: PlatformSigner) -> None:
    nonce = os.urandom(32)
    with pytest.raises(AttestationError, match="kind 'tdx', expected 'emulated'"):
        appraise(Evidence("tdx", attester(signer).collect(nonce).blob, nonce), nonce, policy(signer))
    with pytest.raises(AttestationError, match="policy is for 'tdx' evidence"):
        appraise(attester(signer).collect(nonce), nonce, policy(signer, kind="tdx"))


def test_a_policy_root_that_is_no_platform_key_is_named(signer: PlatformSigner) -> None:
    nonce = os.urandom(32)
    with pytest.raises(AttestationError, match="policy root 0 is 31 bytes"):
        appraise(attester(signer).collect(nonce), nonce, policy(signer, roots=[b"k" * 31]))


def test_min_versions(signer: PlatformSigner) -> None:
    nonce = os.urandom(32)
    appraise(attester(signer).collect(nonce), nonce, policy(signer, min_versions={"emulated": "1"}))
    with pytest.raises(AttestationError, match="version 'emulated' is 1, below the minimum 2"):
        appraise(attester(signer).collect(nonce), nonce, policy(signer, min_versions={"emulated": "2"}))
    with pytest.raises(AttestationError, match="'tcb' has a minimum"):
        require_min_versions({}, policy(signer, min_versions={"tcb": "1"}))


@pytest.mark.parametrize(
    ("got", "least", "ok"),
    [("96.00.60.00.01", "96.00.5E.00.01", True), ("96.00.5D.00.01", "96.00.5E.00.01", False),
     ("1.10", "1.9", True), ("1.2", "1.2.1", False), ("1.2.0", "1.2", True), ("2", "10", False)],
)
def test_version_order(got: str, least: str, ok: bool) -> None:
    assert version_at_least(got, least) is ok


@pytest.mark.parametrize(
    ("over", "message"),
    [({"kind": "sgx"}, "kind 'sgx'"), ({"grace_s": -1.0}, "grace_s"), ({"grace_s": math.nan}, "grace_s"),
     ({"roots": [b""]}, "every root"), ({"pinned": {"code": b""}}, "pinned 'code'"), ({"min_versions": {"tcb": ""}}, "min version")],
)
def test_policy_values_are_checked_when_built(signer: PlatformSigner, over: dict[str, object], message: str) -> None:
    with pytest.raises(AttestationError, match=message):
        policy(signer, **over)
