"""Node identities and key files: permissions, one-line errors naming the file, binding, the roster."""

from __future__ import annotations

import json
import os
import stat

import pytest

from gtbus.errors import KeyFileError
from gtbus.messages import NodeIdentity, PublicIdentity, Role, Roster, load_identity, load_public, write_identity
from gtbus.messages.primitives import Ed25519Verifier


def one_line_naming(exc: BaseException, path) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


@pytest.fixture
def written(tmp_path):
    ident = NodeIdentity.generate("h1", Role.HOLDER)
    key, pub = write_identity(ident, tmp_path / "keys")
    return ident, key, pub


def test_write_identity_makes_a_0600_key_and_round_trips(written):
    ident, key, pub = written
    assert key.name == "h1.key" and pub.name == "h1.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not list(key.parent.glob("*.tmp"))
    loaded = load_identity(key)
    assert loaded.public == ident.public
    assert loaded.to_json() == ident.to_json()
    assert load_public(pub) == ident.public
    # The loaded key signs what the public file verifies.
    assert Ed25519Verifier(load_public(pub).ed25519).verify(b"m", loaded.sign(b"m"))


def test_write_identity_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        key, _ = write_identity(NodeIdentity.generate("h2", Role.HOLDER), tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_write_identity_refuses_to_overwrite(written, tmp_path):
    ident, key, _ = written
    other = NodeIdentity.generate("h1", Role.HOLDER)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        write_identity(other, key.parent)
    assert load_identity(key).public == ident.public
    write_identity(other, key.parent, overwrite=True)
    assert load_identity(key).public == other.public


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602, 0o610])
def test_load_identity_refuses_open_permissions(written, mode):
    _, key, _ = written
    os.chmod(key, mode)
    with pytest.raises(KeyFileError) as ei:
        load_identity(key)
    msg = one_line_naming(ei.value, key)
    assert f"{mode:04o}" in msg and "too open" in msg and "chmod 600" in msg


def test_secrets_stay_out_of_repr(written):
    ident, _, _ = written
    r = repr(ident)
    for secret in ident.to_json().values():
        if len(secret) == 64:
            assert secret not in r
    assert "h1" in r


def test_missing_files(tmp_path):
    for loader, name in ((load_identity, "nope.key"), (load_public, "nope.pub")):
        with pytest.raises(KeyFileError) as ei:
            loader(tmp_path / name)
        assert "no such key file" in one_line_naming(ei.value, tmp_path / name)
    with pytest.raises(KeyFileError, match="no such key directory"):
        Roster.from_dir(tmp_path / "nodir")
    with pytest.raises(KeyFileError, match=r"no \*\.pub files"):
        Roster.from_dir(tmp_path)


@pytest.mark.parametrize("text", ["", "{", "{\"name\": \"h1\",}", "not json", "\x00\x01"])
def test_bad_json(written, text):
    _, key, pub = written
    for path, loader in ((key, load_identity), (pub, load_public)):
        path.write_text(text)
        with pytest.raises(KeyFileError) as ei:
            loader(path)
        assert "not valid JSON" in one_line_naming(ei.value, path)


def test_not_a_json_object(written):
    _, key, pub = written
    for path, loader in ((key, load_identity), (pub, load_public)):
        path.write_text("[1, 2]")
        with pytest.raises(KeyFileError) as ei:
            loader(path)
        assert "expected a JSON object" in one_line_naming(ei.value, path)


@pytest.mark.parametrize(
    "field, value, expect",
    [
        ("ed25519_seed", "00" * 31, "must be 32 bytes, got 31"),
        ("ed25519_seed", "00" * 33, "must be 32 bytes, got 33"),
        ("x25519_secret", "", "must be 32 bytes, got 0"),
        ("curve_secret", "zz" * 32, "not valid hex"),
        ("curve_secret", 5, "must be a hex string"),
        ("role", "admin", "not a valid Role"),
        ("ed25519_seed", None, "must be a hex string"),
    ],
)
def test_secret_file_field_errors(written, field, value, expect):
    _, key, _ = written
    data = json.loads(key.read_text())
    data[field] = value
    key.write_text(json.dumps(data))
    with pytest.raises(KeyFileError) as ei:
        load_identity(key)
    assert expect in one_line_naming(ei.value, key)


def test_secret_file_missing_field(written):
    _, key, _ = written
    data = json.loads(key.read_text())
    del data["curve_secret"]
    key.write_text(json.dumps(data))
    with pytest.raises(KeyFileError) as ei:
        load_identity(key)
    assert "missing field 'curve_secret'" in one_line_naming(ei.value, key)


@pytest.mark.parametrize(
    "field, value, expect",
    [
        ("ed25519", "00" * 31, "must be 32 bytes, got 31"),
        ("x25519", "00" * 33, "must be 32 bytes, got 33"),
        ("curve", "ab", "must be 32 bytes, got 1"),
        ("binding", "00" * 32, "must be 64 bytes, got 32"),
        ("binding", "0g" * 64, "not valid hex"),
    ],
)
def test_public_file_field_errors(written, field, value, expect):
    _, _, pub = written
    data = json.loads(pub.read_text())
    data[field] = value
    pub.write_text(json.dumps(data))
    with pytest.raises(KeyFileError) as ei:
        load_public(pub)
    assert expect in one_line_naming(ei.value, pub)


@pytest.mark.parametrize(
    "field, value",
    [
        ("curve", None),  # replaced by another node's (valid) CURVE key
        ("x25519", None),  # replaced by another node's X25519 key
        ("role", "orchestrator"),  # a holder promoting itself
        ("name", "h2"),  # claiming another name
        ("ed25519", None),  # another signing key under the old binding
    ],
)
def test_tampered_public_file_fails_binding(written, field, value):
    _, _, pub = written
    data = json.loads(pub.read_text())
    other = NodeIdentity.generate("zz", Role.HOLDER).public.to_json()
    data[field] = other[field] if value is None else value
    pub.write_text(json.dumps(data))
    with pytest.raises(KeyFileError) as ei:
        load_public(pub)
    assert "binding signature does not verify" in one_line_naming(ei.value, pub)


def test_binding_is_checked_when_building_a_roster_from_a_directory(written):
    _, key, pub = written
    write_identity(NodeIdentity.generate("orch", Role.ORCHESTRATOR), key.parent)
    assert sorted(m.name for m in Roster.from_dir(key.parent)) == ["h1", "orch"]
    data = json.loads(pub.read_text())
    data["curve"] = "11" * 32
    pub.write_text(json.dumps(data))
    with pytest.raises(KeyFileError) as ei:
        Roster.from_dir(key.parent)
    one_line_naming(ei.value, pub)


@pytest.mark.parametrize("name", ["", "H1", "-x", "a b", "a/b", "../h1", "x" * 64, "é"])
def test_invalid_node_names(name):
    with pytest.raises(KeyFileError, match="invalid node name"):
        NodeIdentity.generate(name, Role.HOLDER)


def test_roster_refuses_duplicates():
    a = NodeIdentity.generate("h1", Role.HOLDER)
    a2 = NodeIdentity.generate("h1", Role.HOLDER)
    with pytest.raises(KeyFileError, match="node 'h1' listed twice"):
        Roster([a.public, a2.public])
    with pytest.raises(KeyFileError, match="listed twice"):
        Roster([a.public, a.public])
    # Two names sharing one CURVE key would let one connection speak as either.
    b = NodeIdentity(
        name="h2",
        role=Role.HOLDER,
        signing_key=NodeIdentity.generate("x", Role.HOLDER).signing_key,
        x25519_secret=a.x25519_secret,
        curve_secret=a.curve_secret,
    )
    b.public.check_binding()
    with pytest.raises(KeyFileError, match="share a CURVE key"):
        Roster([a.public, b.public])


def test_roster_lookups():
    ids = [NodeIdentity.generate(n, r) for n, r in (("orch", "orchestrator"), ("h2", "holder"), ("h1", "holder"))]
    roster = Roster(i.public for i in ids)
    assert len(roster) == 3 and "h1" in roster and "eve" not in roster
    assert roster.get("eve") is None and roster["h1"] == ids[2].public
    assert [m.name for m in roster.by_role(Role.HOLDER)] == ["h1", "h2"]
    assert roster.curve_names() == {i.public.curve: i.name for i in ids}
    assert isinstance(next(iter(roster)), PublicIdentity)
