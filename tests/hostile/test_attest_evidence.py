"""A hostile orchestrator answers a holder's evidence request: huge, malformed, wrong kind, replayed.

The orchestrator here is scripted (a real node: its own deployment key, CurveZMQ
on 127.0.0.1, signed messages) so that its *answers* can be hostile; the holder
is gtbus's own (the Holder class in-process for the matrix, the `gtbus holder`
process for the one-line exit). Each case asserts the holder refuses with one
line naming what is wrong, before any grant could be acked.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gtbus.attest import Evidence, run_binding
from gtbus.attest.appraiser import Appraiser
from gtbus.attest.emulated import EmulatedVerifier
from gtbus.attest.policy import emulated_policy
from gtbus.attest.verifier import NoRevocation
from gtbus.gpu.attestation import AttestationError, MeasurementReport, PlatformSigner, channel_key_commitment
from gtbus.gpu.attestation import EmulatedReportVerifier as ReportVerifier
from gtbus.gpu.backends import device_class
from gtbus.gpu.platform_key import load_platform_signer, write_platform_key
from gtbus.messages.deployment_keys import make_deployment
from gtbus.messages.pipeline import Accepted
from gtbus.messages.types import AttestEvidence, AttestRequest, Refusal, Register, Shutdown, Welcome
from gtbus.nodes.holder import Holder
from gtbus.nodes.launcher import free_port
from gtbus.nodes.runtime import NodeRuntime
from gtbus.nodes.wiring import client_transport, server_transport
from gtbus.testing import eventually, run_async
from gtbus.training.corpus import build_demo_corpus
from gtbus.training.shards import Dataset

CODE = bytes(range(32))
RUN = "hostile-run"
#: What the hostile orchestrator answers to attest.request, given the request and its honest attester.
Answer = Callable[[AttestRequest, EmulatedVerifier], object]


class Site:
    """Keys, a platform key, one holder's shard, and endpoints on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dep = make_deployment(root / "keys", 1)
        self.platform_key, self.platform_pub = write_platform_key(root / "platform")
        self.signer = load_platform_signer(self.platform_key)
        self.shard = list(build_demo_corpus(root / "data", holders=1, bytes_per_holder=16 * 1024))[0]
        self.router, self.pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"


class HostileOrchestrator:
    """Welcomes the holder honestly (a genuine report of CODE), then answers attest.request with ``answer``."""

    def __init__(self, site: Site, answer: Answer) -> None:
        o = site.dep.orchestrator
        self.rt = NodeRuntime(o, site.dep.roster, server_transport(o, site.dep.roster, site.router, site.pub), run_dir=site.root / "orch")
        self.site, self.answer = site, answer
        self.honest = EmulatedVerifier(site.signer, lambda: {"code": CODE}, lambda: run_binding(RUN))
        self.refusals: list[str] = []
        self.requests = 0
        self.rt.on(Register, self._on_register)
        self.rt.on(AttestRequest, self._on_attest)
        self.rt.on(Refusal, self._on_refusal)

    async def _on_register(self, acc: Accepted[Register], delivery: Any) -> None:
        rep = MeasurementReport(CODE, b"m" * 32, "dev", channel_key_commitment(b""), RUN, 0, time.time())
        welcome = Welcome(RUN, dict(self.site.signer.sign(rep).to_wire()), {"chunk_tokens": 1 << 12})
        await self.rt.send(welcome, acc.header.sender, parent=acc.header.id)

    async def _on_attest(self, acc: Accepted[AttestRequest], delivery: Any) -> None:
        self.requests += 1
        reply = self.answer(acc.message, self.honest)
        await self.rt.send(reply, acc.header.sender, parent=acc.header.id)

    async def _on_refusal(self, acc: Accepted[Refusal], delivery: Any) -> None:
        self.refusals.append(acc.message.reason)
        await self.rt.publish(Shutdown("the holder refused"))


def _evidence(wire: dict[str, Any]) -> AttestEvidence:
    return AttestEvidence(wire)


def huge(req: AttestRequest, honest: EmulatedVerifier) -> object:
    return _evidence({"kind": "emulated", "blob": b"\x00" * (900 * 1024), "nonce": req.nonce})


def blob_not_bytes(req: AttestRequest, honest: EmulatedVerifier) -> object:
    return _evidence({"kind": "emulated", "blob": "a string", "nonce": req.nonce})


def not_a_map(req: AttestRequest, honest: EmulatedVerifier) -> object:
    return _evidence({"quote": b"x"})


def garbage_blob(req: AttestRequest, honest: EmulatedVerifier) -> object:
    return _evidence({"kind": "emulated", "blob": b"\xc1" * 512, "nonce": req.nonce})  # 0xc1: never valid msgpack


def wrong_kind(req: AttestRequest, honest: EmulatedVerifier) -> object:
    ev = honest.collect(req.nonce)
    return _evidence({**ev.to_wire(), "kind": "tdx"})


_old_nonce = os.urandom(32)


def replayed(req: AttestRequest, honest: EmulatedVerifier) -> object:
    # Genuine evidence, signed for an earlier nonce: sent as it was.
    return _evidence(honest.collect(_old_nonce).to_wire())


def replayed_new_envelope(req: AttestRequest, honest: EmulatedVerifier) -> object:
    # The same, with the envelope's nonce rewritten to the new one (the signed body still holds the old).
    return _evidence({**honest.collect(_old_nonce).to_wire(), "nonce": req.nonce})


def another_run(req: AttestRequest, honest: EmulatedVerifier) -> object:
    # Genuine and fresh, but made for another run (evidence of a second orchestrator on the same platform).
    other = EmulatedVerifier(honest._signer, lambda: {"code": CODE}, lambda: run_binding("another-run"))  # noqa: SLF001
    return _evidence(other.collect(req.nonce).to_wire())


def refused(req: AttestRequest, honest: EmulatedVerifier) -> object:
    return Refusal("attestation-unavailable", "this orchestrator gives no 'emulated' evidence")


CASES = [
    (huge, "evidence: blob must be 1..65536 bytes, got 921600"),
    (blob_not_bytes, "evidence: blob must be 1..65536 bytes, got str"),
    (not_a_map, "evidence: expected a map with kind, blob and nonce"),
    (garbage_blob, "emulated evidence: blob is not valid msgpack"),
    (wrong_kind, "evidence: kind 'tdx', expected 'emulated'"),
    (replayed, "evidence: nonce does not match the one sent"),
    (replayed_new_envelope, "emulated evidence: the signed nonce is not the one sent"),
    (another_run, "emulated evidence: made for another run than 'hostile-run'"),
]


async def _register(site: Site, answer: Answer, appraiser: Appraiser | None = None) -> tuple[HostileOrchestrator, BaseException | None, Holder]:
    orch = HostileOrchestrator(site, answer)
    h = site.dep.holders[0]
    rt = NodeRuntime(h, site.dep.roster, client_transport(h, site.dep.roster, site.router, site.pub), run_dir=site.root / "h1",
                     server=site.dep.orchestrator.name)
    appraiser = appraiser or Appraiser(EmulatedVerifier(), emulated_policy(site.signer.public_key, CODE), NoRevocation())
    holder = Holder(rt, Dataset([site.shard], name="h1"), device_class("host"), ReportVerifier(site.signer.public_key, CODE), appraiser=appraiser)
    await orch.rt.start()
    await rt.start()
    try:
        await holder.register(attempts=3, timeout=3.0)
        return orch, None, holder
    except AttestationError as exc:
        return orch, exc, holder
    finally:
        await rt.close()
        await orch.rt.close()


@pytest.mark.parametrize(("answer", "message"), CASES, ids=[c[0].__name__ for c in CASES])
def test_hostile_evidence_is_refused_with_one_line(tmp_path: Path, answer: Answer, message: str) -> None:
    orch, exc, holder = run_async(_register(Site(tmp_path), answer))
    assert exc is not None, "the holder accepted hostile evidence"
    text = str(exc)
    assert text.startswith("the orchestrator's emulated evidence is refused: ") and "\n" not in text
    assert re.search(message, text), text
    assert orch.requests == 1  # refused at the first answer, not retried into
    assert holder._appraisal_error == text  # noqa: SLF001  (a grant waiting on the appraisal is declined with it, never acked)


def test_a_refusal_instead_of_evidence_is_named(tmp_path: Path) -> None:
    _, exc, _ = run_async(_register(Site(tmp_path), refused))
    assert str(exc) == "the orchestrator gave no emulated evidence: this orchestrator gives no 'emulated' evidence"


def test_the_honest_answer_is_appraised(tmp_path: Path) -> None:
    orch, exc, holder = run_async(_register(Site(tmp_path), lambda req, honest: _evidence(honest.collect(req.nonce).to_wire())))
    assert exc is None and holder._appraised.is_set() and holder._appraisal_error is None  # noqa: SLF001


@pytest.mark.slow
def test_the_holder_process_exits_with_one_line_and_tells_the_orchestrator(tmp_path: Path) -> None:
    site = Site(tmp_path)

    async def main() -> tuple[HostileOrchestrator, subprocess.CompletedProcess[str]]:
        orch = HostileOrchestrator(site, replayed)
        await orch.rt.start()
        h = site.dep.holders[0]
        cmd = [sys.executable, "-m", "gtbus", "holder", "--key", str(site.dep.key_path(h.name)), "--keys", str(site.dep.key_dir),
               "--platform-pub", str(site.platform_pub), "--pin-code", CODE.hex(), "--data", str(site.shard),
               "--router", site.router, "--pub", site.pub, "--run-dir", str(tmp_path / "h1run")]
        try:
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            await eventually(lambda: bool(orch.refusals), timeout=5, what="the holder's refusal")
            return orch, subprocess.CompletedProcess(cmd, proc.returncode or 0, "", err.decode())
        finally:
            await orch.rt.close()

    orch, done = run_async(main(), timeout=90)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0
    assert lines[-1] == "Error: the orchestrator's emulated evidence is refused: evidence: nonce does not match the one sent (replayed or for another request)"
    assert "Traceback" not in done.stderr
    assert orch.refusals == [lines[-1].removeprefix("Error: ")]


# -- a hostile holder asks the real orchestrator process ----------------------------------------------------------


#: The orchestrator's peak resident memory while a holder keeps asking for evidence.
RSS_CAP = 400 << 20


@pytest.mark.slow
def test_a_holder_asking_for_other_kinds_and_many_times_gets_one_line_or_fresh_evidence(travel: Any, tmp_path: Path) -> None:
    from process_memory import peak_rss_bytes
    from scripted_holder import ScriptedHolder, honest_manifest

    from gtbus.gpu.platform_key import load_platform_public

    chunk = 4096
    t = travel(holders=2, chunk_tokens=chunk, lease=60.0, steps="5", bytes_per_holder=2 * chunk)
    t.start_orchestrator()
    t.dep.start_holder(0)  # h1 is honest; h2 is the scripted one
    policy = emulated_policy(load_platform_public(t.dep.platform_pub), bytes.fromhex(t.dep.pin))
    appraiser = Appraiser(EmulatedVerifier(), policy, NoRevocation())

    async def scenario() -> None:
        async with ScriptedHolder(t, "h2", tmp_path / "h2") as h2:
            welcome = await h2.register(honest_manifest(2 * chunk))
            assert isinstance(welcome, Welcome)
            for kind in ("tdx", "nvidia-gpu", "k" * 32):
                acc = await h2.rt.request(AttestRequest(os.urandom(32), kind), timeout=10)
                assert isinstance(acc.message, Refusal) and acc.message.code == "attestation-unavailable"
                assert acc.message.reason == f"this orchestrator gives no {kind!r} evidence (it gives: emulated)"
            nonces = [os.urandom(32) for _ in range(200)]
            answers = await asyncio.gather(*(h2.rt.request(AttestRequest(n, "emulated"), timeout=30) for n in nonces))
            for n, acc in zip(nonces, answers):
                assert isinstance(acc.message, AttestEvidence)
                claims = appraiser.appraise(Evidence.from_wire(acc.message.evidence), n, welcome.run_id, time.time())
                assert claims.measurements == {"code": bytes.fromhex(t.dep.pin)}
            # Evidence answers the nonce it was asked with, and no other.
            with pytest.raises(AttestationError, match="nonce does not match"):
                appraiser.appraise(Evidence.from_wire(answers[0].message.evidence), nonces[1], welcome.run_id, time.time())
            rss.append(peak_rss_bytes(t.orchestrator.pid))  # the run waits on h2's chunks: the orchestrator is alive
            await h2.decline_until_done()  # the run must still end

    rss: list[int] = []
    run_async(scenario(), timeout=150)
    summary = t.finish()
    assert summary["hops_trained"] == 2  # h1's two chunks, nothing of h2's
    assert rss and rss[0] < RSS_CAP
