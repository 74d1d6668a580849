"""Real OpenSSH servers for tests: one ``sshd`` in each namespace of a :class:`NetnsLab`.

Each server runs Debian's ``/usr/sbin/sshd`` in the foreground (``-D -e``) with
a config and an Ed25519 host key of its own, listening only on its namespace's
address, port 22, key-only: one client key generated here is its only
authorized key. This machine (the root namespace) is the operator's: it holds
the client key and a ``known_hosts`` file that pins every server's host key,
written from the host keys' public halves (the out-of-band check an operator
makes), never learnt from the servers.

A server is ready when its sshd says "Server listening on": nothing here
sleeps. :meth:`SshdLab.close` stops every sshd (the namespaces' own cleanup
kills anything left).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from netns_lab import LabUnavailable, NetnsLab

SSHD = Path("/usr/sbin/sshd")
READY_WITHIN = 30.0  # an upper bound that turns a hung sshd into a failure, not a wait

# Key-only, root by key only (the tests run as root), no PAM (no login session machinery
# in a container). StrictModes off: the files live under /tmp, which is world-writable,
# and sshd's ownership walk would refuse them (the authorized key is still only ours).
CONFIG = """\
ListenAddress {addr}:22
HostKey {host_key}
PidFile none
AuthorizedKeysFile {authorized_keys}
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
"""


def require_sshd() -> None:
    """Raise :class:`LabUnavailable` unless OpenSSH's server and client are installed."""
    if not SSHD.is_file():
        raise LabUnavailable(f"{SSHD} is missing (apt-get install openssh-server)")
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise LabUnavailable(f"the {tool} command (openssh-client) is not installed")


def keygen(path: Path) -> str:
    """A fresh Ed25519 key pair at ``path`` (and ``path.pub``); returns its SHA256 fingerprint."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".pub").unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True, timeout=30)
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(path) + ".pub"], check=True, capture_output=True, text=True, timeout=30).stdout
    return out.split()[1]


@dataclass
class SshdLab:
    """An sshd in every server of ``lab``; files under ``folder``."""

    lab: NetnsLab
    folder: Path
    user: str = "root"
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def client_key(self) -> Path:
        """The operator's private key, authorized on every server."""
        return self.folder / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        """The pin file: one line per server, ``ADDRESS ssh-ed25519 KEY``."""
        return self.folder / "known_hosts"

    def host_key(self, server: str) -> Path:
        """``server``'s private host key."""
        return self.folder / server / "ssh_host_ed25519_key"

    def destination(self, server: str) -> str:
        """``user@address`` of ``server``."""
        return f"{self.user}@{self.lab.addr(server)}"

    def start(self) -> "SshdLab":
        """Keys, configs, one sshd per server (each ready), and the known_hosts pinning them all."""
        require_sshd()
        # sshd's privilege separation directory; Debian's service unit makes it, a container may lack it.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        keygen(self.client_key)
        authorized = self.folder / "authorized_keys"
        authorized.write_text(self.client_key.with_name(self.client_key.name + ".pub").read_text())
        for server in self.lab.servers:
            (self.folder / server).mkdir(exist_ok=True)
            self.fingerprints[server] = keygen(self.host_key(server))
            config = self.folder / server / "sshd_config"
            config.write_text(CONFIG.format(addr=self.lab.addr(server), host_key=self.host_key(server), authorized_keys=authorized))
            self._run_sshd(server)
        self.pin_all()
        return self

    def pin_all(self) -> None:
        """Write known_hosts from every server's current public host key."""
        self.known_hosts.write_text("".join(self.pin_line(s) for s in self.lab.servers))

    def pin_line(self, server: str) -> str:
        """The known_hosts line of ``server``'s current host key."""
        kind, key = self.host_key(server).with_name("ssh_host_ed25519_key.pub").read_text().split()[:2]
        return f"{self.lab.addr(server)} {kind} {key}\n"

    def rekey(self, server: str) -> str:
        """Give ``server`` a new host key (as a reinstall would) and restart its sshd; returns the new fingerprint."""
        self._stop(server)
        self.fingerprints[server] = keygen(self.host_key(server))
        self._run_sshd(server)
        return self.fingerprints[server]

    def _run_sshd(self, server: str) -> None:
        config = self.folder / server / "sshd_config"
        p = subprocess.Popen(["ip", "netns", "exec", self.lab.ns(server), str(SSHD), "-D", "-e", "-f", str(config)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.procs[server] = p
        said: list[str] = []
        ready = threading.Event()

        def read() -> None:  # sshd logs to stderr for its whole life: keep draining it
            assert p.stderr is not None
            for line in p.stderr:
                said.append(line)
                if "Server listening on" in line:
                    ready.set()
            ready.set()  # it exited

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(READY_WITHIN) or not any("Server listening on" in x for x in said):
            raise RuntimeError(f"sshd on {server} did not start: {''.join(said).strip()[-500:]}")

    def _stop(self, server: str) -> None:
        p = self.procs.pop(server, None)
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def pids(self) -> set[int]:
        """The sshd processes' ids (their listeners; sessions are children of these)."""
        return {int(p.pid) for p in self.procs.values() if p.poll() is None}

    def close(self) -> None:
        """Stop every sshd (idempotent)."""
        for server in list(self.procs):
            self._stop(server)
