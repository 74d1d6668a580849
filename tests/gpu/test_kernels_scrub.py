"""GPU scrub and verify-zero (needs cupy and a GPU)."""

from __future__ import annotations

import pytest

cp = pytest.importorskip("cupy")

from gtbus.gpu.kernels.scrub import scrub, scrub_and_verify, verify_zero  # noqa: E402


def _has_gpu() -> bool:
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_gpu(), reason="no CUDA device")]


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 4097, (1 << 20) + 3, (32 << 20) + 9])
def test_zero_and_single_nonzero_byte(n: int) -> None:
    buf = cp.zeros(n, dtype=cp.uint8)
    assert verify_zero(buf)
    for pos in {0, n // 2, n - 1} if n else set():
        buf[pos] = 0x10
        assert not verify_zero(buf), pos
        buf[pos] = 0
    assert verify_zero(buf)


@pytest.mark.parametrize("offset", [1, 5, 15])
def test_unaligned_views(offset: int) -> None:
    base = cp.zeros(100_003, dtype=cp.uint8)
    view = base[offset:]
    assert verify_zero(view)
    view[0] = 1
    assert not verify_zero(view)
    view[0] = 0
    view[-1] = 1
    assert not verify_zero(view)
    base[offset - 1] = 7  # outside the view: ignored
    view[-1] = 0
    assert verify_zero(view)


def test_scrub_then_verify() -> None:
    buf = cp.random.randint(1, 256, size=(8 << 20) + 5, dtype=cp.uint8)
    assert not verify_zero(buf)
    assert scrub_and_verify(buf)
    f = cp.ones((1000, 3), dtype=cp.float32)
    scrub(f)
    assert verify_zero(f)
