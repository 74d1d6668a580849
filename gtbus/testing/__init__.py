"""Public testing tools: a fake clock, the in-memory network, throwaway deployments.

gtbus's own tests use these, and so can users testing their own trainers or
schedules (trio's ``trio.testing`` is the model).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine, TypeVar

from gtbus.messages.deployment_keys import Deployment, make_deployment
from gtbus.transport.memory import MemoryNetwork

__all__ = ["FakeClock", "MemoryNetwork", "Deployment", "make_deployment", "run_async", "eventually"]


class FakeClock:
    """A clock that only moves when told to (``advance``), for leases, expiry and skew."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._wall = start
        self._mono = 1000.0

    def time(self) -> float:
        """Fake wall-clock seconds."""
        return self._wall

    def monotonic(self) -> float:
        """Fake monotonic seconds."""
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._wall += seconds
        self._mono += seconds


T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run one test coroutine on a fresh event loop, failing it after ``timeout`` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "condition", interval: float = 0.005) -> None:
    """Poll ``check`` until it is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)
