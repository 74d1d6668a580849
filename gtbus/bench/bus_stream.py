"""The signed bus as a stream: ``ship.segment`` messages through two NodeRuntimes over CurveZMQ, nothing else.

Between the raw CurveZMQ stream (:mod:`gtbus.bench.stream`) and a ship hop
(:mod:`gtbus.bench.ship`) sits gtbus's bus: per message a signature over the
blob's digest, a record, the transport's framing and limits, and on the
receiving side the pipeline (sizes, header, role, digest, Ed25519 verify,
replay guard, record). This measures exactly that, with no AEAD and no device:
a child process (a holder's runtime) sends ``count`` ``ship.segment`` messages
each carrying one 4 MiB blob; this process (an orchestrator's runtime) counts
them in its handler. The rate is the bytes after the first message over the
time from its handling to the last's, as for the raw stream. A closing
``Echo`` tells the sender that everything before it was handled.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gtbus.bench.stream import FRAME_BYTES

_LOOPBACK = "tcp://127.0.0.1:*"


async def _receive(root: Path, count: int, reps: int, timeout_s: float) -> list[float]:
    from gtbus.messages.identity import Roster, load_identity
    from gtbus.messages.types import Echo, EchoReply, ShipSegment
    from gtbus.nodes.runtime import NodeRuntime
    from gtbus.nodes.wiring import server_transport

    ident, roster = load_identity(root / "keys" / "orch.key"), Roster.from_dir(root / "keys")
    rt = NodeRuntime(ident, roster, server_transport(ident, roster, _LOOPBACK, _LOOPBACK), run_dir=root / "orch", heartbeat_interval=0)
    stamps: list[tuple[float, int]] = []
    done = asyncio.Event()

    async def on_segment(acc: Any, delivery: Any) -> None:
        stamps.append((time.perf_counter(), len(acc.blobs[0])))

    async def on_echo(acc: Any, delivery: Any) -> None:
        await rt.send(EchoReply(b"", "done"), acc.header.sender, parent=acc.header.id)
        done.set()

    rt.on(ShipSegment, on_segment)
    rt.on(Echo, on_echo)
    await rt.start()
    router, pub = rt.transport.endpoints  # type: ignore[attr-defined]
    child = subprocess.Popen([sys.executable, "-m", "gtbus.bench.bus_stream", "send", str(root), router, pub, str(count * reps)])
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    finally:
        if not done.is_set():
            child.kill()
        child.wait(timeout=30)
        await rt.close()
    if len(stamps) != count * reps:
        raise RuntimeError(f"{len(stamps)} of {count * reps} ship.segment messages arrived")
    rates = []
    for r in range(reps):
        run = stamps[r * count : (r + 1) * count]
        rates.append(sum(n for _, n in run[1:]) / (run[-1][0] - run[0][0]) / 1e9)
    return rates


async def _send(root: Path, router: str, pub: str, total: int) -> None:
    from gtbus.messages.identity import Roster, load_identity
    from gtbus.messages.types import Echo, ShipSegment
    from gtbus.nodes.runtime import NodeRuntime
    from gtbus.nodes.wiring import client_transport

    ident, roster = load_identity(root / "keys" / "h1.key"), Roster.from_dir(root / "keys")
    rt = NodeRuntime(ident, roster, client_transport(ident, roster, router, pub), run_dir=root / "h1", server="orch", heartbeat_interval=0)
    await rt.start()
    await rt.transport.wait_connected(10)  # type: ignore[attr-defined]
    blobs = [bytearray(os.urandom(FRAME_BYTES)) for _ in range(4)]  # each segment has its own buffer, as a holder's do
    for i in range(total):
        await rt.send(ShipSegment("bench", i % 1000, 1000), blobs=[blobs[i % 4]])
    await rt.request(Echo(b"", "done"), timeout=300)
    await rt.close()


def signed_stream_rate(root: Path, *, total_bytes: int, reps: int = 3, timeout_s: float = 300.0) -> list[float]:
    """GB/s of each repetition of ``total_bytes`` of signed ``ship.segment`` messages (4 MiB blobs) between two processes."""
    from gtbus.messages.deployment_keys import make_deployment

    if not (root / "keys").exists():
        make_deployment(root / "keys", holders=1)
    return asyncio.run(_receive(root, max(2, total_bytes // FRAME_BYTES), reps, timeout_s))


def _main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gtbus.bench.bus_stream")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send", help="internal: the sending side")
    s.add_argument("root", type=Path)
    s.add_argument("router")
    s.add_argument("pub")
    s.add_argument("total", type=int)
    args = p.parse_args(argv)
    asyncio.run(_send(args.root, args.router, args.pub, args.total))


if __name__ == "__main__":
    _main()
