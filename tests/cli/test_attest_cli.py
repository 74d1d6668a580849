"""`gtbus attest fetch` over real HTTP on 127.0.0.1, then `gtbus attest check` offline on Intel's sample TDX quote."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

DATA = Path(__file__).parents[1] / "attest" / "data" / "dcap-qvl"
NONCE = "eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20"  # report_data[32:] of the sample quote
REPORT_DIGEST = "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9"  # report_data[:32]
MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
INSIDE = "2025-07-01T00:00:00Z"

needs_dcap = pytest.mark.skipif(
    __import__("importlib").util.find_spec("dcap_qvl") is None, reason="dcap-qvl not installed (pip install 'gtbus[attest-tdx]')"
)


def gtbus(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gtbus", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """The sample files served by a real HTTP server on 127.0.0.1 (the 'connected machine' side)."""
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(DATA / "tdx_quote_collateral.json", root / "collateral.json")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_sources(tmp_path: Path, url: str) -> Path:
    shutil.copy(DATA / "intel_sgx_root_ca.pem", tmp_path / "intel_sgx_root_ca.pem")
    sources = tmp_path / "sources.toml"
    sources.write_text(
        f"""
[[file]]
name = "tdx-collateral.json"
kind = "tdx-collateral"
url = "{url}/collateral.json"

[[file]]
name = "intel-root.pem"
kind = "cert"
path = "intel_sgx_root_ca.pem"
"""
    )
    return sources


def write_policy(tmp_path: Path, pinned: str = f'mrtd = "{MRTD}"\nreport-data = "{REPORT_DIGEST}"') -> Path:
    shutil.copy(DATA / "intel_sgx_root_ca.pem", tmp_path / "intel_sgx_root_ca.pem")
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f"""kind = "tdx"
roots = ["intel_sgx_root_ca.pem"]
revocation = "offline"
bundle = "bundle"

[pinned]
{pinned}

[min_versions]
tcb-status = "UpToDate"
tcb-eval = "17"
"""
    )
    return policy


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """The bundle `attest fetch` writes (tested above), written in-process: one process less per check test."""
    from gtbus.attest.bundle import BundleFile, validity_of, write_bundle

    files = []
    for name, kind, src in (("tdx-collateral.json", "tdx-collateral", "tdx_quote_collateral.json"), ("intel-root.pem", "cert", "intel_sgx_root_ca.pem")):
        data = (DATA / src).read_bytes()
        files.append(BundleFile(name, kind, f"file:{src}", 0.0, *validity_of(kind, data, name), data))
    return write_bundle(tmp_path / "bundle", files)


def test_fetch_writes_a_private_bundle_with_one_line_per_file(tmp_path: Path, served: str) -> None:
    sources = write_sources(tmp_path, served)
    out = tmp_path / "bundle"
    r = gtbus("attest", "fetch", "--out", str(out), "--from", str(sources), "--allow-stale")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "warn tdx-collateral.json expired at 2025-07-19T10:00:35Z (kept: --allow-stale)"
    assert lines[1] == (
        f"fetched tdx-collateral.json (tdx-collateral) from {served}/collateral.json, valid 2025-06-19T10:32:27Z .. 2025-07-19T10:00:35Z"
    )
    assert lines[2].startswith("fetched intel-root.pem (cert) from ") and lines[2].endswith("valid 2018-05-21T10:45:10Z .. 2049-12-31T23:59:59Z")
    assert lines[3] == f"wrote bundle {out} (2 files, manifest.json with BLAKE3 of each)"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    assert {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in out.iterdir()} == {
        "manifest.json": 0o600, "tdx-collateral.json": 0o600, "intel-root.pem": 0o600
    }
    assert (out / "tdx-collateral.json").read_bytes() == (DATA / "tdx_quote_collateral.json").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["source"] for f in manifest["files"]][0] == f"{served}/collateral.json"


def test_fetch_refuses_stale_sources_and_an_existing_bundle(tmp_path: Path, served: str) -> None:
    sources = write_sources(tmp_path, served)
    r = gtbus("attest", "fetch", "--out", str(tmp_path / "b"), "--from", str(sources))
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"Error: tdx-collateral.json: {served}/collateral.json expired at 2025-07-19T10:00:35Z; the source is stale (--allow-stale keeps it)"
    )
    assert not (tmp_path / "b" / "manifest.json").exists()
    assert gtbus("attest", "fetch", "--out", str(tmp_path / "b"), "--from", str(sources), "--allow-stale").returncode == 0
    r = gtbus("attest", "fetch", "--out", str(tmp_path / "b"), "--from", str(sources), "--allow-stale")
    assert r.returncode == 1 and r.stderr.strip() == f"Error: {tmp_path / 'b'}: already holds a bundle; --force to replace it"


@pytest.mark.parametrize(
    ("sources", "needle"),
    [
        ('[[file]]\nname = "x"\nkind = "crl"\nurl = "{url}/missing.crl"', "/missing.crl: HTTP 404"),
        ('[[file]]\nname = "x"\nkind = "crl"\nurl = "file:///etc/passwd"', "only http:// and https:// URLs are fetched"),
        ('[[file]]\nname = "x"\nkind = "crl"\nurl = "http://127.0.0.1:1/x"', "http://127.0.0.1:1/x: cannot fetch"),
        ('[[file]]\nname = "x"\nkind = "crl"\nurl = "{url}/collateral.json"', "x: not a valid crl"),
        ('[[file]]\nname = "x"\nkind = "tdx-collateral"\npath = "nowhere.json"', "nowhere.json is missing"),
        ('[[file]]\nname = "x"\nkind = "pdf"\npath = "a"', "kind 'pdf' is not one of"),
        ('[[file]]\nname = "x"\nkind = "crl"', "needs name, kind, and exactly one of url or path"),
        ('[[file]]\nname = "../x"\nkind = "tdx-collateral"\nurl = "{url}/collateral.json"', "is not a plain file name"),
        ('[[file]]\nname = 3\nkind = "crl"\npath = "a"', "every value must be a non-empty string"),
        ("[other]\n", "must hold only [[file]] entries"),
        ("not toml [", "not valid TOML"),
        ('[[file]]\nname = "x"\nkind = "crl"\nurl = "{url}/huge.crl"', "/huge.crl: over the 4194304-byte limit"),
    ],
)
def test_fetch_bad_sources_are_one_error_line(tmp_path: Path, served: str, sources: str, needle: str) -> None:
    # A server (or a man in the middle) answering with more than a bundle file may hold is cut off at the limit.
    with (tmp_path / "www" / "huge.crl").open("wb") as f:
        f.truncate((4 << 20) + 1)
    path = tmp_path / "sources.toml"
    path.write_text(sources.replace("{url}", served))
    r = gtbus("attest", "fetch", "--out", str(tmp_path / "b"), "--from", str(path), "--allow-stale")
    assert r.returncode == 1, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle.replace("{tmp}", str(tmp_path)) in lines[0], r.stderr
    assert not (tmp_path / "b" / "manifest.json").exists()


@needs_dcap
def test_check_good_quote_offline(tmp_path: Path, bundle: Path) -> None:
    policy = write_policy(tmp_path)
    r = gtbus("attest", "check", str(DATA / "tdx_quote"), "--policy", str(policy), "--nonce", NONCE, "--now", INSIDE)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"ok   bundle {bundle}: 2 files, manifest and BLAKE3 match"
    assert "ok   tdx evidence appraised at 2025-07-01T00:00:00Z; good until 2025-07-19T10:00:35Z" in lines
    assert f"ok   pinned mrtd = {MRTD}" in lines
    assert f"ok   pinned report-data = {REPORT_DIGEST}" in lines
    assert "ok   version tcb-status = UpToDate" in lines
    assert not any(line.startswith(("FAIL", "warn")) for line in lines), r.stdout


@needs_dcap
@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"--nonce": "00" * 32}, "FAIL tdx: report_data[32:] is not the nonce sent"),
        ({"--now": "2025-08-01T00:00:00Z"}, "FAIL bundle: tdx-collateral.json expired at 2025-07-19T10:00:35Z"),
        ({"pinned": 'mrtd = "' + "00" * 48 + '"'}, "FAIL measurement 'mrtd' is 91eb2b44d141d4ec..., pinned 0000"),
        ({"pinned": 'report-data = "' + "11" * 32 + '"'}, "FAIL measurement 'report-data' is 9a9d48e7f6799642..., pinned 1111"),
        ({"flip": "200"}, "FAIL tdx: quote verification failed (tdx-collateral.json): Verification failed: ISV enclave report signature is invalid"),
    ],
)
def test_check_failures_are_one_line_and_exit_1(tmp_path: Path, bundle: Path, change: dict[str, str], needle: str) -> None:
    policy = write_policy(tmp_path, change["pinned"]) if "pinned" in change else write_policy(tmp_path)
    evidence = DATA / "tdx_quote"
    if "flip" in change:
        raw = bytearray(evidence.read_bytes())
        raw[int(change["flip"])] ^= 1
        evidence = tmp_path / "flipped"
        evidence.write_bytes(bytes(raw))
    r = gtbus(
        "attest", "check", str(evidence), "--policy", str(policy),
        "--nonce", change.get("--nonce", NONCE), "--now", change.get("--now", INSIDE),
    )
    assert r.returncode == 1, r.stdout + r.stderr
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith(needle), r.stdout
    assert "Traceback" not in r.stderr


@needs_dcap
def test_check_tampered_bundle_is_one_error_line(tmp_path: Path, bundle: Path) -> None:
    policy = write_policy(tmp_path)
    data = bytearray((bundle / "tdx-collateral.json").read_bytes())
    data[-3] ^= 1
    (bundle / "tdx-collateral.json").write_bytes(bytes(data))
    r = gtbus("attest", "check", str(DATA / "tdx_quote"), "--policy", str(policy), "--nonce", NONCE, "--now", INSIDE)
    assert r.returncode == 1
    assert r.stderr.strip() == "Error: bundle: tdx-collateral.json does not match its BLAKE3 in the manifest (changed since fetched)"


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("--nonce", "zz"), 2, "Invalid value for --nonce: not hex"),
        (("--nonce", "00"), 2, "must be 32 bytes (64 hex digits), got 1"),
        (("--now", "yesterday"), 2, "Invalid value for --now: 'yesterday' is not an ISO date-time"),
        (("--kind", "nvidia-gpu"), 1, "the policy is for kind tdx, the evidence is nvidia-gpu"),
        (("--evidence", "missing"), 1, "evidence file " + "{tmp}/missing is missing"),
        (("--bundle", "nowhere"), 1, "bundle: "),
        (("--policy", "nowhere.toml"), 1, "no such policy file"),
        (("--policy", "online.toml"), 1, 'revocation = "online" needs a network'),
    ],
)
def test_check_bad_inputs_are_one_error_line(tmp_path: Path, args: tuple[str, ...], code: int, needle: str) -> None:
    policy = write_policy(tmp_path)
    (tmp_path / "online.toml").write_text(policy.read_text().replace('revocation = "offline"', 'revocation = "online"'))
    opts = {"--nonce": NONCE, "--now": INSIDE, "--policy": str(policy), "--evidence": str(DATA / "tdx_quote"),
            "--bundle": str(tmp_path / "bundle")}
    opts.update(dict(zip(args[::2], (str(tmp_path / a) if k in ("--evidence", "--bundle", "--policy") else a for k, a in zip(args[::2], args[1::2])))))
    (tmp_path / "bundle").mkdir()
    evidence = opts.pop("--evidence")
    flat = [x for kv in opts.items() for x in kv]
    r = gtbus("attest", "check", evidence, *flat)
    assert r.returncode == code, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle.replace("{tmp}", str(tmp_path)) in lines[0], r.stderr


def test_check_emulated_evidence_needs_no_bundle(tmp_path: Path) -> None:
    from gtbus.attest.emulated import EmulatedVerifier
    from gtbus.gpu.attestation import PlatformSigner

    signer, forger = PlatformSigner.generate(), PlatformSigner.generate()
    nonce = bytes(range(32))
    code = bytes(range(32, 64))
    (tmp_path / "gpu1.platform.pub").write_text(signer.public_key.hex() + "\n")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'kind = "emulated"\nroots = ["gpu1.platform.pub"]\n\n[pinned]\ncode = "{code.hex()}"\n')
    for who, rc, line in ((signer, 0, f"ok   pinned code = {code.hex()}"), (forger, 1, "FAIL ")):
        blob = EmulatedVerifier(who, measurements=lambda: {"code": code}).collect(nonce).blob
        (tmp_path / "evidence").write_bytes(blob)
        r = gtbus("attest", "check", str(tmp_path / "evidence"), "--policy", str(policy), "--nonce", nonce.hex())
        assert r.returncode == rc, r.stdout + r.stderr
        assert any(got.startswith(line) for got in r.stdout.splitlines()), r.stdout
        if rc == 0:
            assert "; no expiry" in r.stdout and "bundle" not in r.stdout, r.stdout


def test_pack_nvidia_makes_evidence_from_nvidias_files(tmp_path: Path) -> None:
    # NVIDIA's published sample report (hex) and chain (PEM): packed, then read back by the appraiser's own parser.
    from gtbus.attest.nvidia import evidence_from_nvidia_files

    data = Path(__file__).resolve().parents[1] / "attest" / "data" / "nvtrust"
    out = tmp_path / "gpu.evidence"
    r = gtbus("attest", "pack-nvidia", str(data / "hopperAttestationReport.txt"), str(data / "hopperCertChain.txt"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == evidence_from_nvidia_files((data / "hopperAttestationReport.txt").read_bytes(), (data / "hopperCertChain.txt").read_bytes())
    assert out.stat().st_mode & 0o777 == 0o600
    (tmp_path / "bad.txt").write_text("not hex at all")
    bad = gtbus("attest", "pack-nvidia", str(tmp_path / "bad.txt"), str(data / "hopperCertChain.txt"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "not a report in hex" in bad.stderr and not (tmp_path / "x").exists()
