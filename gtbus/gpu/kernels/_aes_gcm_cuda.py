"""CUDA C source of the AES-256-GCM decrypt+verify kernels (compiled by cupy/NVRTC).

Layout of the work (see aes_gcm.py for the host side):

* ``gcm_powers`` / ``gcm_table`` (once per key and lane count P): H^1..H^P,
  and the 16x256 table that multiplies by H^P (byte j of X -> X_j * H^P),
  64 KiB.
* ``gcm_ctr_ghash`` (the bulk pass): a persistent grid; each work unit is
  (segment, group of blockDim lanes). A segment's GHASH input is one sequence
  of M = a + cb + 1 blocks (AAD, ciphertext, length block); lane p of the
  segment takes blocks p, p+P, p+2P, ...: AES-CTR decrypts the ciphertext
  ones (T-table AES, one table replicated per bank so that lookups never
  conflict) and runs GHASH Horner with the fixed multiplier H^P out of the
  shared-memory table. Each lane finally multiplies its accumulator by
  H^(M - last) and the lanes are XOR-reduced (warp shuffles, then atomicXor
  per warp into the segment's accumulator: field addition is XOR, so order
  does not matter).
* ``gcm_finalize`` (one thread per segment): XORs E(K, J0) and compares with
  the stored tag.

Field elements travel in "memory order": the uint4 a thread gets when it loads
the 16 GCM bytes, i.e. four little-endian words. The table lookups need no
byte swapping; only the bit-serial general multiply converts to big-endian.
"""

from __future__ import annotations

from gtbus.gpu.kernels._cuda import CUDA_PREAMBLE
from gtbus.gpu.kernels._gf128 import T0_LE

# Segment descriptor: 64 bytes, shared by host (numpy) and device.
DESC_WORDS = 16

GCM_THREADS = 512

_BODY = r"""
struct SegDesc {
    u64 in_off;      // byte offset of the ciphertext in the staging buffer (16-aligned)
    u64 out_off;     // byte offset of the plaintext in the output buffer (16-aligned)
    u32 clen;        // ciphertext bytes; the 16-byte tag follows at in_off + clen
    u32 aad_off;     // byte offset of this segment's AAD in the AAD blob
    u32 aad_len;
    u32 pad0;
    u32 iv[4];       // 12-byte IV as three LE words (+ pad)
    u32 ej0[4];      // E(K, IV || 0^31 || 1) in memory order
};

#ifndef GCM_UNROLL
#define GCM_UNROLL 2
#endif
#ifndef GCM_THREADS
#define GCM_THREADS 512
#endif

#if !(defined(__CUDACC__) || defined(__CUDACC_RTC__))
#define __ldcs(p) (*(p))
static inline u32 __byte_perm(u32 x, u32 y, u32 s) {
    u64 v = ((u64)y << 32) | x; u32 r = 0;
    for (int i = 0; i < 4; ++i) r |= (u32)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
#endif

GT_DEV uint4 u4xor(uint4 a, uint4 b) { return make_uint4(a.x ^ b.x, a.y ^ b.y, a.z ^ b.z, a.w ^ b.w); }

// ------------------------------------------------------------------ AES ----
// Tb: shared T0 replicated 32x, entry (x, lane) at byte offset x*128 + lane*4,
// so lane L always reads bank L. lo = lane*4.
// Byte r of w is moved to the low byte by PRMT (integer pipe) and scaled by
// IMAD (FMA pipe), which keeps the integer pipe, the bottleneck, less busy.
#define AES_LKR(w, r) (*(const u32*)(Tb + (__byte_perm((w), 0u, 0x4440u | (r)) * 128u + lo)))
#define AES_LK0(w) AES_LKR(w, 0u)
#define AES_LK1(w) AES_LKR(w, 1u)
#define AES_LK2(w) AES_LKR(w, 2u)
#define AES_LK3(w) AES_LKR(w, 3u)

// N independent AES-256 encryptions, interleaved for instruction-level parallelism.
template <int N>
GT_DEV void aes256_encrypt_n(u32 (&s)[N][4], const u8* Tb, u32 lo, const uint4* rk) {
    uint4 k = rk[0];
#pragma unroll
    for (int i = 0; i < N; ++i) { s[i][0] ^= k.x; s[i][1] ^= k.y; s[i][2] ^= k.z; s[i][3] ^= k.w; }
#pragma unroll
    for (int r = 1; r < 14; ++r) {
        k = rk[r];
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const u32 a0 = s[i][0], a1 = s[i][1], a2 = s[i][2], a3 = s[i][3];
            s[i][0] = AES_LK0(a0) ^ GT_ROTL(AES_LK1(a1), 8) ^ GT_ROTL(AES_LK2(a2), 16) ^ GT_ROTL(AES_LK3(a3), 24) ^ k.x;
            s[i][1] = AES_LK0(a1) ^ GT_ROTL(AES_LK1(a2), 8) ^ GT_ROTL(AES_LK2(a3), 16) ^ GT_ROTL(AES_LK3(a0), 24) ^ k.y;
            s[i][2] = AES_LK0(a2) ^ GT_ROTL(AES_LK1(a3), 8) ^ GT_ROTL(AES_LK2(a0), 16) ^ GT_ROTL(AES_LK3(a1), 24) ^ k.z;
            s[i][3] = AES_LK0(a3) ^ GT_ROTL(AES_LK1(a0), 8) ^ GT_ROTL(AES_LK2(a1), 16) ^ GT_ROTL(AES_LK3(a2), 24) ^ k.w;
        }
    }
    k = rk[14];
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const u32 a0 = s[i][0], a1 = s[i][1], a2 = s[i][2], a3 = s[i][3];
        // last round: S-box only; S[x] is byte 1 (and 2) of T0[x].
#define AES_LAST(w0, w1, w2, w3) __byte_perm(__byte_perm(AES_LK0(w0), AES_LK1(w1), 0x0051u), \
                                              __byte_perm(AES_LK2(w2), AES_LK3(w3), 0x5100u), 0x7610u)
        s[i][0] = AES_LAST(a0, a1, a2, a3) ^ k.x;
        s[i][1] = AES_LAST(a1, a2, a3, a0) ^ k.y;
        s[i][2] = AES_LAST(a2, a3, a0, a1) ^ k.z;
        s[i][3] = AES_LAST(a3, a0, a1, a2) ^ k.w;
#undef AES_LAST
    }
}

// ---------------------------------------------------------------- GHASH ----
// x * H^P with the 8-bit tables: HB + j*4096 + b*16 holds (byte j = b) * H^P.
#define GH_B0(w) (__byte_perm((w), 0u, 0x4440u) * 16u)
#define GH_B1(w) (__byte_perm((w), 0u, 0x4441u) * 16u)
#define GH_B2(w) (__byte_perm((w), 0u, 0x4442u) * 16u)
#define GH_B3(w) (__byte_perm((w), 0u, 0x4443u) * 16u)
#define GH_LK(j, off) (*(const uint4*)(HB + (j) * 4096 + (off)))

GT_DEV uint4 ghash_mul_tab(uint4 x, const u8* HB) {
    uint4 a = u4xor(u4xor(GH_LK(0, GH_B0(x.x)), GH_LK(1, GH_B1(x.x))), u4xor(GH_LK(2, GH_B2(x.x)), GH_LK(3, GH_B3(x.x))));
    uint4 b = u4xor(u4xor(GH_LK(4, GH_B0(x.y)), GH_LK(5, GH_B1(x.y))), u4xor(GH_LK(6, GH_B2(x.y)), GH_LK(7, GH_B3(x.y))));
    uint4 c = u4xor(u4xor(GH_LK(8, GH_B0(x.z)), GH_LK(9, GH_B1(x.z))), u4xor(GH_LK(10, GH_B2(x.z)), GH_LK(11, GH_B3(x.z))));
    uint4 d = u4xor(u4xor(GH_LK(12, GH_B0(x.w)), GH_LK(13, GH_B1(x.w))), u4xor(GH_LK(14, GH_B2(x.w)), GH_LK(15, GH_B3(x.w))));
    return u4xor(u4xor(a, b), u4xor(c, d));
}

// General product (used once per lane, and for the per-key powers of H).
// Carry-less 64x64 products from integer multiplies of operands split into
// four interleaved bit classes (each class keeps a 3-bit hole, so carries
// never reach a bit of the same class below bit 64); the high halves come
// from the bit-reversed operands; Karatsuba for 128x128; then reduction
// modulo x^128 + x^7 + x^2 + x + 1 in GCM's reflected bit order.
GT_DEV u64 clmul_lo64(u64 x, u64 y) {
    const u64 m0 = 0x1111111111111111ull, m1 = m0 << 1, m2 = m0 << 2, m3 = m0 << 3;
    const u64 x0 = x & m0, x1 = x & m1, x2 = x & m2, x3 = x & m3;
    const u64 y0 = y & m0, y1 = y & m1, y2 = y & m2, y3 = y & m3;
    const u64 z0 = (x0 * y0) ^ (x1 * y3) ^ (x2 * y2) ^ (x3 * y1);
    const u64 z1 = (x0 * y1) ^ (x1 * y0) ^ (x2 * y3) ^ (x3 * y2);
    const u64 z2 = (x0 * y2) ^ (x1 * y1) ^ (x2 * y0) ^ (x3 * y3);
    const u64 z3 = (x0 * y3) ^ (x1 * y2) ^ (x2 * y1) ^ (x3 * y0);
    return (z0 & m0) | (z1 & m1) | (z2 & m2) | (z3 & m3);
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GT_REV64(x) __brevll(x)
#else
static inline u64 GT_REV64(u64 x) {
    u64 r = 0;
    for (int i = 0; i < 64; ++i) r |= ((x >> i) & 1ull) << (63 - i);
    return r;
}
#endif

GT_DEV uint4 gf_mul(uint4 a, uint4 b) {
    const u64 a1 = ((u64)GT_BSWAP32(a.x) << 32) | GT_BSWAP32(a.y);   // first 8 bytes, big-endian
    const u64 a0 = ((u64)GT_BSWAP32(a.z) << 32) | GT_BSWAP32(a.w);
    const u64 b1 = ((u64)GT_BSWAP32(b.x) << 32) | GT_BSWAP32(b.y);
    const u64 b0 = ((u64)GT_BSWAP32(b.z) << 32) | GT_BSWAP32(b.w);
    const u64 a0r = GT_REV64(a0), a1r = GT_REV64(a1), b0r = GT_REV64(b0), b1r = GT_REV64(b1);
    const u64 lo0 = clmul_lo64(a0, b0), hi0 = GT_REV64(clmul_lo64(a0r, b0r)) >> 1;
    const u64 lo1 = clmul_lo64(a1, b1), hi1 = GT_REV64(clmul_lo64(a1r, b1r)) >> 1;
    const u64 lo2 = clmul_lo64(a0 ^ a1, b0 ^ b1), hi2 = GT_REV64(clmul_lo64(a0r ^ a1r, b0r ^ b1r)) >> 1;
    // 255-bit product v3:v2:v1:v0, shifted left by one (reflected order).
    u64 v0 = lo0, v1 = hi0 ^ lo2 ^ lo0 ^ lo1, v2 = lo1 ^ hi2 ^ hi0 ^ hi1, v3 = hi1;
    v3 = (v3 << 1) | (v2 >> 63);
    v2 = (v2 << 1) | (v1 >> 63);
    v1 = (v1 << 1) | (v0 >> 63);
    v0 <<= 1;
    // Fold the x^128..x^255 half (v1:v0) into v3:v2; v0's overflow lands in v1 first.
    v2 ^= v0 ^ (v0 >> 1) ^ (v0 >> 2) ^ (v0 >> 7);
    v1 ^= (v0 << 63) ^ (v0 << 62) ^ (v0 << 57);
    v3 ^= v1 ^ (v1 >> 1) ^ (v1 >> 2) ^ (v1 >> 7);
    v2 ^= (v1 << 63) ^ (v1 << 62) ^ (v1 << 57);
    return make_uint4(GT_BSWAP32((u32)(v3 >> 32)), GT_BSWAP32((u32)v3),
                      GT_BSWAP32((u32)(v2 >> 32)), GT_BSWAP32((u32)v2));
}

GT_DEV uint4 gf_pow(uint4 h, u32 e) {
    uint4 r = make_uint4(0x80u, 0u, 0u, 0u);   // the field's 1
    int top = 31;
    while (top > 0 && ((e >> top) & 1u) == 0u) --top;
    for (int i = top; i >= 0; --i) {
        r = gf_mul(r, r);
        if ((e >> i) & 1u) r = gf_mul(r, h);
    }
    return r;
}

GT_DEV uint4 load_bytes16(const u8* p, u32 n) {
    u32 w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = 0; i < 16; ++i)
        if ((u32)i < n) w[i >> 2] |= (u32)p[i] << (8 * (i & 3));
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// The work of lane p (of P) on one segment: decrypt its ciphertext blocks,
// GHASH its share of the sequence; returns the lane's term of the GHASH.
GT_DEV uint4 gcm_lane(const u8* __restrict__ in, u8* __restrict__ out, const SegDesc* __restrict__ d,
                      const u8* __restrict__ aad, const u8* Tb, const u8* HB, u32 lo, const uint4* RK,
                      const uint4* __restrict__ hpow_g, u32 p, u32 P) {
    const u32 clen = d->clen, alen = d->aad_len;
    const u64 in_off = d->in_off, out_off = d->out_off;
    const u32 iv0 = d->iv[0], iv1 = d->iv[1], iv2 = d->iv[2];
    const u32 cfull = clen >> 4, rem = clen & 15u, cb = cfull + (rem ? 1u : 0u);
    const u32 na = (alen + 15u) >> 4, M = na + cb + 1u;
    const uint4* src = (const uint4*)(in + in_off);
    uint4* dst = (uint4*)(out + out_off);
    uint4 acc = make_uint4(0u, 0u, 0u, 0u);
    u32 q = p;
    for (; q < na; q += P) {                   // AAD blocks (zero padded)
        const u32 m = alen - 16u * q;
        acc = u4xor(ghash_mul_tab(acc, HB), load_bytes16(aad + d->aad_off + 16u * q, m < 16u ? m : 16u));
    }
    q -= na;                                    // from here on: ciphertext block index
    for (; q + (GCM_UNROLL - 1) * P < cfull; q += GCM_UNROLL * P) {
        uint4 c[GCM_UNROLL];
        u32 s[GCM_UNROLL][4];
#pragma unroll
        for (int i = 0; i < GCM_UNROLL; ++i) {
            c[i] = __ldcs(src + q + i * P);
            s[i][0] = iv0; s[i][1] = iv1; s[i][2] = iv2; s[i][3] = GT_BSWAP32(q + i * P + 2u);
        }
        aes256_encrypt_n<GCM_UNROLL>(s, Tb, lo, RK);
#pragma unroll
        for (int i = 0; i < GCM_UNROLL; ++i) {
            dst[q + i * P] = make_uint4(c[i].x ^ s[i][0], c[i].y ^ s[i][1], c[i].z ^ s[i][2], c[i].w ^ s[i][3]);
            acc = u4xor(ghash_mul_tab(acc, HB), c[i]);
        }
    }
    for (; q < cfull; q += P) {
        const uint4 c = __ldcs(src + q);
        u32 s[1][4] = {{iv0, iv1, iv2, GT_BSWAP32(q + 2u)}};
        aes256_encrypt_n<1>(s, Tb, lo, RK);
        dst[q] = make_uint4(c.x ^ s[0][0], c.y ^ s[0][1], c.z ^ s[0][2], c.w ^ s[0][3]);
        acc = u4xor(ghash_mul_tab(acc, HB), c);
    }
    if (rem != 0u && q == cfull) {              // this lane owns the short last block
        const uint4 c = load_bytes16(in + in_off + 16ull * q, rem);
        u32 s[1][4] = {{iv0, iv1, iv2, GT_BSWAP32(q + 2u)}};
        aes256_encrypt_n<1>(s, Tb, lo, RK);
        const u32 ks[4] = {c.x ^ s[0][0], c.y ^ s[0][1], c.z ^ s[0][2], c.w ^ s[0][3]};
        u8* op = out + out_off + 16ull * q;
#pragma unroll
        for (int i = 0; i < 16; ++i)
            if ((u32)i < rem) op[i] = (u8)(ks[i >> 2] >> (8 * (i & 3)));
        acc = u4xor(ghash_mul_tab(acc, HB), c);
        q += P;
    }
    if (q == cb) {                              // this lane owns the length block
        const u64 abits = 8ull * alen, cbits = 8ull * clen;
        const uint4 len = make_uint4(GT_BSWAP32((u32)(abits >> 32)), GT_BSWAP32((u32)abits),
                                     GT_BSWAP32((u32)(cbits >> 32)), GT_BSWAP32((u32)cbits));
        acc = u4xor(ghash_mul_tab(acc, HB), len);
        q += P;
    }
    if (p < M) {
        const u32 last = q + na - P;              // last sequence index this lane took
        acc = gf_mul(acc, hpow_g[M - last - 1u]);  // H^(M - last)
    }
    return acc;
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

// hpow[t] = H^(t+1), t < npow.
extern "C" __global__ void gcm_powers(const uint4* __restrict__ hbuf, uint4* __restrict__ hpow, u32 npow) {
    const u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < npow) hpow[t] = gf_pow(hbuf[0], t + 1);
}

// htab[j*256 + b] = (block with byte j = b, others 0) * H^P, H^P = hpow[P-1].
extern "C" __global__ void gcm_table(const uint4* __restrict__ hpow, u32 P, uint4* __restrict__ htab) {
    const u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= 4096) return;
    const u32 j = t >> 8, v = (t & 255u) << (8 * (j & 3));
    const uint4 x = make_uint4((j >> 2) == 0 ? v : 0u, (j >> 2) == 1 ? v : 0u, (j >> 2) == 2 ? v : 0u, (j >> 2) == 3 ? v : 0u);
    htab[t] = gf_mul(x, hpow[P - 1]);
}

// GHASH input of a segment as one sequence of M = a + cb + 1 blocks: the a
// AAD blocks, the cb ciphertext blocks, the length block. Lane p of P takes
// blocks p, p+P, ... (Horner with H^P), then multiplies by H^(M - last).
extern "C" __global__ void __launch_bounds__(GCM_THREADS, 2)
gcm_ctr_ghash(const u8* __restrict__ in, u8* __restrict__ out, const SegDesc* __restrict__ desc,
              const u8* __restrict__ aad, const uint4* __restrict__ rk_g, const uint4* __restrict__ htab_g,
              const uint4* __restrict__ hpow_g, u32* __restrict__ segacc, u32 nunits, u32 G, u32 P) {
    extern __shared__ uint4 smem[];
    u32* Ts = (u32*)smem;                       // 256 x 32 words, 32 KiB
    uint4* HT = smem + 2048;                    // 16 x 256 entries, 64 KiB
    uint4* RK = smem + 2048 + 4096;             // 15 round keys
    const u32 tid = threadIdx.x;
    for (u32 i = tid; i < 8192; i += blockDim.x) Ts[i] = AES_T0[i >> 5];
    for (u32 i = tid; i < 4096; i += blockDim.x) HT[i] = htab_g[i];
    if (tid < 15) RK[tid] = rk_g[tid];
    __syncthreads();
    const u8* Tb = (const u8*)Ts;
    const u8* HB = (const u8*)HT;
    const u32 lo = (tid & 31u) << 2;

    for (u32 u = blockIdx.x; u < nunits; u += gridDim.x) {
        const u32 j = u / G;
        const u32 p = (u - j * G) * blockDim.x + tid;
        uint4 acc = gcm_lane(in, out, desc + j, aad, Tb, HB, lo, RK, hpow_g, p, P);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            acc.x ^= __shfl_xor_sync(0xffffffffu, acc.x, o);
            acc.y ^= __shfl_xor_sync(0xffffffffu, acc.y, o);
            acc.z ^= __shfl_xor_sync(0xffffffffu, acc.z, o);
            acc.w ^= __shfl_xor_sync(0xffffffffu, acc.w, o);
        }
        if ((tid & 31u) == 0u && (acc.x | acc.y | acc.z | acc.w) != 0u) {
            atomicXor(segacc + 4 * j + 0, acc.x);
            atomicXor(segacc + 4 * j + 1, acc.y);
            atomicXor(segacc + 4 * j + 2, acc.z);
            atomicXor(segacc + 4 * j + 3, acc.w);
        }
    }
}

// One thread per segment: the tag is GHASH ^ E(K, J0).
extern "C" __global__ void gcm_finalize(const u8* __restrict__ in, const SegDesc* __restrict__ desc,
                                        const u32* __restrict__ segacc, u8* __restrict__ ok, u32 n) {
    const u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const SegDesc d = desc[j];
    const uint4 t = load_bytes16(in + d.in_off + d.clen, 16u);
    const u32 diff = (segacc[4 * j] ^ d.ej0[0] ^ t.x) | (segacc[4 * j + 1] ^ d.ej0[1] ^ t.y) |
                     (segacc[4 * j + 2] ^ d.ej0[2] ^ t.z) | (segacc[4 * j + 3] ^ d.ej0[3] ^ t.w);
    ok[j] = diff == 0u ? 1 : 0;
}

#endif  // CUDA
"""


def _t0_table() -> str:
    rows = []
    for i in range(0, 256, 8):
        rows.append("    " + ", ".join(f"0x{v:08x}u" for v in T0_LE[i : i + 8]) + ",")
    return "\n".join(rows)


SOURCE = (
    CUDA_PREAMBLE
    + "\n#if defined(__CUDACC__) || defined(__CUDACC_RTC__)\n__device__\n#else\nstatic\n#endif\n"
    + "const u32 AES_T0[256] = {\n"
    + _t0_table()
    + "\n};\n"
    + _BODY
)
