"""Runbooks give the holders' attestation policy: inline in [attestation] (written into each holder's run dir by
`up`), or a policy file on each holder's host ([attestation] policy); either way passed as --attest-policy."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_runbook_gpus import good  # noqa: F401  (one prepared deployment for the runbook variants)

from gtbus.attest.policy import load_policy
from gtbus.errors import ConfigError
from gtbus.messages.identity import Role
from gtbus.runbook.config import Host, load_runbook
from gtbus.runbook.control import check, down, node_argv, up
from gtbus.runbook.hosts import HostShell

ROOT = "run/platform/platform.platform.pub"


def _inline(pin: str, extra: str = "") -> str:
    return f'[attestation]\nkind = "emulated"\nroots = ["{ROOT}"]\n{extra}\n[attestation.pinned]\ncode = "{pin}"\n'


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


def test_an_inline_policy_is_read_here_and_passed_as_the_file_up_writes(good: Path) -> None:
    rb = load_runbook(_with(good, _inline("ab" * 32)))
    assert rb.attestation is not None and rb.attestation.policy.pinned == {"code": bytes.fromhex("ab" * 32)}
    assert rb.attestation.policy.roots == [bytes.fromhex((good.parent / ROOT).read_text())]
    argv = node_argv(rb, rb.nodes_by_role(Role.HOLDER)[1], "00" * 32)
    assert argv[argv.index("--attest-policy") + 1] == "run/h2.attest-policy.toml"
    assert "--attest-policy" not in node_argv(rb, rb.orchestrator, "00" * 32)
    assert not [p for p in check(rb, up=True) if "attestation" in p]
    absent = load_runbook(_with(good, _inline("ab" * 32, 'bundle = "/nonexistent/attest-bundle"')))
    assert "node h1: attestation bundle /nonexistent/attest-bundle missing or unreadable on host this" in check(absent, up=True)


@pytest.mark.parametrize(("table", "words"), [
    ('[attestation]\nroots = ["x"]\npolicy = "p.toml"',
     r"\[attestation\]: policy names a policy file, so the policy's own keys cannot be here too \(roots\): keep one of the two forms$"),
    ("[attestation]\npolicy = 3", r"\[attestation\]: policy must be a non-empty string$"),
    ('[attestation]\nkind = "tdx"', r"\[attestation\]: roots must be a non-empty list"),
    ('[attestation]\ncolour = "red"', r"\[attestation\]: unknown key 'colour'"),
    ("[attestation]\n", r"\[attestation\]: roots must be a non-empty list"),  # an empty table is no policy, not "none"
    (_inline("zz"), r"\[attestation\]: pinned.code is not hex: 'zz'$"),
    (_inline("ab" * 32, "grace_s = -1"), r"\[attestation\]: grace_s must be a number of seconds"),
    (_inline("ab" * 32, 'bundle = "attest-bundle"'),
     r"\[attestation\]: bundle 'attest-bundle' must be an absolute path on each holder's host"),
    (_inline("ab" * 32).replace(ROOT, "run/no-such.pub"), r"\[attestation\]: root .*run/no-such.pub: no such file$"),
    (_inline("ab" * 32).replace(f'"{ROOT}"', '{ hex = "abcd" }'), r"\[attestation\]: roots\[0\]: platform public key must be 32 bytes, got 2$"),
    (_inline("ab" * 32) + '[attestation.min_versions]\nemulated = 2\n', r"\[attestation\]: min_versions.emulated must be a non-empty string$"),
])
def test_bad_attestation_tables_are_one_line_naming_the_key(good: Path, table: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        load_runbook(_with(good, table))
    assert "\n" not in str(info.value)


def test_check_names_a_policy_file_missing_on_a_holders_host(good: Path) -> None:
    rb = load_runbook(_with(good, '[attestation]\npolicy = "run/no-such-policy.toml"'))
    assert "node h1: attestation policy run/no-such-policy.toml missing or unreadable on host this" in check(rb, up=True)
    (good.parent / "run" / "policy.toml").write_text("# the holder parses it at start\n")
    assert not [p for p in check(load_runbook(_with(good, '[attestation]\npolicy = "run/policy.toml"')), up=True) if "attestation" in p]


def _measure() -> str:
    r = subprocess.run([sys.executable, "-m", "gtbus", "measure", "--backend", "host", "--trainer", "bytelm"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _inline_with_root_elsewhere(good: Path, extra: str = "") -> tuple[Path, Path]:
    """A runbook whose inline policy reads its root from a folder the holders' host never sees (deleted after loading)."""
    elsewhere = good.parent / "operator-only"
    elsewhere.mkdir(exist_ok=True)
    root = elsewhere / "platform.pub"
    shutil.copy(good.parent / ROOT, root)
    return _with(good, _inline(_measure(), extra).replace(ROOT, "operator-only/platform.pub")), root


def _wait_for(path: Path, words: str, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if words in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{path} never said {words!r}; it says: {text[-2000:]}")


@pytest.mark.slow
def test_up_writes_the_inline_policy_and_each_real_holder_appraises_with_it(good: Path) -> None:
    path, root = _inline_with_root_elsewhere(good)
    rb = load_runbook(path)
    kept = root.read_bytes()
    for h in ("h1", "h2"):
        (good.parent / "run" / f"{h}.out").unlink(missing_ok=True)  # the logs of earlier runs here
    up(rb)
    try:
        root.unlink()  # the holders never read it: its bytes travel inside the written policy
        for h in ("h1", "h2"):
            _wait_for(good.parent / "run" / f"{h}.out", f"{h}: the orchestrator's emulated evidence appraised (code ")
        root.write_bytes(kept)  # `runbook status` reads the runbook again, on the operator's machine
        r = subprocess.run([sys.executable, "-m", "gtbus", "runbook", "status", str(path), "--watch", "--json"],
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.splitlines()[-1])["complete"] is True
    finally:
        down(rb, grace=3)
    for h in ("h1", "h2"):
        written = good.parent / "run" / f"{h}.attest-policy.toml"
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
        assert load_policy(written).policy == rb.attestation.policy  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_real_holder_refuses_by_the_inline_policy(good: Path) -> None:
    # The per-grant pins ([pins]) accept this orchestrator; only the inline policy's minimum version refuses it.
    path, _ = _inline_with_root_elsewhere(good, "[attestation.min_versions]\nemulated = \"2\"")
    rb = load_runbook(path)
    (good.parent / "run" / "h1.out").unlink(missing_ok=True)
    up(rb)
    try:
        out = _wait_for(good.parent / "run" / "h1.out", "evidence is refused")
    finally:
        down(rb, grace=3)
    assert "the orchestrator's emulated evidence is refused: version 'emulated' is 1, below the minimum 2" in out
    assert "Traceback" not in out


def test_the_host_layer_writes_a_private_file_at_a_hostile_path(tmp_path: Path) -> None:
    # The path and the text are data: a path full of shell syntax is one argument, the text goes on stdin.
    sh = HostShell(Host("this", "local", str(tmp_path), sys.executable))
    name = "run dir/$(touch CANARY); `touch CANARY` 'x\" -n.toml"
    (tmp_path / "run dir").mkdir()
    (tmp_path / name).write_text("old")
    (tmp_path / name).chmod(0o644)
    text = 'kind = "emulated"\n# $(touch CANARY)\n' + "é" * 10000
    sh.write_private(name, text)
    assert (tmp_path / name).read_text() == text and stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    sh.write_private("new/deeper/p.toml", "x = 1\n")
    assert stat.S_IMODE((tmp_path / "new" / "deeper").stat().st_mode) == 0o700
    assert not list(tmp_path.rglob("CANARY")) and not list(tmp_path.rglob("*.tmp"))
    (tmp_path / "a-file").write_text("")  # root ignores modes; a file where a folder must be stops anyone
    with pytest.raises(ConfigError, match=r"^host this: could not write a-file/p.toml: .*a-file") as info:
        sh.write_private("a-file/p.toml", "x")
    assert "\n" not in str(info.value)
