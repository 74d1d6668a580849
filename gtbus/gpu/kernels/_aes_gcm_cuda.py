"""CUDA C source of the AES-256-GCM decrypt+verify kernels (compiled by cupy/NVRTC).

Layout of the work (see aes_gcm.py for the host side):

* ``gcm_powers`` / ``gcm_table`` (once per key and lane count P): H^1..H^(P+1),
  H^(cb+1) for the few distinct segment lengths, and the 16x256 table that
  multiplies by H^P (byte j of X -> X_j * H^P), 64 KiB.
* ``gcm_ctr_ghash`` (the bulk pass): a persistent grid; each work unit is
  (segment, group of blockDim lanes); lane p of a segment takes ciphertext
  blocks p, p+P, p+2P, ...: AES-CTR decrypts them (T-table AES, one table
  replicated per bank so that lookups never conflict) and runs GHASH Horner
  with the fixed multiplier H^P out of the shared-memory table. Each lane
  finally multiplies its accumulator by H^(cb+1-q_last) and the lanes are
  XOR-reduced (warp shuffles, then atomicXor per warp into the segment's
  accumulator: field addition is XOR, so order does not matter).
* ``gcm_finalize`` (one thread per segment): adds the AAD blocks and the
  length block, XORs E(K, J0) and compares with the stored tag.

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
    u32 xpow_idx;    // index into xpow of H^(cb+1), cb = ceil(clen/16)
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

// General product, bit-serial (used once per lane and in setup/finalize only).
GT_DEV uint4 gf_mul(uint4 x, uint4 y) {
    const u64 xh = ((u64)GT_BSWAP32(x.x) << 32) | GT_BSWAP32(x.y);
    const u64 xl = ((u64)GT_BSWAP32(x.z) << 32) | GT_BSWAP32(x.w);
    u64 vh = ((u64)GT_BSWAP32(y.x) << 32) | GT_BSWAP32(y.y);
    u64 vl = ((u64)GT_BSWAP32(y.z) << 32) | GT_BSWAP32(y.w);
    u64 zh = 0, zl = 0;
#pragma unroll 8
    for (int i = 0; i < 128; ++i) {
        const u64 bit = (i < 64) ? (xh >> (63 - i)) : (xl >> (127 - i));
        const u64 m = 0ull - (bit & 1ull);
        zh ^= vh & m; zl ^= vl & m;
        const u64 r = 0ull - (vl & 1ull);
        vl = (vl >> 1) | (vh << 63);
        vh = (vh >> 1) ^ (0xE100000000000000ull & r);
    }
    return make_uint4(GT_BSWAP32((u32)(zh >> 32)), GT_BSWAP32((u32)zh),
                      GT_BSWAP32((u32)(zl >> 32)), GT_BSWAP32((u32)zl));
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

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

// hpow[t] = H^(t+1) for t < npow; xpow[i] = H^exps[i].
extern "C" __global__ void gcm_powers(const uint4* __restrict__ hbuf, uint4* __restrict__ hpow, u32 npow,
                                      const u32* __restrict__ exps, uint4* __restrict__ xpow, u32 nexp) {
    const u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    const uint4 h = hbuf[0];
    if (t < npow) hpow[t] = gf_pow(h, t + 1);
    else if (t - npow < nexp) xpow[t - npow] = gf_pow(h, exps[t - npow]);
}

// htab[j*256 + b] = (block with byte j = b, others 0) * H^P, H^P = hpow[P-1].
extern "C" __global__ void gcm_table(const uint4* __restrict__ hpow, u32 P, uint4* __restrict__ htab) {
    const u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= 4096) return;
    const u32 j = t >> 8, v = (t & 255u) << (8 * (j & 3));
    const uint4 x = make_uint4((j >> 2) == 0 ? v : 0u, (j >> 2) == 1 ? v : 0u, (j >> 2) == 2 ? v : 0u, (j >> 2) == 3 ? v : 0u);
    htab[t] = gf_mul(x, hpow[P - 1]);
}

extern "C" __global__ void __launch_bounds__(GCM_THREADS, 2)
gcm_ctr_ghash(const u8* __restrict__ in, u8* __restrict__ out, const SegDesc* __restrict__ desc,
              const uint4* __restrict__ rk_g, const uint4* __restrict__ htab_g, const uint4* __restrict__ hpow_g,
              u32* __restrict__ segacc, u32 nunits, u32 G, u32 P) {
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
        const u32 clen = desc[j].clen;
        const u64 in_off = desc[j].in_off, out_off = desc[j].out_off;
        const u32 iv0 = desc[j].iv[0], iv1 = desc[j].iv[1], iv2 = desc[j].iv[2];
        const u32 cfull = clen >> 4, rem = clen & 15u, cb = cfull + (rem ? 1u : 0u);
        const uint4* src = (const uint4*)(in + in_off);
        uint4* dst = (uint4*)(out + out_off);
        uint4 acc = make_uint4(0u, 0u, 0u, 0u);
        u32 q = p;
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
            const u8* cp = in + in_off + 16ull * q;
            const uint4 c = load_bytes16(cp, rem);
            u32 s[1][4] = {{iv0, iv1, iv2, GT_BSWAP32(q + 2u)}};
            aes256_encrypt_n<1>(s, Tb, lo, RK);
            const u32 ks[4] = {c.x ^ s[0][0], c.y ^ s[0][1], c.z ^ s[0][2], c.w ^ s[0][3]};
            u8* op = out + out_off + 16ull * q;
#pragma unroll
            for (int i = 0; i < 16; ++i)
                if ((u32)i < rem) op[i] = (u8)(ks[i >> 2] >> (8 * (i & 3)));
            acc = u4xor(ghash_mul_tab(acc, HB), c);
        }
        if (p < cb) {
            const u32 qlast = p + ((cb - 1u - p) / P) * P;
            acc = gf_mul(acc, hpow_g[cb - qlast]);      // H^(cb+1-qlast)
        }
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

// One thread per segment: tag = E(K,J0) ^ S, S = lanes ^ AAD*H^(cb+1) ^ len*H.
extern "C" __global__ void gcm_finalize(const u8* __restrict__ in, const u8* __restrict__ aad,
                                        const SegDesc* __restrict__ desc, const uint4* __restrict__ hpow_g,
                                        const uint4* __restrict__ xpow_g, const u32* __restrict__ segacc,
                                        u8* __restrict__ ok, u32 n) {
    const u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const SegDesc d = desc[j];
    const uint4 h = hpow_g[0];
    uint4 s = make_uint4(segacc[4 * j], segacc[4 * j + 1], segacc[4 * j + 2], segacc[4 * j + 3]);
    uint4 g = make_uint4(0u, 0u, 0u, 0u);
    for (u32 off = 0; off < d.aad_len; off += 16) {
        const u32 m = d.aad_len - off < 16u ? d.aad_len - off : 16u;
        g = gf_mul(u4xor(g, load_bytes16(aad + d.aad_off + off, m)), h);
    }
    s = u4xor(s, gf_mul(g, xpow_g[d.xpow_idx]));
    const u64 abits = 8ull * d.aad_len, cbits = 8ull * d.clen;
    const uint4 len = make_uint4(GT_BSWAP32((u32)(abits >> 32)), GT_BSWAP32((u32)abits),
                                 GT_BSWAP32((u32)(cbits >> 32)), GT_BSWAP32((u32)cbits));
    s = u4xor(s, gf_mul(len, h));
    const uint4 t = load_bytes16(in + d.in_off + d.clen, 16u);
    const u32 diff = (s.x ^ d.ej0[0] ^ t.x) | (s.y ^ d.ej0[1] ^ t.y) | (s.z ^ d.ej0[2] ^ t.z) | (s.w ^ d.ej0[3] ^ t.w);
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
