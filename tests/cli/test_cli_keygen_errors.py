"""`gtbus keygen`, and bad input to the CLI: one `Error:` line, non-zero exit, never a traceback."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gtbus.cli.main import main
from gtbus.messages.identity import load_identity, load_public


def gtbus(*args: str | os.PathLike[str]) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r: Result, *needles: str, code: int = 1) -> str:
    """Assert a clean failure (click's own exit, not an escaped exception) with one Error line naming ``needles``."""
    assert r.exit_code == code, (r.exit_code, r.output)
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
    if code == 1:  # a failure of gtbus itself, not of option parsing: only that line
        assert r.stderr.strip() == errors[0]
    return errors[0]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    assert gtbus("keygen", "orch", "--role", "orchestrator", "--out", d).exit_code == 0
    assert gtbus("keygen", "h1", "--out", d).exit_code == 0
    return d


# -- keygen ------------------------------------------------------------------------------------


def test_keygen_writes_private_key_0600_and_public_key(tmp_path: Path) -> None:
    out = tmp_path / "new" / "keys"
    r = gtbus("keygen", "h7", "--out", out)
    assert r.exit_code == 0, r.output
    key, pub = out / "h7.key", out / "h7.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ident = load_identity(key)
    public = load_public(pub)
    assert ident.name == public.name == "h7" and public.role.value == "holder"
    assert ident.public == public
    assert public.ed25519.hex() in r.output
    secrets = json.loads(key.read_text())
    assert not any(v in pub.read_text() for k, v in secrets.items() if k.endswith(("seed", "secret")))


def test_keygen_role_and_no_overwrite(tmp_path: Path) -> None:
    assert gtbus("keygen", "orch", "--role", "orchestrator", "--out", tmp_path).exit_code == 0
    assert load_public(tmp_path / "orch.pub").role.value == "orchestrator"
    before = (tmp_path / "orch.key").read_bytes()
    one_line_error(gtbus("keygen", "orch", "--out", tmp_path), "orch.key", "already exists")
    assert (tmp_path / "orch.key").read_bytes() == before
    assert gtbus("keygen", "orch", "--role", "orchestrator", "--out", tmp_path, "--force").exit_code == 0
    assert (tmp_path / "orch.key").read_bytes() != before


def test_keygen_bad_name_and_role(tmp_path: Path) -> None:
    one_line_error(gtbus("keygen", "../evil", "--out", tmp_path), "invalid node name")
    assert not list(tmp_path.iterdir())
    one_line_error(gtbus("keygen", "h1", "--role", "king", "--out", tmp_path), "--role", "king", code=2)


# -- bad key material ----------------------------------------------------------------------------


def _holder(keys: Path, key: Path, tmp: Path) -> Result:
    # Fails on the keys before anything else is needed (platform key, data).
    return gtbus("holder", "--key", key, "--keys", keys, "--platform-pub", tmp / "p.pub", "--pin-code", "00",
                 "--data", tmp / "d.bin", "--run-dir", tmp / "run")


def test_missing_key_file(keys: Path, tmp_path: Path) -> None:
    one_line_error(_holder(keys, keys / "nope.key", tmp_path), "nope.key", "no such key file")
    r = gtbus("orchestrator", "--key", keys / "nope.key", "--keys", keys, "--platform-key", tmp_path / "p", "--run-dir", tmp_path / "run")
    one_line_error(r, "nope.key", "no such key file")


def test_world_readable_key(keys: Path, tmp_path: Path) -> None:
    os.chmod(keys / "h1.key", 0o644)
    one_line_error(_holder(keys, keys / "h1.key", tmp_path), "h1.key", "0644", "too open")
    os.chmod(keys / "h1.key", 0o640)
    one_line_error(_holder(keys, keys / "h1.key", tmp_path), "0640", "too open")


def test_malformed_key_file(keys: Path, tmp_path: Path) -> None:
    data = json.loads((keys / "h1.key").read_text())
    data["ed25519_seed"] = "zz" * 32
    (keys / "h1.key").write_text(json.dumps(data))
    one_line_error(_holder(keys, keys / "h1.key", tmp_path), "h1.key", "ed25519_seed", "not valid hex")


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"name": "h2"', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"name": "h2", "role": "holder"}', "missing field"),
        ("tampered-binding", "binding signature does not verify"),
        ("short-key", "must be 32 bytes"),
    ],
)
def test_malformed_pub(keys: Path, tmp_path: Path, content: str, needle: str) -> None:
    good = json.loads((keys / "h1.pub").read_text())
    if content == "tampered-binding":  # valid shape, but the curve key is not the one the node signed
        good["curve"] = "11" * 32
        content = json.dumps(good)
    elif content == "short-key":
        good["x25519"] = "ab" * 31
        content = json.dumps(good)
    (keys / "h2.pub").write_text(content)
    one_line_error(_holder(keys, keys / "h1.key", tmp_path), "h2.pub", needle)


def test_unknown_backend(keys: Path, tmp_path: Path) -> None:
    one_line_error(gtbus("measure", "--backend", "tpu"), "--backend", "tpu", code=2)
    r = gtbus("orchestrator", "--key", keys / "orch.key", "--keys", keys, "--platform-key", tmp_path / "p", "--run-dir", tmp_path / "run", "--backend", "tpu")
    one_line_error(r, "--backend", "tpu", code=2)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed here")
def test_unavailable_backend_is_one_line() -> None:
    one_line_error(gtbus("measure", "--backend", "cupy"), "backend cupy unavailable")


def test_replay_of_missing_path(tmp_path: Path) -> None:
    one_line_error(gtbus("replay", tmp_path / "nope"), "nope", "no such log file or folder")
    one_line_error(gtbus("replay", "--verify", tmp_path / "nope"), "nope", "no such log file or folder")
    (tmp_path / "empty").mkdir()
    one_line_error(gtbus("replay", "--verify", tmp_path / "empty"), "no .gtlog files")
    (tmp_path / "x.gtlog").write_bytes(b"not a log")
    r = gtbus("replay", tmp_path / "x.gtlog")
    one_line_error(r, "x.gtlog", "bad magic")


def test_real_process_exit_status_and_stderr(keys: Path, tmp_path: Path) -> None:
    """The installed entry point (python -m gtbus), not only click's runner: stderr is one line, no traceback."""
    os.chmod(keys / "h1.key", 0o604)
    for args in (
        ["replay", "--verify", str(tmp_path / "missing")],
        ["holder", "--key", str(keys / "h1.key"), "--keys", str(keys), "--platform-pub", "p", "--pin-code", "00", "--data", "d", "--run-dir", str(tmp_path)],
    ):
        p = subprocess.run([sys.executable, "-m", "gtbus", *args], capture_output=True, text=True, timeout=60)
        assert p.returncode == 1, p
        assert "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("Error: "), p.stderr
        assert p.stdout == ""
