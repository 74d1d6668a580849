"""The transport layer: moves opaque signed multipart messages between nodes.

Layering (DESIGN §3): the node layer talks to a :class:`ServerTransport` or a
:class:`ClientTransport` and never to sockets. Two implementations:

* :mod:`gtbus.transport.zmq_bus`: ZeroMQ (ROUTER/XPUB on the orchestrator,
  DEALER/SUB on clients) with CurveZMQ and a ZAP handler; the only module in
  gtbus that imports zmq.
* :mod:`gtbus.transport.memory`: an in-process :class:`MemoryNetwork` with the
  same rules and fault injection, for tests (re-exported by ``gtbus.testing``).

Two sans-I/O rule sets the server side applies: :mod:`gtbus.transport.budget`
(per-peer message, byte and refusal-record budgets, checked by the node
runtime before its pipeline) and :mod:`gtbus.transport.conn_guard` (what one
TCP connection may make the zmq server hold before its message is whole).
"""

from gtbus.transport.base import (
    Channel,
    ClientTransport,
    Delivery,
    FrameSeq,
    ServerTransport,
    SubscribeHook,
    Subscription,
    TransportStats,
)
from gtbus.transport.memory import Direction, FrameTap, MemoryClient, MemoryNetwork, MemoryServer
from gtbus.transport.zmq_bus import (
    CurveClientConfig,
    CurveServerConfig,
    SocketTuning,
    ZmqClient,
    ZmqServer,
    curve_public_key,
    generate_curve_keypair,
    z85_key,
)

__all__ = [
    "Channel",
    "ClientTransport",
    "CurveClientConfig",
    "CurveServerConfig",
    "Delivery",
    "Direction",
    "FrameSeq",
    "FrameTap",
    "MemoryClient",
    "MemoryNetwork",
    "MemoryServer",
    "ServerTransport",
    "SocketTuning",
    "SubscribeHook",
    "Subscription",
    "TransportStats",
    "ZmqClient",
    "ZmqServer",
    "curve_public_key",
    "generate_curve_keypair",
    "z85_key",
]
