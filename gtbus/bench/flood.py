"""``gtbus bench flood``: one observer key floods a real orchestrator; what it costs the run.

Two runs of the same local deployment (an orchestrator and two holders as
processes, small hops, many rounds so it is still training when the window
ends): a baseline, then the same run while one process with the observer's
valid key sends as fast as the orchestrator takes them:

* junk (magic and a 1 KiB header of random bytes: refused before the signature),
* signed echoes of the largest payload an echo may carry (accepted, answered),
* signed echoes with a 1 MiB payload (authentic, refused for their size),

and never reads what comes back. Over the same window it reports the growth of
the orchestrator's message log and of its stderr, its peak resident memory
(VmHWM), and the hops it trained, with and without the flood. The bounds
come from the observer's budget (:data:`gtbus.transport.budget.ROLE_BUDGETS`),
the refusal-record gate and the echo payload limit.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gtbus.bench.report import Result, Table, machine_info
from gtbus.errors import ConfigError, TransportError
from gtbus.messages.envelope import MAGIC
from gtbus.messages.identity import NodeIdentity, Role, Roster, load_identity
from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import ECHO_MAX_PAYLOAD, Echo
from gtbus.nodes.launcher import LocalDeployment, LocalRun
from gtbus.nodes.wiring import client_transport, orchestrator_of
from gtbus.transport.budget import ROLE_BUDGETS

#: Goals: what one flooding key may add to the orchestrator, per second of flood.
GOAL_LOG_BYTES_PER_S = 1 << 20
GOAL_EXTRA_RSS = 64 << 20


@dataclass
class Window:
    """What one run did over the measured window."""

    seconds: float
    log_bytes: int
    stderr_bytes: int
    peak_rss: int
    hops: int
    cpu_s: float
    sent: int = 0
    sent_bytes: int = 0
    kinds: dict[str, int] | None = None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _oversized_echo(payload: bytes) -> Echo:
    """An Echo past the payload bound, built around its check: what a hostile peer's own code would sign."""
    echo = object.__new__(Echo)
    object.__setattr__(echo, "payload", payload)
    object.__setattr__(echo, "note", "flood")
    return echo


class Flood:
    """One key's flood: junk, the largest echoes, oversized echoes, in turn; it never reads a reply.

    Built from gtbus's own classes (the node's client transport, its signer), so
    what it signs is as authentic as an honest node's. Used by ``gtbus bench
    flood`` and the hostile-peer tests.
    """

    KINDS = ("junk", "echo-4KiB", "echo-1MiB")

    def __init__(self, identity: NodeIdentity, roster: Roster, router: str, pub: str) -> None:
        self.transport = client_transport(identity, roster, router, pub)
        self.server = orchestrator_of(roster)
        self.signer = MessageSigner(identity)
        rng = random.Random(1)
        # Made before sending, so the flood goes at the speed of the socket, not of this
        # process's signing: an attacker is not bound to the orchestrator's box.
        self._junk = [[MAGIC, rng.randbytes(1024), rng.randbytes(30), rng.randbytes(64)] for _ in range(64)]
        self._big = [[bytes(f) for f in self.signer.sign(_oversized_echo(bytes(1 << 20)), self.server)[1]] for _ in range(8)]
        self._echoes: list[list[Any]] = []
        self._i = 0
        self.sent = 0
        self.sent_bytes = 0
        self.kinds = dict.fromkeys(self.KINDS, 0)

    async def __aenter__(self) -> "Flood":
        await self.transport.start()
        await self.transport.wait_connected(10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.close()

    def _next(self) -> tuple[str, list[Any]]:
        kind = self.KINDS[self._i % 3]
        self._i += 1
        if kind == "junk":
            return kind, self._junk[self._i % len(self._junk)]
        if kind == "echo-4KiB":
            if not self._echoes:  # signed in batches, sent in sequence order
                batch = [self.signer.sign(Echo(bytes(ECHO_MAX_PAYLOAD), "flood"), self.server)[1] for _ in range(256)]
                self._echoes = batch[::-1]
            return kind, self._echoes.pop()
        return kind, self._big[self._i % len(self._big)]

    async def send(self, frames: list[Any], kind: str = "raw") -> None:
        """Send one message as is; counted under ``kind``."""
        await self.transport.send(frames)
        self.sent += 1
        self.sent_bytes += sum(memoryview(f).nbytes for f in frames)
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    async def run(self, *, seconds: float | None = None, count: int | None = None) -> None:
        """Flood for ``seconds``, or ``count`` messages, whichever is given (as fast as the socket takes them)."""
        end = time.monotonic() + seconds if seconds is not None else None
        n = 0
        while (end is None or time.monotonic() < end) and (count is None or n < count):
            kind, frames = self._next()
            n += 1
            try:
                if end is None:
                    await self.send(frames, kind)
                else:
                    await asyncio.wait_for(self.send(frames, kind), max(0.01, end - time.monotonic()))
            except (TimeoutError, TransportError):  # the window ended while the queue was full
                continue


async def _flood(dep: LocalDeployment, seconds: float) -> tuple[int, int, dict[str, int]]:
    """Flood from the observer's key for ``seconds``; (messages, bytes, per kind)."""
    me = load_identity(dep.dep.key_path(dep.dep.observer.name))
    async with Flood(me, Roster.from_dir(dep.keys), dep.router, dep.pub) as flood:
        await flood.run(seconds=seconds)
    return flood.sent, flood.sent_bytes, flood.kinds


def _hops(dep: LocalDeployment) -> int:
    from gtbus.training.checkpoint import read_checkpoint

    path = dep.run.run_dir / "checkpoints" / f"{dep.dep.orchestrator.name}.npz"
    for _ in range(20):  # the first checkpoint may not be written yet
        try:
            return len(read_checkpoint(path, state=False).hops)
        except ConfigError:
            time.sleep(0.05)
    return 0


def _one_run(run_dir: Path, seconds: float, flood: bool, say: Callable[[str], None]) -> Window:
    dep = LocalDeployment(LocalRun(run_dir=run_dir, holders=2, rounds=100_000, chunk_tokens=4096, steps="2",
                                   lease=30.0, bytes_per_holder=4 * 4096))
    dep.start()
    assert dep.orchestrator is not None and dep.orchestrator.stdout is not None
    stream = dep.orchestrator.stdout
    drain = threading.Thread(target=lambda: [None for _ in stream], daemon=True)
    drain.start()
    log = run_dir / "logs" / f"{dep.dep.orchestrator.name}.gtlog"
    err = run_dir / "orchestrator.err"
    try:
        deadline = time.monotonic() + 120
        while _hops(dep) < 4:  # training is under way
            if dep.orchestrator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the orchestrator did not start training: {err.read_text()[-500:]}")
            time.sleep(0.2)
        pid = dep.orchestrator.pid
        log0, err0, hops0, cpu0 = _size(log), _size(err), _hops(dep), _cpu_seconds(pid)
        say(f"{'flood' if flood else 'baseline'}: {seconds:g} s from hop {hops0}")
        t0 = time.monotonic()
        if flood:
            sent, nbytes, kinds = asyncio.run(_flood(dep, seconds))
        else:
            sent, nbytes, kinds = 0, 0, {}
            time.sleep(seconds)
        took = time.monotonic() - t0
        if dep.orchestrator.poll() is not None:
            raise RuntimeError(f"the orchestrator exited during the window: {err.read_text()[-500:]}")
        return Window(took, _size(log) - log0, _size(err) - err0, _vm_hwm(pid), _hops(dep) - hops0,
                      _cpu_seconds(pid) - cpu0, sent, nbytes, kinds)
    finally:
        dep.stop(grace=0.1)


def run_flood_bench(out_dir: str | os.PathLike[str], *, seconds: float = 60.0, say: Callable[[str], None] = print) -> Result:
    """Baseline and flooded runs of ``seconds`` each; writes ``flood-<host>.md/.json`` into ``out_dir``."""
    res = Result(name="flood", title="gtbus bench flood: one observer key floods a real orchestrator", machine=machine_info())
    with tempfile.TemporaryDirectory(prefix="gtbus-flood-") as tmp:
        base = _one_run(Path(tmp) / "baseline", seconds, False, say)
        hit = _one_run(Path(tmp) / "flood", seconds, True, say)
    obs = ROLE_BUDGETS[Role.OBSERVER]
    res.header.append(
        f"Orchestrator and two holders as processes on 127.0.0.1 (host backend, 4096-token hops). Observer budget: "
        f"{obs.messages_per_s:g} msg/s (burst {obs.message_burst:g}), {obs.bytes_per_s / 1024:g} KiB/s "
        f"(burst {obs.byte_burst / 1024:g} KiB); refusal records: 10/s per peer; echo payload <= {ECHO_MAX_PAYLOAD} B."
    )
    t = Table(f"Over {seconds:g} s: the same run without and with one key flooding", ["figure", "baseline", "flood", "flood - baseline"])

    def row(name: str, a: float, b: float, unit: str = "") -> None:
        t.add(name, f"{a:,.0f}{unit}", f"{b:,.0f}{unit}", f"{b - a:+,.0f}{unit}")

    row("message log growth, bytes", base.log_bytes, hit.log_bytes)
    row("stderr growth, bytes", base.stderr_bytes, hit.stderr_bytes)
    row("peak RSS (VmHWM), MiB", base.peak_rss / 2**20, hit.peak_rss / 2**20)
    row("hops trained in the window", base.hops, hit.hops)
    t.add("orchestrator CPU seconds", f"{base.cpu_s:.1f}", f"{hit.cpu_s:.1f}", f"{hit.cpu_s - base.cpu_s:+.1f}")
    row("flood messages sent", 0, hit.sent)
    row("flood MiB sent", 0, hit.sent_bytes / 2**20)
    t.notes.append(f"flood mix sent: {hit.kinds}")
    t.notes.append("The flooder runs on the same 2-core box as the orchestrator and both holders: the hops it costs "
                   "include the CPU it takes itself (and libzmq's CURVE decryption of every byte it sends).")
    res.tables.append(t)
    extra_log_per_s = (hit.log_bytes + hit.stderr_bytes - base.log_bytes - base.stderr_bytes) / max(hit.seconds, 1e-9)
    extra_rss = hit.peak_rss - base.peak_rss
    res.data["windows"] = {"baseline": base.__dict__, "flood": hit.__dict__}
    res.goal("log growth added by one flooding key", round(extra_log_per_s), GOAL_LOG_BYTES_PER_S, "bytes/s", at_most=True)
    res.goal("peak RSS added by one flooding key", extra_rss, GOAL_EXTRA_RSS, "bytes", at_most=True)
    res.goal("the run goes on: hops trained under flood vs baseline", hit.hops, max(1, base.hops // 2), "hops")
    res.finish()
    md, js = res.write(out_dir)
    res.data["files"] = [str(md), str(js)]
    return res
