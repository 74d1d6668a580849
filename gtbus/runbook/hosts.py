"""Running commands on a runbook's hosts: this machine, an OpenSSH server, or a network namespace.

Every host action is a POSIX ``sh`` script run in the host's workdir, so the
same checks and commands work the same way wherever the host is:

* ``local``: ``sh -c SCRIPT`` here;
* ``user@server``: ``ssh -o BatchMode=yes [options] user@server 'cd WORKDIR && SCRIPT'``;
* ``netns:NAME``: ``ip netns exec NAME sh -c SCRIPT`` (Linux network
  namespaces standing in for separate servers in tests and drills).
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass

from gtbus.errors import ConfigError
from gtbus.runbook.config import Host


@dataclass(frozen=True)
class Result:
    """What a host script did."""

    rc: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        """Exit status 0."""
        return self.rc == 0


class HostShell:
    """Runs sh scripts on one host."""

    def __init__(self, host: Host, *, connect_timeout: int = 5) -> None:
        self.host = host
        self.connect_timeout = connect_timeout

    def argv(self, script: str) -> list[str]:
        """The local command line that runs ``script`` on the host, in its workdir."""
        a = self.host.address
        wrapped = f"cd {shlex.quote(self.host.workdir)} && {script}"
        if self.host.local:
            return ["sh", "-c", wrapped]
        if a.startswith("netns:"):
            return ["ip", "netns", "exec", a[len("netns:") :], "sh", "-c", wrapped]
        return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}", *self.host.ssh_options, a, wrapped]

    def run(self, script: str, *, timeout: float = 60.0) -> Result:
        """Run ``script`` and wait for it."""
        try:
            p = subprocess.run(self.argv(script), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Result(124, "", f"timed out after {timeout:.0f}s")
        except FileNotFoundError as exc:
            raise ConfigError(f"host {self.host.name}: cannot run {exc.filename!r}") from None
        return Result(p.returncode, p.stdout, p.stderr)

    def spawn(self, argv: list[str], log: str) -> int:
        """Start ``argv`` detached (own session, output to ``log``); return its pid on the host."""
        cmd = shlex.join(argv)
        script = f"mkdir -p $(dirname {shlex.quote(log)}) && (setsid {cmd} >>{shlex.quote(log)} 2>&1 </dev/null & echo $!)"
        r = self.run(script, timeout=30)
        pid = r.out.strip().splitlines()[-1] if r.out.strip() else ""
        if not r.ok or not pid.isdigit():
            raise ConfigError(f"host {self.host.name}: could not start {argv[3] if len(argv) > 3 else argv[0]}: {r.err.strip() or r.out.strip()}")
        return int(pid)

    def alive(self, pid: int) -> bool:
        """Whether process ``pid`` still runs on the host."""
        return self.run(f"kill -0 {int(pid)} 2>/dev/null").ok

    def signal(self, pid: int, sig: str) -> bool:
        """Send a signal (TERM, KILL, ...) to ``pid``'s process group; True if delivered."""
        return self.run(f"kill -{sig} -- -{int(pid)} 2>/dev/null || kill -{sig} {int(pid)} 2>/dev/null").ok
