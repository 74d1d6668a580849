"""Sealing a hop's channel params to one holder's X25519 key.

A libsodium sealed box gives confidentiality only: anyone can seal to a public
key. The sealed blob therefore always travels inside a grant that the
orchestrator signs; the signature says who sent it, the seal says who can read it.
"""

from __future__ import annotations

from typing import Final

import msgpack
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from gtbus.errors import ChannelError
from gtbus.gpu.channel import ChannelParams

X25519_KEY_SIZE: Final = 32
# Params pack to about 120 bytes plus a 48-byte seal; anything far larger is
# not params and is refused before any work is spent on it.
MAX_SEALED_SIZE: Final = 1024


def seal_bytes(data: bytes, recipient_x25519_public: bytes) -> bytes:
    """Encrypt ``data`` so that only the holder of the matching X25519 secret key can read it."""
    if not isinstance(recipient_x25519_public, bytes) or len(recipient_x25519_public) != X25519_KEY_SIZE:
        raise ChannelError("recipient X25519 public key must be 32 bytes")
    return SealedBox(PublicKey(recipient_x25519_public)).encrypt(data)


def open_bytes(sealed: bytes, x25519_secret: bytes, what: str = "sealed data") -> bytes:
    """Decrypt a sealed box; ChannelError naming ``what`` if the key is wrong or the blob was altered."""
    if not isinstance(x25519_secret, bytes) or len(x25519_secret) != X25519_KEY_SIZE:
        raise ChannelError("X25519 secret key must be 32 bytes")
    if not isinstance(sealed, bytes) or len(sealed) > MAX_SEALED_SIZE:
        raise ChannelError(f"{what} must be bytes of at most {MAX_SEALED_SIZE}")
    try:
        return SealedBox(PrivateKey(x25519_secret)).decrypt(sealed)
    except CryptoError:
        raise ChannelError(f"{what} did not open: wrong key or tampered") from None


def seal_params(params: ChannelParams, recipient_x25519_public: bytes) -> bytes:
    """Encrypt ``params`` so that only the holder of the matching secret key can read them."""
    return seal_bytes(msgpack.packb(params.to_wire(), use_bin_type=True), recipient_x25519_public)


def open_params(sealed: bytes, x25519_secret: bytes) -> ChannelParams:
    """Decrypt and validate sealed params; ChannelError if the key is wrong or the blob was altered."""
    packed = open_bytes(sealed, x25519_secret, "sealed channel params")
    try:
        wire = msgpack.unpackb(packed, raw=False, strict_map_key=True, use_list=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise ChannelError("sealed channel params are not a valid msgpack map") from None
    return ChannelParams.from_wire(wire)
