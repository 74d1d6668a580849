"""Travel against an honest conventional ship, and ship against the raw stream it runs over (DESIGN section 10).

Ship (holder -> signed ``ship.segment`` messages over CurveZMQ -> orchestrator
CPU decrypt on all cores -> pinned bounce -> device) is the baseline travel is
measured against, so it is first held to the raw CurveZMQ stream of the same
machine, same run (:mod:`gtbus.bench.stream`): ship >= 0.5 x that rate. The
signed bus alone (:mod:`gtbus.bench.bus_stream`: the same bytes as signed
``ship.segment`` messages, no AEAD, no device) is measured beside it, so that
what ship loses to the bus and what it loses to its own work are told apart. Only
then do the travel goals mean something: >= 10x ship at the big chunk, and
faster than ship at every cap from 128 KiB up.

Every path runs through the full protocol (real processes, CURVE, signatures,
records) for a few hops; the first hop of each run warms up (pools, pinned
bounces, page faults) and is left out. Transfer is grant to plaintext in the
device buffer (the hop's provision + open time).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gtbus.bench.bus_stream import signed_stream_rate
from gtbus.bench.report import Result, Table
from gtbus.bench.stream import stream_table

MIB = 1 << 20
KIB = 1 << 10
#: Chunk sizes of the "faster at every cap" sweep (bytes): the talk's smallest caps and two between.
SWEEP_CAPS = (128 * KIB, 512 * KIB, 4 * MIB, 32 * MIB)

Runs = Callable[..., dict[str, Any]]
"""``protocol_runs(backend, chunk_tokens, hops, mode, root, *, remote=False)`` of :mod:`gtbus.bench.device`."""


def warm_transfer_s(summary: dict[str, Any]) -> float:
    """Median transfer seconds (provision + open) of a run's trained hops after the first."""
    hops = [h for h in summary["hop_records"] if h["outcome"] == "trained"]
    if not hops:
        raise RuntimeError(f"no hop was trained in a {summary.get('mode')} run: {summary.get('outcomes')}")
    warm = hops[1:] or hops
    return statistics.median(h["provision_s"] + h["open_s"] for h in warm)


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n // KIB} KiB"


def ship_section(res: Result, *, backend: str, ship_mib: float, root: Path, runs: Runs, say: Callable[[str], None],
                 caps: Sequence[int] = SWEEP_CAPS, hops: int = 2, sweep_hops: int = 4, stream_reps: int = 3) -> dict[str, Any]:
    """Measure the raw stream, then travel, ship and the remote path; add tables and goals to ``res``; the numbers."""
    nbytes = int(ship_mib * MIB)
    say(f"raw ZeroMQ stream anchor: {max(nbytes, 64 * MIB) / MIB:g} MiB in 4 MiB frames, {stream_reps} times")
    rates = stream_table(res, total_bytes=max(nbytes, 64 * MIB), reps=stream_reps, say=say)
    curve = next(r for r in rates if r.curve and r.connections == 1)
    plain = next(r for r in rates if not r.curve and r.connections == 1)
    say("signed bus stream: the same bytes as ship.segment messages between two node runtimes, no AEAD")
    bus = statistics.median(signed_stream_rate(root / "bus-stream", total_bytes=max(nbytes, 64 * MIB), reps=stream_reps))

    tok = nbytes // 2
    say(f"travel vs ship: {hops} hops of {ship_mib:g} MiB per path through the full protocol (the first warms up)")
    tr = warm_transfer_s(runs(backend, tok, hops, "travel", root))
    sh = warm_transfer_s(runs(backend, tok, hops, "ship", root))
    rm = warm_transfer_s(runs(backend, tok, hops, "travel", root, remote=True))
    gb = nbytes / 1e9
    t = Table(f"Travel vs conventional ship, {ship_mib:g} MiB chunks, full protocol, same run", ["path", "transfer s", "GB/s"])
    t.add("raw CurveZMQ stream, one connection (anchor, no protocol)", f"{gb / curve.median_gbps:.3f}", f"{curve.median_gbps:.2f}")
    t.add("signed bus stream: ship.segment messages, runtime to runtime, no AEAD, no device", f"{gb / bus:.3f}", f"{bus:.2f}")
    t.add("ship: holder -> CurveZMQ -> orchestrator CPU decrypt (all cores) -> pinned -> device", f"{sh:.3f}", f"{gb / sh:.2f}")
    t.add("remote holder: ciphertext -> CurveZMQ -> device agent -> staging -> device decrypt", f"{rm:.3f}", f"{gb / rm:.2f}")
    t.add("travel: holder -> staging -> device decrypt", f"{tr:.3f}", f"{gb / tr:.2f}")
    t.notes.append(f"ship runs at {gb / sh / curve.median_gbps:.2f} x the raw CurveZMQ stream (goal >= 0.5; plaintext stream "
                   f"{plain.median_gbps:.2f} GB/s) and {gb / sh / bus:.2f} x the signed bus stream it rides on; "
                   f"travel is {sh / tr:.1f}x ship (paper: >= 4x; goal >= 10x)")
    t.notes.append("transfer = grant to plaintext in the device buffer (median of the hops after the first); "
                   "every ship segment is an Ed25519-signed message whose signature covers its blob's digest")
    res.tables.append(t)
    say(t.text())
    res.goal("ship / raw CurveZMQ stream (one connection), rate", gb / sh / curve.median_gbps, 0.5, "ratio")
    res.goal(f"travel / ship at {ship_mib:g} MiB, speed", sh / tr, 10.0, "x")

    sweep: list[dict[str, float]] = []
    ts = Table(f"Travel vs ship by chunk size (median of {sweep_hops - 1} hops after the first, full protocol)",
               ["chunk", "ship s", "travel s", "travel speed-up"])
    for cap in caps:
        say(f"travel vs ship at {_size(cap)}")
        s_s = warm_transfer_s(runs(backend, cap // 2, sweep_hops, "ship", root))
        t_s = warm_transfer_s(runs(backend, cap // 2, sweep_hops, "travel", root))
        sweep.append({"bytes": cap, "ship_s": s_s, "travel_s": t_s})
        ts.add(_size(cap), f"{s_s:.4f}", f"{t_s:.4f}", f"{s_s / t_s:.2f}x")
        res.goal(f"travel / ship at {_size(cap)}, speed", s_s / t_s, 1.0, "x")
    if caps:
        ts.notes.append("goal: travel faster than ship at every cap from 128 KiB up")
        res.tables.append(ts)
        say(ts.text())
    return {"bytes": nbytes, "travel_s": tr, "ship_s": sh, "remote_s": rm, "speedup": sh / tr,
            "stream_curve_gbps": curve.median_gbps, "stream_plain_gbps": plain.median_gbps, "bus_stream_gbps": bus,
            "ship_over_stream": gb / sh / curve.median_gbps, "sweep": sweep}
