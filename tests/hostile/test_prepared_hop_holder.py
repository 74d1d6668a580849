"""Hop preparations (``token.prepare``) against a real holder process: hostile ones refused in one line, honest ones used.

The orchestrator is scripted from gtbus's own classes with the deployment's
real keys and server transport (tests/hostile/scripted_orchestrator.py); the
holder is the real ``gtbus holder`` process on the host backend, and the
staging is real (a sealed memfd offered by a HostDevice in this process).

A preparation is a hint: the holder opens the params and maps the staging
before its grant. So the test checks, over real sockets, that one naming
another holder, another run, params it cannot open or a staging that does not
exist is refused with one line and keeps nothing; that a grant carrying the
prepared params writes through the prepared mapping (its hop line says so);
that a grant carrying other params drops the prepared mapping, writes its own
staging and never touches the prepared one; and that no mapping of any staging
is left in the holder afterwards.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, Callable, Coroutine

import pytest
from scripted_holder import wait_for_text
from scripted_orchestrator import ScriptedOrchestrator
from travel_kit import Travel

from gtbus.gpu.channel import ChannelParams, staging_size
from gtbus.gpu.host import HostDevice
from gtbus.gpu.sealing import seal_params
from gtbus.messages.identity import Roster
from gtbus.messages.types import HopPrepare, Shutdown, TokenAck, TokenGrant, TokenReturn
from gtbus.testing import eventually, run_async

pytestmark = pytest.mark.slow

RUN_ID = "hostile-prepare-1"
CHUNK = 16384
SEGMENT = 1 << 20
IGNORED = "ignored the preparation of chunk"


def _run(scenario: Callable[[], Coroutine[Any, Any, None]], err: Path) -> None:
    """Run a scenario against the real holder (root only: it reads the holder's /proc maps); no traceback in its log."""
    if os.geteuid() != 0:
        pytest.skip("reads the holder's /proc maps, which a non-dumpable process keeps for root")
    run_async(scenario(), timeout=180)
    assert "Traceback" not in err.read_text(errors="replace")


def _staging_maps(pid: int) -> int:
    """How many mappings of a staging memfd the process holds (its /proc maps; the holder is root-readable only)."""
    return sum("gtbus-hop" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


class Scene:
    """The real holder h1 of ``t`` and a scripted orchestrator; staging is made here, on a real HostDevice.

    Entered: the orchestrator serves and h1 runs; left without an error: the run is shut down and h1 has exited.
    """

    def __init__(self, t: Travel, *, hold_evidence: asyncio.Event | None = None) -> None:
        self.t, self.err = t, t.run_dir / "h1.err"
        self.keys = Roster.from_dir(t.dep.keys)
        self.h1 = self.keys["h1"].x25519
        self.device = HostDevice()
        self.nbytes = staging_size(CHUNK * 2, SEGMENT)
        self.orch = ScriptedOrchestrator(t, RUN_ID, CHUNK, hold_evidence=hold_evidence)
        self.acks, self.returns = self.orch.queue_of(TokenAck), self.orch.queue_of(TokenReturn)
        self.proc: Any = None

    async def __aenter__(self) -> "Scene":
        await self.orch.rt.start()
        self.proc = self.t.dep.start_holder(0)
        return self

    async def __aexit__(self, exc_type: Any, *rest: object) -> None:
        try:
            if exc_type is None:
                await self.orch.rt.publish(Shutdown("test over"))
                await eventually(lambda: self.proc.poll() is not None, timeout=30, what="the holder's exit")
        finally:
            await self.orch.rt.close()

    def staging(self, to: bytes | None = None) -> tuple[Any, ChannelParams, bytes]:
        """A fresh staging buffer, its params, and those sealed to ``to`` (default h1)."""
        buf, handle = self.device.alloc_hop_staging(self.nbytes)
        params = ChannelParams.generate(str(handle), CHUNK * 2, segment_size=SEGMENT)
        return buf, params, seal_params(params, to or self.h1)

    async def prepare(self, chunk: int, sealed: bytes, *, holder: str = "h1", run_id: str = RUN_ID) -> None:
        """Send h1 a preparation."""
        await self.orch.rt.send(HopPrepare("tok", run_id, holder, chunk, sealed), "h1")

    async def grant(self, chunk: int, epoch: int, params: ChannelParams, sealed: bytes) -> None:
        """Send h1 the grant of ``epoch`` for ``chunk`` carrying ``sealed``, its report committing to ``params``' key."""
        g = TokenGrant("tok", RUN_ID, "h1", chunk, "travel", time.time() + 60, sealed, self.orch.report(params.key, epoch))
        await self.orch.rt.send(g, "h1", epoch=epoch)

    async def hop(self, chunk: int, epoch: int, params: ChannelParams, sealed: bytes) -> tuple[TokenReturn, str]:
        """Grant, wait for the ack and the return; the return and h1's line for the hop."""
        await self.grant(chunk, epoch, params, sealed)
        await asyncio.wait_for(self.acks.get(), 30)
        r: TokenReturn = (await asyncio.wait_for(self.returns.get(), 30)).message
        return r, await self.hop_line(f"hop {epoch} chunk {chunk}")

    async def hop_line(self, hop: str) -> str:
        """h1's line for ``hop`` ("hop E chunk C"), once written."""
        await wait_for_text(self.err, f"{hop}: wrote")
        return next(x for x in self.err.read_text(errors="replace").splitlines() if f"{hop}: wrote" in x)

    async def maps(self, n: int, what: str) -> None:
        """Wait until h1 holds ``n`` staging mappings."""
        await eventually(lambda: _staging_maps(self.proc.pid) == n, timeout=30, what=what)


def test_preparations_hostile_refused_honest_used_and_nothing_left_mapped(travel: Any) -> None:
    t: Travel = travel(holders=2, chunk_tokens=CHUNK, bytes_per_holder=32 * 1024)  # h1: two chunks
    err = t.run_dir / "h1.err"

    async def scenario() -> None:
        async with Scene(t) as sc:
            await wait_for_text(err, "evidence appraised")
            # -- hostile: each refused with one line naming why, nothing kept --------------------------
            _, elsewhere, _ = sc.staging()  # only ever refused before a mapping
            not_offered = ChannelParams.generate(str(sc.staging()[1].buffer_handle)[:-4] + "0000", CHUNK * 2, segment_size=SEGMENT)
            hostile: list[tuple[str, dict[str, Any]]] = [
                ("names holder 'h2'", {"chunk": 0, "sealed": seal_params(elsewhere, sc.h1), "holder": "h2"}),
                ("is for run 'another-run'", {"chunk": 0, "sealed": seal_params(elsewhere, sc.h1), "run_id": "another-run"}),
                ("sealed channel params", {"chunk": 0, "sealed": b"\x00" * 200}),
                ("sealed channel params", {"chunk": 0, "sealed": seal_params(elsewhere, sc.keys["h2"].x25519)}),  # h1 cannot open it
                ("not a host staging handle", {"chunk": 0, "sealed": seal_params(ChannelParams.generate("cuda-ipc-x", CHUNK * 2), sc.h1)}),
                ("is not exported", {"chunk": 0, "sealed": seal_params(not_offered, sc.h1)}),
            ]
            for n, (expect, what) in enumerate(hostile, 1):
                await sc.prepare(what.pop("chunk"), what.pop("sealed"), **what)
                await eventually(lambda: err.read_text(errors="replace").count(IGNORED) >= n, timeout=30, what=f"refusal {n} ({expect})")
                last = [line for line in err.read_text(errors="replace").splitlines() if IGNORED in line][-1]
                assert expect in last, (expect, last)
            assert _staging_maps(sc.proc.pid) == 0  # none of them left a mapping

            # A chunk it does not have: the params open and the staging maps (nothing is read ahead);
            # the next preparation replaces it, and nothing of it stays mapped.
            far, _, far_sealed = sc.staging()  # kept referenced: a staging dropped here is withdrawn at once
            await sc.prepare(99, far_sealed)
            await sc.maps(1, "h1 mapped the staging of chunk 99's preparation")

            # -- honest: a grant with the prepared params writes through the prepared mapping ----------
            used, params, sealed = sc.staging()
            await sc.prepare(0, sealed)
            await sc.maps(1, "h1 mapped the prepared staging")
            r, line = await sc.hop(0, 1, params, sealed)
            assert (r.chunk_index, r.nbytes, r.segments) == (0, CHUNK * 2, 1)
            assert line.endswith("params and staging were prepared ahead"), line
            assert any(used._mmap[: sc.nbytes])  # type: ignore[index]  # the ciphertext is in the granted staging

            # -- a guess that was wrong: the grant names other params; the prepared staging stays untouched
            guessed, _, guessed_sealed = sc.staging()
            await sc.prepare(1, guessed_sealed)
            await sc.maps(1, "h1 mapped the second prepared staging")
            granted, granted_params, granted_sealed = sc.staging()
            r, line = await sc.hop(1, 2, granted_params, granted_sealed)
            assert (r.chunk_index, r.nbytes) == (1, CHUNK * 2)
            assert "prepared ahead" not in line, line
            assert any(granted._mmap[: sc.nbytes]) and not any(guessed._mmap[: sc.nbytes])  # type: ignore[index]
            await sc.maps(0, "h1 unmapped every staging")

    _run(scenario, err)
    assert err.read_text(errors="replace").count(IGNORED) == 6


def test_a_preparation_that_comes_while_a_hop_is_written_serves_the_next_grant(travel: Any) -> None:
    # One holder's hops back to back: the next hop's preparation reaches the holder while it writes
    # the current one (the holder opens it as that hop ends, off its path; when exactly is not
    # observable from here). The holder stops itself after its ack (drill stop_after_ack) and the
    # preparation is sent while it is stopped, so it arrives mid-hop whatever the scheduling: it
    # must still serve the next grant, and leave nothing mapped.
    t: Travel = travel(holders=1, chunk_tokens=CHUNK, bytes_per_holder=32 * 1024, holder_faults={"h1": "stop_after_ack"})
    err = t.run_dir / "h1.err"

    async def scenario() -> None:
        async with Scene(t) as sc:
            await wait_for_text(err, "evidence appraised")
            (buf1, first, first_sealed), (buf2, second, second_sealed) = sc.staging(), sc.staging()  # kept: dropped, withdrawn
            await sc.grant(0, 1, first, first_sealed)
            # Stopped right after sending its ack, which its ZeroMQ I/O thread may not have written yet:
            # the ack is awaited only after the holder runs again.
            await eventually(lambda: _stopped(sc.proc.pid), timeout=30, what="h1 stopped after its ack")
            await sc.prepare(1, second_sealed)
            assert _staging_maps(sc.proc.pid) == 0  # stopped before it maps hop 1
            os.kill(sc.proc.pid, 18)  # SIGCONT
            await asyncio.wait_for(sc.acks.get(), 30)
            await asyncio.wait_for(sc.returns.get(), 30)
            await sc.hop_line("hop 1 chunk 0")
            # Hop 1's mapping closed, the preparation's opened: one mapping, of the second staging.
            await sc.maps(1, "the preparation mapped after hop 1")
            r, line = await sc.hop(1, 2, second, second_sealed)
            assert r.chunk_index == 1 and line.endswith("prepared ahead"), line
            assert any(buf1._mmap[: sc.nbytes]) and any(buf2._mmap[: sc.nbytes])  # type: ignore[index]
            assert IGNORED not in err.read_text(errors="replace")
            await sc.maps(0, "h1 unmapped every staging")

    _run(scenario, err)


def test_a_preparation_that_comes_while_the_holder_sets_up_is_kept_for_after(travel: Any) -> None:
    # The run's first hops come right after registration: a holder may still be setting up (here held in
    # its appraisal of the orchestrator's evidence) when its first preparation arrives. It is kept and
    # opened once the holder is ready, and its grant writes through it.
    t: Travel = travel(holders=1, chunk_tokens=CHUNK, bytes_per_holder=32 * 1024)
    err = t.run_dir / "h1.err"
    gate = asyncio.Event()

    async def scenario() -> None:
        async with Scene(t, hold_evidence=gate) as sc:
            buf, params, sealed = sc.staging()  # kept referenced: a staging dropped here is withdrawn at once
            await wait_for_text(err, f"registered with run {RUN_ID}")  # the evidence is asked for next, and held
            await sc.prepare(0, sealed)
            # The holder has received it (its log records every message as it accepts it) before it is set up.
            await eventually(lambda: any(m.type == "token.prepare" and m.dir == "in" for m in t.messages("h1")), timeout=30,
                             what="h1 received the preparation")
            assert _staging_maps(sc.proc.pid) == 0 and "evidence appraised" not in err.read_text(errors="replace")
            gate.set()
            await wait_for_text(err, "evidence appraised")
            await sc.maps(1, "h1 mapped the staging once set up")
            _, line = await sc.hop(0, 1, params, sealed)
            assert line.endswith("params and staging were prepared ahead"), line
            assert any(buf._mmap[: sc.nbytes])  # type: ignore[index]  # written where it was prepared

    _run(scenario, err)
