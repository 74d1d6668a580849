"""Start a whole deployment on this machine as separate processes (demo, bench, tests).

Each node is its own OS process (own address space), as the design requires:
the orchestrator with the model and device, and one process per holder with
its data. Keys, the platform key, the demo corpus and the pinned code
measurement are prepared first, exactly as an operator would.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from gtbus.errors import GtbusError
from gtbus.private_files import append_private, private_dir


def _ephemeral_ports() -> range:
    # Where the kernel picks the local ports of outgoing connections (and of bind to port 0).
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, outside the kernel's ephemeral range, never the same twice here.

    A port from the ephemeral range (what binding to port 0 gives) can be taken,
    between this call and the node's bind, by any process's outgoing connection:
    a suite that opens many connections then fails with "address already in use".
    """
    ephemeral = _ephemeral_ports()
    candidates = [p for p in range(20000, 32768) if p not in ephemeral and p not in _handed_out]
    for port in random.sample(candidates, min(len(candidates), 200)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # nothing free outside the ephemeral range: take what the kernel gives
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def measure_pin(backend: str, trainer: str) -> str:
    """The pin a holder's operator obtains: what ``gtbus measure --backend B --trainer T`` prints, run as its own process.

    Once per process and (backend, trainer): the sources it hashes do not change
    under a running launcher, and a GPU measurement loads the model (seconds).
    """
    cmd = [sys.executable, "-m", "gtbus", "measure", "--backend", backend, "--trainer", trainer]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    pin = done.stdout.strip()
    if done.returncode != 0 or len(pin) != 64:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or [pin or "(no output)"]
        raise GtbusError(f"gtbus measure --backend {backend} --trainer {trainer} failed: {last[0]}")
    return pin


@dataclass
class LocalRun:
    """Options of one local run (what `gtbus orchestrator` and `gtbus holder` are given)."""

    run_dir: Path
    holders: int = 3
    mode: str = "travel"
    rounds: int = 1
    chunk_tokens: int = 1 << 16
    steps: str = "pass"
    lease: float = 10.0
    backend: str = "host"
    trainer: str = "bytelm"  # the orchestrator's --trainer; the pin is measured for it
    checkpoint_every: int = 1  # the orchestrator's --checkpoint-every
    gpus: int = 1  # the orchestrator's --gpus (GPU tokens travelling at once)
    merge_every: int = 0  # the orchestrator's --merge-every
    pin: str | None = None  # the holders' --pin-code; default: what `gtbus measure` prints for this backend and trainer
    holder_pins: dict[str, str] = field(default_factory=dict)  # holder name -> its own --pin-code (tests: one pins another value)
    bytes_per_holder: int = 256 * 1024
    data: Sequence[Path] | None = None  # one shard per holder; default: the demo corpus
    holder_faults: dict[str, str] = field(default_factory=dict)  # holder name -> --fault spec
    orchestrator_fault: str = ""  # --fault spec of the orchestrator (tests and drills only)
    extra_orchestrator_args: Sequence[str] = ()
    extra_holder_args: Sequence[str] = ()  # given to every holder
    remote_holders: Sequence[str] = ()  # these write through a device agent (ship-to-device), as if on another server


class LocalDeployment:
    """Prepares keys and data for a :class:`LocalRun`, then runs its processes."""

    def __init__(self, run: LocalRun) -> None:
        from gtbus.gpu.platform_key import write_platform_key
        from gtbus.messages.deployment_keys import make_deployment

        self.run = run
        private_dir(run.run_dir)
        self.keys = run.run_dir / "keys"
        self.dep = make_deployment(self.keys, run.holders, agents=1 if run.remote_holders else 0)
        self.platform_key, self.platform_pub = write_platform_key(run.run_dir / "platform", overwrite=True)
        if run.data is None:
            from gtbus.training.corpus import build_demo_corpus

            self.shards = list(build_demo_corpus(run.run_dir / "data", holders=run.holders, bytes_per_holder=run.bytes_per_holder))
        else:
            self.shards = list(run.data)
        t0 = time.perf_counter()
        self.pin = run.pin if run.pin is not None else self._pin()
        self.pin_s = time.perf_counter() - t0  # what obtaining the pin cost (a process that loads the trainer)
        self.router = f"tcp://127.0.0.1:{free_port()}"
        self.pub = f"tcp://127.0.0.1:{free_port()}"
        self.agent_router = f"tcp://127.0.0.1:{free_port()}"
        self.agent_pub = f"tcp://127.0.0.1:{free_port()}"
        self.agent_proc: subprocess.Popen[bytes] | None = None
        self.summary_path = run.run_dir / "summary.json"
        self.orchestrator: subprocess.Popen[str] | None = None
        self.holder_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def _pin(self) -> str:
        return measure_pin(self.run.backend, self.run.trainer)

    @property
    def _common(self) -> list[str]:
        return ["--keys", str(self.keys), "--router", self.router, "--pub", self.pub, "--run-dir", str(self.run.run_dir), "--backend", self.run.backend]

    def orchestrator_cmd(self, *, resume: bool = False) -> list[str]:
        """The command line of the orchestrator process."""
        r = self.run
        cmd = [sys.executable, "-m", "gtbus", "orchestrator", "--key", str(self.dep.key_path(self.dep.orchestrator.name)),
               "--platform-key", str(self.platform_key), "--mode", r.mode, "--rounds", str(r.rounds),
               "--chunk-tokens", str(r.chunk_tokens), "--steps", r.steps, "--lease", str(r.lease),
               "--trainer", r.trainer, "--checkpoint-every", str(r.checkpoint_every), "--gpus", str(r.gpus), "--merge-every", str(r.merge_every),
               "--json-out", str(self.summary_path), *self._common, *r.extra_orchestrator_args]
        if r.orchestrator_fault:
            cmd += ["--fault", r.orchestrator_fault]
        return cmd + (["--resume"] if resume else [])

    def holder_cmd(self, index: int) -> list[str]:
        """The command line of holder ``index`` (0-based)."""
        h = self.dep.holders[index]
        cmd = [sys.executable, "-m", "gtbus", "holder", "--key", str(self.dep.key_path(h.name)), "--platform-pub", str(self.platform_pub),
               "--pin-code", self.run.holder_pins.get(h.name, self.pin), "--data", str(self.shards[index]),
               # The run's chunk size, as an expectation: the holder prepares its device for it before registering.
               "--chunk-tokens", str(self.run.chunk_tokens), *self._common]
        fault = self.run.holder_faults.get(h.name)
        if h.name in self.run.remote_holders:
            cmd += ["--agent", self.dep.agents[0].name, "--agent-router", self.agent_router, "--agent-pub", self.agent_pub]
        cmd += list(self.run.extra_holder_args)
        return cmd + (["--fault", fault] if fault else [])

    def agent_cmd(self) -> list[str]:
        """The command line of the device agent process."""
        a = self.dep.agents[0]
        return [sys.executable, "-m", "gtbus", "agent", "--key", str(self.dep.key_path(a.name)), "--listen-router", self.agent_router,
                "--listen-pub", self.agent_pub, *self._common]

    def start_orchestrator(self, *, resume: bool = False) -> subprocess.Popen[str]:
        """Start (or restart) the orchestrator process; its stdout is a pipe of hop lines."""
        self.orchestrator = subprocess.Popen(
            self.orchestrator_cmd(resume=resume), stdout=subprocess.PIPE, stderr=append_private(self.run.run_dir / "orchestrator.err"),
            text=True, env=self.env,
        )
        return self.orchestrator

    def start_holder(self, index: int) -> subprocess.Popen[bytes]:
        """Start holder ``index``; its stderr goes to RUN/<name>.err."""
        name = self.dep.holders[index].name
        p = subprocess.Popen(self.holder_cmd(index), stdout=subprocess.DEVNULL, stderr=append_private(self.run.run_dir / f"{name}.err"), env=self.env)
        self.holder_procs[name] = p
        return p

    def start(self) -> None:
        """Start the orchestrator, the device agent if any holder is remote, and every holder."""
        self.start_orchestrator()
        if self.run.remote_holders:
            self.agent_proc = subprocess.Popen(self.agent_cmd(), stdout=subprocess.DEVNULL, stderr=append_private(self.run.run_dir / "agent.err"), env=self.env)
        for i in range(self.run.holders):
            self.start_holder(i)

    def wait(self, on_line: Callable[[str], None] = lambda s: None, timeout: float = 600.0) -> dict[str, Any]:
        """Relay hop lines until the orchestrator exits; return its summary."""
        assert self.orchestrator is not None and self.orchestrator.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.orchestrator.stdout:
            on_line(line.rstrip())
            if time.monotonic() > deadline:
                break
        try:
            rc = self.orchestrator.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = -1
        if rc != 0 or not self.summary_path.exists():
            err = (self.run.run_dir / "orchestrator.err").read_text()[-2000:]
            last = [l for l in err.splitlines() if l.strip()][-1:] or ["(no output)"]
            raise GtbusError(f"orchestrator exited with status {rc}: {last[0]} (logs in {self.run.run_dir})")
        return json.loads(self.summary_path.read_text())

    def stop(self, grace: float = 5.0) -> None:
        """Let holders exit on the run's shutdown; signal, then kill, whatever is left."""
        procs: list[subprocess.Popen[Any]] = list(self.holder_procs.values())
        if self.agent_proc is not None:
            procs.append(self.agent_proc)
        if self.orchestrator is not None:
            procs.append(self.orchestrator)
        end = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def run_to_end(self, on_line: Callable[[str], None] = lambda s: None, timeout: float = 600.0) -> dict[str, Any]:
        """Start everything, wait for the summary, stop."""
        self.start()
        try:
            return self.wait(on_line, timeout)
        finally:
            self.stop()
