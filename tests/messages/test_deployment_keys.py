"""A deployment's keys on disk: every node's key pair, private key files, a roster that loads back."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gtbus.messages.deployment_keys import make_deployment
from gtbus.messages.identity import Role, Roster, load_identity


def test_every_node_gets_a_private_key_and_a_public_one(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path / "keys", holders=2, agents=1)
    names = {"orch": Role.ORCHESTRATOR, "h1": Role.HOLDER, "h2": Role.HOLDER, "status": Role.OBSERVER, "agent1": Role.AGENT}
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == sorted(f"{n}.{ext}" for n in names for ext in ("key", "pub"))
    roster = Roster.from_dir(tmp_path / "keys")
    for name, role in names.items():
        assert stat.S_IMODE(os.stat(dep.key_path(name)).st_mode) == 0o600
        identity = load_identity(dep.key_path(name))
        assert identity.role is role and roster[name].role is role
    assert {m.name for m in dep.roster.by_role(Role.HOLDER)} == {"h1", "h2"}


def test_a_second_deployment_replaces_the_keys(tmp_path: Path) -> None:
    first = make_deployment(tmp_path, holders=1)
    second = make_deployment(tmp_path, holders=1)
    assert load_identity(second.key_path("h1")).public == second.holders[0].public != first.holders[0].public
