"""The appraiser's attestation policy as a file (TOML) or a runbook's ``[attestation]`` table.

Both go through :func:`policy_from_table`: one schema, one set of checks.
Example (paths are relative to the file; in a runbook, roots are relative to
the runbook and ``bundle`` is an absolute path on each holder's host)::

    kind = "emulated"                  # emulated | tdx | nvidia-gpu
    roots = ["keys/gpu1.platform.pub"] # platform public keys (emulated) or root certificates (PEM or DER)
    revocation = "offline"             # offline | cached | online
    grace_s = 0                        # seconds past a revocation file's nextUpdate still accepted (0: fail closed)
    bundle = "attest-bundle"           # the offline bundle (`gtbus attest fetch`), for the hardware kinds

    [pinned]                           # measurement name -> hex value
    code = "3f1c...e2"                 # what `gtbus measure` prints

    [min_versions]                     # name -> least version accepted
    gpu-firmware = "96.00.5E.00.01"

The nvidia-gpu kind also takes NVIDIA's reference integrity manifests (RIMs,
:mod:`gtbus.attest.nvidia_rim`; the extra ``attest-nvidia-rim``), with or
instead of pinned measurements (both, when given, must match)::

    driver_rim = "rims/NV_GPU_DRIVER_GH100_550.90.07.swidtag"   # a file name, or { hex = "..." }
    vbios_rim = "rims/NV_GPU_VBIOS_1010_0200_882_96009F0001.swidtag"
    rim_roots = ["verifier_RIM_root.pem"]   # the RIM signing roots (NVIDIA CoRIM signing Root CA)

Without driver_rim/vbios_rim, RIMs come from the bundle (files of kind
driver-rim / vbios-rim); a RIM the policy names wins over the bundle's.

A root is a file name or, inline, ``{ hex = "..." }``: the root's bytes (a
DER certificate, or a platform public key for the emulated kind).
:func:`policy_toml` writes a policy back with every root inline, so the file
stands alone on a host that has none of the root files (``gtbus runbook up``
writes one into each holder's run dir).

The schema is strict: an unknown key, a wrong type, a value that is not hex, a
root file that is missing or not a key/certificate is a ConfigError of one line
naming the key (and the file).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gtbus.attest.verifier import KINDS, AttestationError, Policy, Revocation
from gtbus.errors import ConfigError
from gtbus.gpu.attestation import ED25519_KEY_SIZE

KEYS: Final = frozenset(
    {"kind", "roots", "revocation", "grace_s", "bundle", "pinned", "min_versions", "driver_rim", "vbios_rim", "rim_roots"}
)
RIM_KEYS: Final = {"driver_rim": "driver", "vbios_rim": "vbios"}
MAX_RIM_FILE: Final = 256 * 1024  # gtbus.attest.nvidia_rim.MAX_RIM_SIZE, without importing lxml for every policy
MAX_POLICY_FILE: Final = 1 << 20
MAX_ROOT_FILE: Final = 64 * 1024
MAX_GRACE_S: Final = 366 * 86400.0  # a year: a longer grace is no revocation check at all
PEM_CERT: Final = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class PolicySettings:
    """A parsed policy, where its offline bundle is (None: no bundle named), and its NVIDIA RIMs and their roots."""

    policy: Policy
    bundle: Path | None
    rims: Mapping[str, bytes] = field(default_factory=dict)  # "driver" / "vbios" -> the RIM file's bytes
    rim_roots: tuple[bytes, ...] = ()  # DER root certificates the RIMs' signing chains must end at


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


def policy_from_table(table: dict[str, Any], base: Path, where: str, *, absolute_bundle: bool = False) -> PolicySettings:
    """Build a policy from a parsed TOML table (a policy file or a runbook's [attestation]); paths relative to ``base``.

    ``absolute_bundle``: the bundle is a path on another host (a runbook's holders), so it must be absolute.
    """

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
    if not isinstance(roots_in, list) or not roots_in or not all((isinstance(r, str) and r) or isinstance(r, dict) for r in roots_in):
        raise bad("roots must be a non-empty list of file names (platform public keys or root certificates)")
    roots = [_inline_root(r, i, kind, bad) if isinstance(r, dict) else _read_root(base / r, kind, bad) for i, r in enumerate(roots_in)]
    pinned = {name: _hex(value, f"pinned.{name}", bad) for name, value in _str_table(table, "pinned", bad).items()}
    rims, rim_roots = _rims(table, kind, base, bad)
    if not pinned and not rim_roots:  # rim_roots alone: the bundle carries the RIMs
        raise bad("pinned must name at least one measurement (an empty policy accepts any code)")
    versions = _str_table(table, "min_versions", bad)
    bundle = table.get("bundle")
    if bundle is not None and (not isinstance(bundle, str) or not bundle):
        raise bad("bundle must be a path")
    if bundle and absolute_bundle and not bundle.startswith("/"):
        raise bad(f"bundle {bundle!r} must be an absolute path on each holder's host (the policy is written into its run dir)")
    try:
        policy = Policy(pinned, versions, roots, Revocation(revocation), float(grace), kind)
    except AttestationError as exc:
        raise bad(str(exc)) from None
    return PolicySettings(policy, base / bundle if bundle else None, rims, rim_roots)


def _rims(table: dict[str, Any], kind: str, base: Path, bad: Any) -> tuple[dict[str, bytes], tuple[bytes, ...]]:
    """The RIM files (driver_rim, vbios_rim; none if the bundle carries them) and rim_roots of an nvidia-gpu policy, each read and parsed."""
    named = [key for key in (*RIM_KEYS, "rim_roots") if key in table]
    if not named:
        return {}, ()
    if kind != "nvidia-gpu":
        raise bad(f"{named[0]} is for kind nvidia-gpu, not {kind}")
    rims: dict[str, bytes] = {}
    for key, which in RIM_KEYS.items():
        entry = table.get(key)
        if entry is None:
            continue
        if isinstance(entry, dict):
            if set(entry) != {"hex"} or not isinstance(entry["hex"], str) or len(entry["hex"]) > 2 * MAX_RIM_FILE:
                raise bad(f"{key} must be a file name or {{ hex = \"...\" }} of at most {MAX_RIM_FILE} bytes")
            rims[which] = _hex(entry["hex"], f"{key}.hex", bad)
        elif isinstance(entry, str) and entry:
            rims[which] = _read_file(base / entry, MAX_RIM_FILE, f"{key} {base / entry}", bad)
        else:
            raise bad(f"{key} must be a file name or {{ hex = \"...\" }}")
    roots_in = table.get("rim_roots")
    if not isinstance(roots_in, list) or not roots_in or not all((isinstance(r, str) and r) or isinstance(r, dict) for r in roots_in):
        raise bad("rim_roots must be a non-empty list of root certificate files (the RIM signing roots)")
    roots = tuple(
        _inline_root(r, i, kind, bad, "rim_roots") if isinstance(r, dict) else _read_root(base / r, kind, bad) for i, r in enumerate(roots_in)
    )
    from gtbus.attest.nvidia_rim import parse_rim, require_extra  # lxml and signxml: only for policies naming RIMs

    try:
        require_extra()
        for which, data in rims.items():
            parse_rim(data, which)
    except AttestationError as exc:
        raise bad(str(exc)) from None
    return rims, roots


def emulated_policy(platform_public_key: bytes, code: bytes) -> Policy:
    """The policy `gtbus holder --platform-pub --pin-code` stands for: this platform key, this code."""
    return Policy({"code": code}, {}, [platform_public_key], Revocation.OFFLINE, 0.0, "emulated")


def policy_toml(settings: PolicySettings, source: str) -> str:
    """The policy as a policy file that stands alone: every root inline; ConfigError if it would be over the size a holder reads."""
    p = settings.policy
    lines = [f"# written from {_toml_str(source)}: a policy file (see gtbus.attest.policy), its roots inline",
             f"kind = {_toml_str(p.kind)}", "roots = [" + ", ".join(f'{{ hex = "{r.hex()}" }}' for r in p.roots) + "]",
             f"revocation = {_toml_str(p.revocation.value)}", f"grace_s = {float(p.grace_s)!r}"]
    if settings.bundle is not None:
        lines.append(f"bundle = {_toml_str(str(settings.bundle))}")
    for key, which in RIM_KEYS.items():
        if which in settings.rims:
            lines.append(f'{key} = {{ hex = "{settings.rims[which].hex()}" }}')
    if settings.rim_roots:
        lines.append("rim_roots = [" + ", ".join(f'{{ hex = "{r.hex()}" }}' for r in settings.rim_roots) + "]")
    for table, values in (("pinned", {k: v.hex() for k, v in p.pinned.items()}), ("min_versions", p.min_versions)):
        lines += ["", f"[{table}]"] + [f"{_toml_str(k)} = {_toml_str(v)}" for k, v in sorted(values.items())]
    text = "\n".join(lines) + "\n"
    if len(text.encode()) > MAX_POLICY_FILE:
        raise ConfigError(f"{source}: the policy with its roots inline is over {MAX_POLICY_FILE} bytes")
    return text


def _toml_str(value: str) -> str:
    """A TOML basic string: every character literal but the quote, the backslash and control characters."""
    out = []
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


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


def _inline_root(entry: dict[str, Any], index: int, kind: str, bad: Any, key: str = "roots") -> bytes:
    """An inline root, ``{ hex = "..." }``: a platform public key (emulated kind) or a DER certificate."""
    what = f"{key}[{index}]"
    if set(entry) != {"hex"} or not isinstance(entry["hex"], str):
        raise bad(f"{what} must be a file name or {{ hex = \"...\" }}")
    if len(entry["hex"]) > 2 * MAX_ROOT_FILE:
        raise bad(f"{what}: over {MAX_ROOT_FILE} bytes")
    raw = _hex(entry["hex"], f"{what}.hex", bad)
    return _platform_key(raw, what, bad) if kind == "emulated" else _der_certificate(raw, what, bad)


def _platform_key(key: bytes, what: str, bad: Any) -> bytes:
    if len(key) != ED25519_KEY_SIZE:
        raise bad(f"{what}: platform public key must be {ED25519_KEY_SIZE} bytes, got {len(key)}")
    return key


def _der_certificate(raw: bytes, what: str, bad: Any) -> bytes:
    """The certificate in ``raw`` (PEM or DER) as DER."""
    from cryptography import x509  # the hardware kinds only; the emulated path stays light
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        cert = x509.load_pem_x509_certificate(raw) if raw.lstrip().startswith(PEM_CERT) else x509.load_der_x509_certificate(raw)
    except ValueError:
        raise bad(f"{what}: not an X.509 certificate (PEM or DER)") from None
    return cert.public_bytes(Encoding.DER)


def _read_root(path: Path, kind: str, bad: Any) -> bytes:
    """A platform public key (hex text, emulated kind) or a root certificate as DER (from PEM or DER)."""
    raw = _read_file(path, MAX_ROOT_FILE, f"root {path}", bad)
    if kind == "emulated":
        try:
            key = bytes.fromhex(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise bad(f"root {path}: not a platform public key (hex)") from None
        return _platform_key(key, f"root {path}", bad)
    return _der_certificate(raw, f"root {path}", bad)


def _read_file(path: Path, limit: int, what: str, bad: Any) -> bytes:
    """The bytes of a file the policy names, its size checked before reading; ConfigError naming ``what`` otherwise."""
    try:
        if path.stat().st_size > limit:
            raise bad(f"{what}: over {limit} bytes")
        return path.read_bytes()
    except FileNotFoundError:
        raise bad(f"{what}: no such file") from None
    except OSError as exc:
        raise bad(f"{what}: cannot read: {exc.strerror}") from None
