"""Class 9: files only this user can read, and a peer's text shown as one escaped line.

Real files throughout: a planted symlink, a pre-existing 0644 key, a
pre-existing 0755 run folder. The console part runs a real deployment in which
one holder declines every grant with a reason made of a forged log line and
terminal escapes, and reads what the operator would see.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gtbus.cli.main import main
from gtbus.console import EscapingFormatter, printable
from gtbus.errors import ConfigError
from gtbus.messages.identity import load_identity
from gtbus.private_files import append_private, private_dir, write_private
from gtbus.recording import Recorder
from gtbus.testing import make_deployment

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nodes"))
from travel_kit import Travel  # noqa: E402

# What a hostile holder puts in its decline reason: a forged orchestrator log line,
# a screen clear, a window-title escape, a bell and a right-to-left override
# (no comma: the --fault spec is comma-separated).
FORGED = "2099-01-01 00:00:00.000 gtbus.orchestrator.orch ERROR FORGED"
EVIL = f"bye\n{FORGED}\x1b[2J\x1b]0;pwned\x07\u202eevil\rend"
RAW = ("\x1b", "\x07", "\u202e", "\r")


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def keygen(*args: str | Path) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["keygen", *map(str, args)])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.output


# -- key files ---------------------------------------------------------------------------------------


def test_keygen_force_over_a_0644_key_leaves_a_0600_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert keygen("h1", "--out", keys)[0] == 0
    key = keys / "h1.key"
    os.chmod(key, 0o644)
    old = key.read_bytes()
    assert keygen("h1", "--out", keys, "--force")[0] == 0
    assert mode(key) == 0o600 and key.read_bytes() != old
    assert load_identity(key).name == "h1"
    assert mode(keys / "h1.pub") == 0o644  # the public half is meant to be shared


@pytest.mark.parametrize("planted", ["h1.key.tmp", "h1.key"])
def test_a_planted_symlink_never_redirects_the_secret(tmp_path: Path, planted: str) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("the attacker's file\n")
    os.chmod(victim, 0o644)
    (keys / planted).symlink_to(victim)
    code, out = keygen("h1", "--out", keys, "--force")
    assert code == 0, out
    assert victim.read_text() == "the attacker's file\n" and mode(victim) == 0o644
    key = keys / "h1.key"
    assert not key.is_symlink() and stat.S_ISREG(os.lstat(key).st_mode) and mode(key) == 0o600
    assert load_identity(key).name == "h1"
    assert not [p for p in keys.iterdir() if p.name.startswith(".h1.key.")]  # no temporary left behind


def test_without_force_a_planted_key_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("x")
    (keys / "h1.key").symlink_to(victim)
    code, out = keygen("h1", "--out", keys)
    assert code == 1 and "already exists" in out and victim.read_text() == "x"


def test_platform_key_force_over_0644_and_symlink(tmp_path: Path) -> None:
    out = tmp_path / "platform"
    assert keygen("gpu", "--platform", "--out", out)[0] == 0
    key = out / "gpu.platform.key"
    os.chmod(key, 0o644)
    victim = tmp_path / "victim"
    victim.write_text("v")
    (out / "gpu.platform.key.tmp").symlink_to(victim)
    assert keygen("gpu", "--platform", "--out", out, "--force")[0] == 0
    assert mode(key) == 0o600 and victim.read_text() == "v"


# -- run folders and files -----------------------------------------------------------------------


def test_a_pre_existing_0755_run_folder_is_tightened_and_a_symlinked_one_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chmod(run, 0o755)
    assert private_dir(run) == run and mode(run) == 0o700
    made = private_dir(tmp_path / "new" / "deeper")
    assert mode(made) == 0o700 and mode(made.parent) == 0o700
    (tmp_path / "link").symlink_to(run)
    with pytest.raises(ConfigError, match="is a symlink"):
        private_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a folder"):
        private_dir(tmp_path / "file")


def test_write_private_replaces_a_0644_file_and_a_symlink_without_following(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    write_private(target, "new")
    assert target.read_text() == "new" and mode(target) == 0o600
    victim = tmp_path / "victim"
    victim.write_text("v")
    target.unlink()
    target.symlink_to(victim)
    write_private(target, "newer")
    assert not target.is_symlink() and target.read_text() == "newer" and victim.read_text() == "v"
    with pytest.raises(ConfigError, match="already exists"):
        write_private(target, "again", overwrite=False)


def test_logs_and_stderr_files_are_0600_and_never_opened_through_a_symlink(tmp_path: Path) -> None:
    dep = make_deployment(tmp_path / "keys", holders=1)
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    old = logs / "orch.gtlog"
    Recorder(old, "orch", dep.roster, identity=dep.orchestrator).close()
    os.chmod(old, 0o644)
    Recorder(old, "orch", dep.roster, identity=dep.orchestrator).close()  # a restart tightens it
    assert mode(old) == 0o600
    victim = tmp_path / "victim"
    victim.write_bytes(b"v")
    (logs / "h1.gtlog").symlink_to(victim)
    with pytest.raises(ConfigError, match="h1.gtlog: cannot open for appending"):
        Recorder(logs / "h1.gtlog", "h1", dep.roster, identity=dep.holders[0])
    assert victim.read_bytes() == b"v"
    with append_private(tmp_path / "x.err") as fh:
        fh.write(b"line\n")
    assert mode(tmp_path / "x.err") == 0o600


# -- escaping ---------------------------------------------------------------------------------------


def test_printable_escapes_every_control_and_direction_character() -> None:
    assert printable("plain text, é, 日本") == "plain text, é, 日本"
    shown = printable(EVIL)
    assert "\n" not in shown and not any(c in shown for c in RAW)
    assert shown.startswith("bye\\n2099-01-01") and "\\x1b[2J" in shown and "\\u202e" in shown
    # A peer may write text that looks like an escape; it stays text (one line), it never acts.
    assert printable("a\\nb") == "a\\nb" and "\n" not in printable("a\\nb\n")
    for code in [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, 0x200E, 0x2066, 0xFEFF]:
        assert printable(chr(code)).startswith("\\"), hex(code)


def test_escaping_formatter_keeps_each_log_record_on_one_line() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("gtbus.test.escaping")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("hop %d: %s", 3, EVIL)
        try:
            raise ValueError(EVIL)
        except ValueError:
            log.exception("handler failed")
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert not any(c in text for c in RAW)
    lines = text.splitlines()
    assert lines[0].startswith("WARNING hop 3: bye\\n2099")
    assert not any(line.startswith("2099") for line in lines)


# -- a real deployment -----------------------------------------------------------------------------


def test_hostile_decline_reason_is_shown_escaped_and_run_files_are_private(travel) -> None:  # type: ignore[no-untyped-def]
    t: Travel = travel(holders=2, holder_faults={"h2": f"decline_with={EVIL}"}).start()
    summary = t.finish()
    hops = t.hops()
    assert {h["outcome"] for h in hops if h["holder"] == "h2"} == {"declined"}  # nothing of h2's is trained
    assert any(h["outcome"] == "trained" for h in hops if h["holder"] == "h1")  # the run went on
    # The decline really carried the hostile text (the orchestrator accepted it as h2's reason).
    assert any(m.type == "token.decline" and m.body.get("reason") == EVIL for m in t.messages())

    # What the operator sees: hop lines on stdout, the orchestrator's log on stderr.
    declined = [line for line in t.lines if " h2 " in line and "declined" in line]
    assert declined and all("bye\\n2099-01-01" in line and "\\x1b[2J" in line for line in declined), t.lines
    for text in ("\n".join(t.lines), t.stderr(), t.stderr("h1"), t.stderr("h2")):
        assert not any(c in text for c in RAW)
        assert not any(line.startswith("2099-01-01") for line in text.splitlines())

    # `gtbus replay` shows each decline on one escaped line.
    r = CliRunner().invoke(main, ["replay", str(t.logs), "--type", "token.decline", "--node", "orch"])
    assert r.exit_code == 0, r.output
    shown = r.output.splitlines()
    n = sum(1 for m in t.messages("orch") if m.type == "token.decline")
    assert n >= 1 and len(shown) == n
    assert all("bye\\n2099-01-01" in line for line in shown) and not any(c in r.output for c in RAW)

    # Every file the run wrote is this user's only; the run folder is 0700.
    run = t.run_dir
    assert mode(run) == 0o700
    private = [Path(summary["checkpoint"]), t.dep.summary_path, *t.logs.glob("*.gtlog"), *run.glob("*.err"),
               *(run / "state").rglob("epoch")]
    assert len(private) >= 7
    assert {str(p.relative_to(run)): mode(p) for p in private} == {str(p.relative_to(run)): 0o600 for p in private}


def test_replay_journal_is_rewritten_0600_and_never_through_a_symlink(tmp_path: Path) -> None:
    from gtbus.messages.replay_guard import ReplayGuard
    from gtbus.testing import FakeClock

    journal = tmp_path / "state" / "replay.journal"
    ReplayGuard(FakeClock(), journal=journal).close()
    os.chmod(journal, 0o644)
    ReplayGuard(FakeClock(), journal=journal).close()
    assert mode(journal) == 0o600
    victim = tmp_path / "victim"
    victim.write_bytes(b"v")
    (tmp_path / "state" / "replay.journal.tmp").symlink_to(victim)  # the old fixed temporary name
    ReplayGuard(FakeClock(), journal=journal).close()
    assert victim.read_bytes() == b"v" and not journal.is_symlink()
