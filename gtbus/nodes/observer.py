"""An observer node: follows a running deployment's state (for `gtbus status`).

It joins late by design: subscribe, ask the orchestrator for a snapshot, then
apply broadcast events newer than it (:class:`~gtbus.protocol.follower.EventFollower`).
Asking for a snapshot also makes the orchestrator send it the per-hop reports
(losses, details) directly: those are never broadcast, so holders do not see
each other's.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from gtbus.messages.pipeline import Accepted
from gtbus.messages.types import Heartbeat, HopRecord, HopReport, RunComplete, Snapshot, SnapshotRequest, TokenState
from gtbus.nodes.runtime import NodeRuntime
from gtbus.protocol.follower import EventFollower
from gtbus.transport.base import Delivery


class Observer:
    """Keeps an up-to-date copy of the run's state from snapshot + events."""

    def __init__(self, runtime: NodeRuntime, on_change: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.rt = runtime
        self.follower = EventFollower()
        self.on_change = on_change
        self.changed = asyncio.Event()
        for cls in (TokenState, HopRecord, HopReport, RunComplete, Heartbeat):
            runtime.on(cls, self._on_event)

    async def _on_event(self, acc: Accepted[object], delivery: Delivery) -> None:
        if acc.header.sender != self.rt.server:
            return
        if acc.header.recipient == "*":
            changed = self.follower.on_event(acc.header.seq, acc.message)
        elif isinstance(acc.message, (HopReport, RunComplete)):
            changed = self.follower.on_report(acc.message)
        else:
            return
        if changed and self.follower.state is not None:
            self.changed.set()
            if self.on_change:
                self.on_change(self.follower.state)

    async def sync(self, timeout: float = 5.0) -> dict[str, Any]:
        """Ask for a snapshot and install it; returns the state."""
        acc = await self.rt.request(SnapshotRequest(0), timeout=timeout)
        if not isinstance(acc.message, Snapshot):
            raise RuntimeError(f"expected a snapshot, got {acc.spec.name}")
        self.follower.on_snapshot(acc.message.state, acc.message.event_seq, acc.header.session)
        assert self.follower.state is not None
        return self.follower.state
