"""Key files of the emulated platform (the stand-in for the GPU/CPU attestation key).

``NAME.platform.key`` holds the 32-byte Ed25519 seed in hex (mode 0600, on the
GPU host only); ``NAME.platform.pub`` holds the public key that holders pin.
With real confidential-computing hardware these files disappear: the key lives
in the GPU/CPU and the public side is the vendor's certificate chain.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gtbus.errors import ConfigError, KeyFileError
from gtbus.gpu.attestation import PlatformSigner
from gtbus.private_files import write_private


def write_platform_key(out_dir: str | os.PathLike[str], name: str = "platform", *, overwrite: bool = False) -> tuple[Path, Path]:
    """Generate a platform key; write the secret seed (0600) and the public key."""
    out = Path(out_dir)
    key_path, pub_path = out / f"{name}.platform.key", out / f"{name}.platform.pub"
    seed = os.urandom(32)
    try:  # 0600 from creation, renamed into place: never a looser mode, never through a symlink
        write_private(key_path, seed.hex() + "\n", overwrite=overwrite)
        write_private(pub_path, PlatformSigner(seed).public_key.hex() + "\n", mode=0o644)
    except ConfigError as exc:
        raise KeyFileError(f"{exc} (refusing to overwrite keys)" if "already exists" in str(exc) else str(exc)) from None
    return key_path, pub_path


def _read_hex(path: Path, what: str) -> bytes:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"{path}: {what} is not hex") from None
    if len(raw) != 32:
        raise KeyFileError(f"{path}: {what} must be 32 bytes, got {len(raw)}")
    return raw


def load_platform_signer(path: str | os.PathLike[str]) -> PlatformSigner:
    """The platform signer from its secret file (refused if group/others can read it)."""
    p = Path(path)
    if p.exists() and p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{p}: permissions {stat.S_IMODE(p.stat().st_mode):04o} are too open; run chmod 600 {p}")
    return PlatformSigner(_read_hex(p, "platform key"))


def load_platform_public(path: str | os.PathLike[str]) -> bytes:
    """The pinned platform public key."""
    return _read_hex(Path(path), "platform public key")
