"""Servers for tests: Linux network namespaces on one bridge.

Each :class:`NetnsLab` namespace stands for one server: its own interfaces,
addresses, routes and sockets, while it shares this machine's files (so the
venv's python and the test's tmp folder work everywhere). The namespaces are
joined by veth links to a bridge in a switch namespace of their own; this
machine (the root namespace) also gets an address on the bridge, as an
operator's workstation would, so `gtbus runbook status` can reach the
orchestrator from here.

Cutting a server off is ``ip link set eth0 down`` inside its namespace, and
healing is ``up`` again: its TCP connections stall exactly as a pulled cable
would make them.

Everything is named with a per-run suffix and removed by :meth:`close`, which
also kills any process still running inside a namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field


class LabUnavailable(Exception):
    """This machine cannot host the lab (not root, no ``ip netns``); the reason is the message."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _free_subnet(first: int) -> str:
    """A 10.77.X.0/24 with no address or route on this machine (prefix 10.77.X)."""
    used = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    for k in range(250):
        x = (first + k) % 250 + 1
        if f"10.77.{x}." not in used:
            return f"10.77.{x}"
    raise LabUnavailable("no free 10.77.X.0/24 subnet on this machine")


@dataclass
class NetnsLab:
    """Namespaces ``servers`` (name -> last address octet) on one /24, plus this machine at .254."""

    servers: dict[str, int]
    suffix: str = field(default_factory=lambda: str(os.getpid()))
    prefix: str = ""
    namespaces: dict[str, str] = field(default_factory=dict)
    root_if: str = ""
    _made: list[str] = field(default_factory=list)

    @staticmethod
    def require() -> None:
        """Raise :class:`LabUnavailable` unless namespaces can be made here."""
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            raise LabUnavailable("needs root to create network namespaces (ip netns)")
        if shutil.which("ip") is None:
            raise LabUnavailable("the ip command (iproute2) is not installed")
        probe = f"gtbprobe{os.getpid()}"
        r = _ip("netns", "add", probe, check=False)
        if r.returncode != 0:
            raise LabUnavailable(f"ip netns add failed: {r.stderr.strip()}")
        _ip("netns", "del", probe, check=False)

    def ns(self, server: str) -> str:
        """The namespace name of ``server``."""
        return self.namespaces[server]

    def addr(self, server: str) -> str:
        """The IPv4 address of ``server`` (``root`` is this machine)."""
        return f"{self.prefix}.{254 if server == 'root' else self.servers[server]}"

    def exec(self, server: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``server``'s namespace and wait."""
        r = subprocess.run(["ip", "netns", "exec", self.ns(server), *argv], capture_output=True, text=True, timeout=30)
        if check and r.returncode != 0:
            raise RuntimeError(f"{server}: {' '.join(argv)}: {r.stderr.strip()}")
        return r

    def start(self) -> "NetnsLab":
        """Create the switch, the servers, their links and addresses."""
        self.require()
        self.prefix = self.prefix or _free_subnet(os.getpid())
        sw = f"gtb{self.suffix}sw"
        self._add_ns(sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for i, server in enumerate(self.servers):
            name = f"gtb{self.suffix}{server}"
            self._add_ns(name)
            self.namespaces[server] = name
            # One veth per server: eth0 inside it, pN on the switch's bridge.
            _ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", f"p{i}", "netns", sw)
            _ip("-n", name, "addr", "add", f"{self.addr(server)}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", sw, "link", "set", f"p{i}", "master", "br0", "up")
        self.root_if = f"gtb{self.suffix}r"
        _ip("link", "add", self.root_if, "type", "veth", "peer", "name", "proot", "netns", sw)
        _ip("addr", "add", f"{self.addr('root')}/24", "dev", self.root_if)
        _ip("link", "set", self.root_if, "up")
        _ip("-n", sw, "link", "set", "proot", "master", "br0", "up")
        return self

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def cut(self, server: str) -> None:
        """Pull ``server``'s cable: its link goes down; its sockets stay open and stall."""
        self.exec(server, "ip", "link", "set", "eth0", "down")

    def heal(self, server: str) -> None:
        """Plug the cable back in (the address stays; its route comes back with the link)."""
        self.exec(server, "ip", "link", "set", "eth0", "up")

    def close(self) -> None:
        """Kill what still runs in the namespaces, then remove them and the links (idempotent)."""
        for name in reversed(self._made):
            pids = _ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", name, check=False)
        self._made.clear()
        if self.root_if:
            _ip("link", "del", self.root_if, check=False)  # normally gone with the switch namespace
            self.root_if = ""
