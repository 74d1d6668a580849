"""``gtbus bench bus``: signed request/reply over loopback, next to raw ZeroMQ, in one run.

Each variant runs between two processes on 127.0.0.1: this process is the
client, a child process (``python -m gtbus.bench.bus serve``) is the server.
All servers are started first and the variants are measured in
interleaved slices, so a change in machine load hits every variant alike.

Variants, from the bare socket up to the whole stack:

``raw-blocking``
    blocking pyzmq DEALER -> ROUTER, plaintext, no event loop at all: the
    floor that libzmq and loopback TCP set on this machine.
``raw-asyncio-zmq``
    asyncio pyzmq DEALER -> ROUTER through ``zmq.asyncio`` sockets (a future
    and a poller registration per receive), plaintext, nothing else.
``raw-asyncio-fd``
    asyncio pyzmq DEALER -> ROUTER driven the way a careful engineer drives
    zmq from asyncio (and the way gtbus's transport does): plain sockets,
    ``NOBLOCK`` reads until ``EAGAIN``, one ``add_reader`` on libzmq's FD that
    checks ``ZMQ_EVENTS`` and wakes the one waiting coroutine, no poller and no
    future per message, frames copied (they are small). Plaintext.

The anchor of DESIGN section 10, "raw asyncio pyzmq", is whichever of the two
raw asyncio variants has the lower median in the run (:func:`anchor_variant`).
``bus-plain``
    :class:`~gtbus.transport.zmq.ZmqServer` / ``ZmqClient`` in their
    plaintext benchmark mode (``curve=None, insecure=True``): the cost of the
    transport wrapper alone.
``bus-curve``
    the same with CurveZMQ and the ZAP handler, as deployed, but no signing.
``signed``
    :class:`~gtbus.nodes.runtime.NodeRuntime` on both ends (what nodes run):
    sign, record, CURVE, receive pipeline (limits, header, role, Ed25519
    verify, recipient, replay guard with its journal), dispatch to the
    :class:`~gtbus.messages.types.Echo` handler, which signs and records an
    :class:`~gtbus.messages.types.EchoReply`, and the same pipeline back.
    Each node prepares its next signature's nonce while it waits
    (:class:`~gtbus.messages.primitives.PreparedSigner`), as deployed.
``signed-rfc8032``
    the same with ``prepare_signatures=False``: every signature made whole
    (RFC 8032, deterministic) on the message's path; the difference is what
    preparing saves on this host.

The unsigned variants carry exactly the frames of a signed ``Echo``
(plus a one-byte op frame the bench server dispatches on), so every variant
moves the same bytes. One-way throughput sends signed ``Heartbeat`` messages
(fresh signature each) or, unsigned, the same pre-signed frames again and
again, then waits for a reply that the server sends only after it handled
everything before it.

Runtime heartbeats are off in the bench (``heartbeat_interval=0``) so that the
numbers are the round trip itself; everything else is as deployed.

Exception to "only gtbus/transport/zmq/ imports zmq": this module
imports pyzmq for the raw baselines, which by definition must not go
through gtbus's transport. Nothing outside the benchmark uses it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gtbus.bench.report import Result, Table, latency_stats, machine_info

VARIANTS = ("raw-blocking", "raw-asyncio-zmq", "raw-asyncio-fd", "bus-plain", "bus-curve", "signed", "signed-rfc8032")
#: The signed variants: as deployed (nonces prepared while waiting), and every signature made on the path.
SIGNED = ("signed", "signed-rfc8032")
#: The two ways of driving pyzmq from asyncio; the faster one in a run is the anchor.
#: The server of the two-process phase table (not a variant of the round-trip table): ``signed`` with its transport timed.
TRACED = "signed-traced"
TRACE_FILE = "server-marks.json"
RAW_ASYNCIO = ("raw-asyncio-zmq", "raw-asyncio-fd")
DESIGN_GOAL_US = 300.0
#: DESIGN section 10: signed round trip <= this x raw asyncio pyzmq, same run.
RATIO_GOAL_DEV_VM = 2.0
RATIO_GOAL_GPU_HOST = 2.5
ANCHOR = "raw asyncio pyzmq, the faster of raw-asyncio-zmq and raw-asyncio-fd in this run (DESIGN section 10)"


def anchor_variant(stats: dict[str, dict[str, float]]) -> str | None:
    """The raw asyncio variant with the lower median round trip in ``stats`` (None if neither ran)."""
    ran = [v for v in RAW_ASYNCIO if v in stats]
    return min(ran, key=lambda v: stats[v]["median_us"]) if ran else None


def ratio_goal(machine: dict[str, Any]) -> tuple[float, str]:
    """The signed/raw goal for this machine and the host it names: a GPU seen means the GPU host's 2.5x."""
    if machine.get("gpu"):
        return RATIO_GOAL_GPU_HOST, "GPU host"
    return RATIO_GOAL_DEV_VM, "dev VM"

OP_REPLY = b"r"  # answer with the same frames
OP_ONEWAY = b"o"  # count, do not answer
OP_SYNC = b"s"  # answer with the count so far (after everything before it was handled)

_LOOPBACK = "tcp://127.0.0.1:*"


# ------------------------------------------------------------------------------ keys and frames


def _deployment(root: Path) -> Any:
    from gtbus.messages.deployment_keys import make_deployment

    return make_deployment(root / "keys", holders=1)


def _load(root: Path, name: str) -> tuple[Any, Any]:
    from gtbus.messages.identity import Roster, load_identity

    return load_identity(root / "keys" / f"{name}.key"), Roster.from_dir(root / "keys")


def _sample_frames(root: Path, payload: int) -> tuple[list[bytes], list[bytes]]:
    """A signed Echo and a signed Heartbeat from h1 to orch: what the unsigned variants carry."""
    from gtbus.messages.signer import MessageSigner
    from gtbus.messages.types import Echo, Heartbeat

    ident, _ = _load(root, "h1")
    signer = MessageSigner(ident)
    _, echo = signer.sign(Echo(b"x" * payload, ""), "orch")
    _, hb = signer.sign(Heartbeat("bench", 0.0), "orch")
    return [bytes(f) for f in echo], [bytes(f) for f in hb]


# ------------------------------------------------------------------------------ servers (child)


def _serve_blocking(ready: Callable[[str], None]) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    ready(f"tcp://127.0.0.1:{port}")
    count = 0
    while True:
        parts = sock.recv_multipart()
        op = parts[1]
        if op == OP_REPLY:
            sock.send_multipart(parts)
        elif op == OP_ONEWAY:
            count += 1
        else:
            sock.send_multipart([parts[0], OP_SYNC, str(count).encode()])


def _raw_socket(kind: str, fd: bool) -> tuple[Any, Callable[[Sequence[bytes]], Awaitable[None]], Callable[[], Awaitable[list[bytes]]], Callable[[], None]]:
    """A raw pyzmq socket of ``kind`` with LINGER 0: (socket, async send, async recv, close)."""
    import zmq
    import zmq.asyncio

    ctx: Any = zmq.Context() if fd else zmq.asyncio.Context()
    sock = ctx.socket(getattr(zmq, kind))
    sock.setsockopt(zmq.LINGER, 0)
    if fd:
        driven = _FdSocket(sock)
        send, recv = driven.send, driven.recv
    else:
        send, recv = sock.send_multipart, sock.recv_multipart

    def close() -> None:
        if fd:
            driven.loop.remove_reader(driven.fd)
        ctx.destroy(0)

    return sock, send, recv, close


async def _serve_raw(ready: Callable[[str], None], fd: bool) -> None:
    sock, send, recv, _ = _raw_socket("ROUTER", fd)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    ready(f"tcp://127.0.0.1:{port}")
    count = 0
    while True:
        parts = await recv()
        op = parts[1]
        if op == OP_REPLY:
            await send(parts)
        elif op == OP_ONEWAY:
            count += 1
        else:
            await send([parts[0], OP_SYNC, str(count).encode()])


class _FdSocket:
    """A plain pyzmq socket driven from asyncio by its FD: NOBLOCK, one waiter, no poller.

    libzmq's FD signals that ``ZMQ_EVENTS`` may have changed (edge-triggered,
    and any socket operation may consume the signal), so a receive looks at
    ``ZMQ_EVENTS`` first and waits only when it shows nothing; the reader
    callback reads ``ZMQ_EVENTS`` (which clears the FD) and wakes the waiter if
    what it waits for is there. ``ZMQ_EVENTS`` is read through the backend's
    ``get`` (no enum built per call), as gtbus's own transport does. One
    coroutine uses a socket, so at most one waits.
    """

    def __init__(self, sock: Any) -> None:
        import zmq

        self.sock = sock
        # ZMQ_EVENTS is an int; pyzmq types every option as int | bytes.
        self._get: Callable[[], int] = functools.partial(zmq.backend.Socket.get, sock, zmq.EVENTS)  # type: ignore[assignment]
        self._again, self._noblock = zmq.Again, zmq.NOBLOCK
        self._pollin, self._pollout = int(zmq.POLLIN), int(zmq.POLLOUT)
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future[None] | None = None
        self.wanted = 0
        self.fd = sock.getsockopt(zmq.FD)
        self.loop.add_reader(self.fd, self._ready)

    def _ready(self) -> None:
        events = self._get()
        w = self.waiter
        if w is not None and events & self.wanted and not w.done():
            w.set_result(None)

    async def _wait(self, wanted: int) -> None:
        self.waiter, self.wanted = self.loop.create_future(), wanted
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def recv(self) -> list[bytes]:
        while True:
            if self._get() & self._pollin:
                try:
                    return self.sock.recv_multipart(self._noblock)  # type: ignore[no-any-return]
                except self._again:  # seen, then gone (a peer's pipe dropped): look again
                    continue
            await self._wait(self._pollin)

    async def send(self, parts: Sequence[bytes]) -> None:
        while True:
            try:
                self.sock.send_multipart(parts, self._noblock)
                return
            except self._again:  # queue full (one-way mode): wait for room
                await self._wait(self._pollout)


async def _serve_bus(root: Path, curve: bool, ready: Callable[[str], None]) -> None:
    from gtbus.transport.zmq import CurveServerConfig, ZmqServer

    if curve:
        ident, roster = _load(root, "orch")
        server = ZmqServer(
            "orch", _LOOPBACK, _LOOPBACK, CurveServerConfig.from_secret(ident.curve_secret_bytes),
            {roster["h1"].curve: "h1"},
        )
    else:
        server = ZmqServer("orch", _LOOPBACK, _LOOPBACK, None, insecure=True)
    await server.start()
    ready(server.endpoints[0] + " " + server.endpoints[1])
    count = 0
    while True:
        d = await server.recv()
        op = d.frames[0]
        if op == OP_REPLY:
            await server.send(d.peer, d.frames)  # type: ignore[arg-type]
        elif op == OP_ONEWAY:
            count += 1
        else:
            await server.send(d.peer, [OP_SYNC, str(count).encode()])  # type: ignore[arg-type]


async def _serve_signed(root: Path, prepare: bool, ready: Callable[[str], None], traced: bool = False) -> None:
    from gtbus.messages.types import Echo, EchoReply, Heartbeat
    from gtbus.nodes.runtime import NodeRuntime
    from gtbus.nodes.wiring import server_transport

    ident, roster = _load(root, "orch")
    rt = NodeRuntime(
        ident, roster, server_transport(ident, roster, _LOOPBACK, _LOOPBACK),
        run_dir=root / _signed_run_dir(prepare), heartbeat_interval=0, prepare_signatures=prepare,
    )
    count = 0
    # Traced (the two-process phases): the transport's edges are timed, one row per echo answered;
    # note "marks" writes the rows since the last such note to a file the client reads.
    marks: dict[str, int] = {}
    rows: list[tuple[int, int, int]] = []
    if traced:
        _time_transport(rt.transport, marks, "s")

    async def on_echo(acc: Any, delivery: Any) -> None:
        note = acc.message.note
        if note == "count":
            note = str(count)
        elif traced and note == "marks":
            (root / TRACE_FILE).write_text(json.dumps(rows))
            rows.clear()
        await rt.send(EchoReply(acc.message.payload, note), acc.header.sender, parent=acc.header.id)
        if traced and acc.message.note != "marks":
            rows.append((marks["s_recv_ret"], marks["s_send_call"], marks["s_send_ret"]))

    async def on_heartbeat(acc: Any, delivery: Any) -> None:
        nonlocal count
        count += 1

    rt.on(Echo, on_echo)
    rt.on(Heartbeat, on_heartbeat)
    await rt.start()
    ready(" ".join(rt.transport.endpoints))  # type: ignore[union-attr]
    await asyncio.Event().wait()


def _serve(variant: str, root: Path, loop: str = "asyncio") -> None:
    def ready(endpoints: str) -> None:
        print(f"ready {endpoints}", flush=True)

    if variant == "raw-blocking":
        with contextlib.suppress(KeyboardInterrupt):
            _serve_blocking(ready)
        return
    _use_loop(loop)
    if variant in RAW_ASYNCIO:
        coro: Awaitable[None] = _serve_raw(ready, fd=variant == "raw-asyncio-fd")
    elif variant in ("bus-plain", "bus-curve"):
        coro = _serve_bus(root, variant == "bus-curve", ready)
    elif variant in SIGNED or variant == TRACED:
        coro = _serve_signed(root, variant != "signed-rfc8032", ready, traced=variant == TRACED)
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ clients (this process)


class _Client:
    """One variant's client: a round trip, a one-way send, and a sync that returns the server's count."""

    async def start(self) -> None: ...
    async def round_trip(self) -> None: ...
    async def oneway(self) -> None: ...
    async def sync(self) -> int: ...
    async def close(self) -> None: ...


class _BlockingClient(_Client):
    """Blocking socket calls (the event loop just waits): the no-asyncio floor."""

    def __init__(self, endpoint: str, echo: list[bytes], hb: list[bytes]) -> None:
        self.endpoint, self.echo, self.hb = endpoint, [OP_REPLY, *echo], [OP_ONEWAY, *hb]

    async def start(self) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)

    async def round_trip(self) -> None:
        self.sock.send_multipart(self.echo)
        self.sock.recv_multipart()

    async def oneway(self) -> None:
        self.sock.send_multipart(self.hb)

    async def sync(self) -> int:
        self.sock.send_multipart([OP_SYNC])
        return int(self.sock.recv_multipart()[1])

    async def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class _RawClient(_Client):
    """Raw pyzmq DEALER, through ``zmq.asyncio`` (``fd=False``) or :class:`_FdSocket` (``fd=True``)."""

    def __init__(self, endpoint: str, echo: list[bytes], hb: list[bytes], *, fd: bool) -> None:
        self.endpoint, self.echo, self.hb, self.fd = endpoint, [OP_REPLY, *echo], [OP_ONEWAY, *hb], fd

    async def start(self) -> None:
        sock, self.send, self.recv, self.close_socket = _raw_socket("DEALER", self.fd)
        sock.connect(self.endpoint)

    async def round_trip(self) -> None:
        await self.send(self.echo)
        await self.recv()

    async def oneway(self) -> None:
        await self.send(self.hb)

    async def sync(self) -> int:
        await self.send([OP_SYNC])
        return int((await self.recv())[1])

    async def close(self) -> None:
        self.close_socket()


class _BusClient(_Client):
    def __init__(self, root: Path, endpoints: Sequence[str], curve: bool, echo: list[bytes], hb: list[bytes]) -> None:
        from gtbus.transport.zmq import CurveClientConfig, ZmqClient

        if curve:
            ident, roster = _load(root, "h1")
            cfg = CurveClientConfig.from_secret(ident.curve_secret_bytes, roster["orch"].curve)
            self.client = ZmqClient("h1", endpoints[0], endpoints[1], cfg, server_name="orch")
        else:
            self.client = ZmqClient("h1", endpoints[0], endpoints[1], None, insecure=True)
        self.echo, self.hb = [OP_REPLY, *echo], [OP_ONEWAY, *hb]

    async def start(self) -> None:
        await self.client.start()
        await self.client.wait_connected(10)

    async def round_trip(self) -> None:
        await self.client.send(self.echo)
        await self.client.recv()

    async def oneway(self) -> None:
        await self.client.send(self.hb)

    async def sync(self) -> int:
        await self.client.send([OP_SYNC])
        while True:
            d = await self.client.recv()
            if d.channel == "direct":
                return int(d.frames[1])

    async def close(self) -> None:
        await self.client.close()


def _signed_run_dir(prepare: bool) -> str:
    """Each signed variant's own run folder (logs, replay journals)."""
    return "run" if prepare else "run-rfc8032"


class _SignedClient(_Client):
    def __init__(self, root: Path, endpoints: Sequence[str], payload: int, prepare: bool) -> None:
        from gtbus.messages.types import Echo, Heartbeat
        from gtbus.nodes.runtime import NodeRuntime
        from gtbus.nodes.wiring import client_transport

        ident, roster = _load(root, "h1")
        self.rt = NodeRuntime(
            ident, roster, client_transport(ident, roster, endpoints[0], endpoints[1]),
            run_dir=root / _signed_run_dir(prepare), server="orch", heartbeat_interval=0, prepare_signatures=prepare,
        )
        self.echo = Echo(b"x" * payload, "")
        self.hb = Heartbeat("bench", 0.0)
        self.count_echo = Echo(b"", "count")

    async def start(self) -> None:
        await self.rt.start()
        await self.rt.transport.wait_connected(10)  # type: ignore[union-attr]

    async def round_trip(self) -> None:
        await self.rt.request(self.echo)

    async def oneway(self) -> None:
        await self.rt.send(self.hb)

    async def sync(self) -> int:
        acc = await self.rt.request(self.count_echo, timeout=60)
        return int(acc.message.note)

    async def close(self) -> None:
        await self.rt.close()


# ------------------------------------------------------------------------------ measuring


@dataclass
class _VariantData:
    rtt_ns: list[int] = field(default_factory=list)
    sent: int = 0
    counted: int = 0
    oneway_s: float = 0.0


async def _measure_rtt(client: _Client, seconds: float, into: list[int]) -> None:
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)
    rt = client.round_trip
    while True:
        t0 = clock()
        await rt()
        t1 = clock()
        into.append(t1 - t0)
        if t1 >= end:
            return


async def _measure_oneway(client: _Client, seconds: float, data: _VariantData) -> None:
    base = await client.sync()
    clock = time.perf_counter
    t0 = clock()
    end = t0 + seconds
    sent = 0
    send = client.oneway
    while clock() < end:
        for _ in range(64):
            await send()
        sent += 64
    counted = await client.sync() - base
    data.oneway_s += clock() - t0
    data.sent += sent
    data.counted += counted


def _use_loop(loop: str) -> None:
    """Make asyncio.run use ``loop``: the standard "asyncio" loop, or "uvloop" if it is installed."""
    if loop == "uvloop":
        import uvloop  # type: ignore[import-not-found]

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif loop != "asyncio":
        raise ValueError(f"unknown event loop {loop!r} (asyncio or uvloop)")


def _start_server(variant: str, root: Path, loop: str = "asyncio") -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gtbus.bench.bus", "serve", variant, str(root), "--loop", loop],
        stdout=subprocess.PIPE, stderr=open(root / f"server-{variant}.err", "w"), text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != "ready":
        proc.kill()
        err = (root / f"server-{variant}.err").read_text()[-800:]
        raise RuntimeError(f"bench server {variant} did not start: {err}")
    return proc, line[1:]


def _make_client(variant: str, root: Path, endpoints: list[str], payload: int, echo: list[bytes], hb: list[bytes]) -> _Client:
    if variant == "raw-blocking":
        return _BlockingClient(endpoints[0], echo, hb)
    if variant in RAW_ASYNCIO:
        return _RawClient(endpoints[0], echo, hb, fd=variant == "raw-asyncio-fd")
    if variant in ("bus-plain", "bus-curve"):
        return _BusClient(root, endpoints, variant == "bus-curve", echo, hb)
    return _SignedClient(root, endpoints, payload, variant == "signed")


async def _run_variants(root: Path, variants: Sequence[str], seconds: float, payload: int, slices: int, warmup: int, loop: str) -> dict[str, _VariantData]:
    echo, hb = _sample_frames(root, payload)
    procs: list[subprocess.Popen[str]] = []
    clients: dict[str, _Client] = {}
    try:
        for v in variants:
            proc, endpoints = _start_server(v, root, loop)
            procs.append(proc)
            clients[v] = _make_client(v, root, endpoints, payload, echo, hb)
            await clients[v].start()
        for c in clients.values():
            for _ in range(warmup):
                await c.round_trip()
        data = {v: _VariantData() for v in variants}
        # Interleave: every slice visits every variant, in a rotated order.
        for s in range(slices):
            order = list(variants[s % len(variants):]) + list(variants[: s % len(variants)])
            for v in order:
                await _measure_rtt(clients[v], seconds / slices, data[v].rtt_ns)
            for v in order:
                await _measure_oneway(clients[v], seconds / slices, data[v])
        return data
    finally:
        for c in clients.values():
            with contextlib.suppress(Exception):
                await c.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ------------------------------------------------------------------------------ CPU costs per message

SIGN_RFC8032 = "Ed25519 sign, RFC 8032 (PyNaCl)"
PREPARE_NONCE = "Ed25519 nonce prepared ahead (off the path)"
SIGN_PREPARED = "Ed25519 sign from a prepared nonce (on the path)"
VERIFY = "Ed25519 verify (PyNaCl)"
MESSAGE_SIGN = "MessageSigner.sign(Echo), nonce prepared"


def _per_call_us(fn: Callable[[], object], n: int) -> float:
    fn()
    t0 = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - t0) / n / 1e3


def message_costs(root: Path, payload: int, n: int = 2000) -> list[tuple[str, float]]:
    """Microseconds of CPU per call of each message-layer step, in this process, no sockets."""
    from gtbus.messages.envelope import signing_input
    from gtbus.messages.pipeline import ReceivePipeline
    from gtbus.messages.primitives import Ed25519Verifier, PreparedSigner
    from gtbus.messages.replay_guard import ReplayGuard
    from gtbus.messages.signer import MessageSigner
    from gtbus.messages.types import Echo
    from gtbus.recording import Recorder

    h1, roster = _load(root, "h1")
    orch, _ = _load(root, "orch")
    signer = MessageSigner(h1)
    unprepared = MessageSigner(h1)
    prepared = PreparedSigner(bytes(h1.signing_key), b"bench")
    msg = Echo(b"x" * payload, "")
    work = root / "costs"
    rec = Recorder(work / "h1.gtlog", "h1", roster)
    frames = [f for _, f in (signer.sign(msg, "orch") for _ in range(n + 1))]
    guard = ReplayGuard(journal=work / "replay.journal")
    pipe = ReceivePipeline("orch", roster, guard)
    nojournal = ReceivePipeline("orch", roster, ReplayGuard())
    header_bytes, body_bytes, sig = frames[0][1], frames[0][2], frames[0][3]
    verifier = Ed25519Verifier(roster["h1"].ed25519)
    data = signing_input(header_bytes, body_bytes, [])
    it = iter(frames)
    it2 = iter(frames)
    # _per_call_us calls n + 1 times: that many nonces are prepared before the prepared rows.
    rows = [
        (SIGN_RFC8032, _per_call_us(lambda: h1.sign(data), n)),
        (PREPARE_NONCE, _per_call_us(lambda: prepared.prepare(), n)),
        (SIGN_PREPARED, _per_call_us(lambda: prepared.sign(data), n)),
        (VERIFY, _per_call_us(lambda: verifier.verify(data, sig), n)),
        ("MessageSigner.sign(Echo), none prepared", _per_call_us(lambda: unprepared.sign(msg, "orch"), n)),
    ]
    signer.prepare(n + 1)
    rows += [
        (MESSAGE_SIGN, _per_call_us(lambda: signer.sign(msg, "orch"), n)),
        ("Recorder.record (one os.write)", _per_call_us(lambda: rec.record("out", frames[0], "sent", peer="orch", channel="direct"), n)),
        ("ReceivePipeline.accept, journal on", _per_call_us(lambda: pipe.accept(next(it), "h1"), n)),
        ("ReceivePipeline.accept, no journal", _per_call_us(lambda: nojournal.accept(next(it2), "h1"), n)),
    ]
    rec.close()
    guard.close()
    return rows


# ------------------------------------------------------------------------------ profile (one process, two real sockets)


async def _pair_in_one_loop(root: Path, run: str, payload: int) -> tuple[Any, Any, Any]:
    """Server and client NodeRuntimes in this process and loop over real CURVE sockets, warmed up; and the echo they trade."""
    from gtbus.messages.types import Echo, EchoReply
    from gtbus.nodes.runtime import NodeRuntime
    from gtbus.nodes.wiring import client_transport, server_transport

    orch, roster = _load(root, "orch")
    h1, _ = _load(root, "h1")
    srv = NodeRuntime(orch, roster, server_transport(orch, roster, _LOOPBACK, _LOOPBACK), run_dir=root / run, heartbeat_interval=0)

    async def on_echo(acc: Any, delivery: Any) -> None:
        await srv.send(EchoReply(acc.message.payload, acc.message.note), acc.header.sender, parent=acc.header.id)

    srv.on(Echo, on_echo)
    await srv.start()
    router, pub = srv.transport.endpoints  # type: ignore[union-attr]
    cli = NodeRuntime(h1, roster, client_transport(h1, roster, router, pub), run_dir=root / run, server="orch", heartbeat_interval=0)
    await cli.start()
    await cli.transport.wait_connected(10)  # type: ignore[union-attr]
    msg = Echo(b"x" * payload, "")
    for _ in range(200):
        await cli.request(msg)
    return srv, cli, msg


async def _profiled_round_trips(root: Path, payload: int, count: int) -> str:
    """Server and client NodeRuntimes in one process and loop, over real CURVE sockets, under cProfile."""
    srv, cli, msg = await _pair_in_one_loop(root, "prof", payload)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(count):
        await cli.request(msg)
    prof.disable()
    wall = time.perf_counter() - t0
    await cli.close()
    await srv.close()
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out)
    st.sort_stats("tottime").print_stats(28)
    text = out.getvalue()
    for prefix in sorted({str(Path(p).parent) for p in sys.path if p}, key=len, reverse=True):
        text = text.replace(prefix + "/", "")
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith(("   Ordered by", "   List reduced"))]
    head = (
        f"{count} signed round trips, client and server NodeRuntime in ONE process and event loop "
        f"(real CURVE sockets over loopback): {wall / count * 1e6:.0f} us per round trip under cProfile "
        "(profiling inflates it); sorted by own time; times are per the whole run, in seconds."
    )
    return head + "\n" + "\n".join(lines)


# ------------------------------------------------------------------------------ phases of one signed round trip


PHASES = (
    ("client: request() until transport.send (sign, record)", "c0", "c_send_call"),
    ("client: transport.send", "c_send_call", "c_send_ret"),
    ("wire + server transport.recv (CURVE, TCP, wake-up)", "c_send_ret", "s_recv_ret"),
    ("server: delivery until transport.send (accept, record, dispatch, sign, record)", "s_recv_ret", "s_send_call"),
    ("server: transport.send", "s_send_call", "s_send_ret"),
    ("wire + client transport.recv", "s_send_ret", "c_recv_ret"),
    ("client: reply until request() returns (accept, record, future, task wake-up)", "c_recv_ret", "c1"),
)


async def _phase_round_trips(root: Path, payload: int, count: int) -> list[tuple[str, float]]:
    """Median time of each phase of a signed round trip: both NodeRuntimes in one loop, transports timed at their edges."""
    srv, cli, msg = await _pair_in_one_loop(root, "phases", payload)
    clock = time.monotonic_ns
    marks: dict[str, int] = {}
    _time_transport(cli.transport, marks, "c")
    _time_transport(srv.transport, marks, "s")
    for _ in range(10):  # each side's receive loop was already waiting in the unwrapped recv
        await cli.request(msg)
    rows: list[dict[str, int]] = []
    for _ in range(count):
        marks["c0"] = clock()
        await cli.request(msg)
        marks["c1"] = clock()
        rows.append(dict(marks))
    await cli.close()
    await srv.close()
    return _phase_medians(rows, "= round trip (this one-process setup)")


def _phase_medians(rows: Sequence[dict[str, int]], total: str) -> list[tuple[str, float]]:
    """Each :data:`PHASES` median over ``rows`` of marks (ns), then the round trip's as ``total`` (us)."""
    out = [(name, statistics.median(r[b] - r[a] for r in rows) / 1e3) for name, a, b in PHASES]
    out.append((total, statistics.median(r["c1"] - r["c0"] for r in rows) / 1e3))
    return out


def _time_transport(transport: Any, marks: dict[str, int], side: str) -> None:
    """Time ``transport``'s edges into ``marks`` (``{side}_send_call``, ``_send_ret``, ``_recv_ret``; CLOCK_MONOTONIC, ns).

    Instance attributes shadow the methods, so the runtime calls these wrappers. CLOCK_MONOTONIC is one
    clock for every process of the host, so marks taken in two processes subtract.
    """
    send, recv = transport.send, transport.recv
    clock = time.monotonic_ns

    async def send_w(*args: Any) -> None:
        marks[f"{side}_send_call"] = clock()
        await send(*args)
        marks[f"{side}_send_ret"] = clock()

    async def recv_w() -> Any:
        d = await recv()
        marks[f"{side}_recv_ret"] = clock()
        return d

    transport.send, transport.recv = send_w, recv_w


async def _two_process_phases(root: Path, payload: int, count: int) -> list[tuple[str, float]]:
    """The phases of :func:`_phase_round_trips` with the server in its own process, as deployed (marks on one clock)."""
    proc, endpoints = _start_server(TRACED, root)
    try:
        client = _SignedClient(root, endpoints, payload, True)
        await client.start()
        marks: dict[str, int] = {}
        _time_transport(client.rt.transport, marks, "c")
        clock = time.monotonic_ns
        for _ in range(300):
            await client.round_trip()
        await client.rt.request(_echo("marks"))  # drops the warm-up rows
        mine: list[dict[str, int]] = []
        for _ in range(count):
            marks["c0"] = clock()
            await client.round_trip()
            marks["c1"] = clock()
            mine.append(dict(marks))
        await client.rt.request(_echo("marks"))
        theirs = json.loads((root / TRACE_FILE).read_text())
        await client.close()
    finally:
        proc.kill()
        proc.wait()
    if len(theirs) != len(mine):
        raise RuntimeError(f"traced server answered {len(theirs)} echoes, the client sent {len(mine)}")
    for m, (s_recv, s_call, s_ret) in zip(mine, theirs):
        m.update(s_recv_ret=s_recv, s_send_call=s_call, s_send_ret=s_ret)
    return _phase_medians(mine, "= round trip (two processes)")


def _echo(note: str) -> Any:
    from gtbus.messages.types import Echo

    return Echo(b"", note)


# ------------------------------------------------------------------------------ the benchmark


def run_bus_bench(
    out_dir: str | os.PathLike[str] | None = "bench/results",
    *,
    seconds: float = 4.0,
    payload: int = 64,
    slices: int = 4,
    warmup: int = 300,
    profile: bool | None = None,
    variants: Sequence[str] = VARIANTS,
    loop: str = "asyncio",
    say: Callable[[str], None] = print,
) -> Result:
    """Measure every variant for ``seconds`` each (round trips, then one-way), write the results.

    ``profile``: None profiles only when the signed median misses the design goal.
    Returns the :class:`Result`; files are written when ``out_dir`` is not None.
    """
    machine = machine_info()
    res = Result(
        "bus" if loop == "asyncio" else f"bus-{loop}",
        "gtbus bench bus: signed request/reply vs raw ZeroMQ, loopback, two processes",
        machine,
    )
    with tempfile.TemporaryDirectory(prefix="gtbus-bench-bus-") as tmp:
        root = Path(tmp)
        _deployment(root)
        say(f"bus bench: {len(variants)} variants, {seconds:g} s of round trips and {seconds:g} s one-way each, {slices} interleaved slices; load {machine['load_at_start']}")
        _use_loop(loop)
        try:
            data = asyncio.run(_run_variants(root, variants, seconds, payload, slices, warmup, loop))
            costs = message_costs(root, payload)
            stats = {v: latency_stats(d.rtt_ns) for v, d in data.items()}
            signed_median = stats.get("signed", {}).get("median_us", 0.0)
            do_profile = profile if profile is not None else signed_median > DESIGN_GOAL_US
            phases = asyncio.run(_phase_round_trips(root, payload, 3000))
            phases2 = asyncio.run(_two_process_phases(root, payload, 3000))
            prof_text = asyncio.run(_profiled_round_trips(root, payload, 3000)) if do_profile else None
        finally:
            asyncio.set_event_loop_policy(None)
    res.finish()
    limit, host_kind = ratio_goal(machine)

    frame_bytes = sum(len(f) for f in _frames_len_probe(payload))
    res.header = [
        "",
        f"Client in the bench process, server in a child process, 127.0.0.1 TCP. Echo payload {payload} B; "
        f"every variant carries the frames of one signed Echo ({frame_bytes} B in 4 frames; the unsigned "
        "variants add a 1-byte op frame). Variants measured in "
        f"{slices} interleaved slices, {seconds:g} s of sequential round trips and {seconds:g} s of one-way sends each. "
        f"Anchor: {ANCHOR}; goal: signed median <= {DESIGN_GOAL_US:.0f} us. Event loop: {loop} (both ends).",
        f"Ratio goal: signed <= {limit:g} x the anchor, the {host_kind}'s (a GPU seen by cupy means the GPU host's "
        f"{RATIO_GOAL_GPU_HOST:g}x, none the dev VM's {RATIO_GOAL_DEV_VM:g}x; here: {machine.get('gpu') or 'no GPU seen'}).",
    ]
    t = Table("Round trip (request -> reply), microseconds", ["variant", "what runs", "n", "median", "p90", "p99", "min", "mean"], text_columns=2)
    what = {
        "raw-blocking": "blocking pyzmq DEALER/ROUTER, plaintext, no event loop (floor)",
        "raw-asyncio-zmq": "asyncio pyzmq DEALER/ROUTER via zmq.asyncio sockets, plaintext",
        "raw-asyncio-fd": "asyncio pyzmq DEALER/ROUTER, NOBLOCK + add_reader on the zmq FD, plaintext",
        "bus-plain": "gtbus ZmqClient/ZmqServer, plaintext",
        "bus-curve": "gtbus ZmqClient/ZmqServer, CURVE + ZAP",
        "signed": "NodeRuntime both ends: sign, record, CURVE, verify, replay guard, dispatch, reply",
        "signed-rfc8032": "the same, no nonce prepared while waiting: each signature whole on the path",
    }
    for v in variants:
        s = stats[v]
        t.add(v, what[v], s["n"], f"{s['median_us']:.0f}", f"{s['p90_us']:.0f}", f"{s['p99_us']:.0f}", f"{s['min_us']:.0f}", f"{s['mean_us']:.0f}")
    verdict = "meets" if signed_median <= DESIGN_GOAL_US else "misses"
    t.notes.append(f"signed median {signed_median:.0f} us {verdict} the goal of {DESIGN_GOAL_US:.0f} us")
    anchor = anchor_variant(stats)
    ratio = None
    if anchor is not None and "signed" in stats:
        ratio = signed_median / max(stats[anchor]["median_us"], 1e-9)
        t.notes.append(f"anchor (raw asyncio pyzmq): {anchor}, the faster raw asyncio variant of this run")
        t.notes.append(f"signed / {anchor} median: {ratio:.2f}x (goal on a {host_kind}: <= {limit:g}x)")
    if all(v in stats for v in SIGNED):
        gain = stats["signed-rfc8032"]["median_us"] - signed_median
        t.notes.append(
            f"nonces prepared while waiting: signed-rfc8032 - signed = {gain:.0f} us (both signatures' fixed-base "
            "multiplication off the path; it takes a spare core: with two, it competes with the peer and the I/O threads)"
        )
    res.tables.append(t)

    ow = Table("One-way throughput (client sends back to back, server handles each)", ["variant", "messages", "seconds", "msgs/s", "us/msg"])
    for v in variants:
        d = data[v]
        rate = d.counted / d.oneway_s if d.oneway_s > 0 else 0.0
        ow.add(v, d.counted, f"{d.oneway_s:.2f}", f"{rate:,.0f}", f"{1e6 / rate:.1f}" if rate else "-")
    ow.notes.append("signed: a fresh Heartbeat signed, recorded and sent each time, verified, guarded, recorded and dispatched by the server; unsigned: the same pre-signed frames resent")
    res.tables.append(ow)

    ct = Table("CPU per message-layer step, this process, no sockets (microseconds per call)", ["step", "us"])
    for name, us in costs:
        ct.add(name, f"{us:.1f}")
    by = dict(costs)
    per_rt = 2 * (by[MESSAGE_SIGN] + 2 * by["Recorder.record (one os.write)"] + by["ReceivePipeline.accept, journal on"])
    ct.notes.append(
        f"a signed round trip does each of sign, accept and two records twice (request and reply): about {per_rt:.0f} us "
        "of message-layer CPU, spread over the two processes"
    )
    res.tables.append(ct)

    where = _where_the_time_goes(stats, by, per_rt, limit)
    if where:
        res.sections.append(("Where the signed round trip spends its time: stack layers (two processes, medians)", where))
    ph = Table(
        "Phases of one signed round trip (client and server NodeRuntime in one process and loop, real CURVE sockets; medians, us)",
        ["phase", "us"],
    )
    for name, us in phases:
        ph.add(name, f"{us:.0f}")
    ph.notes.append(
        "one process runs both ends here, so the wire phases include the other side's scheduling, and each end's nonce "
        "preparation (off the path with two processes) lands in the other's wire phase; the total is not the two-process median"
    )
    res.tables.append(ph)
    ph2 = Table(
        "Phases of one signed round trip, two processes as deployed (server timed in its own process; one CLOCK_MONOTONIC; medians, us)",
        ["phase", "us", "one process"],
    )
    one = [us for _, us in phases]
    for (name, us), us1 in zip(phases2, one):
        ph2.add(name, f"{us:.0f}", f"{us1:.0f}")
    ph2.notes.append(
        "the same marks as the table above; a wire phase here is the sender's libzmq I/O thread, loopback TCP, the receiver's "
        "I/O thread and the wake-up of its event loop, with each process idle while the other works"
    )
    res.tables.append(ph2)
    if prof_text:
        res.sections.append(("Profile of the signed round trip", prof_text))

    res.data = {
        "settings": {"seconds": seconds, "payload": payload, "slices": slices, "warmup": warmup, "loop": loop},
        "round_trip_us": stats,
        "oneway": {v: {"messages": d.counted, "sent": d.sent, "seconds": d.oneway_s, "msgs_per_s": d.counted / d.oneway_s if d.oneway_s else 0.0} for v, d in data.items()},
        "message_layer_us": dict(costs),
        "phases_us": dict(phases),
        "phases_two_processes_us": dict(phases2),
        "goal_us": DESIGN_GOAL_US,
        "signed_median_meets_goal": signed_median <= DESIGN_GOAL_US,
        "anchor": anchor,
        "signed_over_anchor": ratio,
        "ratio_goal": {"limit": limit, "host": host_kind},
    }
    if ratio is not None:
        res.goal(f"signed round trip / raw asyncio pyzmq, median, {host_kind}", ratio, limit, "x", at_most=True)
    if "signed" in stats:
        res.goal("signed round trip, median", signed_median, DESIGN_GOAL_US, "us", at_most=True)
    if out_dir is not None:
        md, js = res.write(out_dir)
        res.data["files"] = [str(md), str(js)]
    return res


def _frames_len_probe(payload: int) -> list[bytes]:
    from gtbus.messages.identity import NodeIdentity, Role
    from gtbus.messages.signer import MessageSigner
    from gtbus.messages.types import Echo

    _, frames = MessageSigner(NodeIdentity.generate("h1", Role.HOLDER)).sign(Echo(b"x" * payload, ""), "orch")
    return [bytes(f) for f in frames]


def _where_the_time_goes(stats: dict[str, dict[str, float]], costs: dict[str, float], msg_layer_us: float, limit: float) -> str:
    anchor = anchor_variant(stats)
    need = ("bus-plain", "bus-curve", "signed")
    if anchor is None or not all(v in stats for v in need):
        return ""
    m = {v: stats[v]["median_us"] for v in need}
    m["raw-pyzmq"] = a = stats[anchor]["median_us"]
    crypto = 2 * (costs[SIGN_PREPARED] + costs[VERIFY])
    rows = []
    if "raw-blocking" in stats:
        b = stats["raw-blocking"]["median_us"]
        rows += [
            ("libzmq + loopback TCP, blocking pyzmq (floor)", b),
            (f"asyncio wake-ups, both ends ({anchor} - floor)", m["raw-pyzmq"] - b),
        ]
    else:
        rows.append(("bare loopback round trip, asyncio pyzmq", m["raw-pyzmq"]))
    rows += [
        (f"gtbus transport wrapper (bus-plain - {anchor})", m["bus-plain"] - m["raw-pyzmq"]),
        ("CurveZMQ encryption (bus-curve - bus-plain)", m["bus-curve"] - m["bus-plain"]),
        ("Ed25519 on the critical path: 2 x (sign from a prepared nonce + verify)", crypto),
        ("rest of message layer and runtime (signed - bus-curve - Ed25519)", m["signed"] - m["bus-curve"] - crypto),
    ]
    lines = [f"{name:<66} {us:>7.0f} us" for name, us in rows]
    lines.append(f"{'= signed round trip':<66} {m['signed']:>7.0f} us")
    lines += [
        "",
        f"The four signature operations are serial (client signs, server verifies, server signs, client verifies): "
        f"{crypto:.0f} us, each signature's nonce having been prepared while its node waited "
        f"({costs[PREPARE_NONCE]:.0f} us each, off the path; RFC 8032's deterministic signature would put "
        f"{2 * costs[SIGN_RFC8032]:.0f} us there instead of {2 * costs[SIGN_PREPARED]:.0f}). With the asyncio round trip, CURVE and the transport wrapper that is already "
        f"{m['bus-curve'] + crypto:.0f} us before any other work of the message layer and runtime "
        f"(envelope encode/parse, replay guard and its journal, four log records, dispatch, futures), which adds the last line. "
        f"All message-layer CPU of a round trip, crypto included, is about {msg_layer_us:.0f} us (table of per-call costs).",
        "",
        "What bounds the ratio (every message Ed25519-signed and verified, serially on the critical path):",
        f"  floor without CURVE: ({anchor} + Ed25519) / {anchor} = ({a:.0f} + {crypto:.0f}) / {a:.0f} = {(a + crypto) / a:.2f}x",
        f"  floor as deployed:   (bus-curve + Ed25519) / {anchor} = ({m['bus-curve']:.0f} + {crypto:.0f}) / {a:.0f} = {(m['bus-curve'] + crypto) / a:.2f}x",
        f"  at the goal of {limit:g}x the whole round trip may take {limit * a:.0f} us: "
        f"{limit * a - m['bus-curve'] - crypto:.0f} us left for everything but CURVE and Ed25519; "
        f"used: {m['signed'] - m['bus-curve'] - crypto:.0f} us",
    ]
    return "\n".join(lines)


def _main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gtbus.bench.bus")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="internal: the server side of one variant")
    s.add_argument("variant", choices=(*VARIANTS, TRACED))
    s.add_argument("root", type=Path)
    s.add_argument("--loop", default="asyncio", choices=("asyncio", "uvloop"))
    args = p.parse_args(argv)
    if args.cmd == "serve":
        _serve(args.variant, args.root, args.loop)


if __name__ == "__main__":
    _main()
