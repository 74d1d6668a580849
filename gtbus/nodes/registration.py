"""Joining a run: the Register / Welcome exchange every client node makes, with retries."""

from __future__ import annotations

import asyncio
from typing import Any

from gtbus.errors import GtbusError
from gtbus.messages.pipeline import Accepted
from gtbus.messages.types import Refusal, Register, Welcome
from gtbus.nodes.runtime import NodeRuntime

SOFTWARE = "gtbus/0.1"


async def register_with(rt: NodeRuntime, manifest: dict[str, Any], *, attempts: int = 30, timeout: float = 2.0) -> Accepted:
    """Register with the orchestrator; return the accepted Welcome.

    Retries while the orchestrator is still starting (a request that times out is
    simply sent again); a Refusal or any other answer ends it with GtbusError.
    """
    for _ in range(attempts):
        try:
            acc = await rt.request(Register(manifest, SOFTWARE), timeout=timeout)
        except asyncio.TimeoutError:
            continue
        if isinstance(acc.message, Refusal):
            raise GtbusError(f"{rt.name}: registration refused: {acc.message.reason}")
        if not isinstance(acc.message, Welcome):
            raise GtbusError(f"{rt.name}: unexpected answer to registration: {acc.spec.name}")
        return acc
    raise GtbusError(f"{rt.name}: the orchestrator did not answer registration ({attempts} tries of {timeout:g}s)")
