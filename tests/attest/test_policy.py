"""The policy file: strict TOML, roots read from files, every mistake one line naming the key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from gtbus.attest import Revocation
from gtbus.attest.policy import emulated_policy, load_policy, policy_toml
from gtbus.errors import ConfigError
from gtbus.gpu.platform_key import load_platform_public, write_platform_key

CODE = "ab" * 32


@pytest.fixture
def pub(tmp_path: Path) -> Path:
    return write_platform_key(tmp_path / "platform")[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "policy.toml"
    p.write_text(text)
    return p


def test_a_full_emulated_policy(tmp_path: Path, pub: Path) -> None:
    p = write(tmp_path, f'kind = "emulated"\nroots = ["platform/platform.platform.pub"]\nrevocation = "cached"\ngrace_s = 3600\n'
                        f'bundle = "b"\n[pinned]\ncode = "{CODE}"\n[min_versions]\nemulated = "1"\n')
    s = load_policy(p)
    assert s.policy.pinned == {"code": bytes.fromhex(CODE)}
    assert s.policy.roots == [load_platform_public(pub)]
    assert s.policy.revocation is Revocation.CACHED and s.policy.grace_s == 3600.0
    assert s.policy.min_versions == {"emulated": "1"}
    assert s.bundle == tmp_path / "b"
    assert emulated_policy(load_platform_public(pub), bytes.fromhex(CODE)) == load_policy(
        write(tmp_path, f'roots = ["platform/platform.platform.pub"]\n[pinned]\ncode = "{CODE}"\n')).policy


ROOT = 'roots = ["platform/platform.platform.pub"]\n'
PIN = f'[pinned]\ncode = "{CODE}"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1\n" + ROOT + PIN, "unknown key 'colour'"),
        ('kind = "sgx"\n' + ROOT + PIN, "kind must be one of emulated, tdx, nvidia-gpu, not 'sgx'"),
        ('revocation = "never"\n' + ROOT + PIN, "revocation must be offline, cached or online"),
        ("grace_s = -5\n" + ROOT + PIN, "grace_s must be"),
        ('grace_s = "1h"\n' + ROOT + PIN, "grace_s must be"),
        ("grace_s = 1e12\n" + ROOT + PIN, "grace_s must be"),
        (PIN, "roots must be a non-empty list"),
        ("roots = []\n" + PIN, "roots must be a non-empty list"),
        ('roots = ["nope.pub"]\n' + PIN, "root .*nope.pub: no such file"),
        ('roots = ["policy.toml"]\n' + PIN, "root .*policy.toml: not a platform public key"),
        (ROOT, "pinned must name at least one measurement"),
        (ROOT + '[pinned]\ncode = "zz"\n', "pinned.code is not hex: 'zz'"),
        (ROOT + "[pinned]\ncode = 5\n", "pinned.code must be a non-empty string"),
        (ROOT + 'pinned = "x"\n', "pinned must be a table"),
        (ROOT + PIN + "[min_versions]\ntcb = 3\n", "min_versions.tcb must be a non-empty string"),
        ("bundle = 3\n" + ROOT + PIN, "bundle must be a path"),
        ("roots = [\n", "not valid TOML"),
    ],
)
def test_mistakes_are_one_line_naming_the_file(tmp_path: Path, pub: Path, text: str, message: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_policy(p)
    assert str(info.value).startswith(str(p)) and "\n" not in str(info.value)


def test_a_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such policy file"):
        load_policy(tmp_path / "none.toml")


def test_a_huge_policy_file_is_not_read(tmp_path: Path) -> None:
    p = tmp_path / "big.toml"
    p.write_bytes(b"#" * ((1 << 20) + 1))
    with pytest.raises(ConfigError, match="policy file over"):
        load_policy(p)


def test_a_platform_key_of_the_wrong_size(tmp_path: Path) -> None:
    (tmp_path / "short.pub").write_text("ab" * 31)
    with pytest.raises(ConfigError, match="must be 32 bytes, got 31"):
        load_policy(write(tmp_path, 'roots = ["short.pub"]\n' + PIN))


def test_certificate_roots_for_the_hardware_kinds(tmp_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA384()))
    (tmp_path / "root.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "root.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    (tmp_path / "junk.der").write_bytes(b"\x30\x03junk")
    s = load_policy(write(tmp_path, 'kind = "nvidia-gpu"\nroots = ["root.pem", "root.der"]\n' + PIN))
    assert s.policy.roots == [cert.public_bytes(serialization.Encoding.DER)] * 2
    assert load_policy(write(tmp_path, policy_toml(s, "x"))).policy == s.policy  # the DER travels inline
    with pytest.raises(ConfigError, match="root .*junk.der: not an X.509 certificate"):
        load_policy(write(tmp_path, 'kind = "tdx"\nroots = ["junk.der"]\n' + PIN))


def test_a_written_policy_stands_alone_and_reads_back_the_same(tmp_path: Path, pub: Path) -> None:
    # Names a peer never sends but an operator might write: quotes, backslashes, control characters, non-ASCII.
    text = (f'roots = ["platform/platform.platform.pub"]\nrevocation = "cached"\ngrace_s = 60\nbundle = "/srv/b"\n'
            f'[pinned]\ncode = "{CODE}"\n"we\\"ird\\\\ \\u0001 é" = "00ff"\n[min_versions]\n"a\\nb" = "1.2 \\"x\\""\n')
    s = load_policy(write(tmp_path, text))
    (tmp_path / "platform" / "platform.platform.pub").unlink()  # the written file needs no root file
    out = tmp_path / "elsewhere" / "written.toml"
    out.parent.mkdir()
    out.write_text(policy_toml(s, "rb.toml [attestation]"))
    again = load_policy(out)
    assert again.policy == s.policy and again.bundle == Path("/srv/b")


@pytest.mark.parametrize(("root", "message"), [
    ('{ hex = "zz" }', r"roots\[0\].hex is not hex"),
    ('{ hex = "abcd" }', r"roots\[0\]: platform public key must be 32 bytes, got 2"),
    ('{ der = "abcd" }', r"roots\[0\] must be a file name or \{ hex"),
    ("{ hex = 5 }", r"roots\[0\] must be a file name or \{ hex"),
    (f'{{ hex = "{"ab" * (64 * 1024 + 1)}" }}', r"roots\[0\]: over 65536 bytes"),
])
def test_bad_inline_roots_are_named(tmp_path: Path, root: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_policy(write(tmp_path, f"roots = [{root}]\n" + PIN))


def test_an_inline_certificate_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"roots\[0\]: not an X.509 certificate"):
        load_policy(write(tmp_path, 'kind = "tdx"\nroots = [{ hex = "3003010203" }]\n' + PIN))
