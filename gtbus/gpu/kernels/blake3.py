"""BLAKE3 (plain 32-byte hash) of a device buffer, computed on the GPU.

Used to measure the model and code before training (DESIGN.md section 6).
The input is split into 1 KiB chunks, one thread per chunk; each block of
``_CHUNK_THREADS`` threads then merges its chunk chaining values pairwise in
shared memory, and further launches merge the per-block values until one is
left. BLAKE3's tree is left-balanced, which is exactly "pair neighbours at
every level, carry an odd last node up", and blocks cover aligned power-of-two
ranges, so block-local merging produces the same tree. The ROOT flag goes on
the one compression made when a level has exactly two nodes (or on the only
chunk's last block). A 0.5 GB input takes three launches.

Checked against the ``blake3`` package (tests/gpu/test_kernels_blake3.py).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from gtbus.gpu.kernels import _cuda

__all__ = ["blake3_digest", "blake3_digest_device", "blake3_tree_model"]

CHUNK_LEN = 1024
BLOCK_LEN = 64
_CHUNK_THREADS = 128
_PARENT_THREADS = 512

_IV = (
    0x6A09E667,
    0xBB67AE85,
    0x3C6EF372,
    0xA54FF53A,
    0x510E527F,
    0x9B05688C,
    0x1F83D9AB,
    0x5BE0CD19,
)
_PERM = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)
CHUNK_START, CHUNK_END, PARENT, ROOT = 1, 2, 4, 8


def _schedule() -> list[list[int]]:
    s = [list(range(16))]
    for _ in range(6):
        s.append([s[-1][_PERM[i]] for i in range(16)])
    return s


def _compress_source() -> str:
    """Straight-line compression function (7 rounds, message indices resolved here)."""
    lines = []
    for r, sig in enumerate(_schedule()):
        m = [f"m{sig[i]}" for i in range(16)]
        lines.append(f"    /* round {r} */")
        cols = [(0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15)]
        diags = [(0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)]
        for k, (a, b, c, d) in enumerate(cols + diags):
            lines.append(f"    B3G(v{a}, v{b}, v{c}, v{d}, {m[2 * k]}, {m[2 * k + 1]});")
    return "\n".join(lines)


_BODY = r"""
#define B3_CHUNK_START 1u
#define B3_CHUNK_END 2u
#define B3_PARENT 4u
#define B3_ROOT 8u
#define B3_IV0 0x6A09E667u
#define B3_IV1 0xBB67AE85u
#define B3_IV2 0x3C6EF372u
#define B3_IV3 0xA54FF53Au
#define B3_IV4 0x510E527Fu
#define B3_IV5 0x9B05688Cu
#define B3_IV6 0x1F83D9ABu
#define B3_IV7 0x5BE0CD19u

#define B3G(a, b, c, d, x, y)              \
    a = a + b + (x); d = GT_ROTR(d ^ a, 16); \
    c = c + d;       b = GT_ROTR(b ^ c, 12); \
    a = a + b + (y); d = GT_ROTR(d ^ a, 8);  \
    c = c + d;       b = GT_ROTR(b ^ c, 7);

// cv <- first half of the compression output.
GT_DEV void b3_compress(u32* cv, u32 m0, u32 m1, u32 m2, u32 m3, u32 m4, u32 m5, u32 m6, u32 m7,
                        u32 m8, u32 m9, u32 m10, u32 m11, u32 m12, u32 m13, u32 m14, u32 m15,
                        u64 counter, u32 blen, u32 flags) {
    u32 v0 = cv[0], v1 = cv[1], v2 = cv[2], v3 = cv[3], v4 = cv[4], v5 = cv[5], v6 = cv[6], v7 = cv[7];
    u32 v8 = B3_IV0, v9 = B3_IV1, v10 = B3_IV2, v11 = B3_IV3;
    u32 v12 = (u32)counter, v13 = (u32)(counter >> 32), v14 = blen, v15 = flags;
@@COMPRESS@@
    cv[0] = v0 ^ v8; cv[1] = v1 ^ v9; cv[2] = v2 ^ v10; cv[3] = v3 ^ v11;
    cv[4] = v4 ^ v12; cv[5] = v5 ^ v13; cv[6] = v6 ^ v14; cv[7] = v7 ^ v15;
}

GT_DEV void b3_iv(u32* cv) {
    cv[0] = B3_IV0; cv[1] = B3_IV1; cv[2] = B3_IV2; cv[3] = B3_IV3;
    cv[4] = B3_IV4; cv[5] = B3_IV5; cv[6] = B3_IV6; cv[7] = B3_IV7;
}

// Parent node: compress(IV, left || right, counter 0, 64, PARENT [| ROOT]).
GT_DEV void b3_parent(u32* out, const u32* l, const u32* r, bool root) {
    b3_iv(out);
    b3_compress(out, l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7],
                r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], 0ull, 64u, B3_PARENT | (root ? B3_ROOT : 0u));
}

// Any chunk (short, last, or the only one): byte loads, zero padding.
GT_DEV void b3_chunk_generic(u32* cv, const u8* p, u32 len, u64 chunk, bool root) {
    b3_iv(cv);
    const u32 nb = len == 0u ? 1u : (len + 63u) / 64u;
    for (u32 b = 0; b < nb; ++b) {
        const u32 blen = (b + 1u == nb) ? len - 64u * b : 64u;
        u32 m[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) m[i] = 0u;
#pragma unroll
        for (int i = 0; i < 64; ++i)
            if ((u32)i < blen) m[i >> 2] |= (u32)p[64u * b + i] << (8 * (i & 3));
        u32 flags = (b == 0u ? B3_CHUNK_START : 0u) | (b + 1u == nb ? B3_CHUNK_END : 0u);
        if (root && b + 1u == nb) flags |= B3_ROOT;
        b3_compress(cv, m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10], m[11],
                    m[12], m[13], m[14], m[15], chunk, blen, flags);
    }
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

// A full 1 KiB chunk (not the root): 16-byte loads, next block prefetched.
__device__ __forceinline__ void b3_chunk_full(u32* cv, const uint4* __restrict__ src, u64 chunk) {
    b3_iv(cv);
    uint4 a = __ldcs(src), b = __ldcs(src + 1), c = __ldcs(src + 2), d = __ldcs(src + 3);
#pragma unroll 1
    for (u32 k = 0; k < 16u; ++k) {
        const uint4 ma = a, mb = b, mc = c, md = d;
        if (k < 15u) {
            const uint4* nx = src + 4u * (k + 1u);
            a = __ldcs(nx); b = __ldcs(nx + 1); c = __ldcs(nx + 2); d = __ldcs(nx + 3);
        }
        const u32 flags = (k == 0u ? B3_CHUNK_START : 0u) | (k == 15u ? B3_CHUNK_END : 0u);
        b3_compress(cv, ma.x, ma.y, ma.z, ma.w, mb.x, mb.y, mb.z, mb.w, mc.x, mc.y, mc.z, mc.w,
                    md.x, md.y, md.z, md.w, chunk, 64u, flags);
    }
}

// Merge the block's nodes (already in s[tid*9 .. +8]) level by level.
// m: global node count at the block's level; cnt: this block's node count.
__device__ __forceinline__ void b3_block_tree(u32* s, u32 cnt, u64 m, u32 nthreads) {
    const u32 tid = threadIdx.x;
    for (u32 w = nthreads; w > 1u && m > 1ull; w >>= 1) {
        const u32 half = cnt >> 1, ncnt = (cnt + 1u) >> 1;
        u32 r[8];
        if (tid < half) {
            b3_parent(r, s + 18u * tid, s + 18u * tid + 9u, m == 2ull);
        } else if (tid < ncnt) {   // odd last node is carried up unchanged
#pragma unroll
            for (int i = 0; i < 8; ++i) r[i] = s[9u * (cnt - 1u) + i];
        }
        __syncthreads();
        if (tid < ncnt) {
#pragma unroll
            for (int i = 0; i < 8; ++i) s[9u * tid + i] = r[i];
        }
        __syncthreads();
        cnt = ncnt;
        m = (m + 1ull) >> 1;
    }
}

extern "C" __global__ void __launch_bounds__(B3_CHUNK_THREADS)
b3_chunks(const u8* __restrict__ in, u64 nbytes, u64 nchunks, u32* __restrict__ cv_out) {
    __shared__ u32 s[B3_CHUNK_THREADS * 9];
    const u32 tid = threadIdx.x;
    const u64 chunk = (u64)blockIdx.x * B3_CHUNK_THREADS + tid;
    if (chunk < nchunks) {
        u32 cv[8];
        const u64 start = chunk * 1024ull;
        const u64 rest = nbytes - start;
        const u32 len = rest < 1024ull ? (u32)rest : 1024u;
        if (len == 1024u && nchunks > 1ull) b3_chunk_full(cv, (const uint4*)(in + start), chunk);
        else b3_chunk_generic(cv, in + start, len, chunk, nchunks == 1ull);
#pragma unroll
        for (int i = 0; i < 8; ++i) s[9u * tid + i] = cv[i];
    }
    __syncthreads();
    const u64 left = nchunks - (u64)blockIdx.x * B3_CHUNK_THREADS;
    b3_block_tree(s, left < B3_CHUNK_THREADS ? (u32)left : B3_CHUNK_THREADS, nchunks, B3_CHUNK_THREADS);
    if (tid < 8u) cv_out[8ull * blockIdx.x + tid] = s[tid];
}

extern "C" __global__ void __launch_bounds__(B3_PARENT_THREADS)
b3_parents(const u32* __restrict__ cv_in, u64 m, u32* __restrict__ cv_out) {
    __shared__ u32 s[B3_PARENT_THREADS * 9];
    const u32 tid = threadIdx.x;
    const u64 node = (u64)blockIdx.x * B3_PARENT_THREADS + tid;
    if (node < m) {
#pragma unroll
        for (int i = 0; i < 8; ++i) s[9u * tid + i] = cv_in[8ull * node + i];
    }
    __syncthreads();
    const u64 left = m - (u64)blockIdx.x * B3_PARENT_THREADS;
    b3_block_tree(s, left < B3_PARENT_THREADS ? (u32)left : B3_PARENT_THREADS, m, B3_PARENT_THREADS);
    if (tid < 8u) cv_out[8ull * blockIdx.x + tid] = s[tid];
}

#endif  // CUDA
"""

SOURCE = (
    _cuda.CUDA_PREAMBLE
    + f"#define B3_CHUNK_THREADS {_CHUNK_THREADS}\n#define B3_PARENT_THREADS {_PARENT_THREADS}\n"
    + _BODY.replace("@@COMPRESS@@", _compress_source())
)

_lock = threading.Lock()
_fns: dict[int, tuple[Any, Any]] = {}


def _functions() -> tuple[Any, Any]:
    cp = _cuda.cupy()
    dev = cp.cuda.Device().id
    with _lock:
        f = _fns.get(dev)
        if f is None:
            mod = _cuda.get_module("blake3", SOURCE)
            f = _fns[dev] = (mod.get_function("b3_chunks"), mod.get_function("b3_parents"))
        return f


def blake3_digest_device(buf: Any) -> Any:
    """Start hashing ``buf`` (a contiguous cupy uint8 array); return the 8 hash words on the device.

    Nothing is synchronised; ``blake3_digest`` fetches the bytes.
    """
    cp = _cuda.cupy()
    data = _cuda.require_device_array(buf, "buf")
    if data.data.ptr % 16:
        data = data.copy()  # a fresh allocation is aligned; the kernels load 16 bytes at a time
    nbytes = int(data.size)
    nchunks = max(1, -(-nbytes // CHUNK_LEN))
    chunks_fn, parents_fn = _functions()
    nodes = -(-nchunks // _CHUNK_THREADS)
    cv = cp.empty(8 * nodes, dtype=cp.uint32)
    chunks_fn((nodes,), (_CHUNK_THREADS,), (data, np.uint64(nbytes), np.uint64(nchunks), cv))
    while nodes > 1:
        nxt = -(-nodes // _PARENT_THREADS)
        out = cp.empty(8 * nxt, dtype=cp.uint32)
        parents_fn((nxt,), (_PARENT_THREADS,), (cv, np.uint64(nodes), out))
        cv, nodes = out, nxt
    return cv[:8]


def blake3_digest(buf: Any) -> bytes:
    """BLAKE3-256 of a device buffer, as bytes (synchronises the stream)."""
    words = blake3_digest_device(buf).get()
    return words.astype("<u4").tobytes()


# ------------------------------------------------------------ host model ---


def _g(v: list[int], a: int, b: int, c: int, d: int, x: int, y: int) -> None:
    mask = 0xFFFFFFFF

    def rotr(w: int, n: int) -> int:
        return ((w >> n) | (w << (32 - n))) & mask

    v[a] = (v[a] + v[b] + x) & mask
    v[d] = rotr(v[d] ^ v[a], 16)
    v[c] = (v[c] + v[d]) & mask
    v[b] = rotr(v[b] ^ v[c], 12)
    v[a] = (v[a] + v[b] + y) & mask
    v[d] = rotr(v[d] ^ v[a], 8)
    v[c] = (v[c] + v[d]) & mask
    v[b] = rotr(v[b] ^ v[c], 7)


def _compress(cv: list[int], m: list[int], counter: int, blen: int, flags: int) -> list[int]:
    v = list(cv) + list(_IV[:4]) + [counter & 0xFFFFFFFF, counter >> 32, blen, flags]
    for sig in _schedule():
        mm = [m[i] for i in sig]
        for k, (a, b, c, d) in enumerate(
            [(0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
             (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)]
        ):
            _g(v, a, b, c, d, mm[2 * k], mm[2 * k + 1])
    return [v[i] ^ v[i + 8] for i in range(8)]


def blake3_tree_model(data: bytes, block_nodes: tuple[int, ...] = (4, 8)) -> bytes:
    """Pure-Python model of the GPU algorithm (block-local merges of
    ``block_nodes[0]`` chunks, then repeated passes of ``block_nodes[1]``);
    slow, for tests of the tree logic against the ``blake3`` package."""
    nchunks = max(1, -(-len(data) // CHUNK_LEN))
    cvs = []
    for c in range(nchunks):
        chunk = data[c * CHUNK_LEN : (c + 1) * CHUNK_LEN]
        cv = list(_IV)
        nb = max(1, -(-len(chunk) // BLOCK_LEN))
        for b in range(nb):
            blk = chunk[b * BLOCK_LEN : (b + 1) * BLOCK_LEN]
            m = list(np.frombuffer(blk.ljust(64, b"\0"), dtype="<u4").astype(int))
            flags = (CHUNK_START if b == 0 else 0) | (CHUNK_END if b == nb - 1 else 0)
            if nchunks == 1 and b == nb - 1:
                flags |= ROOT
            cv = _compress(cv, m, c, len(blk), flags)
        cvs.append(cv)

    def block_pass(nodes: list[list[int]], width: int) -> list[list[int]]:
        out = []
        m = len(nodes)
        for start in range(0, m, width):
            part = nodes[start : start + width]
            mm = m
            w = width
            while w > 1 and mm > 1:
                nxt = []
                for i in range(0, len(part) - 1, 2):
                    nxt.append(_compress(list(_IV), part[i] + part[i + 1], 0, 64, PARENT | (ROOT if mm == 2 else 0)))
                if len(part) % 2:
                    nxt.append(part[-1])
                part = nxt
                mm = (mm + 1) // 2
                w //= 2
            out.append(part[0])
        return out

    nodes = block_pass(cvs, block_nodes[0])
    while len(nodes) > 1:
        nodes = block_pass(nodes, block_nodes[1])
    return b"".join(int(w).to_bytes(4, "little") for w in nodes[0])
