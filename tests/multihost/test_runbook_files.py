"""The runbooks shipped in runbooks/ are valid deployments, not just examples that drifted."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gtbus.messages.identity import Role
from gtbus.runbook.config import load_runbook

RUNBOOKS = sorted((Path(__file__).resolve().parents[2] / "runbooks").glob("*.toml"))


def test_the_shipped_runbooks_are_found() -> None:
    assert {p.name for p in RUNBOOKS} >= {"local.toml", "three-servers.toml", "netns-lab.toml"}


def test_unset_variables_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from gtbus.errors import ConfigError

    for k in LAB_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError) as exc:
        load_runbook(next(p for p in RUNBOOKS if p.name == "netns-lab.toml"))
    assert "hosts.gpu.address: environment variable GTBUS_LAB_GPU_NS is not set" in str(exc.value)


LAB_ENV = {  # what tests/multihost/test_netns_deployment.py sets for runbooks/netns-lab.toml
    "GTBUS_LAB_NAME": "lab", "GTBUS_LAB_GPU_NS": "gpu", "GTBUS_LAB_HOLA_NS": "hola", "GTBUS_LAB_HOLB_NS": "holb",
    "GTBUS_LAB_GPU_ADDR": "10.77.1.1", "GTBUS_LAB_DIR": "/tmp", "GTBUS_PYTHON": sys.executable,
}


@pytest.mark.parametrize("path", RUNBOOKS, ids=lambda p: p.name)
def test_runbook_loads_and_its_holders_can_reach_the_device(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in LAB_ENV.items():
        monkeypatch.setenv(k, v)
    rb = load_runbook(path)  # raises ConfigError listing every schema problem
    orch = rb.orchestrator
    holders = rb.nodes_by_role(Role.HOLDER)
    assert holders
    if rb.training["mode"] == "travel":
        for h in holders:
            # A holder on another server cannot map the GPU host's staging: it must write
            # through a device agent that runs beside the orchestrator.
            if h.host != orch.host:
                assert h.agent, f"{path.name}: holder {h.name} is on {h.host}, not the GPU host {orch.host}, and names no agent"
            if h.agent:
                assert rb.nodes[h.agent].host == orch.host, f"{path.name}: agent {h.agent} must run on the GPU host"


def test_three_servers_binds_every_interface_and_pins_a_measurement() -> None:
    rb = load_runbook(next(p for p in RUNBOOKS if p.name == "three-servers.toml"))
    assert rb.orchestrator.bind_router == "tcp://0.0.0.0:7700"
    assert re.fullmatch(r"[0-9a-f]{64}", rb.pin_code)
    assert all(not h.local for name, h in rb.hosts.items() if name != "console")
    assert {rb.hosts[n.host].address for n in rb.nodes_by_role(Role.HOLDER)} == {
        "trainer@holder-a.example.internal",
        "trainer@holder-b.example.internal",
    }


def test_local_runbook_check_reports_only_missing_files(tmp_path: Path) -> None:
    """In an empty working folder, `check` finds the host fine and only lists files to prepare."""
    py = tmp_path / ".venv" / "bin" / "python"  # the runbook's python: this one
    py.parent.mkdir(parents=True)
    py.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    py.chmod(0o755)
    r = subprocess.run([sys.executable, "-m", "gtbus", "runbook", "check", str(RUNBOOKS[0].parent / "local.toml")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines and "Traceback" not in r.stderr and "problem(s)" not in r.stderr
    allowed = re.compile(
        r"node \S+: (secret key|platform key|pinned platform public key|data file) \S+ missing or unreadable on host this"
        r"|node \S+: public key \S+ missing on host this"
        r"|node orch: cannot bind tcp://127\.0\.0\.1:770[01]: .*"  # something else listens there right now
    )
    for line in lines:
        assert allowed.fullmatch(line), line
    assert any("data file runs/local/data/holder00.bin" in line for line in lines)
