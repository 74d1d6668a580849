"""Skip a GPU test module cleanly where cupy or a CUDA device is missing (as in CI)."""

from __future__ import annotations

from types import ModuleType

import pytest


def cupy_or_skip() -> ModuleType:
    """cupy, or a module-level skip naming what is missing."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:  # pragma: no cover - only on a machine without GPUs
            pytest.skip("no CUDA device", allow_module_level=True)
    except cupy.cuda.runtime.CUDARuntimeError:  # pragma: no cover - driver present, no device
        pytest.skip("no CUDA device", allow_module_level=True)
    return cupy
