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


async def _end(orch: ScriptedOrchestrator, proc: Any) -> None:
    """Shut the run down and wait for the holder's exit."""
    await orch.rt.publish(Shutdown("test over"))
    await eventually(lambda: proc.poll() is not None, timeout=30, what="the holder's exit")


async def _hop_line(err: Path, hop: str) -> str:
    """The holder's line for ``hop`` ("hop E chunk C"), once written."""
    await wait_for_text(err, f"{hop}: wrote")
    return next(x for x in err.read_text(errors="replace").splitlines() if f"{hop}: wrote" in x)


def _staging_maps(pid: int) -> int:
    """How many mappings of a staging memfd the process holds (its /proc maps; the holder is root-readable only)."""
    return sum("gtbus-hop" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def test_preparations_hostile_refused_honest_used_and_nothing_left_mapped(travel: Any) -> None:
    t: Travel = travel(holders=2, chunk_tokens=CHUNK, bytes_per_holder=32 * 1024)  # h1: two chunks
    err = t.run_dir / "h1.err"
    roster = Roster.from_dir(t.dep.keys)
    h1, h2 = roster["h1"].x25519, roster["h2"].x25519
    device = HostDevice()
    nbytes = staging_size(CHUNK * 2, SEGMENT)

    def fresh() -> tuple[Any, ChannelParams]:
        buf, handle = device.alloc_hop_staging(nbytes)
        return buf, ChannelParams.generate(str(handle), CHUNK * 2, segment_size=SEGMENT)

    async def scenario() -> None:
        orch = ScriptedOrchestrator(t, RUN_ID, CHUNK)
        acks, returns = orch.queue_of(TokenAck), orch.queue_of(TokenReturn)
        await orch.rt.start()
        proc = t.dep.start_holder(0)
        try:
            await wait_for_text(err, "evidence appraised")

            async def prepare(chunk: int, sealed: bytes, *, holder: str = "h1", run_id: str = RUN_ID) -> None:
                await orch.rt.send(HopPrepare("tok", run_id, holder, chunk, sealed), "h1")

            # -- hostile: each refused with one line naming why, nothing kept --------------------------
            _, elsewhere = fresh()
            not_offered = ChannelParams.generate(str(fresh()[1].buffer_handle)[:-4] + "0000", CHUNK * 2, segment_size=SEGMENT)
            hostile: list[tuple[str, dict[str, Any]]] = [
                ("names holder 'h2'", {"chunk": 0, "sealed": seal_params(elsewhere, h1), "holder": "h2"}),
                ("is for run 'another-run'", {"chunk": 0, "sealed": seal_params(elsewhere, h1), "run_id": "another-run"}),
                ("sealed channel params", {"chunk": 0, "sealed": b"\x00" * 200}),
                ("sealed channel params", {"chunk": 0, "sealed": seal_params(elsewhere, h2)}),  # sealed to h2: h1 cannot open it
                ("not a host staging handle", {"chunk": 0, "sealed": seal_params(ChannelParams.generate("cuda-ipc-x", CHUNK * 2), h1)}),
                ("is not exported", {"chunk": 0, "sealed": seal_params(not_offered, h1)}),
            ]
            for n, (expect, what) in enumerate(hostile, 1):
                await prepare(what.pop("chunk"), what.pop("sealed"), **what)
                await eventually(lambda: err.read_text(errors="replace").count(IGNORED) >= n, timeout=30, what=f"refusal {n} ({expect})")
                last = [line for line in err.read_text(errors="replace").splitlines() if IGNORED in line][-1]
                assert expect in last, (expect, last)
            assert _staging_maps(proc.pid) == 0  # none of them left a mapping

            # A chunk it does not have: the params open and the staging maps (nothing is read ahead);
            # the next preparation replaces it, and nothing of it stays mapped.
            _, far = fresh()
            await prepare(99, seal_params(far, h1))
            await eventually(lambda: _staging_maps(proc.pid) == 1, timeout=30, what="h1 mapped the staging of chunk 99's preparation")

            # -- honest: a grant with the prepared params writes through the prepared mapping ----------
            used, params = fresh()
            sealed = seal_params(params, h1)
            await prepare(0, sealed)
            await eventually(lambda: _staging_maps(proc.pid) == 1, timeout=30, what="h1 mapped the prepared staging")
            grant = TokenGrant("tok", RUN_ID, "h1", 0, "travel", time.time() + 60, sealed, orch.report(params.key, 1))
            await orch.rt.send(grant, "h1", epoch=1)
            await asyncio.wait_for(acks.get(), 30)
            r: TokenReturn = (await asyncio.wait_for(returns.get(), 30)).message
            assert (r.chunk_index, r.nbytes, r.segments) == (0, CHUNK * 2, 1)
            line = await _hop_line(err, "hop 1 chunk 0")
            assert line.endswith("params and staging were prepared ahead"), line
            assert any(used._mmap[:nbytes])  # type: ignore[index]  # the ciphertext is in the granted staging

            # -- a guess that was wrong: the grant names other params; the prepared staging stays untouched
            guessed, guessed_params = fresh()
            await prepare(1, seal_params(guessed_params, h1))
            await eventually(lambda: _staging_maps(proc.pid) == 1, timeout=30, what="h1 mapped the second prepared staging")
            granted, granted_params = fresh()
            grant = TokenGrant("tok", RUN_ID, "h1", 1, "travel", time.time() + 60, seal_params(granted_params, h1), orch.report(granted_params.key, 2))
            await orch.rt.send(grant, "h1", epoch=2)
            await asyncio.wait_for(acks.get(), 30)
            r = (await asyncio.wait_for(returns.get(), 30)).message
            assert (r.chunk_index, r.nbytes) == (1, CHUNK * 2)
            line = await _hop_line(err, "hop 2 chunk 1")
            assert "prepared ahead" not in line, line
            assert any(granted._mmap[:nbytes]) and not any(guessed._mmap[:nbytes])  # type: ignore[index]
            await eventually(lambda: _staging_maps(proc.pid) == 0, timeout=30, what="h1 unmapped every staging")

            await _end(orch, proc)
        finally:
            await orch.rt.close()

    _run(scenario, err)
    assert err.read_text(errors="replace").count(IGNORED) == 6


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_a_preparation_that_comes_while_a_hop_is_written_serves_the_next_grant(travel: Any) -> None:
    # One holder's hops back to back: the next hop's preparation reaches the holder while it writes
    # the current one (the holder opens it as that hop ends, off its path; when exactly is not
    # observable from here). The holder stops itself after its ack (drill stop_after_ack) and the
    # preparation is sent while it is stopped, so it arrives mid-hop whatever the scheduling: it
    # must still serve the next grant, and leave nothing mapped.
    t: Travel = travel(holders=1, chunk_tokens=CHUNK, bytes_per_holder=32 * 1024, holder_faults={"h1": "stop_after_ack"})
    err = t.run_dir / "h1.err"
    h1 = Roster.from_dir(t.dep.keys)["h1"].x25519
    device = HostDevice()
    nbytes = staging_size(CHUNK * 2, SEGMENT)

    async def scenario() -> None:
        orch = ScriptedOrchestrator(t, RUN_ID, CHUNK)
        acks, returns = orch.queue_of(TokenAck), orch.queue_of(TokenReturn)
        await orch.rt.start()
        proc = t.dep.start_holder(0)
        try:
            await wait_for_text(err, "evidence appraised")
            staging = [device.alloc_hop_staging(nbytes) for _ in range(2)]
            params = [ChannelParams.generate(str(handle), CHUNK * 2, segment_size=SEGMENT) for _, handle in staging]
            sealed = [seal_params(p, h1) for p in params]
            await orch.rt.send(TokenGrant("tok", RUN_ID, "h1", 0, "travel", time.time() + 60, sealed[0], orch.report(params[0].key, 1)), "h1", epoch=1)
            # Stopped right after sending its ack, which its ZeroMQ I/O thread may not have written yet:
            # the ack is awaited only after the holder runs again.
            await eventually(lambda: _stopped(proc.pid), timeout=30, what="h1 stopped after its ack")
            await orch.rt.send(HopPrepare("tok", RUN_ID, "h1", 1, sealed[1]), "h1")
            assert _staging_maps(proc.pid) == 0  # stopped before it maps hop 1
            os.kill(proc.pid, 18)  # SIGCONT
            await asyncio.wait_for(acks.get(), 30)
            await asyncio.wait_for(returns.get(), 30)
            await wait_for_text(err, "hop 1 chunk 0: wrote")
            # Hop 1's mapping closed, the preparation's opened: one mapping, of the second staging.
            await eventually(lambda: _staging_maps(proc.pid) == 1 and IGNORED not in err.read_text(errors="replace"), timeout=30,
                             what="the preparation mapped after hop 1")
            await orch.rt.send(TokenGrant("tok", RUN_ID, "h1", 1, "travel", time.time() + 60, sealed[1], orch.report(params[1].key, 2)), "h1", epoch=2)
            r: TokenReturn = (await asyncio.wait_for(returns.get(), 30)).message
            assert r.chunk_index == 1
            await wait_for_text(err, "hop 2 chunk 1: wrote")
            lines = [x for x in err.read_text(errors="replace").splitlines() if ": wrote " in x]
            assert [x.endswith("prepared ahead") for x in lines] == [False, True], lines
            await eventually(lambda: _staging_maps(proc.pid) == 0, timeout=30, what="h1 unmapped every staging")
            await _end(orch, proc)
        finally:
            await orch.rt.close()

    _run(scenario, err)


def test_a_preparation_that_comes_while_the_holder_sets_up_is_kept_for_after(travel: Any) -> None:
    # The run's first hops come right after registration: a holder may still be setting up (here held in
    # its appraisal of the orchestrator's evidence) when its first preparation arrives. It is kept and
    # opened once the holder is ready, and its grant writes through it.
    t: Travel = travel(holders=1, chunk_tokens=CHUNK, bytes_per_holder=32 * 1024)
    err = t.run_dir / "h1.err"
    h1 = Roster.from_dir(t.dep.keys)["h1"].x25519
    device = HostDevice()
    staging, handle = device.alloc_hop_staging(staging_size(CHUNK * 2, SEGMENT))
    params = ChannelParams.generate(str(handle), CHUNK * 2, segment_size=SEGMENT)
    sealed = seal_params(params, h1)

    async def scenario() -> None:
        gate = asyncio.Event()
        orch = ScriptedOrchestrator(t, RUN_ID, CHUNK, hold_evidence=gate)
        acks, returns = orch.queue_of(TokenAck), orch.queue_of(TokenReturn)
        await orch.rt.start()
        proc = t.dep.start_holder(0)
        try:
            await wait_for_text(err, f"registered with run {RUN_ID}")  # the evidence is asked for next, and held
            await orch.rt.send(HopPrepare("tok", RUN_ID, "h1", 0, sealed), "h1")
            # The holder has received it (its log records every message as it accepts it) before it is set up.
            await eventually(lambda: any(m.type == "token.prepare" and m.dir == "in" for m in t.messages("h1")), timeout=30,
                             what="h1 received the preparation")
            assert _staging_maps(proc.pid) == 0 and "evidence appraised" not in err.read_text(errors="replace")
            gate.set()
            await wait_for_text(err, "evidence appraised")
            await eventually(lambda: _staging_maps(proc.pid) == 1, timeout=30, what="h1 mapped the staging once set up")
            await orch.rt.send(TokenGrant("tok", RUN_ID, "h1", 0, "travel", time.time() + 60, sealed, orch.report(params.key, 1)), "h1", epoch=1)
            await asyncio.wait_for(acks.get(), 30)
            await asyncio.wait_for(returns.get(), 30)
            line = await _hop_line(err, "hop 1 chunk 0")
            assert line.endswith("params and staging were prepared ahead"), line
            await _end(orch, proc)
        finally:
            await orch.rt.close()

    _run(scenario, err)
