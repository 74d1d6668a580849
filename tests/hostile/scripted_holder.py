"""A scripted holder: a real node (its own key, CurveZMQ, signed messages) that the test drives.

Built from gtbus's own classes (NodeRuntime, the ZeroMQ client transport, the
message types), so everything it sends is as authentic as an honest holder's:
only the *values* are hostile. The test decides, message by message, what it
says; the orchestrator under test is a real process started by the ``travel``
fixture.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from travel_kit import Travel

from gtbus.gpu.sealing import open_params
from gtbus.messages.identity import Roster, load_identity
from gtbus.messages.pipeline import Accepted
from gtbus.messages.types import Refusal, Register, RunComplete, Shutdown, TokenDecline, TokenGrant, Welcome
from gtbus.nodes.runtime import NodeRuntime
from gtbus.nodes.wiring import client_transport, orchestrator_of
from gtbus.testing import eventually

#: A manifest the orchestrator admits: ``total`` tokens of byte ids, any digest.
def honest_manifest(total: int, *, max_token: int = 255) -> dict[str, Any]:
    """A well-formed manifest (what an honest holder of ``total`` byte tokens registers)."""
    return {"name": "scripted", "total_tokens": total, "token_dtype": "uint16", "max_token": max_token,
            "digest_alg": "blake3", "digest": "ab" * 32}


class ScriptedHolder:
    """Holder ``name`` of a :class:`Travel` deployment, driven message by message."""

    def __init__(self, travel: Travel, name: str, run_dir: Path) -> None:
        dep = travel.dep
        self.identity = load_identity(dep.dep.key_path(name))
        roster = Roster.from_dir(dep.keys)
        self.rt = NodeRuntime(self.identity, roster, client_transport(self.identity, roster, dep.router, dep.pub),
                              run_dir=run_dir, server=orchestrator_of(roster))
        self.grants: asyncio.Queue[Accepted] = asyncio.Queue()

        async def on_grant(acc: Accepted, delivery: Any) -> None:
            if acc.message.holder == name:
                await self.grants.put(acc)

        self.rt.on(TokenGrant, on_grant)
        self.done = asyncio.Event()

        async def on_end(acc: Accepted, delivery: Any) -> None:
            self.done.set()

        self.rt.on(RunComplete, on_end)
        self.rt.on(Shutdown, on_end)

    async def __aenter__(self) -> "ScriptedHolder":
        await self.rt.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.rt.close()

    async def register(self, manifest: object, *, timeout: float = 10.0) -> Welcome | Refusal:
        """Send a Register with this manifest (retrying while the orchestrator starts); its answer."""
        for _ in range(30):
            try:
                acc = await self.rt.request(Register(manifest, "scripted/0"), timeout=timeout)  # type: ignore[arg-type]
            except asyncio.TimeoutError:
                continue
            assert isinstance(acc.message, (Welcome, Refusal)), acc.spec.name
            return acc.message
        raise AssertionError("the orchestrator never answered registration")

    async def next_grant(self, timeout: float = 60.0) -> tuple[TokenGrant, int, Any]:
        """The next grant for us: (grant, epoch, opened channel params)."""
        acc = await asyncio.wait_for(self.grants.get(), timeout)
        g: TokenGrant = acc.message
        params = open_params(g.sealed_params, bytes(self.identity.x25519_secret))
        return g, acc.header.epoch, params

    async def decline_until_done(self, timeout: float = 90.0) -> None:
        """Decline every further grant until the orchestrator announces the end of the run."""

        async def loop() -> None:
            while True:
                g, epoch, _ = await self.next_grant(timeout=timeout)
                await self.send(TokenDecline(g.token_id, "scripted"), epoch)

        task = asyncio.create_task(loop())
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        finally:
            task.cancel()

    async def send(self, msg: object, epoch: int, *, blobs: list[bytes] | None = None) -> None:
        """Send one signed message to the orchestrator under ``epoch``."""
        await self.rt.send(msg, epoch=epoch, blobs=blobs or ())


async def wait_for_text(path: Path, text: str, timeout: float = 60.0) -> None:
    """Wait until a node's stderr file contains ``text``."""
    await eventually(lambda: path.exists() and text in path.read_text(errors="replace"), timeout=timeout, what=f"{text!r} in {path.name}")
