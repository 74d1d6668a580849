"""``gtbus bench device``: the device figures of the design's table (section 10), in one run.

* encrypted provisioning of a chunk (default 512 MiB): a separate, long-lived
  holder process maps the hop's staging by handle and seals into it; the
  device authenticates and decrypts into a private buffer. Baselines in the
  same run: the holder process's plain pinned (and pageable) host-to-device
  copy on cupy, or a plain memcpy on the host backend;
* the same at the talk's buffer sizes, and with a GPT-2 124M training
  throughput measured on this device, the transfer share per size (training
  time of one pass over a chunk projected from the measured tokens/s);
* travel vs the conventional ship path for one chunk, both through the full
  protocol (real processes, CURVE, signatures) in the same run;
* hop control overhead: grant to return for (near) zero-byte hops, through the
  full protocol;
* scrub + verify-zero of the hop buffer and re-measure of a 0.5 GB model.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import msgpack

from gtbus.bench.report import Result, Table, machine_info
from gtbus.bench.ship import ship_section
from gtbus.gpu.backends import make_device
from gtbus.gpu.channel import ChannelParams, SegmentContext, segment_count, staging_size
from gtbus.nodes.hop_phases import durations, parse_described
from gtbus.training.checkpoint import read_checkpoint

MIB = 1 << 20


class _Holder:
    """The benchmark's holder process."""

    def __init__(self, backend: str, nbytes: int) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "gtbus.bench.holder_proc", backend, str(nbytes)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout is not None
        self.baseline = json.loads(self.p.stdout.readline())

    def seal(self, params: ChannelParams, ctx: SegmentContext, nbytes: int) -> dict[str, Any]:
        assert self.p.stdin is not None and self.p.stdout is not None
        req = {"params": msgpack.packb(params.to_wire(), use_bin_type=True).hex(), "run": ctx.run_id, "epoch": ctx.epoch,
               "count": ctx.count, "nbytes": nbytes}
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("benchmark holder process died")
        return json.loads(line)

    def close(self) -> None:
        if self.p.stdin:
            self.p.stdin.close()
        self.p.wait(timeout=30)


def _sync(dev: Any) -> None:
    if dev.name == "cupy":
        dev.array_module.cuda.runtime.deviceSynchronize()


def provision(dev: Any, holder: _Holder, nbytes: int, reps: int, seg: int = 4 * MIB) -> dict[str, float]:
    """Median times of: staging allocation, holder map+seal+unmap, device open; end to end."""
    rows: list[dict[str, float]] = []
    for r in range(reps + 1):  # the first one warms caches and the holder's pinned pool
        t0 = time.perf_counter()
        staging, handle = dev.alloc_hop_staging(staging_size(nbytes, seg))
        data = dev.alloc(nbytes)
        params = ChannelParams.generate(str(handle), nbytes, segment_size=seg)
        ctx = SegmentContext("bench", r + 1, "h1", segment_count(nbytes, seg))
        _sync(dev)
        t1 = time.perf_counter()
        answer = holder.seal(params, ctx, nbytes)
        t2 = time.perf_counter()
        dev.open_segments(staging, data, params, ctx, ctx.count, nbytes)
        _sync(dev)
        t3 = time.perf_counter()
        for b in (staging, data):
            dev.scrub(b)
            dev.release(b)
        if r:
            rows.append({"alloc_s": t1 - t0, "holder_s": t2 - t1, "map_s": answer["map_s"], "seal_s": answer["seal_s"],
                         "unmap_s": answer["unmap_s"], "open_s": t3 - t2,
                         "transfer_s": t3 - t1, "with_alloc_s": t3 - t0})
    return {k: statistics.median(x[k] for x in rows) for k in rows[0]}


def scrub_measure(dev: Any, buffer_bytes: int, model_bytes: int, reps: int = 5) -> dict[str, float]:
    """Median seconds of scrub + verify-zero of a hop buffer and measuring a model of ``model_bytes``."""
    xp = dev.array_module
    buf = dev.alloc(buffer_bytes)
    model = xp.ones(model_bytes // 4, dtype=xp.float32)
    out: list[dict[str, float]] = []
    for _ in range(reps + 1):
        _sync(dev)
        t0 = time.perf_counter()
        dev.scrub(buf)
        ok = dev.verify_zero(buf)
        t1 = time.perf_counter()
        dev.measure(model)
        _sync(dev)
        t2 = time.perf_counter()
        assert ok
        out.append({"scrub_verify_s": t1 - t0, "measure_s": t2 - t1, "total_s": t2 - t0})
    dev.release(buf)
    return {k: statistics.median(x[k] for x in out[1:]) for k in out[0]}


def protocol_runs(backend: str, chunk_tokens: int, hops: int, mode: str, root: Path, *, remote: bool = False, prepare: bool = True) -> dict[str, Any]:
    """A one-holder run through the full protocol (``remote``: through the device agent; ``prepare``: the orchestrator's
    --prepare/--no-prepare); its summary and hop records."""
    from gtbus.nodes.launcher import LocalDeployment, LocalRun
    from gtbus.training.shards import write_shard

    import numpy as np

    run_dir = root / f"{mode}-{chunk_tokens}{'-remote' if remote else ''}{'' if prepare else '-unprepared'}"
    data = run_dir / "h1.bin"
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_shard(data, rng.integers(0, 256, size=chunk_tokens * hops, dtype=np.uint16))
    dep = LocalDeployment(LocalRun(run_dir=run_dir, holders=1, mode=mode, chunk_tokens=chunk_tokens, steps="1", backend=backend,
                                   data=[data], lease=120.0, remote_holders=["h1"] if remote else [],
                                   extra_orchestrator_args=() if prepare else ("--no-prepare",)))
    summary = dep.run_to_end(timeout=900)
    summary["hop_records"] = read_checkpoint(summary["checkpoint"], state=False).hops
    summary["holder_phases"] = holder_phases((run_dir / "h1.err").read_text(errors="replace"))
    return summary


_HOLDER_HOP = re.compile(r": hop (\d+) chunk \d+: wrote .*\(ms from the grant: ([^)]*)\)")


def holder_phases(text: str) -> dict[int, list[tuple[str, float]]]:
    """The holder's phase durations by epoch, from its hop lines (stderr)."""
    return {int(m[1]): parse_described(m[2]) for m in map(_HOLDER_HOP.search, text.splitlines()) if m}


def phase_table(title: str, run: dict[str, Any], *, skip_first: bool = True) -> Table:
    """Median and p90 ms of each phase of a full-protocol run's trained hops, orchestrator then holder (time order)."""
    hops = [h for h in run["hop_records"] if h["outcome"] == "trained"]
    hops = hops[1:] if skip_first and len(hops) > 1 else hops  # the first hop warms caches, pools, the JIT of the loop
    t = Table(title, ["side", "phase (ended)", "median ms", "p90 ms"])
    for side, per_hop in (("orchestrator", [durations(h.get("phases") or {}) for h in hops]),
                          ("holder", [run["holder_phases"].get(h["epoch"], []) for h in hops])):
        seen: dict[str, list[float]] = {}
        for phases in per_hop:
            for name, sec in phases:
                seen.setdefault(name, []).append(sec * 1e3)
        for name, ms in seen.items():
            ms.sort()
            t.add(side, name, f"{statistics.median(ms):.3f}", f"{ms[round(0.9 * (len(ms) - 1))]:.3f}")
    t.notes.append(f"{len(hops)} hops; each phase is the gap to the mark before it on the same side (gtbus/nodes/hop_phases.py); "
                   "the holder's marks start when its grant handler runs (after receive: signature, replay checks, record)")
    return t


def _best_parallel(work: Callable[[int, int], None], count: int, threads: int, tries: int = 3) -> float:
    """Best seconds of ``work(lo, hi)`` over ``count`` items split among ``threads`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    step = -(-count // threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(tries):
            t = time.perf_counter()
            list(pool.map(lambda lo: work(lo, min(count, lo + step)), range(0, count, step)))
            best = min(best, time.perf_counter() - t)
    return best


def _sealer(nbytes: int, seg: int, dst: Any) -> Callable[[int, int], None]:
    """``work(lo, hi)``: seal segments lo..hi of ``nbytes`` random bytes into ``dst`` (segment + tag each)."""
    import os

    import numpy as np

    from gtbus.gpu.channel import SegmentCipher

    cipher = SegmentCipher("aes-256-gcm", os.urandom(32))
    src = memoryview(np.frombuffer(os.urandom(nbytes), dtype=np.uint8))
    out = memoryview(dst)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            cipher.seal_segment(i.to_bytes(12, "big"), src[i * seg : (i + 1) * seg], b"aad", out[i * (seg + 16) : (i + 1) * (seg + 16)])

    return work


def aead_scaling(nbytes: int = 256 * MIB, seg: int = MIB) -> list[tuple[int, float]]:
    """AES-256-GCM ``encrypt_into`` GB/s on this CPU with 1, 2, 4, ... threads (the holder's bound)."""
    import os

    import numpy as np

    work = _sealer(nbytes, seg, np.zeros(nbytes + (nbytes // seg) * 16, dtype=np.uint8))
    out = []
    threads = 1
    while threads <= (os.cpu_count() or 1):
        out.append((threads, nbytes / _best_parallel(work, nbytes // seg, threads) / 1e9))
        threads *= 2
    return out


def seal_beside_copy(nbytes: int = 512 * MIB, seg: int = 4 * MIB) -> dict[str, float]:
    """Host memory shared by the holder's seal and the device copy (cupy): GB/s of each alone and together.

    Travel provisioning runs both at once: the seal reads plaintext and writes
    ciphertext into pinned memory on every core while the DMA engine reads
    earlier segments out of it, so every byte crosses host memory three times
    and min(seal alone, copy alone) is out of reach. Measured: a plain copy on
    all cores (host memory's own rate), the seal alone, the copy alone, and the
    seal while copies of another pinned buffer run back to back.
    """
    import os
    import threading

    import cupy
    import numpy as np

    threads = os.cpu_count() or 1
    a = np.frombuffer(os.urandom(nbytes), dtype=np.uint8)
    b = np.empty_like(a)

    def copy(lo: int, hi: int) -> None:
        np.copyto(b[lo * seg : hi * seg], a[lo * seg : hi * seg])

    res = {"threads": float(threads), "memcpy_all_cores_gbps": nbytes / _best_parallel(copy, nbytes // seg, threads) / 1e9}
    sealed = nbytes + (nbytes // seg) * 16
    keep = [cupy.cuda.alloc_pinned_memory(sealed), cupy.cuda.alloc_pinned_memory(nbytes)]
    seal = _sealer(nbytes, seg, np.frombuffer(keep[0], dtype=np.uint8, count=sealed))
    res["seal_alone_gbps"] = nbytes / _best_parallel(seal, nbytes // seg, threads) / 1e9
    other = np.frombuffer(keep[1], dtype=np.uint8, count=nbytes)
    other[:] = 1
    dev = cupy.empty(nbytes, dtype=cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)

    def h2d() -> None:
        cupy.cuda.runtime.memcpyAsync(dev.data.ptr, other.ctypes.data, nbytes, cupy.cuda.runtime.memcpyHostToDevice, stream.ptr)
        stream.synchronize()

    h2d()
    t = time.perf_counter()
    for _ in range(5):
        h2d()
    res["copy_alone_gbps"] = 5 * nbytes / (time.perf_counter() - t) / 1e9
    stop, copied = threading.Event(), [0]

    def copies() -> None:
        while not stop.is_set():
            h2d()
            copied[0] += nbytes

    th = threading.Thread(target=copies)
    th.start()
    try:
        while not copied[0]:
            time.sleep(0.01)  # the copies are running
        c0, t0 = copied[0], time.perf_counter()
        res["seal_beside_copy_gbps"] = nbytes / _best_parallel(seal, nbytes // seg, threads) / 1e9
        res["copy_beside_seal_gbps"] = (copied[0] - c0) / (time.perf_counter() - t0) / 1e9
    finally:
        stop.set()
        th.join()
    return res


def gpt2_tokens_per_s(steps: int = 8) -> float | None:
    """GPT-2 124M training throughput on this GPU (tokens/s), or None without torch/cupy."""
    try:
        import cupy

        from gtbus.training.workloads import make_trainer
    except ImportError:
        return None
    try:
        trainer = make_trainer("gpt2")
        trainer.load(cupy)
    except Exception:  # torch missing or unusable here
        return None
    toks = cupy.random.randint(0, 50257, size=4 << 20, dtype=cupy.int32).astype(cupy.uint16)
    trainer.train_on(toks, 2)  # warm-up (kernels, allocator)
    cupy.cuda.runtime.deviceSynchronize()
    rep = trainer.train_on(toks, steps)
    cupy.cuda.runtime.deviceSynchronize()
    return rep.tokens_seen / rep.seconds


def run_device_bench(out_dir: Path, *, backend: str, chunk_mib: float, reps: int, sizes_mib: list[float], control_hops: int,
                     ship_mib: float, gpt2: bool, say: Callable[[str], None], segment_mib: float = 4.0,
                     only_provisioning: bool = False) -> Result:
    """All figures; writes ``device-<backend>-<host>.md/.json``."""
    res = Result(name=f"device-{backend}", title=f"gtbus bench device ({backend} backend)", machine=machine_info())
    dev = make_device(backend)
    card = getattr(dev, "card", "CPU (host backend)")
    res.header.append(f"device: {card} ({dev.device_id.split(':')[0]})")
    nbytes = int(chunk_mib * MIB)
    say(f"starting the holder process ({chunk_mib:g} MiB of plaintext in its memory)")
    holder = _Holder(backend, max(nbytes, int(max(sizes_mib, default=0) * MIB)))
    try:
        base = holder.baseline
        seg = int(segment_mib * MIB)
        p = provision(dev, holder, nbytes, reps, seg)
        t = Table(f"Encrypted travel provisioning of one {chunk_mib:g} MiB chunk, {segment_mib:g} MiB segments (median of {reps})", ["figure", "seconds", "GB/s"])
        gb = nbytes / 1e9
        t.add("holder: map + seal (AES-256-GCM, all cores) + copy in + unmap", f"{p['holder_s']:.4f}", f"{gb / p['holder_s']:.1f}")
        t.add("device: authenticate + decrypt into private buffer", f"{p['open_s']:.4f}", f"{gb / p['open_s']:.1f}")
        t.add("travel provisioning, staging allocated", f"{p['transfer_s']:.4f}", f"{gb / p['transfer_s']:.1f}")
        t.add("travel provisioning incl. fresh staging allocation", f"{p['with_alloc_s']:.4f}", f"{gb / p['with_alloc_s']:.1f}")
        for k, v in base.items():
            if k.endswith("_gbps"):
                t.add(f"baseline, same run: plain {k[:-5].replace('_', ' ')}", f"{gb / v:.4f}", f"{v:.1f}")
        t.notes.append("goal (DESIGN §10): >= 25 GB/s encrypted travel, then 40; the fresh per-hop allocation can overlap the previous hop's training")
        res.tables.append(t)
        res.data["provision"] = {"chunk_bytes": nbytes, **p, "baseline": base}
        say(t.text())

        scaling = aead_scaling(seg=seg)
        ts = Table(f"Holder CPU bound: AES-256-GCM encrypt_into ({segment_mib:g} MiB segments, reused output) by threads", ["threads", "GB/s"])
        for k, v in scaling:
            ts.add(k, f"{v:.1f}")
        res.tables.append(ts)
        res.data["aead_scaling"] = scaling
        # Goal d: provisioning against its bound, both measured in this run: the
        # holder's AES-GCM on all its cores and the plain copy to the device.
        copy_gbps = base.get("pinned_h2d_gbps") or base.get("memcpy_gbps")
        if scaling and copy_gbps:
            bound = min(scaling[-1][1], copy_gbps)
            ts.notes.append(f"bound = min(AES-GCM on {scaling[-1][0]} threads {scaling[-1][1]:.1f}, plain copy {copy_gbps:.1f}) = {bound:.1f} GB/s; "
                            f"travel provisioning {gb / p['transfer_s']:.1f} GB/s = {gb / p['transfer_s'] / bound:.2f} x")
            res.goal(f"encrypted provisioning of {chunk_mib:g} MiB / min(holder AES-GCM on all cores, plain copy)", gb / p["transfer_s"] / bound, 0.8, "ratio")
        say(ts.text())
        if backend == "cupy":
            # What goal d's min() leaves out: the seal and the copy share host memory (seal_beside_copy).
            shared = seal_beside_copy(seg=seg)
            tm = Table("Host memory shared by the seal and the device copy (all cores, 512 MiB, best of 3)", ["figure", "GB/s"])
            for k, v in shared.items():
                if k.endswith("_gbps"):
                    tm.add(k[:-5].replace("_", " "), f"{v:.1f}")
            tm.notes.append(f"travel provisioning {gb / p['transfer_s']:.1f} GB/s = {gb / p['transfer_s'] / shared['seal_beside_copy_gbps']:.2f} x the seal "
                            "beside the copy; every byte crosses host memory three times (plaintext read, ciphertext written, DMA read)")
            res.tables.append(tm)
            res.data["seal_beside_copy"] = shared
            say(tm.text())

        rate = gpt2_tokens_per_s() if gpt2 and backend == "cupy" else None
        t2 = Table("Transfer share per buffer size (travel; GPT-2 124M training time projected from measured throughput)",
                   ["buffer", "travel tx s", "GPT-2 training s (one pass)", "tx %"])
        shares = []
        for mib in sizes_mib:
            n = int(mib * MIB)
            pp = provision(dev, holder, n, max(1, reps // 2), seg)
            train = (n // 2) / rate if rate else None
            share = pp["transfer_s"] / (pp["transfer_s"] + train) if train else None
            shares.append({"mib": mib, "transfer_s": pp["transfer_s"], "train_s": train, "share": share})
            t2.add(f"{mib:g} MiB", f"{pp['transfer_s']:.4f}", f"{train:.1f}" if train else "n/a", f"{share * 100:.4f}" if share is not None else "n/a")
        if rate:
            t2.notes.append(f"GPT-2 124M (bf16 autocast, batch 8 x 1024) trained at {rate:,.0f} tokens/s on this device; a chunk of N bytes holds N/2 tokens")
        else:
            t2.notes.append("no GPT-2 throughput (needs cupy and torch on a GPU): training column not available")
        t2.notes.append("goal: transfer share <= 0.05 % at every size (paper: 0.08 %)")
        res.tables.append(t2)
        res.data["shares"] = shares
        res.data["gpt2_tokens_per_s"] = rate
        say(t2.text())
    finally:
        holder.close()

    if only_provisioning:
        res.finish()
        md, js = res.write(out_dir)
        res.data["files"] = [str(md), str(js)]
        return res
    sm = scrub_measure(dev, nbytes, 500 * 1000 * 1000)
    t3 = Table("Epilogue: scrub + verify-zero of the hop buffer, re-measure of a 0.5 GB model (median)", ["figure", "ms"])
    t3.add(f"scrub + verify zero, {chunk_mib:g} MiB", f"{sm['scrub_verify_s'] * 1e3:.3f}")
    t3.add("measure 0.5 GB model (BLAKE3)", f"{sm['measure_s'] * 1e3:.3f}")
    t3.add("total", f"{sm['total_s'] * 1e3:.3f}")
    t3.notes.append("goal: <= 2 ms on a GPU")
    res.tables.append(t3)
    res.data["epilogue"] = sm
    say(t3.text())

    with tempfile.TemporaryDirectory(prefix="gtbus-bench-device-") as tmp:
        root = Path(tmp)
        say(f"control overhead: {control_hops} hops of 64 tokens through the full protocol")
        ctl = protocol_runs(backend, 64, control_hops, "travel", root)
        # The same hops with nothing prepared ahead (--no-prepare), in the same process tree: what preparing is worth.
        unprepared = protocol_runs(backend, 64, control_hops, "travel", root, prepare=False)
        prov = sorted(h["provision_s"] for h in ctl["hop_records"] if h["outcome"] == "trained")
        prov_unprepared = sorted(h["provision_s"] for h in unprepared["hop_records"] if h["outcome"] == "trained")
        t4 = Table(f"Hop control overhead: grant to return, 128-byte hops ({len(prov)} hops, full protocol)", ["statistic", "ms"])
        t4.add("median", f"{statistics.median(prov) * 1e3:.2f}")
        t4.add("p90", f"{prov[int(0.9 * (len(prov) - 1))] * 1e3:.2f}")
        t4.add("min", f"{prov[0] * 1e3:.2f}")
        g2r = [h["phases"]["return_received"] - h["phases"]["grant_sent"] for h in ctl["hop_records"]
               if h["outcome"] == "trained" and {"grant_sent", "return_received"} <= set(h.get("phases") or {})]
        if g2r:
            t4.add("median, grant sent to return handled (no work before the grant)", f"{statistics.median(g2r) * 1e3:.2f}")
        t4.add("median, the same hops not prepared ahead (--no-prepare), same run", f"{statistics.median(prov_unprepared) * 1e3:.2f}")
        t4.notes.append(f"hops prepared ahead (token.prepare): {ctl.get('prepared_hops')}; the --no-prepare run is the baseline of what preparing saves")
        t4.notes.append("from the hop's start (staging, key, model digest) to the return handled: includes sealing the params to the "
                        "holder, signing, CURVE, map/unmap; goal <= 2 ms median on the GPU host (DESIGN §10)")
        res.tables.append(t4)
        res.data["control_ms"] = [x * 1e3 for x in prov]
        res.data["control_unprepared_ms"] = [x * 1e3 for x in prov_unprepared]
        res.goal("hop control overhead, median (128-byte hops, full protocol)", statistics.median(prov) * 1e3, 2.0, "ms", at_most=True)
        say(t4.text())
        tp = phase_table("Where a control hop's time goes (128-byte hops)", ctl)
        res.tables.append(tp)
        res.data["control_phases"] = {"orchestrator": [h.get("phases") for h in ctl["hop_records"]], "holder": ctl["holder_phases"]}
        say(tp.text())

        full_hops = 3
        say(f"full-protocol travel: {full_hops} hops of {ship_mib:g} MiB (the first warms up), against the provisioning micro-benchmark")
        full = protocol_runs(backend, int(ship_mib * MIB) // 2, full_hops, "travel", root)
        warm = [h for h in full["hop_records"] if h["outcome"] == "trained"][1:]
        full_s = statistics.median(h["provision_s"] + h["open_s"] for h in warm)
        full_gbps = ship_mib * MIB / full_s / 1e9
        micro_gbps = nbytes / p["transfer_s"] / 1e9
        tf = phase_table(f"Where a full-protocol {ship_mib:g} MiB travel hop's time goes", full)
        tf.notes.append(f"grant to plaintext in the device buffer: {full_s:.4f} s ({full_gbps:.2f} GB/s, median of {len(warm)}); "
                        f"provisioning micro-benchmark, same run: {p['transfer_s']:.4f} s for {chunk_mib:g} MiB ({micro_gbps:.2f} GB/s)")
        res.tables.append(tf)
        res.data["full_protocol"] = {"bytes": int(ship_mib * MIB), "transfer_s": full_s, "gbps": full_gbps, "micro_gbps": micro_gbps,
                                     "phases": {"orchestrator": [h.get("phases") for h in full["hop_records"]], "holder": full["holder_phases"]}}
        res.goal(f"full-protocol {ship_mib:g} MiB travel hop / provisioning micro-benchmark, rate", full_gbps / micro_gbps, 0.8, "ratio")
        say(tf.text())

        res.data["travel_vs_ship"] = ship_section(res, backend=backend, ship_mib=ship_mib, root=root, runs=protocol_runs, say=say)
    res.finish()
    md, js = res.write(out_dir)
    res.data["files"] = [str(md), str(js)]
    return res
