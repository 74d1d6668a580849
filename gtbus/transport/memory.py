"""An in-process network of asyncio queues, with fault injection, for tests.

:class:`MemoryNetwork` hands out server and client transports that keep the
same rules as the ZeroMQ ones (see :mod:`gtbus.transport.base`), so node code
tested here behaves the same on sockets:

* a sender's identity is the name its transport was created with; nobody can
  send under another name (what CURVE + ZAP guarantee on zmq);
* ``send`` to a client that is not started (or closed, or attached to another
  server) raises :class:`PeerUnreachable`;
* ``publish`` fans out to every started client of that server whose topics
  prefix-match the first frame;
* messages a client sends before its server starts wait in the server's inbox,
  as a DEALER queues them before the connection is up; messages to a server
  that is closed or does not exist are lost;
* the server's ``on_subscribe`` hook fires when a client starts, when the
  server starts with clients already started, and when a partition of either
  heals (a SUB re-sends its subscriptions after reconnecting); an unsubscribe
  fires when a client closes.

Faults, applied in this order to every message handed to the network (one
published event counts once per subscriber):

1. the tap ``on_frames(direction, src, dst, frames)`` sees it; returning a new
   frame list replaces the message (to tamper), ``None`` leaves it;
2. if ``src`` or ``dst`` is partitioned, it is dropped silently (like TCP
   behind a partition: no error until heartbeats would time out);
3. if ``drop_next(n)`` left a budget, it is dropped and the budget shrinks.

Drops are counted in ``network.stats`` (``fault_dropped`` and ``extra``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Literal

from gtbus.errors import ConfigError, PeerUnreachable, TransportError
from gtbus.transport.base import (
    AsyncStartClose,
    Delivery,
    FrameSeq,
    SubscribeHook,
    Subscription,
    TransportStats,
)

__all__ = ["Direction", "FrameTap", "MemoryClient", "MemoryNetwork", "MemoryServer"]

Direction = Literal["to-server", "to-client", "event"]
"""``to-server``: a client's direct message; ``to-client``: a server's reply; ``event``: published."""

FrameTap = Callable[[Direction, str, str, list[bytes]], list[bytes] | None]
"""``(direction, src, dst, frames) -> replacement frames or None``."""


class _Closed:
    """Queue sentinel: the transport was closed."""


_CLOSED = _Closed()


class MemoryNetwork:
    """An in-process network: one or more servers, their clients, and faults between them."""

    def __init__(self, *, on_frames: FrameTap | None = None) -> None:
        #: tap called for every message handed to the network (see module docstring)
        self.on_frames: FrameTap | None = on_frames
        #: network-wide counters of messages lost to faults
        self.stats = TransportStats()
        self._servers: dict[str, MemoryServer] = {}
        self._clients: dict[str, MemoryClient] = {}
        self._partitioned: set[str] = set()
        self._drop_budget = 0

    # -- nodes

    def server(self, name: str, *, on_subscribe: SubscribeHook | None = None) -> MemoryServer:
        """Create the server transport ``name`` (a closed one of that name may be replaced)."""
        self._claim(name)
        server = MemoryServer(self, name, on_subscribe)
        self._servers[name] = server
        return server

    def client(self, name: str, *, server: str | None = None, topics: Sequence[bytes] = (b"",)) -> MemoryClient:
        """Create the client transport ``name`` attached to ``server`` (default: the only server)."""
        if server is None:
            live = [s for s in self._servers.values() if not s.closed]
            if len(live) != 1:
                raise ConfigError(f"client {name!r}: name its server (the network has {len(live)})")
            server = live[0].name
        self._claim(name)
        client = MemoryClient(self, name, server, tuple(bytes(t) for t in topics))
        self._clients[name] = client
        return client

    def _claim(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError("node name must be a non-empty string")
        existing = self._servers.get(name) or self._clients.get(name)
        if existing is not None and not existing.closed:
            raise ConfigError(f"node {name!r} already exists on this network")
        self._servers.pop(name, None)
        self._clients.pop(name, None)

    # -- faults

    def partition(self, name: str) -> None:
        """Cut node ``name`` off: everything it sends or is sent is lost until :meth:`heal`."""
        self._partitioned.add(name)

    def heal(self, name: str) -> None:
        """End the partition of ``name``; subscribers that reconnect re-announce themselves."""
        if name not in self._partitioned:
            return
        self._partitioned.discard(name)
        if name in self._clients:
            self._announce(self._clients[name])
        elif name in self._servers:
            for client in self._clients.values():
                if client.server_name == name:
                    self._announce(client)

    def is_partitioned(self, name: str) -> bool:
        """True while ``name`` is cut off."""
        return name in self._partitioned

    def drop_next(self, n: int = 1) -> None:
        """Lose the next ``n`` messages handed to the network, whoever sends them."""
        if n < 0:
            raise ValueError("drop_next needs n >= 0")
        self._drop_budget += n

    # -- the wire

    def _carry(self, direction: Direction, src: str, dst: str, frames: FrameSeq) -> list[bytes] | None:
        """Apply tap and faults; return the frames to deliver, or None if lost."""
        copied = [bytes(f) for f in frames]  # the wire copies; no aliasing of caller buffers
        if self.on_frames is not None:
            replaced = self.on_frames(direction, src, dst, copied)
            if replaced is not None:
                copied = [bytes(f) for f in replaced]
        if src in self._partitioned or dst in self._partitioned:
            self._count_drop("partition")
            return None
        if self._drop_budget > 0:
            self._drop_budget -= 1
            self._count_drop("injected")
            return None
        return copied

    def _count_drop(self, reason: str) -> None:
        self.stats.fault_dropped += 1
        self.stats.extra[reason] = self.stats.extra.get(reason, 0) + 1

    def _announce(self, client: MemoryClient, subscribed: bool = True) -> None:
        """Tell the client's server about its subscriptions, as a SUB does on (re)connect."""
        server = self._servers.get(client.server_name)
        if server is None or not server.started or server.closed or not client.started:
            return
        if client.name in self._partitioned or server.name in self._partitioned:
            return
        for topic in client.topics:
            server._subscription(Subscription(client.name, topic, subscribed))


class _MemoryEndpoint(AsyncStartClose):
    """What both ends of a :class:`MemoryNetwork` share: name, inbox, state, counters."""

    _role = "endpoint"

    def __init__(self, net: MemoryNetwork, name: str) -> None:
        self._net = net
        self._name = name
        self._inbox: asyncio.Queue[Delivery | _Closed] = asyncio.Queue()
        self.started = False
        self.closed = False
        self.stats = TransportStats()

    @property
    def name(self) -> str:
        """This node's name."""
        return self._name

    def _check(self, what: str) -> None:
        if self.closed:
            raise TransportError(f"{what}: transport is closed")
        if not self.started:
            raise TransportError(f"{what}: {self._role} {self._name!r} is not started")

    async def recv(self) -> Delivery:
        """Wait for the next message delivered to this end."""
        self._check("recv")
        item = await self._inbox.get()
        if isinstance(item, _Closed):
            self._inbox.put_nowait(item)  # wake other waiters too
            raise TransportError("recv: transport is closed")
        self.stats.received += 1
        return item


class MemoryServer(_MemoryEndpoint):
    """Server side of a :class:`MemoryNetwork`; create it with ``network.server(name)``."""

    _role = "server"

    def __init__(self, net: MemoryNetwork, name: str, on_subscribe: SubscribeHook | None) -> None:
        super().__init__(net, name)
        self._on_subscribe = on_subscribe

    @property
    def endpoints(self) -> tuple[str, str]:
        """Pseudo endpoints naming this server (no ports in memory)."""
        return (f"memory://{self._name}/router", f"memory://{self._name}/pub")

    async def start(self) -> None:
        """Start serving; clients already started announce their subscriptions."""
        if self.closed:
            raise TransportError(f"server {self._name!r} is closed")
        if self.started:
            return
        self.started = True
        for client in list(self._net._clients.values()):
            if client.server_name == self._name:
                self._net._announce(client)

    async def close(self) -> None:
        """Stop; a pending recv wakes with TransportError. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._inbox.put_nowait(_CLOSED)

    async def send(self, peer: str, frames: FrameSeq) -> None:
        """Send to client ``peer``; PeerUnreachable unless it is started and attached here."""
        what = f"send to {peer!r}"
        self._check(what)
        client = self._net._clients.get(peer)
        if client is None or not client.started or client.closed or client.server_name != self._name:
            raise PeerUnreachable(f"{what}: peer {peer!r} is not connected")
        self.stats.sent += 1
        carried = self._net._carry("to-client", self._name, peer, frames)
        if carried is not None:
            client._deliver(Delivery("direct", carried, None, self._name))

    async def publish(self, frames: FrameSeq) -> None:
        """Publish to every started client of this server whose topics match the first frame."""
        self._check("publish")
        self.stats.published += 1
        first = bytes(frames[0]) if len(frames) else b""
        for client in list(self._net._clients.values()):
            if client.server_name != self._name or not client.started or client.closed:
                continue
            if not any(first.startswith(t) for t in client.topics):
                continue
            carried = self._net._carry("event", self._name, client.name, frames)
            if carried is not None:
                client._deliver(Delivery("event", carried, None, self._name))

    def _deliver(self, delivery: Delivery) -> None:
        if not self.closed:
            self._inbox.put_nowait(delivery)

    def _subscription(self, sub: Subscription) -> None:
        self.stats.subscriptions += 1
        hook = self._on_subscribe
        if hook is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # heal() called outside the loop
            hook(sub)
        else:
            # Like the zmq transport, the hook runs from the loop, not inside the caller.
            loop.call_soon(hook, sub)


class MemoryClient(_MemoryEndpoint):
    """Client side of a :class:`MemoryNetwork`; create it with ``network.client(name)``."""

    _role = "client"

    def __init__(self, net: MemoryNetwork, name: str, server_name: str, topics: tuple[bytes, ...]) -> None:
        super().__init__(net, name)
        self.server_name = server_name
        self.topics = topics

    async def start(self) -> None:
        """Attach to the server (announcing subscriptions if it is up)."""
        if self.closed:
            raise TransportError(f"client {self._name!r} is closed")
        if self.started:
            return
        self.started = True
        self._net._announce(self)

    async def close(self) -> None:
        """Detach; a pending recv wakes with TransportError. Idempotent."""
        if self.closed:
            return
        self._net._announce(self, subscribed=False)
        self.closed = True
        self._inbox.put_nowait(_CLOSED)

    async def send(self, frames: FrameSeq) -> None:
        """Send to the server; held in its inbox until it starts, lost if it is closed or gone."""
        self._check("send")
        self.stats.sent += 1
        carried = self._net._carry("to-server", self._name, self.server_name, frames)
        if carried is None:
            return
        server = self._net._servers.get(self.server_name)
        if server is None or server.closed:
            self._net._count_drop("no-server")
            return
        server._deliver(Delivery("direct", carried, self._name, self._name))

    def _deliver(self, delivery: Delivery) -> None:
        if not self.closed:
            self._inbox.put_nowait(delivery)
