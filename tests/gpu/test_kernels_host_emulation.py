"""The CUDA sources' device functions, compiled for the CPU and checked against references.

No GPU needed (a host C++ compiler is): the AES-GCM source's per-lane
function ``gcm_lane`` (CTR decryption plus the lane's GHASH term) is run for
every lane of every segment, exactly as the kernel splits the work, and the
BLAKE3 source's chunk and parent functions build a hash. This keeps the
kernel code itself under test on machines without a GPU; the GPU tests then
cover the launch code, the shared-memory staging and the reductions.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import blake3
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gtbus.gpu.kernels import _aes_gcm_cuda, _gf128
from gtbus.gpu.kernels import blake3 as gpu_blake3
from gtbus.gpu.kernels.aes_gcm import hop_layout, pack_segments, segment_nonce

CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler")

_GCM_HARNESS = r"""
#include <cstdio>
#include <vector>
#include "gcm.cu"
// in: u32 n, P, nstaging, naad, nout; u32 rk[60]; uint4 H; desc[n]; staging; aad
// out: n x 16-byte GHASH (XOR of the lanes' terms), then the output buffer
int main(int argc, char** argv) {
    FILE* f = fopen(argv[1], "rb");
    u32 h[5];
    if (fread(h, 4, 5, f) != 5) return 1;
    const u32 n = h[0], P = h[1], ns = h[2], na = h[3], no = h[4];
    u32 rkw[60];
    uint4 H;
    std::vector<SegDesc> desc(n);
    std::vector<u8> st(ns), aad(na + 16), out(no, 0x5a);
    if (fread(rkw, 4, 60, f) != 60 || fread(&H, 16, 1, f) != 1 || fread(desc.data(), 64, n, f) != n ||
        fread(st.data(), 1, ns, f) != ns || fread(aad.data(), 1, na, f) != na) return 1;
    fclose(f);
    static u32 T[8192];
    for (int i = 0; i < 8192; i++) T[i] = AES_T0[i >> 5];
    uint4 rk[15];
    for (int r = 0; r < 15; r++) rk[r] = make_uint4(rkw[4 * r], rkw[4 * r + 1], rkw[4 * r + 2], rkw[4 * r + 3]);
    std::vector<uint4> hpow(P);
    for (u32 t = 0; t < P; t++) hpow[t] = gf_pow(H, t + 1);
    static uint4 tab[4096];
    for (u32 t = 0; t < 4096; t++) {  // as gcm_table
        const u32 j = t >> 8, v = (t & 255u) << (8 * (j & 3));
        const uint4 x = make_uint4((j >> 2) == 0 ? v : 0u, (j >> 2) == 1 ? v : 0u, (j >> 2) == 2 ? v : 0u, (j >> 2) == 3 ? v : 0u);
        tab[t] = gf_mul(x, hpow[P - 1]);
    }
    FILE* g = fopen(argv[2], "wb");
    for (u32 j = 0; j < n; j++) {
        uint4 acc = make_uint4(0, 0, 0, 0);
        for (u32 p = 0; p < P; p++)
            acc = u4xor(acc, gcm_lane(st.data(), out.data(), &desc[j], aad.data(), (const u8*)T, (const u8*)tab,
                                      (p % 32) * 4, rk, hpow.data(), p, P));
        fwrite(&acc, 16, 1, g);
    }
    fwrite(out.data(), 1, no, g);
    fclose(g);
    return 0;
}
"""

_B3_HARNESS = r"""
#include <cstdio>
#include <vector>
#include "b3.cu"
// in: u64 n; n bytes. out: 32-byte hash, tree merged level by level (odd last node carried up).
int main(int argc, char** argv) {
    FILE* f = fopen(argv[1], "rb");
    unsigned long long n;
    if (fread(&n, 8, 1, f) != 1) return 1;
    std::vector<u8> d(n + 64);
    if (fread(d.data(), 1, n, f) != n) return 1;
    fclose(f);
    const unsigned long long nch = n ? (n + 1023) / 1024 : 1;
    std::vector<u32> cv(8 * nch);
    for (unsigned long long c = 0; c < nch; c++) {
        const unsigned long long rest = n - c * 1024;
        b3_chunk_generic(&cv[8 * c], d.data() + c * 1024, rest < 1024 ? (u32)rest : 1024u, c, nch == 1);
    }
    unsigned long long m = nch;
    while (m > 1) {
        unsigned long long k = 0;
        for (unsigned long long i = 0; i + 1 < m; i += 2, k++) {
            u32 o[8];
            b3_parent(o, &cv[8 * i], &cv[8 * i + 8], m == 2);
            for (int w = 0; w < 8; w++) cv[8 * k + w] = o[w];
        }
        if (m & 1) { for (int w = 0; w < 8; w++) cv[8 * k + w] = cv[8 * (m - 1) + w]; k++; }
        m = k;
    }
    FILE* g = fopen(argv[2], "wb");
    fwrite(cv.data(), 4, 8, g);
    fclose(g);
    return 0;
}
"""


def _build(tmp: Path, name: str, files: dict[str, str], defines: tuple[str, ...] = ()) -> Path:
    for fname, text in files.items():
        (tmp / fname).write_text(text)
    exe = tmp / name
    subprocess.run(
        [CXX, "-O2", "-std=c++17", *defines, "-x", "c++", str(tmp / f"{name}.cpp"), "-o", str(exe)],
        check=True,
        capture_output=True,
        cwd=tmp,
    )
    return exe


@pytest.fixture(scope="module")
def gcm_exes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    tmp = tmp_path_factory.mktemp("gcm")
    return {
        u: _build(tmp, f"gcm{u}", {"gcm.cu": _aes_gcm_cuda.SOURCE, f"gcm{u}.cpp": _GCM_HARNESS}, (f"-DGCM_UNROLL={u}",))
        for u in (1, 2, 4)
    }


def _emulate(exe: Path, tmp: Path, key: bytes, staging: np.ndarray, host: np.ndarray, acc_off: int,
             aad_off: int, lanes: int, nout: int) -> tuple[np.ndarray, bytes]:
    n = acc_off // 64
    h = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(bytes(16))
    aad = host[aad_off:]
    blob = (
        struct.pack("<5I", n, lanes, staging.size, aad.size, nout)
        + struct.pack("<60I", *_gf128.expand_key_256(key))
        + h
        + host[:acc_off].tobytes()
        + staging.tobytes()
        + aad.tobytes()
    )
    (tmp / "in.bin").write_bytes(blob)
    subprocess.run([str(exe), str(tmp / "in.bin"), str(tmp / "out.bin")], check=True)
    res = (tmp / "out.bin").read_bytes()
    return np.frombuffer(res[: 16 * n], dtype=np.uint8).reshape(n, 16), res[16 * n :]


@pytest.mark.parametrize("unroll", [1, 2, 4])
@pytest.mark.parametrize("lanes", [1, 3, 7, 512])
@pytest.mark.parametrize("seg,nbytes", [(16, 0), (16, 33), (64, 1000), (4096, 3 * 4096 + 5)])
def test_gcm_lane_split_matches_cryptography(
    gcm_exes: dict[int, Path], tmp_path: Path, unroll: int, lanes: int, seg: int, nbytes: int
) -> None:
    rng = random.Random(f"{unroll}-{lanes}-{seg}-{nbytes}")
    key, prefix, pt = rng.randbytes(32), rng.randbytes(4), rng.randbytes(nbytes)
    n = max(1, -(-nbytes // seg))
    aads = [rng.randbytes(rng.choice([0, 1, 16, 60, 61])) for _ in range(n)]
    staging = np.full(n * (seg + 16) + 16, 0xA5, dtype=np.uint8)
    for i in range(n):
        ct = AESGCM(key).encrypt(segment_nonce(prefix, i), pt[i * seg : (i + 1) * seg], aads[i])
        staging[i * (seg + 16) : i * (seg + 16) + len(ct)] = np.frombuffer(ct, dtype=np.uint8)
    in_offs, out_offs, clens, j0 = hop_layout(prefix, seg, nbytes, n)
    ecb = Cipher(algorithms.AES(key), modes.ECB())
    packed = pack_segments(ecb, in_offs, out_offs, clens, j0, aads)
    ej0 = packed.host[: packed.acc_off].reshape(n, 64)[:, 48:64]

    def check(st: np.ndarray) -> list[bool]:
        acc, out = _emulate(gcm_exes[unroll], tmp_path, key, st, packed.host, packed.acc_off, packed.aad_off,
                            lanes, nbytes + 32)
        if st is staging:
            assert out[:nbytes] == pt and out[nbytes:] == b"\x5a" * 32
        tags = [st[int(o) + int(c) : int(o) + int(c) + 16] for o, c in zip(in_offs, clens)]
        return [bool(((acc[i] ^ ej0[i]) == tags[i]).all()) for i in range(n)]

    assert check(staging) == [True] * n
    if nbytes:
        bad = staging.copy()
        bad[int(in_offs[-1])] ^= 0x40
        assert check(bad) == [True] * (n - 1) + [False]


@pytest.fixture(scope="module")
def b3_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("b3")
    return _build(tmp, "b3", {"b3.cu": gpu_blake3.SOURCE, "b3.cpp": _B3_HARNESS})


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1023, 1024, 1025, 2048, 3072, 3073, 9 * 1024 + 7, 70_000])
def test_blake3_device_functions(b3_exe: Path, tmp_path: Path, n: int) -> None:
    data = os.urandom(n)
    (tmp_path / "in.bin").write_bytes(struct.pack("<Q", n) + data)
    subprocess.run([str(b3_exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    assert (tmp_path / "out.bin").read_bytes() == blake3.blake3(data).digest()
