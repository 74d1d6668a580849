"""Without the optional dcap-qvl, TDX appraisal is one line saying how to get it (and the rest of gtbus works)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data" / "dcap-qvl"

# Run in a fresh interpreter where importing dcap_qvl fails, as on a host without the extra.
SCRIPT = f"""
import sys
sys.modules["dcap_qvl"] = None
from pathlib import Path
from gtbus.attest.bundle import Bundle
from gtbus.attest.tdx import TdxVerifier
from gtbus.attest.verifier import AttestationError, Evidence, NoRevocation, Policy
quote = open({str(DATA / "tdx_quote")!r}, "rb").read()
nonce = bytes(32)
try:
    TdxVerifier(Bundle(Path("."), ())).appraise(Evidence("tdx", quote, nonce), nonce, Policy({{}}, {{}}, [], kind="tdx"), 0.0, NoRevocation())
except AttestationError as exc:
    print(exc)
"""


def test_missing_dcap_qvl_is_one_line() -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "tdx: dcap-qvl is not installed (pip install 'gtbus[attest-tdx]')"
