"""The three-server runbook rehearsed over real OpenSSH: `check`, `up`, `status`, `down`, then a changed host key.

Three network namespaces play the servers (``netns_lab.py``), each running a
real ``sshd`` (``sshd_lab.py``): key-only, listening on its own address. The
runbook reaches them as ``root@ADDRESS`` with the operator's key and names a
``known_hosts`` file that pins their host keys; the gtbus checkout is reached
by path, since namespaces share the filesystem. ``gpu`` runs the orchestrator
and the device agent; ``hola`` and ``holb`` each run a holder that writes
through the agent; this machine runs the CLI and the observer.

Nothing waits on a timer: ``holb`` first has no route to ``gpu``, so the
orchestrator waits for ``h2`` while ``status`` shows every process alive and
the run not complete; the route comes back once ``status --watch`` follows the
run, which then completes. Afterwards ``gpu`` gets a new host key, as a
reinstall would, and ssh must refuse it: `runbook check` says so in one line
naming the host and the key it now offers, and `runbook down` of a deployment
recorded there refuses in that line too, keeping its state. A server whose line
is missing from known_hosts is refused as well; with every key pinned again,
`runbook check` passes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from netns_lab import NetnsLab
from sshd_lab import SshdLab

from gtbus.errors import ConfigError
from gtbus.gpu.platform_key import write_platform_key
from gtbus.messages.identity import NodeIdentity, write_identity
from gtbus.runbook.config import load_runbook
from gtbus.runbook.hosts import HostShell
from gtbus.training.checkpoint import read_checkpoint
from gtbus.training.corpus import build_demo_corpus

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(120)]

CHUNK_TOKENS = 16384
CHUNKS_PER_HOLDER = 2
NODES = {"orch": "orchestrator", "agent1": "agent", "h1": "holder", "h2": "holder", "status": "observer"}

RUNBOOK = """\
[deployment]
name = "sshd{suffix}"
run_dir = "run"
keys = "run/keys"
backend = "host"
known_hosts = "ssh/known_hosts"

[training]
rounds = 1
chunk_tokens = {chunk_tokens}
steps = "5"
lease = 10.0

[pins]
code = "auto"
platform_pub = "run/platform/platform.platform.pub"
{ssh_hosts}
[hosts.ops]
address = "local"
workdir = "{workdir}"
python = "{python}"

[nodes.orch]
role = "orchestrator"
host = "gpu"
key = "run/keys/orch.key"
platform_key = "run/platform/platform.platform.key"
router = "tcp://{gpu}:7700"
pub = "tcp://{gpu}:7701"
bind_router = "tcp://0.0.0.0:7700"
bind_pub = "tcp://0.0.0.0:7701"

[nodes.agent1]
role = "agent"
host = "gpu"
key = "run/keys/agent1.key"
router = "tcp://{gpu}:7710"
pub = "tcp://{gpu}:7711"

[nodes.h1]
role = "holder"
host = "hola"
key = "run/keys/h1.key"
data = ["run/data/holder00.bin"]
agent = "agent1"

[nodes.h2]
role = "holder"
host = "holb"
key = "run/keys/h2.key"
data = ["run/data/holder01.bin"]
agent = "agent1"

[nodes.status]
role = "observer"
host = "ops"
key = "run/keys/status.key"
"""

SSH_HOST = """
[hosts.{name}]
address = "{destination}"
workdir = "{workdir}"
python = "{python}"
ssh_options = ["-i", "{client_key}", "-o", "IdentitiesOnly=yes"]
"""


def _gtbus(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gtbus", *args], capture_output=True, text=True, timeout=timeout)


def _prepare(tmp: Path, servers: SshdLab) -> Path:
    """Every node's keys, the platform key and two holders' data under tmp/run; the runbook at tmp/runbook.toml."""
    for name, role in NODES.items():
        write_identity(NodeIdentity.generate(name, role), tmp / "run" / "keys")
    write_platform_key(tmp / "run" / "platform")
    build_demo_corpus(tmp / "run" / "data", holders=2, bytes_per_holder=CHUNK_TOKENS * CHUNKS_PER_HOLDER)
    common = {"workdir": str(tmp), "python": sys.executable}
    ssh_hosts = "".join(SSH_HOST.format(name=s, destination=servers.destination(s), client_key=servers.client_key, **common)
                        for s in ("gpu", "hola", "holb"))
    rb = tmp / "runbook.toml"
    rb.write_text(RUNBOOK.format(suffix=servers.lab.suffix, chunk_tokens=CHUNK_TOKENS, ssh_hosts=ssh_hosts, gpu=servers.lab.addr("gpu"), **common))
    return rb


def _ns_pids(lab: NetnsLab, server: str) -> set[int]:
    return {int(p) for p in subprocess.run(["ip", "netns", "pids", lab.ns(server)], capture_output=True, text=True, timeout=30).stdout.split()}


def _line(proc: subprocess.Popen[str], err: Path) -> dict[str, Any]:
    """The next JSON line ``status --watch`` prints (the module's timeout bounds a hang)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"status ended early: {err.read_text()}"
    return json.loads(line)


def test_runbook_over_real_sshd_runs_and_refuses_a_changed_host_key(tmp_path: Path, sshd_lab: SshdLab) -> None:
    lab = sshd_lab.lab
    rb = _prepare(tmp_path, sshd_lab)
    # The gate: holb cannot reach the GPU host (its sshd, reached from this machine, still can).
    gpu = f"{lab.addr('gpu')}/32"
    lab.exec("holb", "ip", "route", "add", "unreachable", gpu)
    r = _gtbus("runbook", "up", str(rb), timeout=90)  # `runbook check` first, over ssh to every host; then the nodes
    assert r.returncode == 0, r.stdout + r.stderr
    state_file = tmp_path / ".state" / f"sshd{lab.suffix}.json"
    state = json.loads(state_file.read_text())
    assert {n: s["host"] for n, s in state["nodes"].items()} == {"orch": "gpu", "agent1": "gpu", "h1": "hola", "h2": "holb"}
    watch = None
    try:
        err = tmp_path / "status.err"
        watch = subprocess.Popen([sys.executable, "-m", "gtbus", "runbook", "status", str(rb), "--watch", "--json", "--timeout", "10"],
                                 stdout=subprocess.PIPE, stderr=open(err, "w"), text=True)
        procs = {p["name"]: p for p in _line(watch, err)["processes"]}
        assert set(procs) == {"orch", "agent1", "h1", "h2"} and all(p["alive"] for p in procs.values()), procs
        first = _line(watch, err)
        assert first["complete"] is False and "h2" not in first["holders"], first
        lab.exec("holb", "ip", "route", "del", "unreachable", gpu)
        out, _ = watch.communicate(timeout=90)
        assert watch.returncode == 0, err.read_text()
        last = json.loads(out.strip().splitlines()[-1])
        assert last["complete"] is True, last
        summary_path = tmp_path / "run" / "summary.json"
        deadline = time.monotonic() + 30
        while not summary_path.exists():  # written as the orchestrator exits, just after the run completes
            assert time.monotonic() < deadline, "the orchestrator wrote no summary"
            time.sleep(0.1)
    finally:
        if watch is not None and watch.poll() is None:
            watch.kill()
        lab.exec("holb", "ip", "route", "del", "unreachable", gpu, check=False)
        d = _gtbus("runbook", "down", str(rb), "--grace", "3")
    assert d.returncode == 0, d.stdout + d.stderr
    assert not state_file.exists()
    summary = json.loads(summary_path.read_text())
    assert summary["hops_trained"] == 2 * CHUNKS_PER_HOLDER and not summary["skipped"], summary
    hops = read_checkpoint(tmp_path / "run" / "checkpoints" / "orch.npz", state=False).hops
    assert sorted((h["holder"], h["chunk"]) for h in hops if h["outcome"] == "trained") == [
        (h, c) for h in ("h1", "h2") for c in range(CHUNKS_PER_HOLDER)], hops
    # Nothing but the sshd listeners is left on the servers: every node, every ssh session gone.
    for server in ("gpu", "hola", "holb"):
        assert _ns_pids(lab, server) == {sshd_lab.procs[server].pid}, server
    for node in ("orch", "agent1", "h1", "h2"):
        assert "Traceback" not in (tmp_path / "run" / f"{node}.out").read_text(), node

    # gpu is reinstalled: a new host key. ssh refuses it; check says so in one line naming the host.
    offered = sshd_lab.rekey("gpu")
    r = _gtbus("runbook", "check", str(rb))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"host gpu ({sshd_lab.destination('gpu')}): refused: its host key changed: it offers {offered}"), lines[0]
    assert f"{sshd_lab.known_hosts}:1" in lines[0]
    # A deployment recorded as up on the refused host: `down` refuses too, rather than read "no answer"
    # as "exited" and forget it (the recorded process is one of this test's, so a wrong signal harms nothing).
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        state_file.write_text(json.dumps({**state, "nodes": {"orch": {**state["nodes"]["orch"], "pid": bystander.pid}}}))
        d = _gtbus("runbook", "down", str(rb), "--grace", "1")
        assert d.returncode == 1 and d.stderr.strip().splitlines() == [f"Error: {lines[0]}"], d.stderr
        assert state_file.exists() and bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        state_file.unlink(missing_ok=True)

    # The operator checks the new key out of band and pins it; holb's line is lost: that host is refused instead.
    sshd_lab.known_hosts.write_text(sshd_lab.pin_line("gpu") + sshd_lab.pin_line("hola"))
    hosts = load_runbook(rb).hosts
    assert HostShell(hosts["gpu"]).run(["true"]).ok
    with pytest.raises(ConfigError) as refused:
        HostShell(hosts["holb"]).run(["true"])
    assert str(refused.value) == (f"host holb ({sshd_lab.destination('holb')}): refused: no ED25519 host key for {lab.addr('holb')} "
                                  f"in {sshd_lab.known_hosts}; add the server's key, checked out of band")
    # Every server pinned again: the whole deployment checks out over ssh.
    sshd_lab.pin_all()
    r = _gtbus("runbook", "check", str(rb))
    assert r.returncode == 0 and "ok (4 hosts, 5 nodes)" in r.stdout, r.stdout + r.stderr
