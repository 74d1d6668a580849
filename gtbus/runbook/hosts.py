"""Running commands on a runbook's hosts: this machine, an OpenSSH server, or a network namespace.

Rules this module keeps:

* **No shell text is ever built from a value.** Every host action is an argv
  list. It runs in the host's workdir through one fixed wrapper
  (``cd -- "$1" && shift && exec "$@"``) that receives the workdir and the argv
  as positional parameters, so a path, a python, a trainer name or an address
  from a runbook is always one argument, never code.
* The few actions that need the shell (start detached with a log, look at a
  file's mode, signal a process group) are fixed ``sh`` programs written in
  this module (:data:`SPAWN`, ...); their values are positional parameters too.
* Where the command crosses a second shell (the remote login shell of ``ssh``),
  it is quoted with :func:`shlex.join`, and ``--`` ends ssh's options before the
  destination, so neither the destination nor the command can be read as an
  ssh option.

How each kind of host runs ``argv``:

* ``local``: ``sh -c WRAPPER gtbus-host WORKDIR ARGV...`` here;
* ``user@server``: ``ssh -o BatchMode=yes [pins] [options] -- user@server 'sh -c WRAPPER gtbus-host WORKDIR ARGV...'``;
* ``netns:NAME``: ``ip netns exec NAME sh -c WRAPPER gtbus-host WORKDIR ARGV...`` (Linux network
  namespaces standing in for separate servers in tests and drills).

Host keys: with the runbook's ``known_hosts`` (:attr:`Host.known_hosts`), ssh
checks the server's key strictly against that file alone (:func:`pin_options`).
Whatever the files, a host key ssh refuses (changed, or not known) stops every
action on that host with one :class:`~gtbus.errors.ConfigError` line naming the
host and the key it offered: never read as "the process is not alive".
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from gtbus.errors import ConfigError
from gtbus.runbook.config import Host

# The one wrapper every host command passes through: $1 is the workdir, the rest is the argv.
IN_WORKDIR = 'cd -- "$1" || exit 125; shift; exec "$@"'

# Fixed sh programs; values arrive as "$1", "$2", ... only.
SPAWN = 'log=$1; shift; mkdir -p -- "$(dirname -- "$log")" && { setsid "$@" >>"$log" 2>&1 </dev/null & echo $!; }'
"""Start ``$2...`` detached in its own session, output appended to ``$1``; print its pid."""
READABLE_MODE = 'test -r "$1" && stat -c %a -- "$1"'
"""Print the octal mode of ``$1`` if it is readable."""
UNREADABLE = 'for f; do test -r "$f" || printf "%s\\n" "$f"; done'
"""Print each argument that is not a readable file, one a line."""
ALIVE = 'kill -0 "$1" 2>/dev/null'
"""Exit 0 if process ``$1`` exists."""
SIGNAL = 'kill -s "$1" -- "-$2" 2>/dev/null || kill -s "$1" "$2" 2>/dev/null'
"""Send signal ``$1`` to the process group of ``$2`` (else to ``$2`` alone)."""

WRITE_PRIVATE = ('umask 077; mkdir -p -- "$(dirname -- "$1")" && rm -f -- "$1.tmp" && cat >"$1.tmp" '
                 '&& chmod 600 -- "$1.tmp" && mv -f -- "$1.tmp" "$1"')
"""Write standard input to ``$1`` (mode 0600, its folders 0700 where made), replacing it whole."""

SIGNALS = ("TERM", "KILL")

# What ssh prints when it refuses a server's host key (OpenSSH's wording, stable for decades).
_KEY_CHANGED = "REMOTE HOST IDENTIFICATION HAS CHANGED"
_KEY_REFUSED = "Host key verification failed."
_FINGERPRINT = re.compile(r"\b(SHA256:[A-Za-z0-9+/=]+)")
_OFFENDING = re.compile(r"Offending \S+ key in (\S+:\d+)")
_UNKNOWN = re.compile(r"No (\S+) host key is known for (\S+)")


def pin_options(host: Host) -> list[str]:
    """ssh options that make ``host.known_hosts`` the only authority on the server's key (none without it)."""
    if not host.known_hosts:
        return []
    # Global files could vouch for a key the runbook does not pin; UpdateHostKeys would write to the pin file.
    return ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={host.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no"]


def host_key_refusal(host: Host, stderr: str) -> str | None:
    """One line saying why ssh refused ``host``'s key, from ssh's stderr; None if it did not."""
    if _KEY_REFUSED not in stderr and _KEY_CHANGED not in stderr:
        return None
    pins = host.known_hosts or "your known_hosts files"
    where = f"host {host.name} ({host.address}): refused"
    if _KEY_CHANGED in stderr:
        offered = _FINGERPRINT.search(stderr)
        offending = _OFFENDING.search(stderr)
        return (f"{where}: its host key changed: it offers {offered.group(1) if offered else 'another key'}, "
                f"not the key pinned in {offending.group(1) if offending else pins}; "
                "if the server was reinstalled, check its new key out of band and replace that line")
    unknown = _UNKNOWN.search(stderr)
    if unknown:
        return f"{where}: no {unknown.group(1)} host key for {unknown.group(2)} in {pins}; add the server's key, checked out of band"
    return f"{where}: ssh could not verify its host key against {pins}"


@dataclass(frozen=True)
class Result:
    """What a host command did."""

    rc: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        """Exit status 0."""
        return self.rc == 0


class HostShell:
    """Runs argv lists (and this module's fixed sh programs) on one host, in its workdir."""

    def __init__(self, host: Host, *, connect_timeout: int = 5) -> None:
        self.host = host
        self.connect_timeout = connect_timeout

    def argv(self, argv: Sequence[str]) -> list[str]:
        """The local command line that runs ``argv`` on the host, in its workdir."""
        on_host = ["sh", "-c", IN_WORKDIR, "gtbus-host", self.host.workdir, *argv]
        a = self.host.address
        if self.host.local:
            return on_host
        if a.startswith("netns:"):
            return ["ip", "netns", "exec", a[len("netns:") :], *on_host]
        # The pins come before the runbook's options: ssh keeps the first value of an option.
        return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}", *pin_options(self.host),
                *self.host.ssh_options, "--", a, shlex.join(on_host)]

    @property
    def ssh(self) -> bool:
        """Whether commands reach this host through ssh."""
        return not self.host.local and not self.host.address.startswith("netns:")

    def run(self, argv: Sequence[str], *, timeout: float = 60.0, stdin: str | None = None) -> Result:
        """Run ``argv`` on the host (``stdin`` its input) and wait for it (ConfigError if ssh refuses the host's key)."""
        kh = self.host.known_hosts
        if self.ssh and kh and not os.path.isfile(kh):
            raise ConfigError(f"host {self.host.name} ({self.host.address}): known_hosts file {kh} (the runbook's pinned host keys) is missing")
        try:
            p = subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout, input=stdin)
        except subprocess.TimeoutExpired:
            return Result(124, "", f"timed out after {timeout:.0f}s")
        except FileNotFoundError as exc:
            raise ConfigError(f"host {self.host.name}: cannot run {exc.filename!r}") from None
        if self.ssh and p.returncode == 255:  # ssh's own failure (or the command's 255): keep the line that says why
            refusal = host_key_refusal(self.host, p.stderr)
            if refusal:
                raise ConfigError(refusal)
            lines = [x for x in p.stderr.splitlines() if x.strip()]
            return Result(p.returncode, p.stdout, lines[-1] if lines else "")
        return Result(p.returncode, p.stdout, p.stderr)

    def sh(self, program: str, *args: str, timeout: float = 60.0, stdin: str | None = None) -> Result:
        """Run one of this module's fixed sh programs with ``args`` as its positional parameters."""
        return self.run(["sh", "-c", program, "gtbus-sh", *args], timeout=timeout, stdin=stdin)

    def write_private(self, path: str, text: str) -> None:
        """Write ``text`` to ``path`` on the host, readable by its owner only; ConfigError (one line) if it cannot."""
        r = self.sh(WRITE_PRIVATE, path, timeout=30, stdin=text)
        if not r.ok:
            raise ConfigError(f"host {self.host.name}: could not write {path}: {(r.err or r.out).strip()[-200:]}")

    def spawn(self, argv: list[str], log: str) -> int:
        """Start ``argv`` detached (own session, output to ``log``); return its pid on the host."""
        r = self.sh(SPAWN, log, *argv, timeout=30)
        pid = r.out.strip().splitlines()[-1] if r.out.strip() else ""
        if not r.ok or not pid.isdigit():
            raise ConfigError(f"host {self.host.name}: could not start {argv[3] if len(argv) > 3 else argv[0]}: {r.err.strip() or r.out.strip()}")
        return int(pid)

    def alive(self, pid: int) -> bool:
        """Whether process ``pid`` still runs on the host."""
        return self.sh(ALIVE, str(int(pid))).ok

    def signal(self, pid: int, sig: str) -> bool:
        """Send a signal (TERM or KILL) to ``pid``'s process group; True if delivered."""
        if sig not in SIGNALS:
            raise ConfigError(f"signal {sig!r} is not one of {', '.join(SIGNALS)}")
        return self.sh(SIGNAL, sig, str(int(pid))).ok
