"""AES-256-GCM decrypt-and-verify of staged segments on the GPU (cupy).

The staging layout is the hop channel's (DESIGN.md section 6): segment i sits
at byte offset ``i * (seg_size + 16)`` of the staging buffer as ``len_i``
ciphertext bytes followed by its 16-byte tag; ``len_i == seg_size`` except for
the last segment, which may be shorter. Segment i's nonce is
``nonce_prefix (4 bytes) || i (8 bytes, big-endian)`` and its associated data
is given by the caller. Plaintext lands contiguously in ``out``
(segment i at ``i * seg_size``) and every tag is checked on the GPU.

What the host does (small, per call): the AES key schedule, H = E(K, 0),
E(K, J0) for each segment (one ECB call of ``cryptography``), and the
segment descriptors; everything that touches bulk data runs on the device.
The output of a segment whose tag fails is still written: callers must scrub
it (``decrypt_segments_or_scrub`` does).

Byte-for-byte the result equals ``cryptography``'s ``AESGCM.decrypt``; the
tests check that and the Wycheproof vectors.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gtbus.errors import ChannelError
from gtbus.gpu.kernels import _cuda
from gtbus.gpu.kernels._aes_gcm_cuda import DESC_WORDS, GCM_THREADS, SOURCE
from gtbus.gpu.kernels._gf128 import expand_key_256

__all__ = [
    "GcmDecryptor",
    "SegmentSpec",
    "decrypt_segments",
    "decrypt_segments_or_scrub",
    "first_bad_segment",
    "segment_nonce",
    "TAG_SIZE",
]

TAG_SIZE = 16
NONCE_PREFIX_SIZE = 4
_SMEM_BYTES = 8192 * 4 + 4096 * 16 + 15 * 16
_BLOCKS_PER_SM = 2
_EPILOGUE_STEPS = 3
_MAX_LANES = 1 << 16
_DEFAULT_UNROLL = 2


def segment_nonce(nonce_prefix: bytes, index: int) -> bytes:
    """The 12-byte nonce of segment ``index``: prefix || big-endian 64-bit index."""
    if len(nonce_prefix) != NONCE_PREFIX_SIZE:
        raise ValueError("nonce prefix must be 4 bytes")
    return bytes(nonce_prefix) + int(index).to_bytes(8, "big")


@dataclass(frozen=True)
class SegmentSpec:
    """One AEAD message placed in device buffers (general form, any IV).

    ``in_off`` and ``out_off`` must be multiples of 16; the tag follows the
    ``clen`` ciphertext bytes at ``in_off + clen``.
    """

    in_off: int
    out_off: int
    clen: int
    iv: bytes
    aad: bytes


class _Kernels:
    """The compiled functions for one unroll setting on the current device."""

    def __init__(self, unroll: int) -> None:
        mod = _cuda.get_module(
            "aes_gcm", SOURCE, (f"-DGCM_UNROLL={unroll}", f"-DGCM_THREADS={GCM_THREADS}")
        )
        self.powers = mod.get_function("gcm_powers")
        self.table = mod.get_function("gcm_table")
        self.main = mod.get_function("gcm_ctr_ghash")
        self.main.max_dynamic_shared_size_bytes = _SMEM_BYTES
        self.finalize = mod.get_function("gcm_finalize")
        self.grid = _BLOCKS_PER_SM * _cuda.sm_count()


_kernels_lock = threading.Lock()
_kernels: dict[tuple[int, int], _Kernels] = {}


def _get_kernels(unroll: int) -> _Kernels:
    cp = _cuda.cupy()
    key = (cp.cuda.Device().id, unroll)
    with _kernels_lock:
        k = _kernels.get(key)
        if k is None:
            k = _kernels[key] = _Kernels(unroll)
        return k


class GcmDecryptor:
    """Device-side AES-256-GCM state for one key (one hop's channel key).

    Holds the round keys and the GHASH tables on the device (built on first
    use for each lane count). ``close()`` overwrites them with zeros; use it
    (or the context manager) when the hop ends.
    """

    def __init__(self, key: bytes, *, unroll: int = _DEFAULT_UNROLL) -> None:
        if len(key) != 32:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        cp = _cuda.cupy()
        self._ecb = Cipher(algorithms.AES(bytes(key)), modes.ECB())
        self._k = _get_kernels(unroll)
        rk = np.asarray(expand_key_256(bytes(key)), dtype=np.uint32)
        self._rk = cp.asarray(rk)
        h = self._ecb.encryptor().update(bytes(16))
        self._h = cp.asarray(np.frombuffer(h, dtype=np.uint8))
        self._tables: dict[int, tuple[Any, Any]] = {}
        self._closed = False
        # Benchmarks set this to a list to collect (start, end) CUDA events
        # around the bulk kernel of each call.
        self.timing: list[tuple[Any, Any]] | None = None

    # -- key material --------------------------------------------------------

    def _tables_for(self, lanes: int) -> tuple[Any, Any]:
        """(htab, hpow) for P = lanes: the H^P byte tables and H^1..H^P."""
        t = self._tables.get(lanes)
        if t is None:
            cp = _cuda.cupy()
            hpow = cp.empty(lanes * 16, dtype=cp.uint8)
            threads = 128
            self._k.powers(((lanes + threads - 1) // threads,), (threads,), (self._h, hpow, np.uint32(lanes)))
            htab = cp.empty(4096 * 16, dtype=cp.uint8)
            self._k.table((4096 // threads,), (threads,), (hpow, np.uint32(lanes), htab))
            t = self._tables[lanes] = (htab, hpow)
        return t

    def close(self) -> None:
        """Zero the device copies of the key material (idempotent)."""
        if self._closed:
            return
        self._rk.fill(0)
        self._h.fill(0)
        for htab, hpow in self._tables.values():
            htab.fill(0)
            hpow.fill(0)
        self._tables.clear()
        self._closed = True

    def __enter__(self) -> GcmDecryptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- decryption ----------------------------------------------------------

    def decrypt_segments(
        self,
        nonce_prefix: bytes,
        staging: Any,
        out: Any,
        seg_size: int,
        nbytes: int,
        aads: Sequence[bytes],
    ) -> Any:
        """Decrypt and verify the hop layout; return a cupy bool array of per-segment tag results.

        ``len(aads)`` is the segment count n; it must match ``nbytes`` and
        ``seg_size`` (n = ceil(nbytes / seg_size), or 1 for nbytes == 0).
        ``seg_size`` must be a multiple of 16. Nothing is synchronised: the
        result is ready when the current stream is.
        """
        in_offs, out_offs, clens, j0 = hop_layout(nonce_prefix, seg_size, nbytes, len(aads))
        return self._run(staging, out, in_offs, out_offs, clens, j0, list(aads), nbytes)

    def decrypt_many(self, staging: Any, out: Any, specs: Sequence[SegmentSpec]) -> Any:
        """General form: decrypt and verify arbitrary messages with 12-byte IVs.

        Returns a cupy bool array, one entry per spec.
        """
        n = len(specs)
        if n == 0:
            raise ValueError("no segments")
        in_offs = np.asarray([s.in_off for s in specs], dtype=np.uint64)
        out_offs = np.asarray([s.out_off for s in specs], dtype=np.uint64)
        clens = np.asarray([s.clen for s in specs], dtype=np.uint64)
        j0 = np.zeros((n, 16), dtype=np.uint8)
        for i, s in enumerate(specs):
            if len(s.iv) != 12:
                raise ValueError("only 96-bit IVs are supported")
            j0[i, :12] = np.frombuffer(s.iv, dtype=np.uint8)
        if np.any(in_offs % 16) or np.any(out_offs % 16):
            raise ValueError("segment offsets must be multiples of 16")
        out_need = int((out_offs + clens).max())
        return self._run(staging, out, in_offs, out_offs, clens, j0, [s.aad for s in specs], out_need)

    def _run(
        self,
        staging: Any,
        out: Any,
        in_offs: np.ndarray,
        out_offs: np.ndarray,
        clens: np.ndarray,
        j0: np.ndarray,
        aads: list[bytes],
        out_need: int,
    ) -> Any:
        if self._closed:
            raise ChannelError("decryptor is closed")
        cp = _cuda.cupy()
        staging = _cuda.require_device_array(staging, "staging")
        out = _cuda.require_device_array(out, "out")
        if staging.data.ptr % 16 or out.data.ptr % 16:
            raise ValueError("staging and out must be 16-byte aligned")
        n = len(aads)
        if int((in_offs + clens).max()) + TAG_SIZE > staging.size:
            raise ValueError("staging buffer is smaller than the segments it should hold")
        if out_need > out.size:
            raise ValueError("output buffer is smaller than the plaintext")
        if int(clens.max()) >= (1 << 32) - 64:
            raise ValueError("segment too long for a 32-bit GCM counter")

        packed = pack_segments(self._ecb, in_offs, out_offs, clens, j0, aads)
        meta = cp.asarray(packed.host)
        desc_d = meta[: packed.acc_off]
        segacc = meta[packed.acc_off : packed.aad_off]
        aad_d = meta[packed.aad_off :]

        k = self._k
        g = _choose_groups(n, packed.seq_max, k.grid)
        lanes = GCM_THREADS * g
        htab, hpow = self._tables_for(lanes)
        nunits = n * g
        if self.timing is not None:
            ev0, ev1 = cp.cuda.Event(), cp.cuda.Event()
            ev0.record()
        k.main(
            (min(nunits, k.grid),),
            (GCM_THREADS,),
            (
                staging,
                out,
                desc_d,
                aad_d,
                self._rk,
                htab,
                hpow,
                segacc,
                np.uint32(nunits),
                np.uint32(g),
                np.uint32(lanes),
            ),
            shared_mem=_SMEM_BYTES,
        )
        if self.timing is not None:
            ev1.record()
            self.timing.append((ev0, ev1))
        ok = cp.empty(n, dtype=cp.uint8)
        k.finalize(((n + 127) // 128,), (128,), (staging, desc_d, segacc, ok, np.uint32(n)))
        return ok.view(cp.bool_)


def hop_layout(
    nonce_prefix: bytes, seg_size: int, nbytes: int, nseg: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Offsets, lengths and IVs of the hop layout (pure host work).

    Returns (staging offsets, output offsets, ciphertext lengths, (n, 16)
    uint8 array with each segment's IV in its first 12 bytes).
    """
    if len(nonce_prefix) != NONCE_PREFIX_SIZE:
        raise ValueError("nonce prefix must be 4 bytes")
    if seg_size <= 0 or seg_size % 16:
        raise ValueError("seg_size must be a positive multiple of 16")
    n = nseg
    if n < 1:
        raise ValueError("at least one segment (one AAD) is needed")
    expect = max(1, -(-nbytes // seg_size))
    if n != expect:
        raise ValueError(f"{n} AADs given but {nbytes} bytes in {seg_size}-byte segments make {expect}")
    idx = np.arange(n, dtype=np.uint64)
    clens = np.full(n, seg_size, dtype=np.uint64)
    clens[-1] = nbytes - (n - 1) * seg_size
    in_offs = idx * np.uint64(seg_size + TAG_SIZE)
    out_offs = idx * np.uint64(seg_size)
    j0 = np.zeros((n, 16), dtype=np.uint8)
    j0[:, :4] = np.frombuffer(bytes(nonce_prefix), dtype=np.uint8)
    j0[:, 4:12] = idx.astype(">u8").view(np.uint8).reshape(n, 8)
    return in_offs, out_offs, clens, j0


@dataclass(frozen=True)
class PackedSegments:
    """Host image of one call's small inputs, uploaded in one copy.

    ``host[:acc_off]``: n 64-byte descriptors (see ``SegDesc`` in the CUDA
    source); ``host[acc_off:aad_off]``: n zeroed 16-byte GHASH accumulators;
    ``host[aad_off:]``: the AADs back to back (plus 16 bytes of slack).
    ``seq_max``: the longest GHASH sequence (AAD + ciphertext + length blocks).
    """

    host: np.ndarray
    acc_off: int
    aad_off: int
    seq_max: int


def pack_segments(
    ecb: Any,
    in_offs: np.ndarray,
    out_offs: np.ndarray,
    clens: np.ndarray,
    j0: np.ndarray,
    aads: Sequence[bytes],
) -> PackedSegments:
    """Build the descriptors (pure host work; ``ecb`` is a ``cryptography`` AES-ECB Cipher).

    ``j0`` is an (n, 16) uint8 array whose first 12 bytes per row are the
    IVs; it is completed in place to J0 = IV || 0^31 || 1 and E(K, J0) goes
    into the descriptors.
    """
    n = len(aads)
    j0[:, 12:] = 0
    j0[:, 15] = 1
    ej0 = np.frombuffer(ecb.encryptor().update(j0.tobytes()), dtype=np.uint8)
    aad_lens = np.asarray([len(a) for a in aads], dtype=np.uint64)
    aad_offs = np.zeros(n, dtype=np.uint64)
    if n > 1:
        np.cumsum(aad_lens[:-1], out=aad_offs[1:])
    aad_blob = b"".join(aads)
    if len(aad_blob) >= (1 << 32):
        raise ValueError("AAD too large")
    desc = np.zeros((n, DESC_WORDS), dtype=np.uint32)
    d64 = desc.view(np.uint64)
    d64[:, 0] = in_offs
    d64[:, 1] = out_offs
    desc[:, 4] = clens
    desc[:, 5] = aad_offs
    desc[:, 6] = aad_lens
    desc[:, 8:11] = j0[:, :12].copy().view("<u4")
    desc[:, 12:16] = ej0.reshape(n, 16).view("<u4")
    acc_off = n * 64
    aad_off = acc_off + n * 16
    host = np.zeros(aad_off + len(aad_blob) + 16, dtype=np.uint8)
    host[:acc_off] = desc.view(np.uint8).reshape(-1)
    host[aad_off : aad_off + len(aad_blob)] = np.frombuffer(aad_blob, dtype=np.uint8)
    sixteen = np.uint64(16)
    seq = (clens + np.uint64(15)) // sixteen + (aad_lens + np.uint64(15)) // sixteen
    return PackedSegments(host, acc_off, aad_off, int(seq.max()) + 1)


def _choose_groups(nseg: int, seq_blocks: int, grid: int) -> int:
    """Lane groups per segment (P = GCM_THREADS * groups), by a makespan model.

    The persistent grid runs ``nseg * groups`` work units in waves of ``grid``;
    a unit takes about ceil(seq_blocks / P) block steps plus an epilogue of a
    few steps (the lane's general multiply, shuffles, atomics). Pick the
    fewest groups that minimise waves x steps.
    """
    best_g, best_cost = 1, None
    gmax = max(1, min(_MAX_LANES // GCM_THREADS, -(-seq_blocks // GCM_THREADS)))
    for g in range(1, gmax + 1):
        steps = -(-seq_blocks // (GCM_THREADS * g))
        cost = -(-nseg * g // grid) * (steps + _EPILOGUE_STEPS)
        if best_cost is None or cost < best_cost:
            best_g, best_cost = g, cost
    return best_g


def decrypt_segments(
    key: bytes,
    nonce_prefix: bytes,
    staging: Any,
    out: Any,
    seg_size: int,
    nbytes: int,
    aads: Sequence[bytes],
) -> Any:
    """One-shot ``GcmDecryptor(key).decrypt_segments(...)``; key material is zeroed after.

    Returns a cupy bool array (True = tag verified) per segment.
    """
    with GcmDecryptor(key) as dec:
        return dec.decrypt_segments(nonce_prefix, staging, out, seg_size, nbytes, aads)


def first_bad_segment(ok: Any) -> int | None:
    """Index of the first segment whose tag failed, or None (synchronises the stream)."""
    cp = _cuda.cupy()
    if ok.size == 0 or bool(ok.all()):
        return None
    return int(cp.argmin(ok.view(cp.uint8)))


def decrypt_segments_or_scrub(
    key: bytes,
    nonce_prefix: bytes,
    staging: Any,
    out: Any,
    seg_size: int,
    nbytes: int,
    aads: Sequence[bytes],
) -> None:
    """Decrypt and verify; on any bad tag zero ``out[:nbytes]`` and raise ChannelError."""
    ok = decrypt_segments(key, nonce_prefix, staging, out, seg_size, nbytes, aads)
    bad = first_bad_segment(ok)
    if bad is not None:
        out.reshape(-1)[:nbytes].fill(0)
        raise ChannelError(f"segment {bad} failed authentication; output scrubbed")
