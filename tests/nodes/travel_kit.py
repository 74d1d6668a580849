"""A local deployment under test: real processes, sockets, crypto and files.

:class:`Travel` wraps :class:`gtbus.nodes.launcher.LocalDeployment` with what
fault tests need: reading the orchestrator's message log while it runs,
waiting for a message to appear in it, signalling node processes, opening the
sealed grants (the test holds every key of its throwaway deployment) to learn
each hop's staging handle and the model measurement the orchestrator reported,
and the hop list of the final checkpoint.

Nothing here measures time: waits poll the logs with a generous upper bound
that only turns a hang into a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from gtbus.gpu.attestation import MeasurementReport, SignedReport
from gtbus.gpu.backends import make_device
from gtbus.gpu.sealing import open_params
from gtbus.nodes.launcher import LocalDeployment, LocalRun
from gtbus.private_files import append_private
from gtbus.recording import LogFormatError
from gtbus.replay.view import Entry, entries
from gtbus.training.checkpoint import Checkpoint, read_checkpoint
from gtbus.training.workloads import make_trainer

T = TypeVar("T")

# Upper bound for any single wait: a hung run fails instead of blocking the suite.
HANG = 90.0


@dataclass(frozen=True)
class GrantSeen:
    """One token.grant as the orchestrator recorded it, with its sealed params opened."""

    epoch: int
    holder: str
    chunk: int
    handle: str
    model_hash: bytes
    t: float


@dataclass(frozen=True)
class Msg:
    """One record of a message log, flattened for assertions."""

    dir: str
    verdict: str
    type: str
    sender: str
    recipient: str
    epoch: int
    t: float
    body: dict[str, Any]


class Travel:
    """One local run: an orchestrator and holders as OS processes on 127.0.0.1."""

    def __init__(self, run_dir: Path, **options: Any) -> None:
        options.setdefault("holders", 2)
        options.setdefault("chunk_tokens", 32768)
        options.setdefault("steps", "20")
        options.setdefault("lease", 5.0)
        options.setdefault("bytes_per_holder", 64 * 1024)
        self.run_dir = run_dir
        self.dep = LocalDeployment(LocalRun(run_dir=run_dir, **options))
        self.lines: list[str] = []
        self.orchestrators: list[subprocess.Popen[str]] = []
        self._readers: list[threading.Thread] = []
        self._secrets = {h.name: bytes(h.x25519_secret) for h in self.dep.dep.holders}

    # -- processes ---------------------------------------------------------------------------

    @property
    def holder_names(self) -> list[str]:
        return [h.name for h in self.dep.dep.holders]

    def start(self) -> "Travel":
        """Start the orchestrator and every holder."""
        self.start_orchestrator()
        for i in range(len(self.holder_names)):
            self.dep.start_holder(i)
        return self

    def start_orchestrator(self, *, resume: bool = False) -> subprocess.Popen[str]:
        """Start (or restart) the orchestrator; its hop lines are collected in :attr:`lines`."""
        p = self.dep.start_orchestrator(resume=resume)
        self.orchestrators.append(p)
        assert p.stdout is not None
        stream = p.stdout

        def drain() -> None:
            for line in stream:
                self.lines.append(line.rstrip())

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        self._readers.append(t)
        return p

    def start_agent(self) -> subprocess.Popen[bytes]:
        """Start the device agent of a run with ``remote_holders``; its stderr goes to RUN/agent.err."""
        d = self.dep
        d.agent_proc = subprocess.Popen(d.agent_cmd(), stdout=subprocess.DEVNULL, stderr=append_private(self.run_dir / "agent.err"), env=d.env)
        return d.agent_proc

    def restart_holder(self, name: str) -> subprocess.Popen[bytes]:
        """Start holder ``name`` again (the old process must be gone)."""
        return self.dep.start_holder(self.holder_names.index(name))

    def holder(self, name: str) -> subprocess.Popen[bytes]:
        return self.dep.holder_procs[name]

    @property
    def orchestrator(self) -> subprocess.Popen[str]:
        assert self.dep.orchestrator is not None
        return self.dep.orchestrator

    def signal(self, proc: subprocess.Popen[Any], sig: int) -> None:
        """Send ``sig`` to one process this test started (by its pid)."""
        os.kill(proc.pid, sig)

    def kill(self, proc: subprocess.Popen[Any]) -> int:
        """SIGKILL one process this test started and reap it; its exit status."""
        if proc.poll() is None:
            proc.kill()
        return proc.wait(timeout=30)

    def finish(self, timeout: float = HANG) -> dict[str, Any]:
        """Wait for the (last) orchestrator to exit 0 and return its summary."""
        p = self.orchestrator
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"orchestrator still running after {timeout:.0f}s; hop lines: {self.lines}; stderr: {self.stderr()}") from None
        for t in self._readers:
            t.join(timeout=10)
        assert rc == 0, f"orchestrator exited {rc}; stderr tail: {self.stderr()[-3000:]}"
        # Holders leave on the run's shutdown event.
        for name, h in self.dep.holder_procs.items():
            try:
                h.wait(timeout=20)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"holder {name} did not exit after the run; stderr: {self.stderr(name)}") from None
        return json.loads(self.dep.summary_path.read_text())

    def stderr(self, node: str = "orchestrator") -> str:
        p = self.run_dir / f"{node}.err"
        return p.read_text(errors="replace") if p.exists() else ""

    def close(self) -> None:
        """Kill whatever is still running (continuing stopped ones first)."""
        agent = [self.dep.agent_proc] if self.dep.agent_proc is not None else []
        procs: list[subprocess.Popen[Any]] = [*self.dep.holder_procs.values(), *agent, *self.orchestrators]
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if p.stdout is not None:
                p.stdout.close()
        # Nothing to clean up after a killed orchestrator: hop staging is an
        # anonymous memfd and goes with the process.

    # -- logs --------------------------------------------------------------------------------

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    def log_of(self, node: str) -> Path:
        return self.logs / f"{node}.gtlog"

    def messages(self, node: str | None = None) -> list[Msg]:
        """Every message record of ``node``'s log (default: the orchestrator's), in order."""
        path = self.log_of(node or self.dep.dep.orchestrator.name)
        if not path.exists():
            return []
        out = []
        for e in _entries_now(path):
            h = e.header
            if h is None:
                continue
            d = e.record.data
            out.append(Msg(str(d.get("dir")), str(d.get("verdict")), h.type, h.sender, h.recipient, h.epoch, e.time, e.body or {}))
        return out

    def grants(self) -> list[GrantSeen]:
        """Every grant the orchestrator sent, in order, with staging handle and reported model hash."""
        out = []
        for m in self.messages():
            if m.dir != "out" or m.type != "token.grant":
                continue
            b = m.body
            params = open_params(b["sealed_params"], self._secrets[b["holder"]])
            report = MeasurementReport.from_bytes(SignedReport.from_wire(b["report"]).body)
            out.append(GrantSeen(m.epoch, b["holder"], int(b["chunk_index"]), params.buffer_handle, report.model_hash, m.t))
        return out

    def wait_for(self, what: str, probe: Callable[[], T | None], timeout: float = HANG) -> T:
        """Poll ``probe`` until it returns something truthy; fail (naming ``what``) if the run ends or hangs first."""
        end = time.monotonic() + timeout
        while True:
            try:
                got = probe()
            except LogFormatError:
                got = None  # a record being appended right now: read again
            if got:
                return got
            if self.orchestrator.poll() is not None:
                try:
                    got = probe()
                except LogFormatError:
                    got = None
                if got:
                    return got
                raise AssertionError(f"orchestrator exited ({self.orchestrator.returncode}) before: {what}; stderr: {self.stderr()[-2000:]}")
            if time.monotonic() > end:
                raise AssertionError(f"gave up waiting for: {what}")
            time.sleep(0.02)

    def wait_message(self, what: str, pred: Callable[[Msg], bool], node: str | None = None) -> Msg:
        """Wait until ``node``'s log (default: the orchestrator's) holds a record matching ``pred``."""
        return self.wait_for(what, lambda: next((m for m in self.messages(node) if pred(m)), None))

    # -- results -----------------------------------------------------------------------------

    def checkpoint(self, *, state: bool = True) -> Checkpoint:
        """The orchestrator's last checkpoint (``state=False``: its meta only)."""
        return read_checkpoint(self.run_dir / "checkpoints" / f"{self.dep.dep.orchestrator.name}.npz", state=state)

    def hops(self) -> list[dict[str, Any]]:
        """Every hop of the run (across orchestrator lifetimes), from the last checkpoint."""
        return self.checkpoint(state=False).hops

    def checkpoint_model_hash(self) -> bytes:
        """The model measurement of the last checkpoint, as the orchestrator would report it."""
        device = make_device("host")
        trainer = make_trainer("bytelm")
        trainer.load(device.array_module)
        trainer.load_state_dict(self.checkpoint().trainer_state())
        return bytes(device.measure(*trainer.parameter_views()))

    def replay_verify(self) -> subprocess.CompletedProcess[str]:
        """`gtbus replay --verify` on the run's logs against the deployment's public keys."""
        return subprocess.run(
            [sys.executable, "-m", "gtbus", "replay", "--verify", "--keys", str(self.dep.keys), str(self.logs)],
            capture_output=True, text=True, timeout=120,
        )


def _entries_now(path: Path) -> list[Entry]:
    return list(entries(path))


def trained_keys(hops: list[dict[str, Any]]) -> list[tuple[int, str, int]]:
    """(round, holder, chunk) of every trained hop."""
    return [(h["round"], h["holder"], h["chunk"]) for h in hops if h["outcome"] == "trained"]


def by_epoch(hops: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {h["epoch"]: h for h in hops}


def process_state(pid: int) -> str:
    """The one-letter state of a process (R, S, T for stopped, ...) from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]
