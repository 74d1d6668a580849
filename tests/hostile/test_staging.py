"""Class 1: a holder cannot change the size or identity of the staging the device reads.

A real orchestrator process, one honest holder process (h1) and one scripted
holder (h2: a real node with a valid key, built from gtbus's own classes)
that attacks its hop's staging with the descriptor it was handed: it tries to
shrink, grow, reseal and replace it, looks for it (and other hops' staging)
by any name, scribbles over it, keeps it past the hop, and replays its
ticket. Before the sealed memfd, one ``ftruncate`` of the ``/dev/shm`` file
killed the orchestrator with SIGBUS, and again after every ``--resume``.

Each hostile hop must end with only that hop refused; the orchestrator lives,
nothing of h2's is trained, h1's chunks are, the run survives kill -9 and
``--resume`` with h2 attacking again, and the orchestrator's peak RSS stays
under :data:`RSS_CAP`.
"""

from __future__ import annotations

import asyncio
import fcntl
import mmap
import os
from typing import Any

import pytest
from process_memory import peak_rss_bytes
from scripted_holder import ScriptedHolder, honest_manifest
from travel_kit import Travel, trained_keys

from gtbus.errors import DeviceError
from gtbus.gpu.channel import segment_count, staging_size
from gtbus.gpu.fd_passing import fetch_fd
from gtbus.gpu.host import HANDLE_PREFIX, SHM_DIR, HostDevice
from gtbus.messages.types import TokenAck, TokenDecline, TokenReturn, Welcome
from gtbus.testing import eventually, run_async

pytestmark = pytest.mark.slow

#: The orchestrator's peak resident memory with a hostile holder (it idles at ~110 MiB here).
RSS_CAP = 400 << 20
CHUNK = 4096  # tokens per chunk: small hops, fast test
MEMFD = "/memfd:gtbus-hop"


def _fetch(handle: str) -> int:
    """The descriptor a hostile holder gets for its hop: the same fetch map_staging does."""
    address, ticket = handle[len(HANDLE_PREFIX) :].split(":")
    return fetch_fd(address, bytes.fromhex(ticket))


def _refused(action: Any) -> bool:
    try:
        action()
    except OSError:
        return True
    return False


def _attack(fd: int, orchestrator_pid: int) -> dict[str, Any]:
    """Everything a holder can try on the size and identity of its staging; what got through."""
    size = os.fstat(fd).st_size
    seen: dict[str, Any] = {"size": size}
    seen["shrink"] = [_refused(lambda s=s: os.ftruncate(fd, s)) for s in (0, 1, size - 1)]
    seen["grow"] = [
        _refused(lambda: os.ftruncate(fd, size + 1)),
        _refused(lambda: os.ftruncate(fd, 1 << 40)),
        _refused(lambda: os.pwrite(fd, b"x", size)),
        _refused(lambda: os.posix_fallocate(fd, size, 1 << 20)),
    ]
    seen["reseal"] = [_refused(lambda s=s: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, s)) for s in (fcntl.F_SEAL_WRITE, fcntl.F_SEAL_SHRINK)]
    # Find it, or any hop's staging, by a name: there is none in /dev/shm, and the
    # orchestrator's own descriptors (open to us here: same user, and root) are
    # just as sealed. A memfd has no path to unlink, rename or swap.
    seen["in_shm"] = sorted(n for n in os.listdir(SHM_DIR) if n.startswith("gtbus"))
    by_proc = []
    for entry in os.scandir(f"/proc/{orchestrator_pid}/fd"):
        try:
            target = os.readlink(entry.path)
            if not target.startswith(MEMFD):
                continue
            other = os.open(entry.path, os.O_RDWR)
        except OSError:
            continue  # closed meanwhile, or not ours to open
        try:
            by_proc.append((target, _refused(lambda: os.ftruncate(other, 0)), _refused(lambda: os.ftruncate(other, 1 << 30))))
        finally:
            os.close(other)
    seen["by_proc"] = by_proc
    seen["size_after"] = os.fstat(fd).st_size
    return seen


def _assert_held(seen: dict[str, Any]) -> None:
    assert all(seen["shrink"]) and all(seen["grow"]) and all(seen["reseal"]), seen
    assert seen["in_shm"] == [], seen
    assert all(shrink and grow for _, shrink, grow in seen["by_proc"]), seen
    assert seen["size_after"] == seen["size"], seen


def _forged_return(g: Any, params: Any) -> TokenReturn:
    nbytes = CHUNK * 2
    return TokenReturn(g.token_id, g.chunk_index, segment_count(nbytes, params.segment_size), nbytes, b"\0" * 32, bytes(32))


async def _hop_record(t: Travel, epoch: int) -> dict[str, Any]:
    found: list[Any] = []

    def probe() -> bool:
        assert t.orchestrator.poll() is None, f"the orchestrator exited: {t.stderr()[-400:]}"
        found[:] = [m for m in t.messages() if m.dir == "out" and m.type == "hop.record" and m.epoch == epoch]
        return bool(found)

    await eventually(probe, timeout=60, what=f"the hop record of epoch {epoch}", interval=0.1)
    return found[0].body


async def _decline_until_the_run_ends(t: Travel, h2: ScriptedHolder, proc: Any) -> None:
    while proc.poll() is None:
        try:
            g, epoch, _ = await h2.next_grant(timeout=1.0)
        except TimeoutError:
            continue
        await h2.send(TokenDecline(g.token_id, "scripted"), epoch)


def test_a_holder_cannot_shrink_grow_or_replace_its_staging_and_only_its_hop_is_refused(travel: Any, tmp_path: Any) -> None:
    t: Travel = travel(holders=2, chunk_tokens=CHUNK, mode="travel", lease=60.0, steps="5", bytes_per_holder=2 * CHUNK)
    first = t.start_orchestrator()
    t.dep.start_holder(0)  # h1 is honest; h2 is the scripted one
    rss: list[int] = []
    refused: list[dict[str, Any]] = []

    async def hostile_hop(h2: ScriptedHolder, orchestrator: Any) -> None:
        """One grant: attack the staging, scribble over it, return a forged summary; the hop must be refused."""
        g, epoch, params = await h2.next_grant()
        await h2.send(TokenAck(g.token_id), epoch)
        fd = _fetch(params.buffer_handle)
        assert os.fstat(fd).st_size == staging_size(params.capacity, params.segment_size)
        with pytest.raises(DeviceError, match="revoked or never issued"):
            HostDevice.map_staging(params.buffer_handle)  # the ticket maps once: a replay gets nothing
        _assert_held(_attack(fd, orchestrator.pid))
        kept = mmap.mmap(fd, os.fstat(fd).st_size)
        os.close(fd)
        kept[:] = os.urandom(len(kept))
        await h2.send(_forged_return(g, params), epoch)
        record = await _hop_record(t, epoch)
        assert record["holder"] == "h2" and record["outcome"] == "rejected", record
        refused.append(record)
        assert orchestrator.poll() is None, "the orchestrator died of a holder's staging"
        rss.append(peak_rss_bytes(orchestrator.pid))
        # Kept past its hop, the mapping still works for h2 and reaches nothing of anyone's.
        kept[:16] = b"still writing..."
        kept.close()

    async def scenario() -> None:
        async with ScriptedHolder(t, "h2", tmp_path / "h2") as h2:
            assert isinstance(await h2.register(honest_manifest(2 * CHUNK)), Welcome)
            await hostile_hop(h2, first)
            # The next grant: h2 takes its staging and sits on it; the orchestrator is killed.
            g, epoch, params = await h2.next_grant()
            await h2.send(TokenAck(g.token_id), epoch)
            held = _fetch(params.buffer_handle)
            assert t.kill(first) < 0
            # Its staging lives on only in h2's descriptor, with its seals; the dead
            # process's broker hands nothing out any more.
            _assert_held(_attack(held, os.getpid()))
            os.close(held)
            with pytest.raises(DeviceError, match="its device is gone"):
                HostDevice.map_staging(params.buffer_handle)
            resumed = t.start_orchestrator(resume=True)
            assert isinstance(await h2.register(honest_manifest(2 * CHUNK)), Welcome)
            await hostile_hop(h2, resumed)
            await _decline_until_the_run_ends(t, h2, resumed)

    run_async(scenario(), timeout=240)
    summary = t.finish()
    hops = t.hops()
    assert sorted(trained_keys(hops)) == [(0, "h1", 0), (0, "h1", 1)]
    assert not [h for h in hops if h["holder"] == "h2" and h["outcome"] == "trained"]
    assert summary["hops_trained"] == 2 and len(refused) == 2
    assert max(rss) < RSS_CAP, f"peak RSS {max(rss) >> 20} MiB"
    err = t.stderr()
    assert "SIGBUS" not in err and "Fatal Python error" not in err
    assert t.replay_verify().returncode == 0


def test_a_holder_writing_its_staging_during_the_epilogue_cannot_stop_the_run(travel: Any, tmp_path: Any) -> None:
    # h2 writes a genuine chunk (it holds the key), returns, and keeps writing
    # non-zero bytes into the mapping it kept while the device scrubs and checks
    # that staging. The device's check must not be something a holder can fail:
    # the run goes on.
    import threading

    import numpy as np

    from gtbus.gpu.channel import SegmentContext, SegmentSealer

    t: Travel = travel(holders=2, chunk_tokens=CHUNK, mode="travel", lease=60.0, steps="5", bytes_per_holder=2 * CHUNK)
    orchestrator = t.start_orchestrator()
    t.dep.start_holder(0)
    outcomes: list[str] = []

    async def scenario() -> None:
        async with ScriptedHolder(t, "h2", tmp_path / "h2") as h2:
            assert isinstance(await h2.register(honest_manifest(2 * CHUNK)), Welcome)
            for _ in range(2):
                g, epoch, params = await h2.next_grant()
                await h2.send(TokenAck(g.token_id), epoch)
                mapping = HostDevice.map_staging(params.buffer_handle)
                plain = np.random.default_rng(epoch).integers(0, 256, CHUNK, dtype="<u2").view(np.uint8)
                ctx = SegmentContext(g.run_id, epoch, "h2", segment_count(plain.nbytes, params.segment_size))
                s = SegmentSealer(params).seal_into(plain, mapping.view, ctx)
                stop = threading.Event()

                def scribble(view: memoryview = mapping.view) -> None:
                    while not stop.is_set():
                        for i in range(0, len(view), 512):
                            view[i] = 0xA5

                writer = threading.Thread(target=scribble)
                writer.start()
                try:
                    await h2.send(TokenReturn(g.token_id, g.chunk_index, s.count, s.nbytes, s.ciphertext_digest, bytes(32)), epoch)
                    record = await _hop_record(t, epoch)
                finally:
                    stop.set()
                    writer.join()
                    mapping.close()
                outcomes.append(record["outcome"])
                assert orchestrator.poll() is None, "the orchestrator died of a holder writing its own staging"
            await _decline_until_the_run_ends(t, h2, orchestrator)

    run_async(scenario(), timeout=120)
    summary = t.finish()
    assert len(outcomes) == 2
    assert summary["hops_trained"] >= 2  # h1's two chunks, and h2's where its scribbling came after the device read it
    assert "did not read zero" not in t.stderr()


def test_a_remote_holder_cannot_write_outside_its_staging_through_the_agent(travel: Any, tmp_path: Any) -> None:
    # h2 is "on another server": it streams through the device agent, which maps
    # the hop's staging for it. Every offset and size h2 sends is checked against
    # the staging the agent really mapped; nothing lands outside it, the agent
    # lives, and nothing of h2's is trained.
    from gtbus.messages.identity import Roster
    from gtbus.messages.types import AgentDone, Refusal, ShipSegment
    from gtbus.nodes.runtime import NodeRuntime
    from gtbus.nodes.wiring import client_transport

    t: Travel = travel(holders=2, chunk_tokens=CHUNK, mode="travel", lease=60.0, steps="5", bytes_per_holder=2 * CHUNK,
                       remote_holders=("h2",))
    orchestrator = t.start_orchestrator()
    agent = t.start_agent()
    t.dep.start_holder(0)
    agent_name = t.dep.dep.agents[0].name
    answers: list[Any] = []

    async def scenario() -> None:
        async with ScriptedHolder(t, "h2", tmp_path / "h2") as h2:
            roster = Roster.from_dir(t.dep.keys)
            link = NodeRuntime(h2.identity, roster, client_transport(h2.identity, roster, t.dep.agent_router, t.dep.agent_pub, server_name=agent_name),
                               run_dir=tmp_path / "h2", server=agent_name, log_name=f"h2-to-{agent_name}", heartbeat_interval=0)
            await link.start()
            try:
                assert isinstance(await h2.register({**honest_manifest(2 * CHUNK), "via": agent_name}), Welcome)
                g, epoch, params = await h2.next_grant()
                await h2.send(TokenAck(g.token_id), epoch)
                count = segment_count(2 * CHUNK, params.segment_size)
                staged = staging_size(2 * CHUNK, params.segment_size)
                stride = params.segment_size + 16
                for index, claimed, size in [
                    (0, count, staged + 4096),  # longer than the whole staging
                    (count - 1, count, stride),  # a full stride past the end of the last segment
                    (10**9, count, 64),  # an index far past the hop
                    (2**62, 2**63 - 1, 64),  # huge values
                    (0, count + 1, 64),  # another count than the hop's
                ]:
                    await link.send(ShipSegment(g.token_id, index, claimed), epoch=epoch, blobs=[os.urandom(size)])
                acc = await link.request(AgentDone(g.token_id, count, 2 * CHUNK), timeout=30, epoch=epoch)
                answers.append(acc.message)
                assert agent.poll() is None, "the agent died of a remote holder's values"
                rss = peak_rss_bytes(agent.pid)
                assert rss < RSS_CAP, f"agent peak RSS {rss >> 20} MiB"
                await h2.send(TokenDecline(g.token_id, "scripted"), epoch)
                await _decline_until_the_run_ends(t, h2, orchestrator)
            finally:
                await link.close()

    run_async(scenario(), timeout=120)
    summary = t.finish()
    assert isinstance(answers[0], Refusal) and "received 0 of" in answers[0].reason, answers
    assert sorted(trained_keys(t.hops())) == [(0, "h1", 0), (0, "h1", 1)]
    assert summary["hops_trained"] == 2
    assert t.stderr("agent").count("refused segment") >= 4
