"""A live orchestrator and holders on real CURVE sockets, and tools to attack them.

``LiveBus`` starts, in the running asyncio loop, an orchestrator-role
:class:`NodeRuntime` on :func:`server_transport` (ROUTER + XPUB bound to
ephemeral loopback ports) that answers ``Echo`` with ``EchoReply``, and
holder-role runtimes on :func:`client_transport`. Keys come from
:func:`gtbus.testing.make_deployment`. Heartbeats are off, so every message
the orchestrator judges is one the test sent.

Attacks go in below the runtime: frames are crafted (with the holder's own
:class:`MessageSigner`, or by hand and signed with a real key) and sent raw
with the client transport's ``send``. :meth:`LiveBus.inject` waits until the
orchestrator has judged the message and returns the verdict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Sequence, TypeVar

from gtbus.messages.envelope import MAGIC, VERSION, Header, new_message_id, new_session_id, packb, signing_input
from gtbus.messages.identity import NodeIdentity
from gtbus.messages.pipeline import Accepted
from gtbus.messages.types import Echo, EchoReply
from gtbus.nodes.runtime import NodeRuntime
from gtbus.nodes.wiring import client_transport, server_transport
from gtbus.recording import LogRecord, read_log
from gtbus.testing import Deployment, make_deployment
from gtbus.testing import eventually
from gtbus.testing import run_async as run  # noqa: F401  (re-exported for the bus tests)
from gtbus.transport.base import Delivery
from gtbus.transport.budget import Budget, PeerBudgets

_UNBOUNDED = Budget(float("inf"), float("inf"), float("inf"), float("inf"))


def unbounded_budgets() -> PeerBudgets:
    """Budgets that admit and record everything: for tests of the pipeline's judgement message by message."""
    from gtbus.clock import SYSTEM_CLOCK

    return PeerBudgets(lambda _: _UNBOUNDED, SYSTEM_CLOCK, records_per_s=float("inf"), record_burst=float("inf"))

T = TypeVar("T")

EPHEMERAL = "tcp://127.0.0.1:*"


def craft(
    identity: NodeIdentity,
    type_name: str,
    body: Any,
    recipient: str,
    *,
    now: float,
    session: bytes | None = None,
    seq: int = 1,
    ttl: float = 30.0,
    blobs: Sequence[bytes] = (),
    body_bytes: bytes | None = None,
    header_bytes: bytes | None = None,
    **overrides: Any,
) -> list[bytes]:
    """Frames built by hand and signed with ``identity``'s real Ed25519 key.

    Bypasses MessageSigner's own refusals (role, blob count), so a test can make
    what a well-behaved node never would; ``body_bytes``/``header_bytes`` put
    arbitrary bytes under a valid signature.
    """
    header = Header(
        v=VERSION,
        id=new_message_id(),
        type=type_name,
        sender=identity.name,
        recipient=recipient,
        session=new_session_id(int(now * 1e9)) if session is None else session,
        seq=seq,
        ts=now,
        exp=now + ttl,
        epoch=0,
        parent=None,
    )
    header = dataclasses.replace(header, **overrides)
    hb = packb(header.to_wire()) if header_bytes is None else header_bytes
    bb = packb(body) if body_bytes is None else body_bytes
    sig = identity.sign(signing_input(hb, bb, list(blobs)))
    return [MAGIC, hb, bb, sig, *blobs]


def verdicts(log_path: Path) -> list[str]:
    """The verdict of every message record of a log, in order."""
    return [str(r.data["verdict"]) for r in read_log(log_path) if r.kind == "msg"]


def msg_records(log_path: Path) -> list[LogRecord]:
    """Every message record of a log."""
    return [r for r in read_log(log_path) if r.kind == "msg"]


class LiveBus:
    """An orchestrator runtime and holder runtimes on real CURVE sockets, in this loop."""

    def __init__(self, tmp: Path, *, holders: int = 2, budgets: PeerBudgets | None = None) -> None:
        # The bus tests judge one message at a time and read each record back; budgets
        # are tested on their own (test_bus_budgets.py), with their own clock.
        self.budgets = budgets or unbounded_budgets()
        self.tmp = Path(tmp)
        self.dep: Deployment = make_deployment(self.tmp / "keys", holders)
        self.roster = self.dep.roster
        self.run_dir = self.tmp / "run"
        self.orch: NodeRuntime | None = None
        self.holders: dict[str, NodeRuntime] = {}
        self.endpoints: tuple[str, str] = (EPHEMERAL, EPHEMERAL)
        self.echoes = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> "LiveBus":
        await self.start_orchestrator()
        for h in self.dep.holders:
            await self.start_holder(h)
        return self

    async def start_orchestrator(self) -> NodeRuntime:
        """Start (or restart, on the same ports and run_dir) the orchestrator."""
        ident = self.dep.orchestrator
        rt = NodeRuntime(
            ident,
            self.roster,
            server_transport(ident, self.roster, *self.endpoints),
            run_dir=self.run_dir,
            heartbeat_interval=0,
            budgets=self.budgets,
        )
        rt.on(Echo, self._echo_handler(rt))
        await rt.start()
        self.endpoints = rt.transport.endpoints  # type: ignore[union-attr]
        assert all(not ep.endswith(":*") for ep in self.endpoints), self.endpoints
        self.orch = rt
        return rt

    def _echo_handler(self, rt: NodeRuntime) -> Callable[[Accepted, Delivery], Coroutine[Any, Any, None]]:
        async def on_echo(acc: Accepted, delivery: Delivery) -> None:
            assert delivery.peer is not None
            self.echoes += 1
            await rt.send(EchoReply(acc.message.payload, acc.message.note), to=delivery.peer, parent=acc.header.id)

        return on_echo

    async def start_holder(self, ident: NodeIdentity, *, wait: bool = True) -> NodeRuntime:
        rt = NodeRuntime(
            ident,
            self.roster,
            client_transport(ident, self.roster, *self.endpoints),
            run_dir=self.run_dir,
            server=self.dep.orchestrator.name,
            heartbeat_interval=0,
        )
        await rt.start()
        if wait:
            await rt.transport.wait_connected(10)  # type: ignore[union-attr]
        self.holders[ident.name] = rt
        return rt

    async def close_orchestrator(self) -> None:
        if self.orch is not None:
            await self.orch.close()

    async def close(self) -> None:
        for rt in self.holders.values():
            await rt.close()
        await self.close_orchestrator()

    async def __aenter__(self) -> "LiveBus":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- looking -------------------------------------------------------------------------

    @property
    def o(self) -> NodeRuntime:
        assert self.orch is not None
        return self.orch

    def h(self, name: str = "h1") -> NodeRuntime:
        return self.holders[name]

    @property
    def orch_log(self) -> Path:
        return self.run_dir / "logs" / f"{self.dep.orchestrator.name}.gtlog"

    def judged(self) -> int:
        """Messages the orchestrator has judged so far: accepted, refused, or dropped by its transport as oversize."""
        return self.o.pipeline.accepted + sum(self.o.rejected.values()) + self.oversize()

    def oversize(self) -> int:
        """Messages the orchestrator's transport drained and dropped for their frame count or size."""
        return self.o.transport.stats.oversize_dropped

    # -- acting --------------------------------------------------------------------------

    async def echo(self, via: str = "h1", payload: bytes = b"ping", *, tries: int = 1, timeout: float = 3.0) -> None:
        """A legitimate signed Echo round trip over the runtime; fails the test if it does not come back."""
        rt = self.h(via)
        last: Exception | None = None
        for _ in range(tries):
            try:
                acc = await rt.request(Echo(payload, "hi"), timeout=timeout)
            except TimeoutError as exc:
                last = exc
                continue
            assert isinstance(acc.message, EchoReply), acc.message
            assert acc.message.payload == payload
            assert acc.header.sender == self.dep.orchestrator.name
            return
        raise AssertionError(f"no echo reply via {via} after {tries} tries") from last

    async def inject(self, frames: Sequence[bytes], via: str = "h1", timeout: float = 5.0) -> str:
        """Send raw frames over ``via``'s connection; return the orchestrator's verdict.

        ``"accepted"``, ``"rejected:<reason>"`` with exactly one counter moved, or
        ``"dropped:transport-oversize"`` (too many frames or bytes: never judged, never recorded).
        """
        before_acc = self.o.pipeline.accepted
        before_big = self.oversize()
        before = Counter(self.o.rejected)
        n = self.judged()
        await self.h(via).transport.send(list(frames))
        await eventually(lambda: self.judged() > n, timeout, "the orchestrator to judge the message")
        assert self.judged() == n + 1, "more than one message judged"
        if self.o.pipeline.accepted > before_acc:
            return "accepted"
        if self.oversize() > before_big:
            return "dropped:transport-oversize"
        moved = Counter(self.o.rejected)
        moved.subtract(before)
        (reason,) = [r for r, c in moved.items() if c]
        return f"rejected:{reason}"


class LoopThread:
    """An asyncio loop in a thread, for sync callers such as hypothesis tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bus-loop", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def flip(frames: Sequence[bytes], frame: int, pos: int, bit: int = 0) -> list[bytes]:
    """A copy of ``frames`` with one bit flipped in frame ``frame`` at byte ``pos``."""
    out = [bytes(f) for f in frames]
    b = bytearray(out[frame])
    b[pos] ^= 1 << bit
    out[frame] = bytes(b)
    return out


def junk(rng: Any, i: int) -> list[bytes]:
    """A junk multipart message (varied shapes: short, wrong magic, garbage msgpack)."""
    kind = i % 5
    if kind == 0:
        return [os.urandom(rng.randrange(0, 64))]
    if kind == 1:
        return [MAGIC, os.urandom(40), os.urandom(30), os.urandom(64)]
    if kind == 2:
        return [os.urandom(4), os.urandom(40), os.urandom(30), os.urandom(64)]
    if kind == 3:
        return [os.urandom(8) for _ in range(rng.randrange(1, 12))]
    return [MAGIC, packb({"v": 1, "junk": i}), b"", os.urandom(64)]


def signed_echo(bus: LiveBus, via: str = "h1", payload: bytes = b"captured") -> list[bytes]:
    """A valid Echo from ``via``'s own signer (same session as its runtime, next sequence)."""
    _, frames = bus.h(via).signer.sign(Echo(payload, "x"), bus.dep.orchestrator.name)
    return [bytes(f) for f in frames]
