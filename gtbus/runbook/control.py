"""Checking, starting, watching and stopping a runbook's deployment.

``up`` starts the orchestrator first, then every holder, each detached on its
host with its output in ``RUN_DIR/NAME.out`` there, and writes a state file
(``<runbook folder>/.state/<name>.json``: host, pid and command of every
node) so that later ``status`` and ``down`` find the running deployment.
A runbook's inline ``[attestation]`` policy is written, roots inline, into
each holder's run dir on its host (0600) just before that holder starts.
``down`` sends SIGTERM, waits a grace period, then SIGKILLs what is left.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from gtbus.attest.policy import policy_toml
from gtbus.errors import ConfigError
from gtbus.messages.identity import Role
from gtbus.runbook.config import Node, Runbook
from gtbus.runbook.hosts import READABLE_MODE, UNREADABLE, HostShell


def state_path(rb: Runbook) -> Path:
    """Where ``up`` records what it started (the schema keeps ``rb.name`` a plain node-style name)."""
    folder = rb.path.parent / ".state"
    p = folder / f"{rb.name}.json"
    if p.parent != folder:  # the schema refuses such names; a hand-built Runbook must not escape either
        raise ConfigError(f"deployment name {rb.name!r} would put its state file outside {folder}")
    return p


def read_state(rb: Runbook) -> dict[str, Any] | None:
    """The state file of a deployment that is up, or None."""
    p = state_path(rb)
    try:
        st = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: unreadable state file ({exc}); remove it if nothing runs") from None
    nodes = st.get("nodes") if isinstance(st, dict) else None
    if not isinstance(nodes, dict) or not all(
        isinstance(n, dict) and type(n.get("pid")) is int and n["pid"] > 1 and isinstance(n.get("role"), str) and isinstance(n.get("host"), str)
        for n in nodes.values()
    ):
        raise ConfigError(f"{p}: state file does not name nodes with pid, role and host; remove it if nothing runs")
    return st


def shell(rb: Runbook, node: Node) -> HostShell:
    """The shell of the host a node runs on."""
    return HostShell(rb.hosts[node.host])


def node_argv(rb: Runbook, node: Node, pin_code: str) -> list[str]:
    """The command line that runs ``node`` on its host."""
    host = rb.hosts[node.host]
    orch = rb.orchestrator
    # The orchestrator binds (bind_* if given); everyone else connects to its router/pub.
    router, pub = (orch.bind_router or orch.router, orch.bind_pub or orch.pub) if node is orch else (orch.router, orch.pub)
    base = [host.python, "-m", "gtbus", "-v", node.role.value, "--key", node.key, "--keys", rb.keys, "--run-dir", rb.run_dir,
            "--router", router, "--pub", pub, "--backend", rb.backend]
    t = rb.training
    if node.role is Role.ORCHESTRATOR:
        holders = ",".join(n.name for n in rb.nodes_by_role(Role.HOLDER))
        return base + ["--platform-key", node.platform_key, "--trainer", rb.trainer, "--mode", str(t["mode"]), "--rounds", str(t["rounds"]),
                       "--chunk-tokens", str(t["chunk_tokens"]), "--steps", str(t["steps"]), "--lease", str(t["lease"]),
                       "--checkpoint-every", str(t["checkpoint_every"]), "--gpus", str(t["gpus"]), "--merge-every", str(t["merge_every"]), "--merge", str(t["merge"]),
                       "--prepare" if t["prepare"] else "--no-prepare",
                       "--holders", holders, "--json-out", f"{rb.run_dir}/summary.json", *node.extra_args]
    if node.role is Role.HOLDER:
        data: list[str] = []
        for d in node.data:
            data += ["--data", d]
        via: list[str] = []
        if node.agent:
            ag = rb.nodes[node.agent]
            via = ["--agent", ag.name, "--agent-router", ag.router, "--agent-pub", ag.pub]
        policy = ["--attest-policy", attest_policy_path(rb, node)] if rb.attest_policy or rb.attestation else []
        return base + ["--platform-pub", rb.platform_pub, "--pin-code", pin_code, "--chunk-tokens", str(t["chunk_tokens"]),
                       *data, *(["--raw"] if node.raw else []), *via, *policy, *node.extra_args]
    if node.role is Role.AGENT:
        return base + ["--listen-router", node.bind_router or node.router, "--listen-pub", node.bind_pub or node.pub, *node.extra_args]
    raise ConfigError(f"node {node.name}: role {node.role.value} is not started by runbooks")


def attest_policy_path(rb: Runbook, node: Node) -> str:
    """The policy file a holder takes as --attest-policy: the runbook's, or the one ``up`` writes from the inline policy."""
    return f"{rb.run_dir}/{node.name}.attest-policy.toml" if rb.attestation else rb.attest_policy


def write_attest_policy(rb: Runbook, node: Node) -> None:
    """Write the runbook's inline policy, roots inline, as a 0600 file in the holder's run dir on its host."""
    if rb.attestation is not None:
        shell(rb, node).write_private(attest_policy_path(rb, node), policy_toml(rb.attestation, f"{rb.path} [attestation]"))


def resolve_pin(rb: Runbook) -> str:
    """The code measurement holders pin: the runbook's, or (``auto``) measured on the orchestrator's host."""
    if rb.pin_code != "auto":
        return rb.pin_code
    orch = rb.orchestrator
    host = rb.hosts[orch.host]
    r = shell(rb, orch).run([host.python, "-m", "gtbus", "measure", "--backend", rb.backend, "--trainer", rb.trainer], timeout=120)
    if not r.ok or len(r.out.strip()) != 64:
        raise ConfigError(f"host {host.name}: `gtbus measure` failed: {(r.err or r.out).strip()[-200:]}")
    return r.out.strip()


# -- check ----------------------------------------------------------------------------------------


def _port_problem(endpoint: str) -> str | None:
    u = urlparse(endpoint)
    if u.hostname is None or u.port is None:
        return None
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((u.hostname, u.port))
        except OSError as exc:
            if exc.errno == 99:  # not an address of this host: another host binds it
                return None
            return f"cannot bind {endpoint}: {exc.strerror}"
    return None


def check(rb: Runbook, *, up: bool = False) -> list[str]:
    """Every problem of a deployment, one line each (empty when ready)."""
    problems: list[str] = []
    reachable: dict[str, bool] = {}
    for name, host in rb.hosts.items():
        try:
            r = HostShell(host).run([host.python, "-c", "import gtbus"], timeout=30)
        except ConfigError as exc:  # e.g. ssh refused its host key: that host is out, the others still checked
            reachable[name] = False
            problems.append(str(exc))
            continue
        reachable[name] = r.ok
        if not r.ok:
            problems.append(f"host {name} ({host.address}): unreachable or gtbus not importable with {host.python}: {(r.err or r.out).strip()[-160:]}")
    for node in rb.nodes.values():
        if not reachable.get(node.host):
            continue
        sh = shell(rb, node)
        files = [(node.key, "secret key", True)]
        if node.role is Role.ORCHESTRATOR:
            files.append((node.platform_key, "platform key", True))
        if node.role is Role.HOLDER:
            files.append((rb.platform_pub, "pinned platform public key", False))
            if rb.attest_policy:
                files.append((rb.attest_policy, "attestation policy", False))
            if rb.attestation is not None and rb.attestation.bundle is not None:
                files.append((str(rb.attestation.bundle), "attestation bundle", False))
            files += [(d, "data file", False) for d in node.data]
        for path, what, secret in files:
            r = sh.sh(READABLE_MODE, path)
            if not r.ok:
                problems.append(f"node {node.name}: {what} {path} missing or unreadable on host {node.host}")
            elif secret and r.out.strip()[-2:] != "00":
                problems.append(f"node {node.name}: {what} {path} has mode {r.out.strip()}; must be readable by its owner only (chmod 600)")
        r = sh.sh(UNREADABLE, *(f"{rb.keys}/{n}.pub" for n in rb.nodes))
        for missing in r.out.splitlines():
            problems.append(f"node {node.name}: public key {missing} missing on host {node.host}")
    orch = rb.orchestrator
    if not up and rb.hosts[orch.host].local:
        for ep in (orch.bind_router or orch.router, orch.bind_pub or orch.pub):
            prob = _port_problem(ep)
            if prob:
                problems.append(f"node {orch.name}: {prob}")
    return problems


# -- up / status / down ---------------------------------------------------------------------------


@dataclass
class NodeState:
    """One node as ``status`` reports it."""

    name: str
    role: str
    host: str
    pid: int
    alive: bool


def up(rb: Runbook, say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Start every node (orchestrator first); write and return the state."""
    if read_state(rb) is not None:
        raise ConfigError(f"deployment {rb.name} is already up (state {state_path(rb)}); run `gtbus runbook down` first")
    pin = resolve_pin(rb)
    started: dict[str, Any] = {"runbook": str(rb.path), "name": rb.name, "started": time.time(), "pin_code": pin, "nodes": {}}
    order = [rb.orchestrator] + rb.nodes_by_role(Role.AGENT) + rb.nodes_by_role(Role.HOLDER)
    try:
        for node in order:
            argv = node_argv(rb, node, pin)
            if node.role is Role.HOLDER:
                write_attest_policy(rb, node)
            pid = shell(rb, node).spawn(argv, f"{rb.run_dir}/{node.name}.out")
            started["nodes"][node.name] = {"host": node.host, "pid": pid, "role": node.role.value, "argv": argv}
            say(f"started {node.role.value} {node.name} on {node.host} (pid {pid})")
            if node.role is Role.ORCHESTRATOR:
                time.sleep(0.5)  # holders retry registration anyway; this only saves a retry
    finally:
        p = state_path(rb)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(started, indent=1))
    return started


def node_states(rb: Runbook) -> list[NodeState]:
    """Liveness of every process the state file names."""
    st = read_state(rb)
    if st is None:
        raise ConfigError(f"deployment {rb.name} is not up (no {state_path(rb)})")
    out = []
    for name, n in st["nodes"].items():
        node = rb.nodes.get(name)
        alive = node is not None and shell(rb, node).alive(int(n["pid"]))
        out.append(NodeState(name, n["role"], n["host"], int(n["pid"]), alive))
    return out


def down(rb: Runbook, grace: float = 10.0, say: Callable[[str], None] = lambda s: None) -> list[NodeState]:
    """SIGTERM every node, wait up to ``grace`` seconds, SIGKILL the rest; remove the state file."""
    states = node_states(rb)
    for s in states:
        if s.alive:
            shell(rb, rb.nodes[s.name]).signal(s.pid, "TERM")
    deadline = time.monotonic() + grace
    left = [s for s in states if s.alive]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [s for s in left if shell(rb, rb.nodes[s.name]).alive(s.pid)]
    for s in left:
        shell(rb, rb.nodes[s.name]).signal(s.pid, "KILL")
        say(f"killed {s.name} (pid {s.pid}) after {grace:.0f}s grace")
    for s in states:
        if s.alive and s not in left:
            say(f"stopped {s.name} (pid {s.pid})")
    state_path(rb).unlink(missing_ok=True)
    return states
