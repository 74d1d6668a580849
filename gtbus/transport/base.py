"""The transport interface: what the node layer may ask of a network.

A transport moves opaque multipart messages (``list[bytes]``): the protocol
frames, already signed by the layer above. It never parses them. Two roles:

* :class:`ServerTransport` (the orchestrator) receives direct messages from any
  client, replies to one client by name, and publishes events to all
  subscribed clients.
* :class:`ClientTransport` (a holder, a device agent) sends direct messages to
  the server and receives the server's replies and events on one stream.

Two implementations exist: :mod:`gtbus.transport.zmq` (ZeroMQ with
CurveZMQ, the real one) and :mod:`gtbus.transport.memory` (asyncio queues, for
tests, with fault injection). Both keep the rules below, so code tested on the
memory network behaves the same on sockets.

Rules every implementation keeps:

* ``Delivery.peer`` on the server side is the *authenticated* name of the
  sender (never a name the sender merely claimed), and is what ``send`` takes
  to reply.
* ``send`` to a peer that is not connected raises :class:`PeerUnreachable`;
  other failures raise :class:`TransportError`; bad configuration (an endpoint
  that cannot be bound, a malformed key) raises :class:`ConfigError`.
* ``recv`` is safe to cancel (``asyncio.wait_for``): a message is never lost
  because a ``recv`` was cancelled.
* After ``close``, ``send`` and ``recv`` raise :class:`TransportError`, and a
  ``recv`` blocked at the time of ``close`` wakes with it.
* Delivery is at most once and in order per sender; a partition or a full
  queue may lose messages. The protocol layer above copes (sequence numbers,
  leases, snapshots).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar, runtime_checkable

_T = TypeVar("_T", bound="AsyncStartClose")

__all__ = [
    "AsyncStartClose",
    "Channel",
    "ClientTransport",
    "Delivery",
    "FrameSeq",
    "ServerTransport",
    "SubscribeHook",
    "Subscription",
    "TransportStats",
]

Channel = Literal["direct", "event"]
"""``direct``: a request or reply between one client and the server; ``event``: published to all."""

FrameSeq = Sequence[bytes | bytearray | memoryview]
"""What ``send``/``publish`` accept. Frames of 64 KiB or more are sent zero-copy:
do not modify their buffers until the call has returned."""


@dataclass(frozen=True)
class Delivery:
    """One received multipart message.

    ``peer``: on the server, the authenticated node name of the sender, to reply
    to with ``send(peer, ...)``; on a client, ``None`` (the only peer is the
    server). ``authenticated_as``: the node name the network vouched for (on
    zmq: the name the ZAP handler bound to the sender's CURVE key, or on a
    client the pinned server's name); ``None`` when nothing authenticated the
    sender (plaintext mode).
    """

    channel: Channel
    frames: list[bytes]
    peer: str | None
    authenticated_as: str | None


@dataclass(frozen=True)
class Subscription:
    """A subscriber (re)joined or left the server's event channel.

    Given to the server's ``on_subscribe`` hook so the node layer can push a
    snapshot to a late joiner (zguide Clone pattern). It fires again when a
    client reconnects after a network fault, since the subscriber re-sends its
    subscriptions. ``peer`` is the subscriber's authenticated name; it is
    ``None`` in plaintext mode (subscribers are anonymous) and for an
    unsubscribe that the zmq transport reports when the *last* subscriber of a
    topic disconnects (libzmq attaches no identity to those).
    """

    peer: str | None
    topic: bytes
    subscribed: bool


SubscribeHook = Callable[[Subscription], None]
"""Called synchronously from the transport; schedule async work yourself."""


@dataclass
class TransportStats:
    """Counters a transport keeps; read them, never rely on their exact timing."""

    sent: int = 0
    received: int = 0
    published: int = 0
    #: connections refused by the ZAP handler (unknown CURVE key, wrong mechanism)
    auth_rejected: int = 0
    #: connections admitted by the ZAP handler
    auth_accepted: int = 0
    #: messages dropped because their connection's routing id is bound to another key
    spoofed_dropped: int = 0
    #: messages drained and dropped unread for more frames or bytes than the transport allows
    oversize_dropped: int = 0
    #: messages dropped because they carried no authenticated identity, or were malformed
    malformed_dropped: int = 0
    #: subscription messages seen on the event socket
    subscriptions: int = 0
    #: client side: handshakes that failed (authentication refused, protocol error)
    handshake_failures: int = 0
    #: messages the memory network dropped by fault injection or partition
    fault_dropped: int = 0
    #: free-form detail counters, e.g. per-reason
    extra: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class ServerTransport(Protocol):
    """The orchestrator's side: direct messages with every client, events to all."""

    @property
    def name(self) -> str:
        """This node's name."""
        ...

    @property
    def endpoints(self) -> tuple[str, str]:
        """``(router_endpoint, pub_endpoint)`` actually bound, with real ports."""
        ...

    @property
    def stats(self) -> TransportStats:
        """Counters of this transport."""
        ...

    async def start(self) -> None:
        """Bind and begin accepting clients."""
        ...

    async def recv(self) -> Delivery:
        """Wait for the next direct message from any client."""
        ...

    async def send(self, peer: str, frames: FrameSeq) -> None:
        """Send a direct message to one connected client; raises PeerUnreachable."""
        ...

    async def publish(self, frames: FrameSeq) -> None:
        """Publish an event to every subscribed client (slow subscribers may miss it)."""
        ...

    async def close(self) -> None:
        """Stop, drop connections, release the ports. Idempotent."""
        ...


@runtime_checkable
class ClientTransport(Protocol):
    """A node's side towards the server: requests out, replies and events in."""

    @property
    def name(self) -> str:
        """This node's name."""
        ...

    @property
    def stats(self) -> TransportStats:
        """Counters of this transport."""
        ...

    async def start(self) -> None:
        """Connect (reconnection is automatic afterwards)."""
        ...

    async def recv(self) -> Delivery:
        """Wait for the next direct reply or event, merged in arrival order."""
        ...

    async def send(self, frames: FrameSeq) -> None:
        """Send a direct message to the server (queued while disconnected)."""
        ...

    async def close(self) -> None:
        """Disconnect and release resources. Idempotent."""
        ...


class AsyncStartClose:
    """``async with transport:`` starts it and closes it, for every implementation."""

    async def start(self) -> None:  # pragma: no cover - every transport defines it
        raise NotImplementedError

    async def close(self) -> None:  # pragma: no cover - every transport defines it
        raise NotImplementedError

    async def __aenter__(self: _T) -> _T:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
