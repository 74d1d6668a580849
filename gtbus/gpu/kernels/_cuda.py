"""Lazy access to cupy and a per-device cache of compiled RawModules.

cupy is an optional dependency (the ``gpu`` extra): nothing here imports it
at module import time, so ``gtbus.gpu.kernels`` can be imported (and its
pure-Python parts used) on machines without a GPU.
"""

from __future__ import annotations

import threading
from typing import Any

from gtbus.errors import DeviceError

_lock = threading.Lock()
_modules: dict[tuple[str, int, tuple[str, ...]], Any] = {}


def cupy() -> Any:
    """Import and return cupy, or raise DeviceError if it is not installed."""
    try:
        import cupy as cp
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise DeviceError("cupy is not installed: the GPU kernels need the 'gpu' extra") from exc
    return cp


def get_module(key: str, source: str, options: tuple[str, ...] = ()) -> Any:
    """Compile ``source`` once per (key, device, options) and return the RawModule."""
    cp = cupy()
    dev = cp.cuda.Device().id
    cache_key = (key, dev, options)
    with _lock:
        mod = _modules.get(cache_key)
        if mod is None:
            mod = cp.RawModule(code=source, options=("--std=c++17",) + options)
            _modules[cache_key] = mod
        return mod


def sm_count() -> int:
    """Number of multiprocessors of the current device."""
    cp = cupy()
    return int(cp.cuda.Device().attributes["MultiProcessorCount"])


def device_name() -> str:
    """Human-readable name of the current device (for benchmarks and logs)."""
    cp = cupy()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def require_device_array(arr: Any, what: str) -> Any:
    """Check that ``arr`` is a C-contiguous cupy uint8 array; return it flattened."""
    cp = cupy()
    if not isinstance(arr, cp.ndarray):
        raise TypeError(f"{what} must be a cupy.ndarray, got {type(arr).__name__}")
    if arr.dtype != cp.uint8:
        raise TypeError(f"{what} must have dtype uint8, got {arr.dtype}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    return arr.reshape(-1)


# Shared preamble: fixed-width types without headers (NVRTC has no libc), and
# host shims so the same device functions can be compiled by a host C++
# compiler for off-GPU checks.
CUDA_PREAMBLE = r"""
typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GT_DEV __device__ __forceinline__
#define GT_BSWAP32(x) __byte_perm((x), 0u, 0x0123u)
#define GT_ROTL(x, n) __funnelshift_l((x), (x), (n))
#define GT_ROTR(x, n) __funnelshift_r((x), (x), (n))
#else
#define GT_DEV static inline
struct uint4 { u32 x, y, z, w; };
static inline uint4 make_uint4(u32 a, u32 b, u32 c, u32 d) { uint4 r = {a, b, c, d}; return r; }
#define GT_BSWAP32(x) __builtin_bswap32((x))
#define GT_ROTL(x, n) (((x) << ((n) & 31)) | ((x) >> ((32 - (n)) & 31)))
#define GT_ROTR(x, n) (((x) >> ((n) & 31)) | ((x) << ((32 - (n)) & 31)))
#endif
"""
