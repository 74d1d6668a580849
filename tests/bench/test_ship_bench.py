"""The honest-ship benchmark: the raw ZeroMQ stream anchor, and travel vs ship through the full protocol.

Real processes, sockets and crypto at tiny sizes; what is checked is that every
figure is measured and every goal recorded (never whether a goal is met: that
is a wall-clock matter for the benchmark, not a test).
"""

from __future__ import annotations

import math
from pathlib import Path

from gtbus.bench.device import protocol_runs
from gtbus.bench.report import Result, machine_info
from gtbus.bench.ship import ship_section
from gtbus.bench.stream import stream_rate


def test_raw_stream_measures_curve_and_plaintext() -> None:
    for curve in (True, False):
        r = stream_rate(curve=curve, total_bytes=16 << 20, reps=2)
        assert r.curve is curve and r.connections == 1 and r.frames == 4
        assert len(r.gbps) == 2 and all(x > 0 and math.isfinite(x) for x in r.gbps)


def test_ship_section_records_the_anchor_the_paths_and_every_goal(tmp_path: Path) -> None:
    res = Result(name="ship-smoke", title="ship smoke", machine=machine_info())
    out = ship_section(res, backend="host", ship_mib=0.25, root=tmp_path, runs=protocol_runs, say=lambda s: None,
                       caps=(), hops=2, stream_reps=1)  # the sweep is the same call per cap: not repeated here
    for key in ("travel_s", "ship_s", "remote_s", "stream_curve_gbps", "stream_plain_gbps", "bus_stream_gbps"):
        assert out[key] > 0 and math.isfinite(out[key]), key
    names = [g.name for g in res.goals]
    assert names == ["ship / raw CurveZMQ stream (one connection), rate", "travel / ship at 0.25 MiB, speed"]
    assert all(g.measured > 0 for g in res.goals)
    assert [t.title.split(",")[0] for t in res.tables][:2] == ["Raw ZeroMQ stream", "Travel vs conventional ship"]


def test_stream_sender_takes_keys_that_begin_with_a_dash() -> None:
    # Z85 keys may begin with '-': CI once drew one, argparse took it for an option, the sender
    # exited and the bench waited 120 s. The key now travels as one '--server-key=KEY' argument.
    from gtbus.bench.stream import _parser

    key = "-" + "a" * 39
    assert _parser().parse_args(["send", "--endpoint", "tcp://127.0.0.1:1", f"--server-key={key}", "--frames", "1", "--frame-bytes", "1"]).server_key == key
