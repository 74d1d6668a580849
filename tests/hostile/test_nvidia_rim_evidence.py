"""A hostile orchestrator answers an nvidia-gpu holder with GPU evidence the holder's RIMs refuse.

Real nodes over CurveZMQ on 127.0.0.1 (the scripted orchestrator of
test_attest_evidence.py), the holder appraising with NvidiaVerifier, RIMs these
tests sign (tests/attest/test_nvidia_rim.py) and real CRLs in a real bundle,
at the real time. The GPU report is NVIDIA's sample re-signed by a test device
chain for the holder's nonce. Each hostile answer is refused with one line
before any grant could be acked; the honest one is appraised.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("signxml")

sys.path.insert(0, str(Path(__file__).parents[1] / "attest"))  # the sample and the PKI of the attest tests

from test_attest_evidence import HostileOrchestrator, Site, _register  # noqa: E402
from test_nvidia import CHAIN, DAY, REPORT, Pki, bundle_of  # noqa: E402
from test_nvidia_rim import make_rim  # noqa: E402

from gtbus.attest.appraiser import Appraiser  # noqa: E402
from gtbus.attest.nvidia import NvidiaVerifier, pack_evidence  # noqa: E402
from gtbus.attest.verifier import Policy  # noqa: E402
from gtbus.messages.types import AttestEvidence, AttestRequest  # noqa: E402
from gtbus.testing import run_async  # noqa: E402

BLOCK_2_VALUE_AT = 37 + 8 + 55 + 7  # the second measurement block's value, inside the signed response


class GpuSite:
    """A device chain, a RIM signing chain, RIMs of the sample's values, and current CRLs for both chains."""

    def __init__(self, tmp_path: Path) -> None:
        self.device, self.rim = Pki.make(), Pki.make()
        now = time.time()  # the holder appraises at the real time
        crls = {f"{who}-{issuer}.crl": pki.crl(issuer, this=now - DAY, until=now + 7 * DAY)
                for who, pki in (("device", self.device), ("rim", self.rim)) for issuer in ("root", "middle")}
        self.rims = {"driver": make_rim(self.rim, "driver"), "vbios": make_rim(self.rim, "vbios")}
        verifier = NvidiaVerifier(self.rims, [self.rim.root_der])
        self.appraiser = Appraiser(verifier, Policy({}, {}, [self.device.root_der], kind="nvidia-gpu"), bundle_of(tmp_path, crls))

    def evidence(self, nonce: bytes, *, edit: int | None = None, chain: list[bytes] | None = None) -> AttestEvidence:
        """The sample report for ``nonce`` (a byte of it flipped at ``edit``), signed by the device leaf."""
        report = REPORT[:4] + nonce + REPORT[36:]
        if edit is not None:
            report = report[:edit] + bytes([report[edit] ^ 0xFF]) + report[edit + 1 :]
        blob = pack_evidence(self.device.sign(report), chain or self.device.chain)
        return AttestEvidence({"kind": "nvidia-gpu", "blob": blob, "nonce": nonce})


def run(tmp_path: Path, answer: str) -> tuple[HostileOrchestrator, BaseException | None]:
    gpu = GpuSite(tmp_path)
    bad_name = CHAIN[0].replace(b"GH100 A01 GSP FMC LF", b"\xffH100 A01 GSP FMC LF")

    def reply(req: AttestRequest, honest: object) -> object:
        if answer == "honest":
            return gpu.evidence(req.nonce)
        if answer == "other-gpu-state":  # a GPU whose measured state the RIM does not list, signed by a genuine key
            return gpu.evidence(req.nonce, edit=BLOCK_2_VALUE_AT)
        return gpu.evidence(req.nonce, chain=[bad_name, *gpu.device.chain[1:]])

    orch, exc, _ = run_async(_register(Site(tmp_path / "site"), reply, gpu.appraiser))
    return orch, exc


def test_the_honest_gpu_evidence_passes_the_rims(tmp_path: Path) -> None:
    orch, exc = run(tmp_path, "honest")
    assert exc is None and orch.requests == 1


@pytest.mark.parametrize(
    "answer, message",
    [
        ("other-gpu-state", "nvidia-gpu RIMs: measurement index 1 (vbios RIM, "),
        ("malformed-leaf-name", "nvidia-gpu: certificate 0 of the evidence's chain is not a well-formed DER X.509 certificate"),
    ],
)
def test_gpu_evidence_the_rims_refuse_is_one_line(tmp_path: Path, answer: str, message: str) -> None:
    orch, exc = run(tmp_path, answer)
    assert exc is not None, "the holder accepted hostile evidence"
    text = str(exc)
    assert text.startswith(f"the orchestrator's nvidia-gpu evidence is refused: {message}") and "\n" not in text, text
    assert orch.requests == 1
