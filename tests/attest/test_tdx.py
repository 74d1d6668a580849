"""TdxVerifier on Intel's real sample quote and collateral (published by dcap-qvl), appraised offline."""

from __future__ import annotations

import calendar
import hashlib
import time
from pathlib import Path

import pytest

dcap_qvl = pytest.importorskip("dcap_qvl", reason="dcap-qvl not installed (pip install 'gtbus[attest-tdx]')")

from gtbus.attest.bundle import BundleFile, read_bundle, validity_of, write_bundle  # noqa: E402
from gtbus.attest.tdx import TdxVerifier, bind_report_data, report_digest  # noqa: E402
from gtbus.attest.verifier import AttestationError, Evidence, NoRevocation, Policy  # noqa: E402

DATA = Path(__file__).parent / "data" / "dcap-qvl"
QUOTE = (DATA / "tdx_quote").read_bytes()
COLLATERAL = (DATA / "tdx_quote_collateral.json").read_bytes()
INSIDE = float(calendar.timegm(time.strptime("2025-07-01", "%Y-%m-%d")))  # collateral: 2025-06-19 .. 2025-07-19
REPORT_DATA = bytes(dcap_qvl.parse_quote(QUOTE).report.report_data)
NONCE = REPORT_DATA[32:]  # the sample TD's report_data; its second half plays the nonce
MRTD = bytes.fromhex("91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7")


def make_bundle(tmp_path: Path, collateral: bytes = COLLATERAL) -> TdxVerifier:
    """A bundle with the sample collateral, and a verifier reading it."""
    nb, na = validity_of("tdx-collateral", collateral, "tdx-collateral.json")
    write_bundle(tmp_path / "bundle", [BundleFile("tdx-collateral.json", "tdx-collateral", "https://pccs.example/fmspc", 0.0, nb, na, collateral)])
    return TdxVerifier(read_bundle(tmp_path / "bundle"))


def policy(**kw: object) -> Policy:
    """A TDX policy; keyword arguments replace its fields."""
    fields: dict[str, object] = {"pinned": {}, "min_versions": {}, "roots": [], "kind": "tdx"}
    fields.update(kw)
    return Policy(**fields)  # type: ignore[arg-type]


def appraise(v: TdxVerifier, quote: bytes = QUOTE, nonce: bytes = NONCE, pol: Policy | None = None, now: float = INSIDE):
    return v.appraise(Evidence("tdx", quote, nonce), nonce, pol or policy(), now, NoRevocation())


def test_good_quote_appraises_offline_with_pinned_measurements(tmp_path: Path) -> None:
    v = make_bundle(tmp_path)
    pol = policy(pinned={"mrtd": MRTD, "report-data": REPORT_DATA[:32]}, min_versions={"tcb-status": "UpToDate", "tcb-eval": "17"})
    claims = appraise(v, pol=pol)
    assert claims.kind == "tdx"
    assert claims.measurements["mrtd"] == MRTD
    assert len(claims.measurements["rtmr0"]) == 48
    assert claims.versions["tcb-status"] == "UpToDate"
    assert claims.versions["fmspc"] == "B0C06F000000"
    assert claims.report_data == REPORT_DATA[:32]
    assert claims.versions["tcb-eval"] == "17"
    assert claims.not_after == calendar.timegm(time.strptime("2025-07-19T10:00:35", "%Y-%m-%dT%H:%M:%S"))


def test_quote_chain_checked_against_policy_roots(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    chain = x509.load_pem_x509_certificates(dcap_qvl.parse_quote(QUOTE).cert_chain_pem_bytes())
    intel_root = chain[-1].public_bytes(Encoding.DER)
    v = make_bundle(tmp_path)
    assert appraise(v, pol=policy(roots=[intel_root])).kind == "tdx"
    with pytest.raises(AttestationError, match="not a root the policy allows"):
        appraise(v, pol=policy(roots=[chain[0].public_bytes(Encoding.DER)]))


@pytest.mark.parametrize("offset", [100, 600, 700])  # TD report body, report_data, QE report
def test_flipped_byte_is_refused(tmp_path: Path, offset: int) -> None:
    bad = bytearray(QUOTE)
    bad[offset] ^= 0x01
    with pytest.raises(AttestationError, match="tdx: quote verification failed") as err:
        appraise(make_bundle(tmp_path), quote=bytes(bad))
    assert "\n" not in str(err.value)


def test_collateral_expired_at_now(tmp_path: Path) -> None:
    after = float(calendar.timegm(time.strptime("2025-07-20", "%Y-%m-%d")))
    with pytest.raises(AttestationError, match=r"tdx-collateral.json expired at 2025-07-19T10:00:35Z"):
        appraise(make_bundle(tmp_path), now=after)
    # Between the PCK CRL's nextUpdate (10:00:35) and the TCB info's (10:16:03): the CRL inside rules.
    between = float(calendar.timegm(time.strptime("2025-07-19T10:10:00", "%Y-%m-%dT%H:%M:%S")))
    with pytest.raises(AttestationError, match=r"expired at 2025-07-19T10:00:35Z \(now 2025-07-19T10:10:00Z\)"):
        appraise(make_bundle(tmp_path), now=between)
    before = float(calendar.timegm(time.strptime("2025-06-01", "%Y-%m-%d")))
    with pytest.raises(AttestationError, match="not valid before 2025-06-19"):
        appraise(make_bundle(tmp_path), now=before)


def test_wrong_report_data_is_refused(tmp_path: Path) -> None:
    v = make_bundle(tmp_path)
    other = report_digest(b"another orchestrator's measurement report")
    with pytest.raises(AttestationError, match=r"measurement 'report-data' is 9a9d48e7f6799642\.\.\., pinned "):
        appraise(v, pol=policy(pinned={"report-data": other}))


def test_wrong_nonce_is_refused(tmp_path: Path) -> None:
    v = make_bundle(tmp_path)
    wrong = hashlib.sha256(b"another nonce").digest()
    with pytest.raises(AttestationError, match=r"report_data\[32:\] is not the nonce sent"):
        appraise(v, nonce=wrong)
    with pytest.raises(AttestationError, match="nonce does not match"):
        v.appraise(Evidence("tdx", QUOTE, wrong), NONCE, policy(), INSIDE, NoRevocation())


def test_tcb_below_policy_is_refused(tmp_path: Path) -> None:
    v = make_bundle(tmp_path)
    with pytest.raises(AttestationError, match="version 'tcb-eval' is 17, below the minimum 18"):
        appraise(v, pol=policy(min_versions={"tcb-eval": "18"}))
    with pytest.raises(AttestationError, match="policy tcb-status 'Great' is not one of"):
        appraise(v, pol=policy(min_versions={"tcb-status": "Great"}))


def test_pinned_measurement_mismatch_names_it(tmp_path: Path) -> None:
    v = make_bundle(tmp_path)
    with pytest.raises(AttestationError, match=r"measurement 'rtmr3' is 0000000000000000\.\.\., pinned ffff"):
        appraise(v, pol=policy(pinned={"rtmr3": b"\xff" * 48}))
    with pytest.raises(AttestationError, match="measurement 'gpu-driver-rim' is pinned but the evidence has none"):
        appraise(v, pol=policy(pinned={"gpu-driver-rim": b"\x01"}))


@pytest.mark.parametrize(
    ("quote", "match"),
    [
        (QUOTE[:500], "quote is 500 bytes, expected"),
        (b"\x00" * 700, "quote does not parse"),
        (QUOTE + b"\x00" * (16 * 1024), "expected 632..16384"),
    ],
)
def test_malformed_quotes_get_one_line(tmp_path: Path, quote: bytes, match: str) -> None:
    with pytest.raises(AttestationError, match=match) as err:
        appraise(make_bundle(tmp_path), quote=quote)
    assert "\n" not in str(err.value)


def test_policy_of_another_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="tdx: the policy is for kind 'emulated'"):
        appraise(make_bundle(tmp_path), pol=policy(kind="emulated"))


def test_no_collateral_for_the_fmspc(tmp_path: Path) -> None:
    other = COLLATERAL.replace(b'\\"fmspc\\":\\"B0C06F000000\\"', b'\\"fmspc\\":\\"00906ED50000\\"')
    assert other != COLLATERAL
    with pytest.raises(AttestationError, match="no TDX collateral for FMSPC B0C06F000000"):
        appraise(make_bundle(tmp_path, other))


def test_bind_report_data_is_digest_then_nonce() -> None:
    rd = bind_report_data(b"report", NONCE)
    assert rd == hashlib.sha256(b"report").digest() + NONCE
    with pytest.raises(AttestationError):
        bind_report_data(b"report", b"short")
