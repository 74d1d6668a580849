"""Helpers for transport tests: real CURVE keys, an asyncio runner with a deadline, polling."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from nacl.public import PrivateKey

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


def run(coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
    """Run one test coroutine on a fresh loop, failing it after ``timeout`` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``check`` until true; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def nothing_arrives(recv: Callable[[], Awaitable[Any]], within: float = 0.3) -> None:
    """Assert that ``recv`` yields nothing for ``within`` seconds."""
    try:
        got = await asyncio.wait_for(recv(), within)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected delivery {got!r}")
