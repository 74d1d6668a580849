"""``gtbus bench stream``: raw ZeroMQ stream throughput, the anchor the conventional ship path is held to.

DESIGN section 10 asks ship (holder -> CurveZMQ -> orchestrator CPU -> device)
to run at >= 0.5 x what a raw CurveZMQ stream does on the same machine in the
same run; this module measures that stream as a competent user of pyzmq would
build it, with nothing of gtbus in the way:

* a child process (``python -m gtbus.bench.stream send ...``) connects PUSH
  sockets, one per connection, each in a context with one libzmq I/O thread per
  connection, and sends the same 4 MiB frame again and again, zero-copy
  (``copy=False``: libzmq reads the frame from Python's memory);
* this process binds a PULL socket and receives zero-copy (``copy=False``: a
  ``zmq.Frame`` over libzmq's message, no copy into Python);
* with ``curve=True`` both ends run CurveZMQ (libzmq's own, libsodium), without
  a ZAP handler: ZAP is consulted once per connection, not per frame;
* the rate is the bytes after the first frame over the time from the first
  frame's arrival to the last's: steady state, not the handshake.

PUSH/PULL rather than DEALER/ROUTER: both move a one-way stream through the same
libzmq session and CURVE code; PUSH/PULL has no routing-id frame to carry.

Exception to "only gtbus/transport/zmq/ imports zmq" (as for ``bench/bus.py``):
the anchor must not go through gtbus's transport.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq

from gtbus.bench.report import Result, Table, machine_info

MIB = 1 << 20
FRAME_BYTES = 4 * MIB  # one ship segment's worth (the largest the bus carries)
_HELLO = b"hi"


@dataclass(frozen=True)
class StreamRate:
    """One variant's measured rates: GB/s of every repetition, and their median."""

    curve: bool
    connections: int
    frame_bytes: int
    frames: int
    gbps: tuple[float, ...]

    @property
    def median_gbps(self) -> float:
        """Median over the repetitions."""
        return statistics.median(self.gbps)

    @property
    def label(self) -> str:
        """``CurveZMQ, 1 connection`` and the like."""
        kind = "CurveZMQ" if self.curve else "plaintext"
        return f"{kind}, {self.connections} connection{'s' if self.connections != 1 else ''}"


def stream_rate(*, curve: bool, total_bytes: int = 512 * MIB, frame_bytes: int = FRAME_BYTES, connections: int = 1,
                reps: int = 3, timeout_s: float = 120.0) -> StreamRate:
    """Measure one raw stream variant: ``reps`` streams of ``total_bytes`` in ``frame_bytes`` frames from a child process."""
    if connections < 1 or frame_bytes < 1 or reps < 1:
        raise ValueError("connections, frame_bytes and reps must be positive")
    frames = max(2, total_bytes // frame_bytes)
    ctx = zmq.Context(io_threads=connections)
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    argv = [sys.executable, "-m", "gtbus.bench.stream", "send", "--frames", str(frames * reps),
            "--frame-bytes", str(frame_bytes), "--connections", str(connections)]
    if curve:
        public, secret = zmq.curve_keypair()
        pull.setsockopt(zmq.CURVE_SERVER, 1)
        pull.setsockopt(zmq.CURVE_SECRETKEY, secret)
        # One argument with '=': a Z85 key may begin with '-', which argparse would read as an option.
        argv += [f"--server-key={public.decode()}"]
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    argv += ["--endpoint", f"tcp://127.0.0.1:{port}"]
    child = subprocess.Popen(argv)
    rates: list[float] = []
    try:
        for _ in range(connections):  # every connection is up (handshake done) before timing
            while not pull.poll(100):  # a sender that failed to start ends the wait at once
                if child.poll() is not None:
                    raise RuntimeError(f"stream sender exited with status {child.returncode} before sending")
            if pull.recv() != _HELLO:
                raise RuntimeError("stream sender spoke out of turn")
        for _ in range(reps):
            pull.recv(copy=False)
            t0 = time.perf_counter()
            got = 0
            for _ in range(frames - 1):
                got += len(pull.recv(copy=False))
            rates.append(got / (time.perf_counter() - t0) / 1e9)
    except zmq.Again:
        raise RuntimeError(f"stream sender sent nothing for {timeout_s:.0f}s") from None
    finally:
        child.kill()
        child.wait()
        pull.close(0)
        ctx.term()
    return StreamRate(curve, connections, frame_bytes, frames, tuple(rates))


def _send(endpoint: str, server_key: str | None, frames: int, frame_bytes: int, connections: int) -> None:
    ctx = zmq.Context(io_threads=connections)
    socks = []
    for _ in range(connections):
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, -1)
        if server_key is not None:
            public, secret = zmq.curve_keypair()
            s.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
            s.setsockopt(zmq.CURVE_PUBLICKEY, public)
            s.setsockopt(zmq.CURVE_SECRETKEY, secret)
        s.connect(endpoint)
        s.send(_HELLO)
        socks.append(s)
    payload = os.urandom(frame_bytes)  # one immutable frame, sent zero-copy again and again
    for i in range(frames):
        socks[i % connections].send(payload, copy=False)
    for s in socks:
        s.close()  # linger: every queued frame goes out first
    ctx.term()


def run_stream_bench(out_dir: Path, *, total_mib: float = 512.0, reps: int = 3, connections: Sequence[int] = (1, 2, 4),
                     say: Callable[[str], None] = lambda s: None) -> Result:
    """CurveZMQ and plaintext stream rates (1 and more connections); writes ``stream-<host>.md/.json``."""
    res = Result(name="stream", title="gtbus bench stream (raw ZeroMQ stream throughput, 4 MiB frames)", machine=machine_info())
    rates = stream_table(res, total_bytes=int(total_mib * MIB), reps=reps, connections=connections, say=say)
    res.data["stream"] = [{"curve": r.curve, "connections": r.connections, "frame_bytes": r.frame_bytes,
                           "frames": r.frames, "gbps": list(r.gbps), "median_gbps": r.median_gbps} for r in rates]
    res.finish()
    md, js = res.write(out_dir)
    res.data["files"] = [str(md), str(js)]
    return res


def stream_table(res: Result, *, total_bytes: int, reps: int, connections: Sequence[int] = (1,),
                 say: Callable[[str], None] = lambda s: None) -> list[StreamRate]:
    """Measure CurveZMQ then plaintext at each connection count; add their table to ``res``; the first is the anchor."""
    rates = [stream_rate(curve=c, total_bytes=total_bytes, connections=n, reps=reps) for c in (True, False) for n in connections]
    t = Table(f"Raw ZeroMQ stream, PUSH -> PULL on 127.0.0.1, {FRAME_BYTES // MIB} MiB frames zero-copy, "
              f"{total_bytes / MIB:g} MiB per repetition (median of {reps})", ["stream", "GB/s", "all repetitions"])
    for r in rates:
        t.add(r.label, f"{r.median_gbps:.2f}", " ".join(f"{x:.2f}" for x in r.gbps))
    t.notes.append("the anchor of DESIGN §10: ship >= 0.5 x the CurveZMQ rate of one connection, measured in the same run")
    res.tables.append(t)
    say(t.text())
    return rates


def _main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    _send(args.endpoint, args.server_key, args.frames, args.frame_bytes, args.connections)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gtbus.bench.stream")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send", help="internal: the sending side")
    s.add_argument("--endpoint", required=True)
    s.add_argument("--server-key", default=None)
    s.add_argument("--frames", type=int, required=True)
    s.add_argument("--frame-bytes", type=int, required=True)
    s.add_argument("--connections", type=int, default=1)
    return p


if __name__ == "__main__":
    _main()
