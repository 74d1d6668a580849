"""``[deployment] known_hosts``: what the runbook pins reaches ssh as written, and nothing in the runbook loosens it.

These need no server: the schema, the ssh command line, and a pin file that is
missing (refused before ssh runs). tests/multihost/test_runbook_sshd.py checks
the same pins against real sshd servers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gtbus.errors import ConfigError
from gtbus.runbook.config import load_runbook
from gtbus.runbook.hosts import HostShell

RUNBOOK = """\
[deployment]
name = "pins"
run_dir = "run"
keys = "keys"
{known_hosts}

[pins]
platform_pub = "platform.pub"

[hosts.far]
address = "trainer@192.0.2.10"
workdir = "/srv/gtbus"
ssh_options = {ssh_options}

[hosts.lab]
address = "netns:lab1"

[hosts.here]
address = "local"

[nodes.orch]
role = "orchestrator"
host = "far"
key = "keys/orch.key"
platform_key = "platform.key"
router = "tcp://192.0.2.10:7700"
pub = "tcp://192.0.2.10:7701"

[nodes.h1]
role = "holder"
host = "far"
key = "keys/h1.key"
data = ["data.bin"]
"""


def _write(folder: Path, known_hosts: str | None = '"known_hosts"', ssh_options: str = '["-o", "ServerAliveInterval=15"]') -> Path:
    p = folder / "deploy.toml"
    p.write_text(RUNBOOK.format(known_hosts=f"known_hosts = {known_hosts}" if known_hosts is not None else "", ssh_options=ssh_options))
    return p


def test_the_pin_file_is_found_beside_the_runbook_and_given_to_ssh_hosts_only(tmp_path: Path) -> None:
    rb = load_runbook(_write(tmp_path))
    assert rb.hosts["far"].known_hosts == str(tmp_path / "known_hosts")
    assert rb.hosts["lab"].known_hosts == rb.hosts["here"].known_hosts == ""
    argv = HostShell(rb.hosts["far"]).argv(["true"])
    dashdash = argv.index("--")
    options = argv[1:dashdash]
    # Strict, that file alone (no global file vouching), never written to; before the runbook's own options.
    pins = ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no"]
    start = options.index("StrictHostKeyChecking=yes") - 1
    assert options[start:start + len(pins)] == pins and options[-2:] == ["-o", "ServerAliveInterval=15"]
    assert argv[dashdash + 1] == "trainer@192.0.2.10"
    # Without known_hosts, ssh keeps its own files (and BatchMode refuses what they do not know).
    plain = load_runbook(_write(tmp_path, known_hosts=None)).hosts["far"]
    assert plain.known_hosts == "" and not any("KnownHostsFile" in a for a in HostShell(plain).argv(["true"]))


def test_an_absolute_pin_file_is_kept(tmp_path: Path) -> None:
    rb = load_runbook(_write(tmp_path, known_hosts='"/etc/gtbus/known_hosts"'))
    assert rb.hosts["far"].known_hosts == "/etc/gtbus/known_hosts"


@pytest.mark.parametrize("option", ["StrictHostKeyChecking=no", "stricthostkeychecking accept-new", "UserKnownHostsFile=/dev/null",
                                    "UserKnownHostsFile /tmp/other"])
def test_ssh_options_cannot_loosen_the_pins(tmp_path: Path, option: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_runbook(_write(tmp_path, ssh_options=f'["-o", "{option}"]'))
    lines = str(exc.value).splitlines()
    assert len(lines) == 1 and "[hosts.far]: ssh_options: -o" in lines[0] and "conflicts with [deployment] known_hosts" in lines[0], lines
    # Without pins the same option is the operator's choice, as before.
    load_runbook(_write(tmp_path, known_hosts=None, ssh_options=f'["-o", "{option}"]'))


@pytest.mark.parametrize("value", ['"my hosts"', '"hosts%h"', '"~/hosts"', '"a#b"', '"a\\"b"', "'a\\b'", '"a\\nb"', '""', "7", "[\"x\"]"])
def test_a_pin_path_ssh_would_read_otherwise_is_refused_in_one_line(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_runbook(_write(tmp_path, known_hosts=value))
    lines = str(exc.value).splitlines()
    assert len(lines) == 1 and "[deployment]: " in lines[0] and "known_hosts" in lines[0], lines


def test_a_missing_pin_file_refuses_the_host_before_ssh_runs(tmp_path: Path) -> None:
    rb = load_runbook(_write(tmp_path))
    with pytest.raises(ConfigError, match=r"^host far \(trainer@192\.0\.2\.10\): known_hosts file \S+/known_hosts \(the runbook's pinned host keys\) is missing$"):
        HostShell(rb.hosts["far"]).run(["true"])
    # `runbook check`: that one line for the host, nothing tried on it (its nodes not checked), no traceback.
    # (The other two hosts of this runbook do not exist either: each has its own line.)
    r = subprocess.run([sys.executable, "-m", "gtbus", "runbook", "check", str(tmp_path / "deploy.toml")],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[0] == f"host far (trainer@192.0.2.10): known_hosts file {tmp_path / 'known_hosts'} (the runbook's pinned host keys) is missing", r.stderr
    assert [x.split(" ")[:2] for x in lines[1:]] == [["host", "lab"], ["host", "here"]], r.stderr
