"""The asymmetric primitives gtbus uses, wrapped once (PyNaCl / libsodium underneath).

Everything in gtbus that signs, verifies or agrees on a key goes through these
wrappers, and the Wycheproof conformance tests run against them, so what is
tested is what runs.
"""

from __future__ import annotations

import hashlib
import os
import struct
import weakref

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


class PreparedSigner:
    """Ed25519 signatures whose costly half is computed ahead of the message, off the critical path.

    An Ed25519 signature is ``R || S`` with ``R = r*B`` and
    ``S = r + SHA-512(R || A || M) * a (mod L)``. Any secret, uniformly random,
    never reused ``r`` gives a valid signature that every verifier accepts
    unchanged; RFC 8032 derives ``r`` from the message only so that a signer
    needs no random source. Here ``r`` does not depend on the message, so the
    fixed-base multiplication ``r*B`` (three quarters of a signature's cost)
    is done by :meth:`prepare` while the node waits, and :meth:`sign` is left
    one hash and two scalar operations. What keeps ``r`` secret and unique:

    * ``r = SHA-512(domain || prefix || context || counter || 32 random bytes) mod L``,
      ``prefix`` being the secret half of the key's expanded seed (as in
      RFC 8032), ``context`` the signer's session (start time and random bytes)
      and ``counter`` never repeating in it: a failed random source alone
      cannot repeat ``r`` for two messages (hedged, as XEdDSA does).
    * each prepared ``r`` is taken out of the pool by the one :meth:`sign` that
      uses it, and a forked child forgets the pool it inherited (its parent
      would use the same values).

    Signatures made from a prepared nonce are not deterministic (the same
    message signed twice gives two valid signatures); the key, the wire format
    and verification are those of every other signature in gtbus. With no
    nonce prepared, :meth:`sign` signs as :class:`Ed25519Signer` does
    (deterministic, RFC 8032 byte for byte, libsodium's own cost), so a burst
    of messages costs no more than before.
    """

    def __init__(self, seed: bytes, context: bytes) -> None:
        if len(seed) != 32:
            raise ValueError(f"Ed25519 seed must be 32 bytes, got {len(seed)}")
        expanded = hashlib.sha512(bytes(seed)).digest()
        scalar = bytearray(expanded[:32])  # RFC 8032 section 5.1.5: the clamped secret scalar
        scalar[0] &= 248
        scalar[31] &= 127
        scalar[31] |= 64
        self._scalar = bytes(scalar)
        self._nonce_key = _NONCE_DOMAIN + expanded[32:] + struct.pack(">H", len(context)) + bytes(context)
        self.public_key, self._secret = nacl.bindings.crypto_sign_seed_keypair(bytes(seed))
        if self.public_key != _base(self._scalar):
            raise RuntimeError("Ed25519: the scalar does not give the seed's public key")  # never, unless libsodium changed
        self._counter = 0
        self._pool: list[tuple[bytes, bytes]] = []
        _PREPARED_SIGNERS.add(self)

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"PreparedSigner({len(self._pool)} prepared)"

    @property
    def prepared(self) -> int:
        """Nonces ready for :meth:`sign`."""
        return len(self._pool)

    def prepare(self, count: int = 1) -> None:
        """Compute ``count`` more nonces (about one signature's cost each)."""
        for _ in range(count):
            self._counter += 1
            seed = self._nonce_key + struct.pack(">Q", self._counter) + os.urandom(32)
            r = _reduce(hashlib.sha512(seed).digest())
            self._pool.append((r, _base(r)))  # r is 0 with probability 2**-252: _base raises

    def sign(self, message: bytes) -> bytes:
        """The detached 64-byte signature of ``message``: from a prepared nonce if one is ready."""
        try:
            r, big_r = self._pool.pop()  # one atomic step: no nonce can be taken twice
        except IndexError:
            return _sign(message, self._secret)[:64]
        k = _reduce(hashlib.sha512(big_r + self.public_key + message).digest())
        return big_r + _scalar_add(_scalar_mul(k, self._scalar), r)

    def forget(self) -> None:
        """Drop every prepared nonce (a forked child must not use its parent's)."""
        self._pool.clear()


_NONCE_DOMAIN = b"gtbus/ed25519-nonce/v1\x00"
_reduce = nacl.bindings.crypto_core_ed25519_scalar_reduce
_base = nacl.bindings.crypto_scalarmult_ed25519_base_noclamp
_scalar_add = nacl.bindings.crypto_core_ed25519_scalar_add
_scalar_mul = nacl.bindings.crypto_core_ed25519_scalar_mul
_PREPARED_SIGNERS: weakref.WeakSet[PreparedSigner] = weakref.WeakSet()


def _forget_prepared_in_child() -> None:
    for signer in list(_PREPARED_SIGNERS):
        signer.forget()


os.register_at_fork(after_in_child=_forget_prepared_in_child)


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
