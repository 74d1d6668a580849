"""Pure-Python GF(2^128) (GHASH) and AES helpers: the host side of the GPU AES-GCM.

Field elements are Python ints holding the 16 GCM block bytes big-endian
(``int.from_bytes(block, "big")``), so bit 127 is the coefficient of x^0, as
in NIST SP 800-38D. These functions are slow (bit-serial); they build the
small per-key inputs of the GPU kernels and model the kernels' arithmetic in
tests. Nothing here touches bulk data.
"""

from __future__ import annotations

_R = 0xE1 << 120
ONE = 1 << 127


def mul_x(v: int) -> int:
    """Multiply by x (one right shift in GCM's reflected bit order)."""
    return (v >> 1) ^ _R if v & 1 else v >> 1


def gf_mul(a: int, b: int) -> int:
    """Product of two field elements (SP 800-38D algorithm 1)."""
    z = 0
    v = b
    for i in range(127, -1, -1):
        if (a >> i) & 1:
            z ^= v
        v = mul_x(v)
    return z


def gf_pow(h: int, e: int) -> int:
    """h**e for e >= 0 by square-and-multiply."""
    r = ONE
    for bit in bin(e)[2:] if e else "":
        r = gf_mul(r, r)
        if bit == "1":
            r = gf_mul(r, h)
    return r


def ghash(h: int, aad: bytes, ct: bytes) -> int:
    """Reference GHASH_H(A, C) as a field element (sequential Horner)."""
    y = 0
    for data in (aad, ct):
        for off in range(0, len(data), 16):
            blk = data[off : off + 16].ljust(16, b"\0")
            y = gf_mul(y ^ int.from_bytes(blk, "big"), h)
    lens = ((8 * len(aad)) << 64) | (8 * len(ct))
    return gf_mul(y ^ lens, h)


def ghash_lanes_model(h: int, aad: bytes, ct: bytes, lanes: int) -> int:
    """GHASH computed the way the GPU kernel splits it; equals ``ghash``.

    The GHASH input is one sequence of M blocks (AAD blocks, ciphertext
    blocks, the length block). Lane p runs Horner with the fixed multiplier
    H^P over blocks p, p+P, p+2P, ... (acc = acc*H^P + X), then multiplies its
    accumulator by H^(M - last), last being the lane's final index; the lane
    results are XORed (the kernel uses atomicXor).
    """

    def blocks(data: bytes) -> list[int]:
        return [int.from_bytes(data[o : o + 16].ljust(16, b"\0"), "big") for o in range(0, len(data), 16)]

    seq = blocks(aad) + blocks(ct) + [((8 * len(aad)) << 64) | (8 * len(ct))]
    m = len(seq)
    hp = gf_pow(h, lanes)
    s = 0
    for p in range(min(lanes, m)):
        acc = 0
        for idx in range(p, m, lanes):
            acc = gf_mul(acc, hp) ^ seq[idx]
            last = idx
        s ^= gf_mul(acc, gf_pow(h, m - last))
    return s


def element_to_words(v: int) -> tuple[int, int, int, int]:
    """The four little-endian uint32 words a GPU thread sees when it loads the block as uint4."""
    b = v.to_bytes(16, "big")
    return tuple(int.from_bytes(b[i : i + 4], "little") for i in range(0, 16, 4))  # type: ignore[return-value]


# ---------------------------------------------------------------- AES -----


def _make_sbox() -> list[int]:
    """AES S-box from the multiplicative inverse in GF(2^8) and the affine map."""
    sbox = [0] * 256
    p = q = 1
    while True:
        p = p ^ ((p << 1) & 0xFF) ^ (0x1B if p & 0x80 else 0)
        q ^= q << 1
        q ^= q << 2
        q ^= q << 4
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09
        x = q
        for s in (1, 2, 3, 4):
            x ^= ((q << s) | (q >> (8 - s))) & 0xFF
        sbox[p] = x ^ 0x63
        if p == 1:
            break
    sbox[0] = 0x63
    return sbox


SBOX = _make_sbox()


def _xtime(s: int) -> int:
    return ((s << 1) ^ (0x1B if s & 0x80 else 0)) & 0xFF


# T0 in the GPU's little-endian word view: memory bytes (2s, s, s, 3s).
T0_LE = [
    _xtime(s) | (s << 8) | (s << 16) | ((_xtime(s) ^ s) << 24) for s in (SBOX[x] for x in range(256))
]


def expand_key_256(key: bytes) -> list[int]:
    """AES-256 key schedule: 60 round-key words, each as the little-endian view of its 4 bytes."""
    if len(key) != 32:
        raise ValueError("AES-256 needs a 32-byte key")
    w = [bytearray(key[i : i + 4]) for i in range(0, 32, 4)]
    rcon = 1
    for i in range(8, 60):
        t = bytearray(w[i - 1])
        if i % 8 == 0:
            t = bytearray(SBOX[b] for b in (t[1], t[2], t[3], t[0]))
            t[0] ^= rcon
            rcon = _xtime(rcon)
        elif i % 8 == 4:
            t = bytearray(SBOX[b] for b in t)
        w.append(bytearray(a ^ b for a, b in zip(w[i - 8], t)))
    return [int.from_bytes(x, "little") for x in w]


def _rotl(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & 0xFFFFFFFF


def aes256_encrypt_model(rk: list[int], block: bytes) -> bytes:
    """One AES-256 block with exactly the kernel's T-table formulation (for tests)."""
    s = [int.from_bytes(block[i : i + 4], "little") ^ rk[i // 4] for i in range(0, 16, 4)]
    T = T0_LE

    def b(w: int, r: int) -> int:
        return (w >> (8 * r)) & 0xFF

    for rnd in range(1, 14):
        s = [
            T[b(s[c], 0)]
            ^ _rotl(T[b(s[(c + 1) % 4], 1)], 8)
            ^ _rotl(T[b(s[(c + 2) % 4], 2)], 16)
            ^ _rotl(T[b(s[(c + 3) % 4], 3)], 24)
            ^ rk[4 * rnd + c]
            for c in range(4)
        ]
    out = []
    for c in range(4):
        v = (
            ((T[b(s[c], 0)] >> 8) & 0xFF)
            | (T[b(s[(c + 1) % 4], 1)] & 0xFF00)
            | ((T[b(s[(c + 2) % 4], 2)] << 8) & 0xFF0000)
            | ((T[b(s[(c + 3) % 4], 3)] << 16) & 0xFF000000)
        )
        out.append(v ^ rk[56 + c])
    return b"".join(v.to_bytes(4, "little") for v in out)
