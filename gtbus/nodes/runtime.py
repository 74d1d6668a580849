"""The asyncio shell every node runs in.

It owns one transport, one :class:`~gtbus.messages.ReceivePipeline`, one
:class:`~gtbus.messages.MessageSigner` and one
:class:`~gtbus.recording.Recorder`, and moves messages between them:

* incoming: transport -> pipeline -> recorder -> handler registered for the
  message's class (looked up in a dict keyed by declared classes only);
* outgoing: message -> signer -> recorder -> transport.

A server node (the orchestrator, a device agent) gives every peer a budget
(:mod:`gtbus.transport.budget`): a message over its peer's message or byte
budget is refused before the pipeline looks at it. A rejected message is
counted, logged once per (reason, sender) and recorded with its verdict (as a
digest, sizes and reason), at most ten records a second per peer, the next
record saying how many were left out; it never stops the loop. A handler
that raises is logged and
the loop goes on. Application heartbeats are sent from the event loop itself,
so they prove the node is scheduling work, not merely that its socket is open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from gtbus.clock import SYSTEM_CLOCK, Clock
from gtbus.errors import PeerUnreachable, RejectedMessage, TransportError
from gtbus.messages.envelope import BROADCAST, Header, Limits, DEFAULT_LIMITS
from gtbus.messages.identity import NodeIdentity, Role, Roster
from gtbus.messages.pipeline import Accepted, ReceivePipeline
from gtbus.messages.replay_guard import ReplayGuard
from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import Heartbeat
from gtbus.recording import LOG_SUFFIX, Recorder
from gtbus.transport.base import ClientTransport, Delivery, ServerTransport
from gtbus.transport.budget import PeerBudgets, role_budgets

Handler = Callable[[Accepted[Any], Delivery], Awaitable[None]]
M = TypeVar("M")


class NodeRuntime:
    """Signs, records, sends, receives, checks and dispatches for one node."""

    def __init__(
        self,
        identity: NodeIdentity,
        roster: Roster,
        transport: ServerTransport | ClientTransport,
        *,
        run_dir: str | Path,
        server: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        heartbeat_interval: float = 1.0,
        limits: Limits = DEFAULT_LIMITS,
        log_name: str | None = None,
        budgets: PeerBudgets | None = None,
        prepare_signatures: bool = True,
    ) -> None:
        self.identity = identity
        self.name = identity.name
        self.roster = roster
        self.transport = transport
        self.is_server = server is None
        self.server = server  # the orchestrator's name, for client nodes
        self.clock = clock
        self.heartbeat_interval = heartbeat_interval
        self.run_dir = Path(run_dir)
        # A node with a second link (a device agent, a remote holder) runs a second
        # runtime; ``log_name`` keeps its log and replay journal apart.
        self.log_name = log_name or self.name
        self.guard = ReplayGuard(clock, journal=self.run_dir / "state" / self.log_name / "replay.journal")
        self.pipeline = ReceivePipeline(self.name, roster, self.guard, limits)
        self.signer = MessageSigner(identity, clock)
        self.recorder = Recorder(self.run_dir / "logs" / f"{self.log_name}{LOG_SUFFIX}", self.name, roster, identity=identity)
        self.log = logging.getLogger(f"gtbus.node.{self.name}")
        self.last_heard: dict[str, float] = {}
        self.state_label = "starting"
        self._handlers: dict[type, list[Handler]] = {}
        self._pending: dict[bytes, asyncio.Future[Accepted]] = {}
        self._logged_rejections: set[tuple[str, str]] = set()
        # Servers face many peers and budget each (by role); a client's only peer is its server.
        if budgets is None and self.is_server:
            budgets = PeerBudgets(role_budgets(self._role_of), clock)
        self.budgets = budgets
        self._tasks: list[asyncio.Task[Any]] = []
        # After each send, prepare the next signature's nonce while waiting (MessageSigner.prepare);
        # False signs every message as RFC 8032 does, all of it on the message's path.
        self.prepare_signatures = prepare_signatures
        self._prepare_pending = False
        self._started = time.monotonic()
        self._closed = False

    # -- wiring ----------------------------------------------------------------------------

    def on(self, cls: type[M], handler: Callable[[Accepted[M], Delivery], Awaitable[None]]) -> None:
        """Call ``handler`` for every accepted message of declared class ``cls`` (in registration order)."""
        self._handlers.setdefault(cls, []).append(handler)

    def _role_of(self, name: str) -> Role | None:
        member = self.roster.get(name)
        return member.role if member is not None else None

    @property
    def rejected(self) -> Counter[str]:
        """Rejections by reason."""
        return self.pipeline.rejected

    def note_refused(self, reason: str, peer: str) -> None:
        """Count (and log once per reason and peer) a message a handler refused after the pipeline accepted it.

        The pipeline judges authenticity; a handler judges whether the message fits
        the run's mode and phase. Both kinds of refusal land in :attr:`rejected`.
        """
        self.pipeline.rejected[reason] += 1
        key = (reason, peer)
        if key not in self._logged_rejections:
            self._logged_rejections.add(key)
            self.log.warning("refused a message from %s: %s", peer, reason)

    # -- sending ---------------------------------------------------------------------------

    def _recipient(self, to: str | None) -> str:
        recipient = to if to is not None else self.server
        if recipient is None:
            raise ValueError("a server node must name the recipient")
        return recipient

    async def _transmit(self, header: Header, frames: list[bytes | memoryview], has_blobs: bool) -> None:
        # Recorded before it leaves: a crash loses at most this record, never a sent message's.
        self.recorder.record("out", frames, "sent", peer=header.recipient, channel="direct",
                             blobs_digest=self.signer.last_blob_digest if has_blobs else None)
        if self.is_server:
            await self.transport.send(header.recipient, frames)  # type: ignore[call-arg]
        else:
            await self.transport.send(frames)  # type: ignore[call-arg]
        self._prepare_soon()

    def _prepare_soon(self) -> None:
        """Prepare the next signature's nonce once this task yields (see MessageSigner.prepare).

        A send is usually followed by a wait (for the reply, or the next
        request), so the nonce is ready before the next message needs it; a
        burst that outruns it signs as it did without.
        """
        if self.prepare_signatures and not self._prepare_pending and not self.signer.ready:
            self._prepare_pending = True
            asyncio.get_running_loop().call_soon(self._prepare_now)

    def _prepare_now(self) -> None:
        self._prepare_pending = False
        if not self._closed:
            self.signer.prepare()

    async def send(
        self,
        msg: object,
        to: str | None = None,
        *,
        epoch: int = 0,
        parent: bytes | None = None,
        blobs: Sequence[bytes | memoryview] = (),
    ) -> Header:
        """Sign, record and send a direct message (clients always send to the server)."""
        header, frames = self.signer.sign(msg, self._recipient(to), epoch=epoch, parent=parent, blobs=blobs)
        await self._transmit(header, frames, bool(blobs))
        return header

    async def publish(self, msg: object, *, epoch: int = 0) -> Header:
        """Sign, record and publish an event to every subscriber (server only)."""
        if not self.is_server:
            raise ValueError("only the server publishes events")
        header, frames = self.signer.sign(msg, BROADCAST, epoch=epoch)
        self.recorder.record("out", frames, "sent", peer=None, channel="event")
        await self.transport.publish(frames)  # type: ignore[attr-defined]
        self._prepare_soon()
        return header

    async def request(self, msg: object, to: str | None = None, *, timeout: float = 5.0, epoch: int = 0) -> Accepted:
        """Send ``msg`` and wait for the message whose parent is its id."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Accepted] = loop.create_future()
        header, frames = self.signer.sign(msg, self._recipient(to), epoch=epoch)
        self._pending[header.id] = fut  # before sending: the reply may come back at once
        try:
            await self._transmit(header, frames, False)
            # A timer on the future instead of asyncio.wait_for: no extra task per request.
            timer = loop.call_later(timeout, lambda: fut.done() or fut.set_exception(asyncio.TimeoutError()))
            try:
                return await fut
            finally:
                timer.cancel()
        finally:
            self._pending.pop(header.id, None)

    # -- receiving -------------------------------------------------------------------------

    def handle_delivery(self, delivery: Delivery) -> Accepted | None:
        """Run one delivery through the budget and the pipeline and record it; None if it was refused."""
        peer = delivery.peer or "?"
        budgets = self.budgets
        if budgets is not None and not budgets.admit(peer, sum(map(len, delivery.frames))):
            self.note_refused("over-budget", peer)
            self._record_refused(delivery, peer, "rejected:over-budget")
            return None
        try:
            acc = self.pipeline.accept(delivery.frames, delivery.authenticated_as)
        except RejectedMessage as exc:
            self._record_refused(delivery, peer, f"rejected:{exc.reason}")
            key = (exc.reason, peer)
            if key not in self._logged_rejections:
                self._logged_rejections.add(key)
                self.log.warning("refused a message from %s: %s", delivery.peer or "unknown peer", exc)
            return None
        self.recorder.record("in", delivery.frames, "accepted", peer=delivery.peer, channel=delivery.channel,
                             blobs_digest=acc.blob_digest if acc.blobs else None)
        self.last_heard[acc.header.sender] = self.clock.monotonic()
        return acc

    def _record_refused(self, delivery: Delivery, peer: str, verdict: str) -> None:
        """Record a refused message, within its peer's record budget (``+N``: N left out before it)."""
        if self.budgets is not None:
            skipped = self.budgets.record_refusal(peer)
            if skipped is None:
                return
            if skipped:
                verdict = f"{verdict}+{skipped}"
        self.recorder.record_refused(delivery.frames, verdict, peer=delivery.peer, channel=delivery.channel)

    async def _dispatch(self, acc: Accepted, delivery: Delivery) -> None:
        parent = acc.header.parent
        if parent is not None and parent in self._pending:
            fut = self._pending.pop(parent)
            if not fut.done():
                fut.set_result(acc)
            return
        handlers = self._handlers.get(type(acc.message))
        if not handlers:
            self.log.debug("no handler for %s from %s", acc.spec.name, acc.header.sender)
            return
        for handler in handlers:
            try:
                await handler(acc, delivery)
            except (TransportError, PeerUnreachable) as exc:
                self.log.warning("while handling %s from %s: %s", acc.spec.name, acc.header.sender, exc)
            except Exception:
                self.log.exception("handler for %s from %s failed", acc.spec.name, acc.header.sender)

    async def _receive_loop(self) -> None:
        while not self._closed:
            try:
                delivery = await self.transport.recv()
            except TransportError:
                if self._closed:
                    return
                raise
            acc = self.handle_delivery(delivery)
            if acc is None:
                continue
            # A reply to a pending request is handed over here, without a coroutine per
            # message; everything else goes through _dispatch as before.
            parent = acc.header.parent
            if parent is not None and parent in self._pending:
                fut = self._pending.pop(parent)
                if not fut.done():
                    fut.set_result(acc)
                continue
            await self._dispatch(acc, delivery)

    async def _heartbeat_loop(self) -> None:
        while not self._closed:
            hb = Heartbeat(state=self.state_label, uptime=time.monotonic() - self._started)
            try:
                if self.is_server:
                    await self.publish(hb)
                else:
                    await self.send(hb)
            except TransportError as exc:
                self.log.debug("heartbeat not sent: %s", exc)
            await asyncio.sleep(self.heartbeat_interval)

    def liveness(self) -> dict[str, float]:
        """Seconds since each peer was last heard from."""
        now = self.clock.monotonic()
        return {name: round(now - t, 3) for name, t in self.last_heard.items()}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the transport, the receive loop and heartbeats."""
        await self.transport.start()
        self._tasks.append(asyncio.create_task(self._receive_loop(), name=f"{self.name}-recv"))
        if self.heartbeat_interval > 0:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name=f"{self.name}-heartbeat"))

    async def close(self) -> None:
        """Stop the loops, close the transport, the log and the replay journal."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, TransportError):
                pass
        await self.transport.close()
        if self.budgets is not None:
            for peer, n in sorted(self.budgets.refused().items()):
                self.log.warning("refused %d messages from %s over its budget", n, peer)
            for peer, n in sorted(self.budgets.unrecorded().items()):
                self.log.warning("%d refused messages from %s were counted but not recorded", n, peer)
        self.recorder.close()
        self.guard.close()
