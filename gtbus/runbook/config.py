"""Runbook files: one TOML file describes one deployment.

A runbook names the hosts (this machine, or servers reached with OpenSSH),
the nodes and their roles, endpoints, key and data paths, what holders pin,
and the training settings. Example (``runbooks/local.toml`` is a full one)::

    [deployment]
    name = "local"
    run_dir = "runs/local"          # on every host, relative to the host's workdir
    keys = "runs/local/keys"         # the folder of every node's NAME.pub (and here, the secrets)
    backend = "host"
    # known_hosts = "known_hosts"    # ssh hosts' keys, pinned (relative to this file's folder)

    [training]
    mode = "travel"
    rounds = 2
    chunk_tokens = 65536
    steps = "120"                    # per hop; or "pass" (one pass over the chunk), or "per:N" (a step per N tokens)
    lease = 10.0
    checkpoint_every = 1             # write the checkpoint every N hops (and after the last)
    gpus = 1                         # GPU tokens travelling at once (the orchestrator's --gpus)
    merge_every = 0                  # with gpus > 1: average the replicas every N trained hops (0: every gpus hops)
    merge = "average"                # how replicas merge: average, sum, delta:LR, or lockstep (see gtbus orchestrator --merge)
    prepare = true                   # one GPU, travel: send the next hop's params ahead (gtbus orchestrator --prepare)

    [pins]
    code = "auto"                    # or the hex printed by `gtbus measure`
    platform_pub = "runs/local/platform/platform.platform.pub"

    [hosts.gpu]
    address = "local"                # or "user@server" (OpenSSH)
    workdir = "."
    python = ".venv/bin/python"

    [nodes.orch]
    role = "orchestrator"
    host = "gpu"
    key = "runs/local/keys/orch.key"
    platform_key = "runs/local/platform/platform.platform.key"
    router = "tcp://127.0.0.1:7700"
    pub = "tcp://127.0.0.1:7701"

    [attestation]                    # optional: what holders require of the orchestrator's evidence,
    kind = "emulated"                # the policy inline, as in a policy file (see gtbus.attest.policy);
    roots = ["runs/local/platform/platform.platform.pub"]  # read here; `up` writes the policy with them
    [attestation.pinned]             # into each holder's run dir and passes it as --attest-policy
    code = "3f1c...e2"
    # or: policy = "runs/local/policy.toml"  (a policy file already on each holder's host)

    [nodes.h1]
    role = "holder"
    host = "gpu"
    key = "runs/local/keys/h1.key"
    data = ["runs/local/data/holder00.bin"]
    # agent = "agent1"              # a holder on another server writes through the GPU host's agent

An ``agent`` node (role "agent") runs on the GPU host with ``router``/``pub``
(where remote holders connect) and optional ``bind_router``/``bind_pub``;
servers also accept ``bind_*`` when they bind another address than the one
others connect to (``tcp://0.0.0.0:PORT``).

Paths are relative to the host's ``workdir``. ``${NAME}`` in any string is
replaced by the environment variable NAME when the runbook is loaded (hosts,
addresses and folders that differ per site; ``runbooks/netns-lab.toml`` uses
it). Every problem found while loading is reported as one line naming the
table and key.

Values are data, never code: every host command is an argv list (see
:mod:`gtbus.runbook.hosts`), and the schema also refuses values that could only
be mistakes or attacks. Deployment, host and node names follow the node-name
rule (the deployment's name names its state file, so no ``../``); ``trainer``
is one of the built-in trainers; ``python`` is an absolute or a plain relative
path (no spaces, quotes or shell characters); ``address`` is ``local``,
``netns:NAME`` or an ssh destination that never starts with ``-``;
``ssh_options`` are ``-o Key=Value`` pairs (and ``-p``, ``-i``, ``-J``,
``-F``, ``-4``, ``-6``), never a key that runs a command.

``[deployment] known_hosts`` names the file (relative to the runbook's folder)
that pins every ssh host's key: ssh then checks strictly against that file
alone, never asks, never adds a key to it, and ``ssh_options`` may not loosen
that (``StrictHostKeyChecking``, ``UserKnownHostsFile``).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gtbus.attest.policy import PolicySettings, policy_from_table
from gtbus.errors import ConfigError
from gtbus.messages.identity import Role, check_node_name
from gtbus.nodes.run_config import MAX_GPUS
from gtbus.training.merge import DEFAULT_MERGE, MERGE_POLICIES, merge_policy
from gtbus.training.trainer import TRAINER_NAMES, WorkloadError, parse_steps


@dataclass(frozen=True)
class Host:
    """Where nodes run: this machine or an OpenSSH destination."""

    name: str
    address: str
    workdir: str = "."
    python: str = ".venv/bin/python"
    ssh_options: tuple[str, ...] = ()
    known_hosts: str = ""  # ssh hosts: the absolute path of the runbook's pinned known_hosts ("" = ssh's own files)

    @property
    def local(self) -> bool:
        """True for this machine."""
        return self.address in ("local", "localhost")


@dataclass(frozen=True)
class Node:
    """One node process of the deployment."""

    name: str
    role: Role
    host: str
    key: str
    router: str = ""
    pub: str = ""
    platform_key: str = ""
    data: tuple[str, ...] = ()
    raw: bool = False
    extra_args: tuple[str, ...] = ()
    agent: str = ""  # holders on another server than the GPU: the device agent they write through
    bind_router: str = ""  # where a server node binds, when it differs from where others connect
    bind_pub: str = ""


@dataclass(frozen=True)
class Runbook:
    """A whole deployment, validated."""

    path: Path
    name: str
    run_dir: str
    keys: str
    backend: str
    trainer: str
    training: dict[str, Any]
    pin_code: str
    platform_pub: str
    hosts: dict[str, Host]
    nodes: dict[str, Node]
    problems: list[str] = field(default_factory=list)
    attest_policy: str = ""  # [attestation] policy: the policy file on each holder's host ("": --platform-pub and --pin-code only)
    attestation: PolicySettings | None = None  # [attestation] with the policy inline: `up` writes it into each holder's run dir

    @property
    def orchestrator(self) -> Node:
        """The deployment's orchestrator node."""
        return next(n for n in self.nodes.values() if n.role is Role.ORCHESTRATOR)

    def nodes_by_role(self, role: Role) -> list[Node]:
        """Nodes of ``role``, in file order."""
        return [n for n in self.nodes.values() if n.role is role]


_TRAINING_DEFAULTS: dict[str, Any] = {"mode": "travel", "rounds": 1, "chunk_tokens": 1 << 17, "steps": "pass", "lease": 10.0,
                                      "checkpoint_every": 1, "gpus": 1, "merge_every": 0, "merge": DEFAULT_MERGE, "prepare": True}


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _table(data: dict[str, Any], key: str, problems: list[str], *, required: bool = True) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        if required:
            problems.append(f"[{key}]: missing table")
        return {}
    if not isinstance(value, dict):
        problems.append(f"[{key}]: must be a table")
        return {}
    return value


def _str(t: dict[str, Any], key: str, where: str, problems: list[str], default: str | None = None) -> str:
    value = t.get(key, default)
    if value is None:
        problems.append(f"{where}: missing key {key!r}")
        return ""
    if not isinstance(value, str) or not value:
        problems.append(f"{where}: {key} must be a non-empty string")
        return ""
    return value


def _endpoint(value: str, where: str, problems: list[str]) -> None:
    u = urlparse(value)
    if u.scheme != "tcp" or not u.hostname or u.port is None:
        problems.append(f"{where}: endpoint {value!r} must look like tcp://HOST:PORT")
    elif not 0 < u.port < 65536:
        problems.append(f"{where}: port {u.port} out of range")


def _name(value: str, where: str, problems: list[str]) -> bool:
    """Check ``value`` against the node-name rule (the one in :func:`check_node_name`)."""
    try:
        check_node_name(value)
    except ConfigError as exc:
        problems.append(f"{where}: {exc}")
        return False
    return True


# (Each is used with fullmatch: "$" would let a trailing newline through.)
# An absolute or a plain relative path: run as one argv entry, but still refused if it
# could only be a mistake or an attack (spaces, quotes, ';', '$', a leading '-').
_PYTHON = re.compile(r"(?!-)[A-Za-z0-9_.+/-]+")
# ssh destinations ("user@host", "host", "ssh://user@host:22", "user@[::1]") and netns names: never a leading '-'.
_SSH_DEST = re.compile(r"(?!-)[A-Za-z0-9_.@:/%+\[\]-]+")
_NETNS = re.compile(r"(?!-)[A-Za-z0-9_.-]{1,64}")
# ssh options a runbook may pass. An allowlist, not a blocklist: ssh has keys that run a
# command or load a library (ProxyCommand, Match exec, PKCS11Provider, ...) and reads a
# quoted keyword as the keyword, and -F would bring a whole config file. Anything else
# belongs in the operator's own ~/.ssh/config.
_SSH_FLAGS = {"-4", "-6"}
_SSH_WITH_VALUE = {"-o", "-p", "-i", "-J"}
_SSH_O_KEYS = {
    "port", "user", "identityfile", "identitiesonly", "connecttimeout", "connectionattempts",
    "serveraliveinterval", "serveralivecountmax", "stricthostkeychecking", "userknownhostsfile",
    "batchmode", "loglevel", "compression", "hostkeyalias", "addressfamily", "checkhostip",
    "controlmaster", "controlpath", "controlpersist", "proxyjump",
}
_SSH_O_OPTION = re.compile(r"([A-Za-z]+)(?:=|\s+)\S.*")
# With [deployment] known_hosts the runbook's file is the only authority on host keys:
# these would loosen or replace it.
_SSH_O_PINNED = {"stricthostkeychecking", "userknownhostsfile"}
# ssh splits UserKnownHostsFile at whitespace, reads quotes and '#', and expands '%' and '~':
# a pinned path must reach it as exactly that path.
_KNOWN_HOSTS_PATH = re.compile(r"/[A-Za-z0-9_.+/-]*")


def _known_hosts(dep: dict[str, Any], runbook: Path, problems: list[str]) -> str:
    """The absolute path of ``[deployment] known_hosts`` (relative to the runbook's folder), or ""."""
    if "known_hosts" not in dep:
        return ""
    value = _str(dep, "known_hosts", "[deployment]", problems)
    if not value:
        return ""
    path = os.path.abspath(runbook.parent / value)
    if not _KNOWN_HOSTS_PATH.fullmatch(path):
        problems.append(f"[deployment]: known_hosts {path!r}: ssh would not read this path as written "
                        "(use A-Z, a-z, 0-9 and _ . + / - only; no spaces, quotes, '%', '~' or '#')")
        return ""
    return path


def _host(name: str, t: dict[str, Any], problems: list[str], known_hosts: str = "") -> Host | None:
    """Validate one ``[hosts.NAME]`` table; an ssh host gets the pinned ``known_hosts``."""
    where = f"[hosts.{name}]"
    if not _name(name, where, problems):
        return None
    for k in sorted(set(t) - {"address", "workdir", "python", "ssh_options"}):
        problems.append(f"{where}: unknown key {k!r}")
    address = _str(t, "address", where, problems)
    if address and address not in ("local", "localhost"):
        if address.startswith("netns:"):
            if not _NETNS.fullmatch(address[len("netns:"):]):
                problems.append(f"{where}: address {address!r}: a netns name is 1-64 of A-Z, a-z, 0-9, '_', '.', '-', not starting with '-'")
        elif not _SSH_DEST.fullmatch(address):
            problems.append(f"{where}: address {address!r} must be local, netns:NAME or an ssh destination like user@server (no spaces, not starting with '-')")
    workdir = _str(t, "workdir", where, problems, ".")
    python = _str(t, "python", where, problems, ".venv/bin/python")
    if python and not _PYTHON.fullmatch(python):
        problems.append(f"{where}: python {python!r} must be an absolute or a plain relative path (A-Z, a-z, 0-9, '_', '.', '+', '-', '/'; not starting with '-')")
    opts = t.get("ssh_options", [])
    if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
        problems.append(f"{where}: ssh_options must be a list of strings")
        opts = []
    pinned = known_hosts if address not in ("local", "localhost") and not address.startswith("netns:") else ""
    problem = _ssh_options_problem(opts, pinned=bool(pinned))
    if problem:
        problems.append(f"{where}: ssh_options: {problem}")
    return Host(name, address, workdir, python, tuple(opts), pinned)


def _ssh_options_problem(opts: list[str], *, pinned: bool = False) -> str | None:
    """Why ``opts`` are not plain ssh options (or, ``pinned``, would override the pinned host keys), or None."""
    i = 0
    while i < len(opts):
        opt = opts[i]
        if opt in _SSH_FLAGS:
            i += 1
            continue
        flag, value = (opt[:2], opt[2:]) if opt[:2] in _SSH_WITH_VALUE and len(opt) > 2 else (opt, None)
        if flag not in _SSH_WITH_VALUE:
            return f"{opt!r} is not one of {', '.join(sorted(_SSH_FLAGS | _SSH_WITH_VALUE))}"
        if value is None:
            if i + 1 >= len(opts):
                return f"{flag} needs a value"
            value = opts[i + 1]
            i += 1
        i += 1
        if flag == "-o":
            m = _SSH_O_OPTION.fullmatch(value.strip())
            if m is None or m.group(1).lower() not in _SSH_O_KEYS:
                shown = m.group(1) if m else value[:40]
                return f"-o {shown!r} is not one of the allowed keys ({', '.join(sorted(_SSH_O_KEYS))}); set others in ~/.ssh/config"
            if pinned and m.group(1).lower() in _SSH_O_PINNED:
                return f"-o {m.group(1)} conflicts with [deployment] known_hosts, which pins every ssh host's key strictly"
        if value.startswith("-") or any(c in value for c in "\n\r\0"):
            return f"value {value!r} of {flag} must not start with '-' or hold a line break"
    return None


def _attestation(t: dict[str, Any], runbook: Path, problems: list[str]) -> tuple[str, PolicySettings | None]:
    """``[attestation]``: a policy file on each holder's host (``policy``), or the policy itself inline, not both."""
    if "policy" in t:
        if set(t) != {"policy"}:
            problems.append(f"[attestation]: policy names a policy file, so the policy's own keys cannot be here too "
                            f"({', '.join(sorted(set(t) - {'policy'}))}): keep one of the two forms")
            return "", None
        return _str(t, "policy", "[attestation]", problems), None
    try:
        return "", policy_from_table(t, runbook.parent, "[attestation]", absolute_bundle=True)
    except ConfigError as exc:
        problems.append(str(exc))
        return "", None


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, where: str, problems: list[str]) -> Any:
    """Replace ``${NAME}`` in every string with the environment variable NAME (a problem if unset)."""
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else k, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, where, problems) for v in value]
    if isinstance(value, str) and "${" in value:

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                problems.append(f"{where}: environment variable {name} is not set")
                return ""
            return os.environ[name]

        return _VAR.sub(sub, value)
    return value


def load_runbook(path: str | Path) -> Runbook:
    """Parse and validate a runbook; ConfigError lists every problem, one per line."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such runbook") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    problems: list[str] = []
    data = _expand(data, "", problems)
    dep = _table(data, "deployment", problems)
    training = {**_TRAINING_DEFAULTS, **_table(data, "training", problems, required=False)}
    pins = _table(data, "pins", problems)
    hosts_t = _table(data, "hosts", problems)
    nodes_t = _table(data, "nodes", problems)
    attestation = _table(data, "attestation", problems, required=False)
    attest_policy, attest_inline = _attestation(attestation, p, problems) if isinstance(data.get("attestation"), dict) else ("", None)
    unknown = set(data) - {"deployment", "training", "pins", "hosts", "nodes", "attestation"}
    for k in sorted(unknown):
        problems.append(f"[{k}]: unknown table")

    backend = dep.get("backend", "host")
    if backend not in ("host", "cupy"):
        problems.append(f"[deployment]: backend must be host or cupy, not {backend!r}")
    if training["mode"] not in ("travel", "ship"):
        problems.append(f"[training]: mode must be travel or ship, not {training['mode']!r}")
    for k in ("rounds", "chunk_tokens", "checkpoint_every"):
        if not _int(training[k]) or training[k] < 1:
            problems.append(f"[training]: {k} must be a positive integer")
    if not _int(training["gpus"]) or not 1 <= training["gpus"] <= MAX_GPUS:
        problems.append(f"[training]: gpus must be an integer from 1 to {MAX_GPUS}")
    if not _int(training["merge_every"]) or training["merge_every"] < 0:
        problems.append("[training]: merge_every must be 0 (every gpus hops) or a positive integer")
    try:
        if not isinstance(training["merge"], str):
            raise ConfigError(f"give {MERGE_POLICIES}")
        merge_policy(training["merge"])
    except ConfigError as exc:
        problems.append(f"[training]: merge: {exc}")
    if not isinstance(training["prepare"], bool):
        problems.append("[training]: prepare must be true or false")
    if not isinstance(training["lease"], (int, float)) or training["lease"] <= 0:
        problems.append("[training]: lease must be a positive number of seconds")
    try:
        parse_steps(str(training["steps"]))
    except WorkloadError:
        problems.append("[training]: steps must be 'pass', a number of steps per hop, or 'per:N' (one step per N tokens of a hop)")

    known_hosts = _known_hosts(dep, p, problems)
    hosts: dict[str, Host] = {}
    for name, t in hosts_t.items():
        if not isinstance(t, dict):
            problems.append(f"[hosts.{name}]: must be a table")
            continue
        host_or_none = _host(name, t, problems, known_hosts)
        if host_or_none is not None:
            hosts[name] = host_or_none

    nodes: dict[str, Node] = {}
    for name, t in nodes_t.items():
        where = f"[nodes.{name}]"
        if not _name(name, where, problems):
            continue
        if not isinstance(t, dict):
            problems.append(f"{where}: must be a table")
            continue
        try:
            role = Role(t.get("role", ""))
        except ValueError:
            problems.append(f"{where}: role must be one of {', '.join(r.value for r in Role)}")
            continue
        host = _str(t, "host", where, problems)
        if host and host not in hosts:
            problems.append(f"{where}: host {host!r} is not in [hosts]")
        data_paths = t.get("data", [])
        if not isinstance(data_paths, list) or not all(isinstance(d, str) for d in data_paths):
            problems.append(f"{where}: data must be a list of paths")
            data_paths = []
        extra_args = t.get("extra_args", [])
        if not isinstance(extra_args, list) or not all(isinstance(a, str) for a in extra_args):
            problems.append(f"{where}: extra_args must be a list of strings")
            extra_args = []
        if not isinstance(t.get("raw", False), bool):
            problems.append(f"{where}: raw must be true or false")
        node = Node(
            name=name, role=role, host=host, key=_str(t, "key", where, problems),
            router=str(t.get("router", "")), pub=str(t.get("pub", "")), platform_key=str(t.get("platform_key", "")),
            data=tuple(data_paths), raw=t.get("raw", False) is True, extra_args=tuple(extra_args),
            agent=str(t.get("agent", "")), bind_router=str(t.get("bind_router", "")), bind_pub=str(t.get("bind_pub", "")),
        )
        unknown_keys = set(t) - {"role", "host", "key", "router", "pub", "platform_key", "data", "raw", "extra_args", "agent", "bind_router", "bind_pub"}
        for k in sorted(unknown_keys):
            problems.append(f"{where}: unknown key {k!r}")
        if role in (Role.ORCHESTRATOR, Role.AGENT):
            for k in ("router", "pub"):
                if not getattr(node, k):
                    problems.append(f"{where}: an {role.value} needs {k}")
                else:
                    _endpoint(getattr(node, k), where, problems)
            for k in ("bind_router", "bind_pub"):
                if getattr(node, k):
                    _endpoint(getattr(node, k), where, problems)
        if role is Role.ORCHESTRATOR and not node.platform_key:
            problems.append(f"{where}: an orchestrator needs platform_key")
        if role is Role.HOLDER and not node.data:
            problems.append(f"{where}: a holder needs data")
        nodes[name] = node
    for n in nodes.values():
        if n.agent and (n.agent not in nodes or nodes[n.agent].role is not Role.AGENT):
            problems.append(f"[nodes.{n.name}]: agent {n.agent!r} is not an agent node of this runbook")
    orchs = [n for n in nodes.values() if n.role is Role.ORCHESTRATOR]
    if len(orchs) != 1:
        problems.append(f"[nodes]: exactly one orchestrator needed, found {len(orchs)}")
    if not any(n.role is Role.HOLDER for n in nodes.values()):
        problems.append("[nodes]: no holder")
    name = _str(dep, "name", "[deployment]", problems) if dep else ""
    if name:
        _name(name, "[deployment]: name", problems)
    trainer = dep.get("trainer", "bytelm")
    if trainer not in TRAINER_NAMES:
        problems.append(f"[deployment]: trainer must be one of {', '.join(TRAINER_NAMES)}, not {trainer!r}")
    for k in sorted(set(dep) - {"name", "run_dir", "keys", "backend", "trainer", "known_hosts"}):
        problems.append(f"[deployment]: unknown key {k!r}")
    rb = Runbook(
        path=p,
        name=name,
        run_dir=_str(dep, "run_dir", "[deployment]", problems) if dep else "",
        keys=_str(dep, "keys", "[deployment]", problems) if dep else "",
        backend=str(backend),
        trainer=str(trainer),
        training=training,
        pin_code=str(pins.get("code", "auto")),
        platform_pub=_str(pins, "platform_pub", "[pins]", problems) if pins else "",
        hosts=hosts,
        nodes=nodes,
        problems=problems,
        attest_policy=attest_policy,
        attestation=attest_inline,
    )
    if len(problems) == 1:
        raise ConfigError(f"{p}: {problems[0]}")
    if problems:
        raise ConfigError(f"{p}: {len(problems)} problem(s):\n" + "\n".join(f"  {x}" for x in problems))
    return rb
