"""GPU BLAKE3 against the ``blake3`` package (needs cupy and a GPU)."""

from __future__ import annotations

import blake3
import numpy as np
import pytest

cp = pytest.importorskip("cupy")

from gtbus.gpu.kernels.blake3 import blake3_digest  # noqa: E402


def _has_gpu() -> bool:
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_gpu(), reason="no CUDA device")]

LENGTHS = [
    0, 1, 63, 64, 65, 127, 1023, 1024, 1025, 2047, 2048, 2049, 3072, 3073, 5000,
    128 * 1024, 128 * 1024 + 1, 129 * 1024 - 7, 1 << 20, (1 << 20) + 7, 3 * 1000 * 1000 + 11,
    (1 << 24) + 1234, (64 << 20) + 1024 + 5,
]


@pytest.mark.parametrize("n", LENGTHS)
def test_matches_blake3_package(n: int) -> None:
    rng = np.random.default_rng(n)
    host = rng.integers(0, 256, size=n, dtype=np.uint8)
    dev = cp.asarray(host)
    assert blake3_digest(dev) == blake3.blake3(host.tobytes()).digest()


@pytest.mark.parametrize("offset", [1, 3, 8])
def test_unaligned_view(offset: int) -> None:
    rng = np.random.default_rng(offset)
    host = rng.integers(0, 256, size=70_000, dtype=np.uint8)
    dev = cp.asarray(host)
    assert blake3_digest(dev[offset:]) == blake3.blake3(host[offset:].tobytes()).digest()


def test_one_flipped_bit_changes_digest() -> None:
    host = np.random.default_rng(5).integers(0, 256, size=(1 << 20) + 3, dtype=np.uint8)
    dev = cp.asarray(host)
    d0 = blake3_digest(dev)
    dev[123457] ^= 1
    assert blake3_digest(dev) != d0
