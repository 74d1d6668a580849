"""Benchmark of the GPU kernels: ``python3 -m gtbus.gpu.kernels.bench_kernels``.

Prints the card, a device-to-device copy baseline, AES-256-GCM decrypt+verify
throughput of 512 MiB (1 MiB and 4 MiB segments, each unroll variant), BLAKE3
of 512 MiB, and scrub + verify-zero of 512 MiB, all in one process. Times are
medians of CUDA-event intervals after warm-up; the AES-GCM "call" figure
includes the host work of a call (descriptors, E(K, J0), upload), the "kernel"
figure only the bulk kernel. Not a test: it checks results once and exits
non-zero if any is wrong.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _time_events(cp, fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    ts = []
    for _ in range(reps):
        s, e = cp.cuda.Event(), cp.cuda.Event()
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(cp.cuda.get_elapsed_time(s, e))
    return statistics.median(ts)


def _stage(key: bytes, prefix: bytes, pt: np.ndarray, seg: int, aads: list[bytes]) -> np.ndarray:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from gtbus.gpu.kernels.aes_gcm import segment_nonce

    n = len(aads)
    staging = np.zeros(n * (seg + 16), dtype=np.uint8)
    aes = AESGCM(key)

    def enc(i: int) -> None:
        data = memoryview(pt[i * seg : (i + 1) * seg])
        o = i * (seg + 16)
        aes.encrypt_into(segment_nonce(prefix, i), data, aads[i], memoryview(staging[o : o + len(data) + 16]))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        list(pool.map(enc, range(n)))
    return staging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)

    import blake3

    import cupy as cp

    from gtbus.gpu.kernels import _cuda
    from gtbus.gpu.kernels.aes_gcm import GcmDecryptor
    from gtbus.gpu.kernels.blake3 import blake3_digest, blake3_digest_device
    from gtbus.gpu.kernels.scrub import scrub, verify_zero, verify_zero_async

    rows: list[tuple[str, str]] = []
    failed = False
    nbytes = args.mib << 20
    name = _cuda.device_name()
    print(f"card: {name}, {_cuda.sm_count()} SMs, cupy {cp.__version__}", flush=True)
    rows.append(("card", name))

    # -- baseline: device-to-device copy ------------------------------------
    a = cp.random.randint(0, 256, size=nbytes, dtype=cp.uint8)
    b = cp.empty_like(a)
    ms = _time_events(cp, lambda: cp.copyto(b, a), args.reps)
    rows.append((f"memcpy D2D {args.mib} MiB", f"{ms:.3f} ms, {2 * nbytes / ms / 1e6:.0f} GB/s (read+write), "
                 f"{nbytes / ms / 1e6:.0f} GB/s (bytes copied)"))
    print(rows[-1], flush=True)
    del b

    # -- AES-256-GCM ---------------------------------------------------------
    rng = np.random.default_rng(1)
    pt = np.frombuffer(rng.bytes(nbytes), dtype=np.uint8)
    pt_d = cp.asarray(pt)
    key, prefix = rng.bytes(32), rng.bytes(4)
    out = cp.empty(nbytes, dtype=cp.uint8)
    for seg in (1 << 20, 4 << 20):
        n = -(-nbytes // seg)
        aads = [rng.bytes(60) for _ in range(n)]
        t0 = time.perf_counter()
        staging = cp.asarray(_stage(key, prefix, pt, seg, aads))
        print(f"staged {n} x {seg >> 20} MiB segments in {time.perf_counter() - t0:.2f} s", flush=True)
        for unroll in (1, 2, 4):
            dec = GcmDecryptor(key, unroll=unroll)
            out.fill(0)
            ok = dec.decrypt_segments(prefix, staging, out, seg, nbytes, aads)
            good = bool(ok.all()) and bool(cp.array_equal(out, pt_d))
            failed |= not good
            ms = _time_events(cp, lambda: dec.decrypt_segments(prefix, staging, out, seg, nbytes, aads), args.reps)
            dec.timing = []
            for _ in range(args.reps):
                dec.decrypt_segments(prefix, staging, out, seg, nbytes, aads)
            cp.cuda.Device().synchronize()
            kms = statistics.median(cp.cuda.get_elapsed_time(s, e) for s, e in dec.timing)
            dec.timing = None
            dec.close()
            rows.append((f"AES-GCM decrypt {args.mib} MiB, {seg >> 20} MiB segs, unroll {unroll}",
                         f"call {ms:.3f} ms = {nbytes / ms / 1e6:.1f} GB/s; kernel {kms:.3f} ms = "
                         f"{nbytes / kms / 1e6:.1f} GB/s; correct={good}"))
            print(rows[-1], flush=True)
        # one-shot including key setup (tables)
        def oneshot() -> None:
            with GcmDecryptor(key) as d:
                d.decrypt_segments(prefix, staging, out, seg, nbytes, aads)
        ms = _time_events(cp, oneshot, max(3, args.reps // 2))
        rows.append((f"AES-GCM one-shot incl. key setup, {seg >> 20} MiB segs",
                     f"{ms:.3f} ms = {nbytes / ms / 1e6:.1f} GB/s"))
        print(rows[-1], flush=True)
        del staging

    # -- BLAKE3 ----------------------------------------------------------------
    t0 = time.perf_counter()
    ref = blake3.blake3(pt.tobytes(), max_threads=blake3.blake3.AUTO).digest()
    cpu_s = time.perf_counter() - t0
    got = blake3_digest(pt_d)
    good = got == ref
    failed |= not good
    ms = _time_events(cp, lambda: blake3_digest_device(pt_d), args.reps)
    rows.append((f"BLAKE3 {args.mib} MiB", f"{ms:.3f} ms = {nbytes / ms / 1e6:.1f} GB/s; correct={good}; "
                 f"CPU blake3 (all threads) {cpu_s * 1e3:.0f} ms"))
    print(rows[-1], flush=True)

    # -- scrub + verify ---------------------------------------------------------
    buf = pt_d
    ms_s = _time_events(cp, lambda: scrub(buf), args.reps)
    ms_v = _time_events(cp, lambda: verify_zero_async(buf), args.reps)
    good = verify_zero(buf)
    buf[nbytes - 1] = 1
    good &= not verify_zero(buf)
    failed |= not good
    scrub(buf)
    walls = []
    for _ in range(args.reps):
        buf[12345] = 3
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        scrub(buf)
        z = verify_zero(buf)
        walls.append((time.perf_counter() - t0) * 1e3)
        failed |= not z
    rows.append((f"scrub {args.mib} MiB", f"{ms_s:.3f} ms = {nbytes / ms_s / 1e6:.0f} GB/s"))
    rows.append((f"verify_zero {args.mib} MiB", f"{ms_v:.3f} ms = {nbytes / ms_v / 1e6:.0f} GB/s; correct={good}"))
    rows.append((f"scrub+verify {args.mib} MiB (host wall, incl. flag readback)",
                 f"{statistics.median(walls):.3f} ms"))

    print("\n=== summary ===")
    for k, v in rows:
        print(f"{k:<58} {v}")
    print("RESULT:", "FAIL" if failed else "all results correct")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
