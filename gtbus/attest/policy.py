"""The appraiser's attestation policy as a file (TOML) or a runbook's ``[attestation]`` table.

Example (paths are relative to the file, or to the runbook)::

    kind = "emulated"                  # emulated | tdx | nvidia-gpu
    roots = ["keys/gpu1.platform.pub"] # platform public keys (emulated) or root certificates (PEM or DER)
    revocation = "offline"             # offline | cached | online
    grace_s = 0                        # seconds past a revocation file's nextUpdate still accepted (0: fail closed)
    bundle = "attest-bundle"           # the offline bundle (`gtbus attest fetch`), for the hardware kinds

    [pinned]                           # measurement name -> hex value
    code = "3f1c...e2"                 # what `gtbus measure` prints

    [min_versions]                     # name -> least version accepted
    gpu-firmware = "96.00.5E.00.01"

The schema is strict: an unknown key, a wrong type, a value that is not hex, a
root file that is missing or not a key/certificate is a ConfigError of one line
naming the key (and the file).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from gtbus.attest.verifier import KINDS, AttestationError, Policy, Revocation
from gtbus.errors import ConfigError
from gtbus.gpu.attestation import ED25519_KEY_SIZE

KEYS: Final = frozenset({"kind", "roots", "revocation", "grace_s", "bundle", "pinned", "min_versions"})
MAX_POLICY_FILE: Final = 1 << 20
MAX_ROOT_FILE: Final = 64 * 1024
MAX_GRACE_S: Final = 366 * 86400.0  # a year: a longer grace is no revocation check at all
PEM_CERT: Final = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class PolicySettings:
    """A parsed policy and where its offline bundle is (None: no bundle named)."""

    policy: Policy
    bundle: Path | None


def load_policy(path: str | Path) -> PolicySettings:
    """Read and check a policy file; ConfigError of one line naming the file and what is wrong."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_POLICY_FILE:
            raise ConfigError(f"{p}: policy file over {MAX_POLICY_FILE} bytes")
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such policy file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the policy file: {getattr(exc, 'strerror', None) or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    return policy_from_table(data, p.parent, str(p))


def policy_from_table(table: dict[str, Any], base: Path, where: str) -> PolicySettings:
    """Build a policy from a parsed TOML table (a policy file or a runbook's [attestation]); paths relative to ``base``."""

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise bad(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
    kind = table.get("kind", "emulated")
    if kind not in KINDS:
        raise bad(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    revocation = table.get("revocation", Revocation.OFFLINE.value)
    if revocation not in {r.value for r in Revocation}:
        raise bad(f"revocation must be offline, cached or online, not {revocation!r}")
    grace = table.get("grace_s", 0)
    if type(grace) not in (int, float) or not 0 <= grace <= MAX_GRACE_S:
        raise bad(f"grace_s must be a number of seconds in [0, {MAX_GRACE_S:.0f}]")
    roots_in = table.get("roots")
    if not isinstance(roots_in, list) or not roots_in or not all(isinstance(r, str) and r for r in roots_in):
        raise bad("roots must be a non-empty list of file names (platform public keys or root certificates)")
    roots = [_read_root(base / r, kind, bad) for r in roots_in]
    pinned = {name: _hex(value, f"pinned.{name}", bad) for name, value in _str_table(table, "pinned", bad).items()}
    if not pinned:
        raise bad("pinned must name at least one measurement (an empty policy accepts any code)")
    versions = _str_table(table, "min_versions", bad)
    bundle = table.get("bundle")
    if bundle is not None and (not isinstance(bundle, str) or not bundle):
        raise bad("bundle must be a path")
    try:
        policy = Policy(pinned, versions, roots, Revocation(revocation), float(grace), kind)
    except AttestationError as exc:
        raise bad(str(exc)) from None
    return PolicySettings(policy, base / bundle if bundle else None)


def emulated_policy(platform_public_key: bytes, code: bytes) -> Policy:
    """The policy `gtbus holder --platform-pub --pin-code` stands for: this platform key, this code."""
    return Policy({"code": code}, {}, [platform_public_key], Revocation.OFFLINE, 0.0, "emulated")


def _str_table(table: dict[str, Any], key: str, bad: Any) -> dict[str, str]:
    sub = table.get(key, {})
    if not isinstance(sub, dict):
        raise bad(f"{key} must be a table of names to strings")
    for name, value in sub.items():
        if not isinstance(value, str) or not value:
            raise bad(f"{key}.{name} must be a non-empty string")
    return dict(sub)


def _hex(value: str, what: str, bad: Any) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise bad(f"{what} is not hex: {value[:20]!r}") from None
    if not raw:
        raise bad(f"{what} is empty")
    return raw


def _read_root(path: Path, kind: str, bad: Any) -> bytes:
    """A platform public key (hex text, emulated kind) or a root certificate as DER (from PEM or DER)."""
    try:
        if path.stat().st_size > MAX_ROOT_FILE:
            raise bad(f"root {path}: over {MAX_ROOT_FILE} bytes")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise bad(f"root {path}: no such file") from None
    except OSError as exc:
        raise bad(f"root {path}: cannot read: {exc.strerror}") from None
    if kind == "emulated":
        try:
            key = bytes.fromhex(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise bad(f"root {path}: not a platform public key (hex)") from None
        if len(key) != ED25519_KEY_SIZE:
            raise bad(f"root {path}: platform public key must be {ED25519_KEY_SIZE} bytes, got {len(key)}")
        return key
    from cryptography import x509  # the hardware kinds only; the emulated path stays light

    try:
        cert = x509.load_pem_x509_certificate(raw) if raw.lstrip().startswith(PEM_CERT) else x509.load_der_x509_certificate(raw)
    except ValueError:
        raise bad(f"root {path}: not an X.509 certificate (PEM or DER)") from None
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.DER)
