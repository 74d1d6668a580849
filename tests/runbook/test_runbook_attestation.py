"""Runbooks name the holders' attestation policy: [attestation] policy, passed as --attest-policy, checked on each host."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_runbook_gpus import good  # noqa: F401  (one prepared deployment for the runbook variants)

from gtbus.errors import ConfigError
from gtbus.messages.identity import Role
from gtbus.runbook.config import load_runbook
from gtbus.runbook.control import check, node_argv


def _with(good: Path, table: str) -> Path:
    rb = good.parent / f"attest-{abs(hash(table))}.toml"
    rb.write_text(good.read_text().replace("[hosts.this]\n", f"{table}\n\n[hosts.this]\n"))
    return rb


def test_the_policy_reaches_every_holder_and_only_holders(good: Path) -> None:
    rb = load_runbook(_with(good, '[attestation]\npolicy = "run/policy.toml"'))
    holder = rb.nodes_by_role(Role.HOLDER)[0]
    argv = node_argv(rb, holder, "00" * 32)
    assert argv[argv.index("--attest-policy") + 1] == "run/policy.toml"
    assert "--attest-policy" not in node_argv(rb, rb.orchestrator, "00" * 32)
    plain = load_runbook(good)
    assert plain.attest_policy == "" and "--attest-policy" not in node_argv(plain, plain.nodes_by_role(Role.HOLDER)[0], "00" * 32)


@pytest.mark.parametrize(("table", "words"), [
    ('[attestation]\nroots = ["x"]\npolicy = "p.toml"', r"\[attestation\]: unknown key 'roots' \(the policy's own keys go in its file\)"),
    ("[attestation]\npolicy = 3", r"\[attestation\]: policy must be a non-empty string"),
    ('[attestation]\nkind = "tdx"', r"\[attestation\]: missing key 'policy'"),
])
def test_bad_attestation_tables_are_named(good: Path, table: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_runbook(_with(good, table))


def test_check_names_a_policy_file_missing_on_a_holders_host(good: Path) -> None:
    rb = load_runbook(_with(good, '[attestation]\npolicy = "run/no-such-policy.toml"'))
    assert "node h1: attestation policy run/no-such-policy.toml missing or unreadable on host this" in check(rb, up=True)
    (good.parent / "run" / "policy.toml").write_text("# the holder parses it at start\n")
    assert not [p for p in check(load_runbook(_with(good, '[attestation]\npolicy = "run/policy.toml"')), up=True) if "attestation" in p]
