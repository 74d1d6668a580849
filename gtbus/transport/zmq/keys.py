"""CURVE keys as gtbus passes them around, and the key pairs of a server and a client.

Keys are **raw 32-byte Curve25519 keys** (``bytes``), the same bytes as
``bytes(nacl.public.PrivateKey)`` and ``bytes(nacl.public.PrivateKey.public_key)``:
libzmq's CURVE is libsodium's X25519, so an identity's PyNaCl box key is usable
as is. Keys become Z85 (40 ASCII characters) only when handed to libzmq
(:func:`z85_key`, used by :mod:`gtbus.transport.zmq.options`); the ``allowed``
map and the ZAP handler use raw public keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nacl.public import PrivateKey
from zmq.utils import z85

from gtbus.errors import ConfigError

__all__ = [
    "CURVE_KEY_BYTES",
    "CurveClientConfig",
    "CurveServerConfig",
    "check_raw_key",
    "curve_public_key",
    "generate_curve_keypair",
    "z85_key",
]

CURVE_KEY_BYTES = 32


def check_raw_key(key: bytes, what: str) -> bytes:
    """``key`` as bytes if it is a raw Curve25519 key, else ConfigError naming ``what``."""
    if not isinstance(key, (bytes, bytearray)) or len(key) != CURVE_KEY_BYTES:
        raise ConfigError(f"{what} must be {CURVE_KEY_BYTES} raw bytes (a Curve25519 key)")
    return bytes(key)


def curve_public_key(secret_key: bytes) -> bytes:
    """Derive the raw 32-byte Curve25519 public key of a raw 32-byte secret key."""
    secret = check_raw_key(secret_key, "CURVE secret key")
    return bytes(PrivateKey(secret).public_key)


def generate_curve_keypair() -> tuple[bytes, bytes]:
    """Return a fresh ``(secret, public)`` pair of raw 32-byte Curve25519 keys."""
    sk = PrivateKey.generate()
    return bytes(sk), bytes(sk.public_key)


def z85_key(raw_key: bytes) -> bytes:
    """Encode a raw 32-byte key as the 40-character Z85 text libzmq options take."""
    return z85.encode(check_raw_key(raw_key, "CURVE key"))


@dataclass(frozen=True)
class CurveServerConfig:
    """The server's own CURVE key pair (raw 32-byte keys; the secret is never printed)."""

    secret_key: bytes = field(repr=False)
    public_key: bytes

    def __post_init__(self) -> None:
        check_raw_key(self.public_key, "CURVE public key")
        if curve_public_key(self.secret_key) != self.public_key:
            raise ConfigError("CURVE public key does not belong to the secret key")

    @classmethod
    def from_secret(cls, secret_key: bytes) -> CurveServerConfig:
        """Build from the secret key alone, deriving the public key."""
        return cls(bytes(secret_key), curve_public_key(secret_key))


@dataclass(frozen=True)
class CurveClientConfig:
    """A client's CURVE key pair and the server public key it pins (all raw 32 bytes)."""

    secret_key: bytes = field(repr=False)
    public_key: bytes
    server_public_key: bytes

    def __post_init__(self) -> None:
        check_raw_key(self.public_key, "CURVE public key")
        check_raw_key(self.server_public_key, "server CURVE public key")
        if curve_public_key(self.secret_key) != self.public_key:
            raise ConfigError("CURVE public key does not belong to the secret key")

    @classmethod
    def from_secret(cls, secret_key: bytes, server_public_key: bytes) -> CurveClientConfig:
        """Build from the client's secret key and the server's public key."""
        return cls(bytes(secret_key), curve_public_key(secret_key), bytes(server_public_key))

