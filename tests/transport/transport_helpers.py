"""Helpers for transport tests: real CURVE keys, an asyncio runner with a deadline, polling."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from nacl.public import PrivateKey

from gtbus.testing import eventually, run_async
from gtbus.transport import CurveClientConfig, CurveServerConfig

T = TypeVar("T")


@dataclass(frozen=True)
class Deployment:
    """A server key pair and client key pairs, as PyNaCl X25519 keys (raw 32 bytes)."""

    server: PrivateKey
    clients: dict[str, PrivateKey]

    def server_config(self) -> CurveServerConfig:
        return CurveServerConfig.from_secret(bytes(self.server))

    def allowed(self) -> dict[bytes, str]:
        return {bytes(sk.public_key): name for name, sk in self.clients.items()}

    def client_config(self, name: str, key: PrivateKey | None = None) -> CurveClientConfig:
        sk = key if key is not None else self.clients[name]
        return CurveClientConfig.from_secret(bytes(sk), bytes(self.server.public_key))


async def nothing_arrives(recv: Callable[[], Awaitable[Any]], within: float = 0.3) -> None:
    """Assert that ``recv`` yields nothing for ``within`` seconds."""
    try:
        got = await asyncio.wait_for(recv(), within)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected delivery {got!r}")


def run(coro, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    """Transport tests are bounded at 10 s each."""
    return run_async(coro, timeout)


__all__ = ["Deployment", "eventually", "nothing_arrives", "run"]
