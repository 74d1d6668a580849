"""Runbooks never build shell strings from values (class 8).

Each hostile value sits in a real runbook file and goes through the real
``gtbus runbook check`` and ``up`` processes. A value the schema refuses gives
one ``Error:`` line naming its table and key, and nothing runs: the canary
file a shell injection would create does not exist and no file appears
outside ``.state``. Values the schema lets through (paths, workdirs) are argv
entries, so they reach the host as one argument each; that is checked by
running them, here and through the quoting a remote login shell undoes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gtbus.cli.main import main
from gtbus.errors import ConfigError
from gtbus.runbook.config import Host, load_runbook
from gtbus.runbook.control import state_path
from gtbus.runbook.hosts import IN_WORKDIR, HostShell
from gtbus.training import TRAINER_NAMES

CANARY = "CANARY"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")  # JSON string escapes are TOML basic-string escapes (TOML escapes DEL too)


def _toml(tables: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, t in tables.items():
        out.append(f"[{name}]")
        out += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in t.items()]
        out.append("")
    return "\n".join(out)


def _runbook(tmp: Path, extra: str = "", **overrides: Any) -> Path:
    """A valid one-machine runbook in ``tmp/deep/rb.toml``.

    ``overrides`` maps "table.key" to a value, or a table to None (dropped);
    ``extra`` is TOML appended as written.
    """
    canary = tmp / CANARY
    tables: dict[str, dict[str, Any]] = {
        "deployment": {"name": "hostile", "run_dir": "run", "keys": "run/keys", "backend": "host"},
        "training": {"rounds": 1, "chunk_tokens": 4096, "steps": "1", "lease": 5.0},
        "pins": {"code": "0" * 64, "platform_pub": "run/platform/platform.platform.pub"},
        "hosts.this": {"address": "local", "workdir": str(tmp), "python": sys.executable},
        "nodes.orch": {"role": "orchestrator", "host": "this", "key": "run/keys/orch.key", "platform_key": "run/platform/p.key",
                       "router": "tcp://127.0.0.1:1", "pub": "tcp://127.0.0.1:2"},
        "nodes.h1": {"role": "holder", "host": "this", "key": "run/keys/h1.key", "data": ["run/data/h1.bin"]},
    }
    for dotted, value in overrides.items():
        table, _, key = dotted.rpartition(".")
        if value is None:
            del tables[dotted]
        else:
            tables.setdefault(table, {})[key] = value.replace("{canary}", str(canary)) if isinstance(value, str) else value
    path = tmp / "deep" / "rb.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_toml(tables) + extra)
    return path


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _gtbus(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gtbus", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


_ESCAPING_HOST = f'[hosts."../x"]\naddress = "local"\npython = "{sys.executable}"\n'

# (override, the field the one error line must name)
REFUSED = {
    "python-with-command": ({"hosts.this.python": sys.executable + "; touch {canary}"}, "[hosts.this]: python"),
    "python-substitution": ({"hosts.this.python": "$(touch {canary})"}, "[hosts.this]: python"),
    "python-backticks": ({"hosts.this.python": "`touch {canary}`"}, "[hosts.this]: python"),
    "python-as-option": ({"hosts.this.python": "-c"}, "[hosts.this]: python"),
    "python-with-space": ({"hosts.this.python": "/usr/bin/env touch {canary}"}, "[hosts.this]: python"),
    "trainer-with-command": ({"deployment.trainer": "bytelm; touch {canary}"}, "[deployment]: trainer"),
    "trainer-unknown": ({"deployment.trainer": "resnet"}, "[deployment]: trainer"),
    "name-escapes-state": ({"deployment.name": "../../escaped"}, "[deployment]: name"),
    "name-absolute": ({"deployment.name": "/tmp/escaped"}, "[deployment]: name"),
    "name-with-newline": ({"deployment.name": "a\nb"}, "[deployment]: name"),
    "address-as-ssh-option": ({"hosts.this.address": "-oProxyCommand=touch {canary}"}, "[hosts.this]: address"),
    "address-with-space": ({"hosts.this.address": "user@server touch {canary}"}, "[hosts.this]: address"),
    "netns-as-option": ({"hosts.this.address": "netns:-all"}, "[hosts.this]: address"),
    "ssh-proxycommand": ({"hosts.this.ssh_options": ["-oProxyCommand=touch {canary}"]}, "[hosts.this]: ssh_options"),
    "ssh-localcommand": ({"hosts.this.ssh_options": ["-o", "LocalCommand touch {canary}"]}, "[hosts.this]: ssh_options"),
    "ssh-unknown-flag": ({"hosts.this.ssh_options": ["-G"]}, "[hosts.this]: ssh_options"),
    # Found in review: a quoted keyword is the keyword to ssh, some keys load code, -F brings a whole config.
    "ssh-quoted-proxycommand": ({"hosts.this.ssh_options": ["-o", '"ProxyCommand" touch {canary}']}, "[hosts.this]: ssh_options"),
    "ssh-pkcs11-provider": ({"hosts.this.ssh_options": ["-o", "PKCS11Provider=/tmp/x.so"]}, "[hosts.this]: ssh_options"),
    "ssh-config-file": ({"hosts.this.ssh_options": ["-F", "/tmp/evil_config"]}, "[hosts.this]: ssh_options"),
    "ssh-value-as-option": ({"hosts.this.ssh_options": ["-i", "-oProxyCommand=x"]}, "[hosts.this]: ssh_options"),
    "host-name-escapes": ({"hosts.this": None, "nodes.orch.host": "../x", "nodes.h1.host": "../x", "extra": _ESCAPING_HOST}, "[hosts.../x]"),
    "extra-args-string": ({"nodes.h1.extra_args": "--fault"}, "[nodes.h1]: extra_args"),
    "raw-string": ({"nodes.h1.raw": "false"}, "[nodes.h1]: raw"),
    "unknown-host-key": ({"hosts.this.pyhton": "/usr/bin/python3"}, "[hosts.this]: unknown key 'pyhton'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_hostile_value_is_one_error_line_and_nothing_runs(tmp_path: Path, case: str) -> None:
    overrides, field = REFUSED[case]
    rb = _runbook(tmp_path, **overrides)
    before = _tree(tmp_path)
    # Each command through the real CLI; the first three cases also as their own processes.
    in_process = case not in ("python-with-command", "trainer-with-command", "name-escapes-state")
    for command in ("check", "up", "status", "down"):
        if in_process:
            r = CliRunner().invoke(main, ["runbook", command, str(rb)])
            rc, err = r.exit_code, r.stderr
        else:
            p = _gtbus("runbook", command, str(rb), cwd=tmp_path)
            rc, err = p.returncode, p.stderr
        lines = err.strip().splitlines()
        assert rc == 1, (command, err)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and field in lines[0], (command, err)
    assert not (tmp_path / CANARY).exists()
    assert not (tmp_path.parent / "escaped.json").exists()
    assert _tree(tmp_path) == before  # no state file, no log, no run folder: nothing started


def test_the_shipped_runbooks_pass_the_stricter_schema() -> None:
    """The new rules refuse only what could be a mistake or an attack, not the documented examples."""
    env = {"GTBUS_LAB_NAME": "lab", "GTBUS_LAB_GPU_NS": "gpu", "GTBUS_LAB_HOLA_NS": "hola", "GTBUS_LAB_HOLB_NS": "holb",
           "GTBUS_LAB_GPU_ADDR": "10.77.1.1", "GTBUS_LAB_DIR": "/tmp", "GTBUS_PYTHON": sys.executable}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for p in sorted((Path(__file__).resolve().parents[2] / "runbooks").glob("*.toml")):
            load_runbook(p)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


SHELL_TEXT = "$(touch {canary}); `touch {canary}` && touch {canary} | '\"\n-x"


def test_paths_and_workdir_reach_the_host_as_one_argument(tmp_path: Path) -> None:
    """Values the schema allows free-form (key, data and workdir paths) are never parsed by a shell."""
    hostile = SHELL_TEXT.replace("{canary}", str(tmp_path / CANARY))
    rb = _runbook(tmp_path, **{"nodes.h1.key": hostile, "nodes.h1.data": [hostile, "-rf"]})
    r = _gtbus("runbook", "check", str(rb), cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"node h1: secret key {hostile} missing or unreadable" in r.stderr
    assert not (tmp_path / CANARY).exists()

    rb = _runbook(tmp_path, **{"hosts.this.workdir": hostile})
    r = _gtbus("runbook", "check", str(rb), cwd=tmp_path)
    assert r.returncode == 1 and "host this (local): unreachable" in r.stderr
    assert not (tmp_path / CANARY).exists()
    assert not (state_path(load_runbook(rb))).exists()


def test_a_hand_built_host_cannot_inject_either(tmp_path: Path) -> None:
    """Defence in depth: a Host that skipped the schema still runs its python as one argv entry."""
    canary = tmp_path / CANARY
    host = Host("h", "local", str(tmp_path), python=f"{sys.executable}; touch {canary}")
    r = HostShell(host).run([host.python, "-c", "import gtbus"])
    assert not r.ok and not canary.exists()
    hostile = SHELL_TEXT.replace("{canary}", str(canary))
    write_argv = "import os, sys; open('a.tmp', 'w').write(repr(sys.argv[1:])); os.replace('a.tmp', 'argv.txt')"
    pid = HostShell(Host("h", "local", str(tmp_path))).spawn([sys.executable, "-c", write_argv, hostile], f"logs/{hostile[:2]}.out")
    assert pid > 1
    deadline = time.monotonic() + 60  # an upper bound that turns a hang into a failure, not a window
    while not (tmp_path / "argv.txt").exists():
        assert time.monotonic() < deadline, "the spawned process never wrote its argv"
        time.sleep(0.02)
    assert (tmp_path / "argv.txt").read_text() == repr([hostile])
    assert not canary.exists()


def test_ssh_gets_an_option_free_destination_and_a_quoted_remote_command(tmp_path: Path) -> None:
    """``--`` ends ssh's options; the remote login shell's parse of the command gives back the exact argv."""
    canary = tmp_path / CANARY
    hostile = SHELL_TEXT.replace("{canary}", str(canary))
    host = Host("h", f"-oProxyCommand=touch {canary}", str(tmp_path), ssh_options=("-o", "ServerAliveInterval=15"))
    argv = HostShell(host).argv(["sh", "-c", 'printf %s "$1" > got', "x", hostile])
    dashdash = argv.index("--")
    assert argv[dashdash + 1] == host.address and argv[dashdash - 2:dashdash] == ["-o", "ServerAliveInterval=15"]
    remote = argv[-1]
    assert shlex.split(remote) == ["sh", "-c", IN_WORKDIR, "gtbus-host", str(tmp_path), "sh", "-c", 'printf %s "$1" > got', "x", hostile]
    # What the remote login shell does with that string: run it with a real sh here.
    subprocess.run(["sh", "-c", remote], check=True, timeout=30)
    assert (tmp_path / "got").read_text() == hostile and not canary.exists()
    # And ssh itself reads the hostile destination as a host name, never as -oProxyCommand.
    r = HostShell(host).run(["true"], timeout=30)
    assert not r.ok and not canary.exists()


@pytest.mark.parametrize("nodes", [{"orch": {"pid": -1, "role": "orchestrator", "host": "this"}},
                                   {"orch": {"pid": 1, "role": "orchestrator", "host": "this"}},
                                   {"orch": {"pid": "1; touch x", "role": "orchestrator", "host": "this"}},
                                   {"orch": "nope"}, []])
def test_a_crafted_state_file_signals_nothing(tmp_path: Path, nodes: Any) -> None:
    """``down`` of pid -1 would be kill(-1): every process of the user. A state file is checked first."""
    rb = _runbook(tmp_path)
    p = state_path(load_runbook(rb))
    p.parent.mkdir()
    p.write_text(json.dumps({"name": "hostile", "nodes": nodes}))
    for command in ("status", "down"):
        if nodes and isinstance(nodes, dict) and nodes["orch"] != "nope" and nodes["orch"]["pid"] == -1:
            proc = _gtbus("runbook", command, str(rb), cwd=tmp_path)  # the dangerous one as its own process too
            rc, err = proc.returncode, proc.stderr
        else:
            r = CliRunner().invoke(main, ["runbook", command, str(rb)])
            rc, err = r.exit_code, r.stderr
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and "state file does not name nodes" in lines[0], err
    assert p.exists()  # left for the operator to look at


def test_state_path_refuses_an_escaping_name_even_unvalidated(tmp_path: Path) -> None:
    import dataclasses

    rb = dataclasses.replace(load_runbook(_runbook(tmp_path)), name="../../x")
    with pytest.raises(ConfigError, match="outside"):
        state_path(rb)


# -- every value, any text -------------------------------------------------------------------------

_FIELDS = {  # runbook key -> (the field the one error line names, what an accepted value must satisfy)
    "hosts.this.python": ("[hosts.this]: python", lambda v: not v.startswith("-") and not any(c.isspace() or c in "$`;&|'\"\\" for c in v)),
    "hosts.this.address": ("[hosts.this]: address", lambda v: not v.startswith("-") and not v.startswith("netns:-") and not any(c.isspace() for c in v)),
    "deployment.name": ("[deployment]: name", lambda v: re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", v) is not None),
    "deployment.trainer": ("[deployment]: trainer", lambda v: v in TRAINER_NAMES),
}
_hostile_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=24) | st.sampled_from(
    ["-oProxyCommand=x", "../../x", "a b", "$(id)", "`id`", "x;y", "netns:-all", "-", "bytelm\n", "/usr/bin/python3", "user@host"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(_FIELDS)), value=_hostile_text)
def test_any_text_is_refused_in_one_line_naming_its_field_or_is_safe(tmp_path: Path, key: str, value: str) -> None:
    field, safe = _FIELDS[key]
    rb = _runbook(tmp_path, **{key: value})
    try:
        load_runbook(rb)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        assert len(lines) == 1 and field in lines[0], str(exc)
        return
    assert safe(value), f"{key} = {value!r} was accepted"


@settings(max_examples=200, deadline=None)
@given(workdir=_hostile_text, argv=st.lists(_hostile_text, min_size=1, max_size=4), address=_hostile_text)
def test_the_remote_command_always_parses_back_to_the_argv(workdir: str, argv: list[str], address: str) -> None:
    """Whatever the values (even a hand-built Host no schema checked), ssh sees one quoted command after ``-- DEST``."""
    ssh = HostShell(Host("h", "user@" + address if not address.startswith("netns:") else address + "x", workdir)).argv(argv)
    if ssh[0] != "ssh":
        return  # a netns or local address: no remote shell in between
    assert ssh[-3] == "--" and ssh[-2].startswith("user@")
    assert shlex.split(ssh[-1]) == ["sh", "-c", IN_WORKDIR, "gtbus-host", workdir, *argv]
