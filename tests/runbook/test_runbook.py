"""Runbooks on one machine: check finds each problem in one line; up, status, down run a deployment."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gtbus.errors import ConfigError
from gtbus.nodes.launcher import free_port
from gtbus.runbook.config import load_runbook

pytestmark = pytest.mark.slow


def _gtbus(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gtbus", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _free_port() -> int:
    return free_port()  # outside the ephemeral range: no outgoing connection can take it meanwhile


def _prepare(tmp: Path, holders: int = 2) -> Path:
    run = tmp / "run"
    assert _gtbus("keygen", "orch", "--role", "orchestrator", "--out", str(run / "keys")).returncode == 0
    for i in range(1, holders + 1):
        assert _gtbus("keygen", f"h{i}", "--role", "holder", "--out", str(run / "keys")).returncode == 0
    assert _gtbus("keygen", "status", "--role", "observer", "--out", str(run / "keys")).returncode == 0
    assert _gtbus("keygen", "platform", "--platform", "--out", str(run / "platform")).returncode == 0
    r = _gtbus("data", "build", "--demo-corpus", "--holders", str(holders), "--bytes-per-holder", "65536", "--out", str(run / "data"))
    assert r.returncode == 0, r.stderr
    nodes = "".join(
        f'\n[nodes.h{i}]\nrole = "holder"\nhost = "this"\nkey = "run/keys/h{i}.key"\ndata = ["run/data/holder{i - 1:02d}.bin"]\n'
        for i in range(1, holders + 1)
    )
    text = f"""
[deployment]
name = "t{os.getpid()}"
run_dir = "run"
keys = "run/keys"
backend = "host"

[training]
rounds = 1
chunk_tokens = 16384
steps = "per:4096"
lease = 10.0
checkpoint_every = 2

[pins]
code = "auto"
platform_pub = "run/platform/platform.platform.pub"

[hosts.this]
address = "local"
workdir = "{tmp}"
python = "{sys.executable}"

[nodes.orch]
role = "orchestrator"
host = "this"
key = "run/keys/orch.key"
platform_key = "run/platform/platform.platform.key"
router = "tcp://127.0.0.1:{_free_port()}"
pub = "tcp://127.0.0.1:{_free_port()}"

[nodes.status]
role = "observer"
host = "this"
key = "run/keys/status.key"
{nodes}"""
    path = tmp / "rb.toml"
    path.write_text(text)
    return path


def test_check_up_status_down(tmp_path: Path) -> None:
    rb = _prepare(tmp_path)
    r = _gtbus("runbook", "check", str(rb))
    assert r.returncode == 0, r.stderr
    r = _gtbus("runbook", "up", str(rb))
    assert r.returncode == 0, r.stderr
    try:
        r = _gtbus("runbook", "status", str(rb), "--watch", "--json", timeout=180)
        assert r.returncode == 0, r.stderr
        lines = [json.loads(x) for x in r.stdout.splitlines()]
        procs = lines[0]["processes"]
        assert {p["name"] for p in procs} == {"orch", "h1", "h2"}
        assert lines[-1]["complete"] is True and lines[-1]["hops_trained"] >= 2
        summary_path = tmp_path / "run" / "summary.json"
        for _ in range(600):  # written when the orchestrator exits, just after the run completes
            if summary_path.exists():
                break
            time.sleep(0.1)
        summary = json.loads(summary_path.read_text())
        assert summary["hops_trained"] == lines[-1]["hops_trained"]
    finally:
        d = _gtbus("runbook", "down", str(rb), "--grace", "3")
    assert d.returncode == 0, d.stderr
    assert not (rb.parent / ".state").joinpath(load_runbook(rb).name + ".json").exists()
    r = _gtbus("runbook", "status", str(rb))
    assert r.returncode != 0 and "is not up" in r.stderr
    assert _gtbus("replay", "--verify", str(tmp_path / "run" / "logs")).returncode == 0


def test_down_kills_a_node_that_ignores_sigterm(tmp_path: Path) -> None:
    rb = _prepare(tmp_path, holders=1)
    assert _gtbus("runbook", "up", str(rb)).returncode == 0
    state = json.loads((tmp_path / ".state" / f"{load_runbook(rb).name}.json").read_text())
    pid = state["nodes"]["h1"]["pid"]
    os.kill(pid, 19)  # SIGSTOP: SIGTERM stays pending, so only the SIGKILL after the grace period ends it
    t0 = time.monotonic()
    r = _gtbus("runbook", "down", str(rb), "--grace", "2")
    assert r.returncode == 0, r.stderr
    assert "killed h1" in r.stdout
    assert time.monotonic() - t0 >= 2
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)


def test_check_reports_each_problem_in_one_line(tmp_path: Path) -> None:
    rb = _prepare(tmp_path)
    os.chmod(tmp_path / "run" / "keys" / "h1.key", 0o644)
    (tmp_path / "run" / "keys" / "h2.pub").unlink()
    (tmp_path / "run" / "data" / "holder01.bin").unlink()
    blocker = socket.socket()
    orch = load_runbook(rb).orchestrator
    port = int(orch.router.rsplit(":", 1)[1])
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        r = _gtbus("runbook", "check", str(rb))
    finally:
        blocker.close()
    assert r.returncode == 1
    err = r.stderr
    assert "h1: secret key run/keys/h1.key has mode 644" in err
    assert "public key run/keys/h2.pub missing" in err
    assert "data file run/data/holder01.bin missing" in err
    assert f"cannot bind {orch.router}" in err
    assert "Traceback" not in err


def test_schema_problems_are_listed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[deployment]\nname = "x"\nrun_dir = "r"\nkeys = "k"\nbackend = "tpu"\n[pins]\nplatform_pub = "p"\n[hosts.a]\naddress = "local"\n'
                   '[nodes.o]\nrole = "orchestrator"\nhost = "nowhere"\nkey = "k"\nrouter = "udp://x"\npub = "tcp://127.0.0.1:1"\n[nodes.h]\nrole = "wizard"\nhost = "a"\nkey = "k"\n')
    with pytest.raises(ConfigError) as exc:
        load_runbook(bad)
    msg = str(exc.value)
    for expect in ("backend must be host or cupy", "host 'nowhere' is not in [hosts]", "must look like tcp://HOST:PORT", "role must be one of", "needs platform_key", "no holder"):
        assert expect in msg
    r = _gtbus("runbook", "check", str(bad))
    assert r.returncode == 1 and "problem(s)" in r.stderr
    (tmp_path / "broken.toml").write_text("[deployment\n")
    r = _gtbus("runbook", "check", str(tmp_path / "broken.toml"))
    assert r.returncode == 1 and "not valid TOML" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("line, words", [
    ('steps = "per:0"', "steps must be 'pass', a number of steps per hop, or 'per:N'"),
    ('steps = "each:5"', "steps must be 'pass', a number of steps per hop, or 'per:N'"),
    ('steps = "-3"', "steps must be 'pass', a number of steps per hop, or 'per:N'"),
    ("checkpoint_every = 0", "checkpoint_every must be a positive integer"),
    ("checkpoint_every = true", "checkpoint_every must be a positive integer"),
])
def test_training_budget_values_are_checked(tmp_path: Path, line: str, words: str) -> None:
    good = _prepare(tmp_path, holders=1)
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("[training]\n", f"[training]\n{line}\n").replace('steps = "per:4096"\n', "" if "steps" in line else 'steps = "per:4096"\n')
                   .replace("checkpoint_every = 2\n", "" if "checkpoint_every" in line else "checkpoint_every = 2\n"))
    with pytest.raises(ConfigError, match=words):
        load_runbook(bad)
