"""The transport layer: moves opaque signed multipart messages between nodes.

Layering (DESIGN §3): the node layer talks to a :class:`ServerTransport` or a
:class:`ClientTransport` and never to sockets. Two implementations:

* :mod:`gtbus.transport.zmq`: ZeroMQ (ROUTER/XPUB on the orchestrator,
  DEALER/SUB on clients) with CurveZMQ and a ZAP handler; the only package in
  gtbus that imports zmq. Its names below are imported on first use, so the
  memory transport, ``gtbus.testing`` and the simulator run without pyzmq.
* :mod:`gtbus.transport.memory`: an in-process :class:`MemoryNetwork` with the
  same rules and fault injection, for tests (re-exported by ``gtbus.testing``).

Two sans-I/O rule sets the server side applies: :mod:`gtbus.transport.budget`
(per-peer message, byte and refusal-record budgets, checked by the node
runtime before its pipeline) and :mod:`gtbus.transport.zmq.conn_guard` (what
one TCP connection may make the zmq server hold before its message is whole).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:  # the names of _ZMQ_NAMES, for type checkers
    from gtbus.transport.zmq import *  # noqa: F403

#: The names of :mod:`gtbus.transport.zmq` (its ``__all__``), imported with pyzmq on first use.
_ZMQ_NAMES = frozenset({
    "CURVE_KEY_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "ZAP_DOMAIN",
    "CurveClientConfig",
    "CurveServerConfig",
    "SocketTuning",
    "ZmqClient",
    "ZmqServer",
    "curve_public_key",
    "generate_curve_keypair",
    "z85_key",
})


def __getattr__(name: str) -> object:
    """Import the zmq transport only when one of its names is asked for (PEP 562)."""
    if name in _ZMQ_NAMES:
        from gtbus.transport import zmq

        value = getattr(zmq, name)
        globals()[name] = value  # asked once: a plain attribute from now on
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Channel",
    "ClientTransport",
    "Delivery",
    "Direction",
    "FrameSeq",
    "FrameTap",
    "MemoryClient",
    "MemoryNetwork",
    "MemoryServer",
    "ServerTransport",
    "SubscribeHook",
    "Subscription",
    "TransportStats",
    *sorted(_ZMQ_NAMES),
]
