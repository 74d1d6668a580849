"""Public testing tools: a fake clock, the in-memory network, throwaway deployments.

gtbus's own tests use these, and so can users testing their own trainers or
schedules (trio's ``trio.testing`` is the model).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Coroutine, TypeVar

from gtbus.messages.identity import NodeIdentity, Role, Roster, write_identity
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


@dataclass
class Deployment:
    """Keys of a throwaway deployment: one orchestrator and some holders."""

    key_dir: Path
    orchestrator: NodeIdentity
    holders: list[NodeIdentity]
    observer: NodeIdentity
    agents: list[NodeIdentity] = field(default_factory=list)

    @property
    def roster(self) -> Roster:
        """Every node's public identity."""
        return Roster([self.orchestrator.public, *(h.public for h in self.holders), self.observer.public, *(a.public for a in self.agents)])

    def key_path(self, name: str) -> Path:
        """Path of a node's secret key file."""
        return self.key_dir / f"{name}.key"


def make_deployment(key_dir: str | os.PathLike[str], holders: int = 3, *, orchestrator: str = "orch", agents: int = 0) -> Deployment:
    """Generate and write keys for an orchestrator, ``holders`` holders (h1, h2, ...), an observer ("status") and ``agents`` device agents."""
    d = Path(key_dir)
    orch = NodeIdentity.generate(orchestrator, Role.ORCHESTRATOR)
    write_identity(orch, d, overwrite=True)
    hs = []
    for i in range(1, holders + 1):
        h = NodeIdentity.generate(f"h{i}", Role.HOLDER)
        write_identity(h, d, overwrite=True)
        hs.append(h)
    obs = NodeIdentity.generate("status", Role.OBSERVER)
    write_identity(obs, d, overwrite=True)
    ags = []
    for i in range(1, agents + 1):
        a = NodeIdentity.generate(f"agent{i}", Role.AGENT)
        write_identity(a, d, overwrite=True)
        ags.append(a)
    return Deployment(d, orch, hs, obs, ags)


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
