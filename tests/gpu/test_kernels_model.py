"""Host-side models of the GPU kernels, checked against references (no GPU needed).

These pin the arithmetic the kernels implement: the T-table AES formulation
and key schedule, the lane-split GHASH, and BLAKE3's tree as merged by blocks.
"""

from __future__ import annotations

import os
import random

import blake3
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gtbus.gpu.kernels import _gf128 as gf
from gtbus.gpu.kernels.blake3 import blake3_tree_model


def test_sbox_known_values() -> None:
    assert gf.SBOX[0x00] == 0x63 and gf.SBOX[0x01] == 0x7C and gf.SBOX[0x53] == 0xED
    assert sorted(gf.SBOX) == list(range(256))


def test_ttable_aes_matches_cryptography() -> None:
    for _ in range(16):
        key, blk = os.urandom(32), os.urandom(16)
        ref = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(blk)
        assert gf.aes256_encrypt_model(gf.expand_key_256(key), blk) == ref


@pytest.mark.parametrize("lanes", [1, 2, 3, 5, 8])
def test_lane_split_ghash_gives_the_gcm_tag(lanes: int) -> None:
    rng = random.Random(lanes)
    for _ in range(6):
        key, iv = os.urandom(32), os.urandom(12)
        aad = os.urandom(rng.choice([0, 1, 16, 17, 60]))
        pt = os.urandom(rng.choice([0, 1, 15, 16, 17, 100, 257]))
        ct = AESGCM(key).encrypt(iv, pt, aad)
        enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        h = int.from_bytes(enc.update(bytes(16)), "big")
        ej0 = int.from_bytes(enc.update(iv + b"\0\0\0\1"), "big")
        s = gf.ghash_lanes_model(h, aad, ct[:-16], lanes)
        assert (s ^ ej0).to_bytes(16, "big") == ct[-16:]


@pytest.mark.parametrize("n", [0, 1, 64, 1024, 1025, 3072, 5 * 1024 + 3, 9 * 1024, 17 * 1024 + 5])
def test_blake3_block_tree_model(n: int) -> None:
    data = os.urandom(n)
    for widths in [(4, 8), (2, 2), (8, 4)]:
        assert blake3_tree_model(data, widths) == blake3.blake3(data).digest()
