"""The asymmetric primitives gtbus uses, wrapped once (PyNaCl / libsodium underneath).

Everything in gtbus that signs, verifies or agrees on a key goes through these
wrappers, and the Wycheproof conformance tests run against them, so what is
tested is what runs.
"""

from __future__ import annotations

import nacl.bindings
import nacl.exceptions
import nacl.signing


class Ed25519Verifier:
    """Verifies detached Ed25519 signatures for one public key."""

    def __init__(self, public_key: bytes) -> None:
        if len(public_key) != 32:
            raise ValueError(f"Ed25519 public key must be 32 bytes, got {len(public_key)}")
        self._key = bytes(nacl.signing.VerifyKey(public_key))  # VerifyKey checks type and length

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True iff ``signature`` is a valid signature of ``message`` (never raises on bad input)."""
        if len(signature) != 64:
            return False
        try:
            # libsodium's crypto_sign_open, as VerifyKey.verify calls it, without the object layer
            _sign_open(bytes(signature) + bytes(message), self._key)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError, TypeError):
            return False
        return True


_sign_open = nacl.bindings.crypto_sign_open


class Ed25519Signer:
    """Detached Ed25519 signatures with one key (libsodium's crypto_sign, no object layer per call)."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError(f"Ed25519 seed must be 32 bytes, got {len(seed)}")
        self.public_key, self._secret = nacl.bindings.crypto_sign_seed_keypair(bytes(seed))

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return "Ed25519Signer(...)"

    def sign(self, message: bytes) -> bytes:
        """The detached 64-byte signature of ``message``."""
        return _sign(message, self._secret)[:64]


_sign = nacl.bindings.crypto_sign


def ed25519_sign(seed: bytes, message: bytes) -> bytes:
    """Detached Ed25519 signature of ``message`` with the key derived from a 32-byte seed."""
    return Ed25519Signer(seed).sign(message)


def ed25519_public(seed: bytes) -> bytes:
    """The Ed25519 public key of a 32-byte seed."""
    return bytes(nacl.signing.SigningKey(seed).verify_key)


def x25519(secret: bytes, public: bytes) -> bytes:
    """X25519 shared secret; raises ValueError for low-order points (all-zero output)."""
    if len(secret) != 32 or len(public) != 32:
        raise ValueError("X25519 keys are 32 bytes")
    try:
        return nacl.bindings.crypto_scalarmult(secret, public)
    except nacl.exceptions.RuntimeError as exc:  # libsodium refuses an all-zero result
        raise ValueError("X25519: low-order public key") from exc
