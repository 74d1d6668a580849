"""Scrub a device buffer and check, on the device, that it reads zero.

``scrub`` is a memset (cupy's ``fill(0)``, i.e. cudaMemsetAsync on the
current stream). ``verify_zero`` ORs the buffer together in a kernel (16-byte
loads, grid-stride, unrolled) and sets a 4-byte flag if any bit is set; only
that flag crosses to the host. Both are used in a hop's epilogue (DESIGN.md
section 6: scrub, verify it reads zero, release).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from gtbus.gpu.kernels import _cuda

__all__ = ["scrub", "verify_zero", "verify_zero_async", "scrub_and_verify"]

_THREADS = 512
_BLOCKS_PER_SM = 4

_BODY = r"""
extern "C" __global__ void __launch_bounds__(512)
nonzero_any(const uint4* __restrict__ p, u64 n16, const u8* __restrict__ head, u32 nhead,
            const u8* __restrict__ tail, u32 ntail, u32* __restrict__ flag) {
    u32 acc = 0u;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3ull * stride < n16; i += 4ull * stride) {
        const uint4 a = __ldcs(p + i), b = __ldcs(p + i + stride);
        const uint4 c = __ldcs(p + i + 2ull * stride), d = __ldcs(p + i + 3ull * stride);
        acc |= a.x | a.y | a.z | a.w | b.x | b.y | b.z | b.w | c.x | c.y | c.z | c.w | d.x | d.y | d.z | d.w;
    }
    for (; i < n16; i += stride) {
        const uint4 a = __ldcs(p + i);
        acc |= a.x | a.y | a.z | a.w;
    }
    if (blockIdx.x == 0u) {
        if (threadIdx.x < nhead) acc |= head[threadIdx.x];
        if (threadIdx.x < ntail) acc |= tail[threadIdx.x];
    }
    if (acc != 0u) *flag = 1u;
}
"""

SOURCE = _cuda.CUDA_PREAMBLE + _BODY

_lock = threading.Lock()
_fns: dict[int, Any] = {}


def _kernel() -> Any:
    cp = _cuda.cupy()
    dev = cp.cuda.Device().id
    with _lock:
        f = _fns.get(dev)
        if f is None:
            f = _fns[dev] = _cuda.get_module("scrub", SOURCE).get_function("nonzero_any")
        return f


def scrub(buf: Any) -> None:
    """Zero a contiguous cupy array in place (asynchronous memset on the current stream)."""
    cp = _cuda.cupy()
    if not isinstance(buf, cp.ndarray):
        raise TypeError("scrub needs a cupy.ndarray")
    if not buf.flags.c_contiguous:
        raise ValueError("scrub needs a C-contiguous array")
    buf.fill(0)


def verify_zero_async(buf: Any) -> Any:
    """Launch the check; return a 1-element cupy uint32 flag (0 = all zero)."""
    cp = _cuda.cupy()
    if not isinstance(buf, cp.ndarray):
        raise TypeError("verify_zero needs a cupy.ndarray")
    if not buf.flags.c_contiguous:
        raise ValueError("verify_zero needs a C-contiguous array")
    data = buf.reshape(-1).view(cp.uint8)
    flag = cp.zeros(1, dtype=cp.uint32)
    n = int(data.size)
    if n == 0:
        return flag
    ptr = data.data.ptr
    nhead = min(n, (-ptr) % 16)
    n16 = (n - nhead) // 16
    ntail = n - nhead - 16 * n16
    body = data[nhead : nhead + 16 * n16]
    grid = max(1, min(_BLOCKS_PER_SM * _cuda.sm_count(), -(-n16 // _THREADS)))
    _kernel()(
        (grid,),
        (_THREADS,),
        (
            body if n16 else data,
            np.uint64(n16),
            data,
            np.uint32(nhead),
            data[nhead + 16 * n16 :] if ntail else data,
            np.uint32(ntail),
            flag,
        ),
    )
    return flag


def verify_zero(buf: Any) -> bool:
    """True if every byte of ``buf`` is zero. Only a 4-byte flag is copied to the host."""
    return int(verify_zero_async(buf).get()[0]) == 0


def scrub_and_verify(buf: Any) -> bool:
    """Scrub, then verify; True when the buffer reads zero afterwards."""
    scrub(buf)
    return verify_zero(buf)
