"""ZeroMQ transport: ROUTER + XPUB on the server, DEALER + SUB on clients.

This package is the only part of gtbus that imports zmq (besides the raw
pyzmq baseline of the bus benchmark), and nothing imports it until a zmq
transport is asked for: ``gtbus.transport`` names these classes lazily.

Security model
--------------
* Every socket on TCP speaks CurveZMQ; the server side of each socket is a
  CURVE server, and a ZAP handler admits only the deployment's keys, each as
  its node name, at a bounded handshake rate; a missing handler fails closed
  (:mod:`~gtbus.transport.zmq.zap`).
* A route belongs to the key that authenticated it: the server routes by the
  authenticated name, never by a name or routing id a client chose, and
  seeds libzmq's auto-generated routing ids from ``os.urandom``
  (:mod:`~gtbus.transport.zmq.server`; a client's routing id is secret random
  bytes, :mod:`~gtbus.transport.zmq.client`).
* Inbound messages are read frame by frame, and one over the frame or byte
  limits is drained without copying and dropped (:mod:`~gtbus.transport.zmq.pipe`);
  what a TCP connection may make the server hold before its message is whole
  is bounded by watching the kernel's count of its bytes
  (:mod:`~gtbus.transport.zmq.connections`, rules in
  :mod:`~gtbus.transport.zmq.conn_guard`).
* Plaintext (no CURVE) is allowed on ``inproc://`` and ``ipc://`` only, unless
  ``insecure=True`` is passed; that exists for the raw-pyzmq benchmark
  baseline and nothing else (:mod:`~gtbus.transport.zmq.endpoint`)::

      server = ZmqServer("orch", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", None, insecure=True)
      client = ZmqClient("h1", *server.endpoints, None, insecure=True)

Modules, one idea each: :mod:`~gtbus.transport.zmq.keys` (CURVE keys as raw
bytes), :mod:`~gtbus.transport.zmq.options` (:class:`SocketTuning`, DESIGN §5),
:mod:`~gtbus.transport.zmq.errors` (zmq and OS errors mapped once),
:mod:`~gtbus.transport.zmq.pipe` (the edge-triggered hot path),
:mod:`~gtbus.transport.zmq.zap`, :mod:`~gtbus.transport.zmq.connections`,
:mod:`~gtbus.transport.zmq.endpoint` (what server and client share),
:mod:`~gtbus.transport.zmq.server` and :mod:`~gtbus.transport.zmq.client`.
"""

from gtbus.transport.zmq.client import ZmqClient
from gtbus.transport.zmq.keys import (
    CURVE_KEY_BYTES,
    CurveClientConfig,
    CurveServerConfig,
    curve_public_key,
    generate_curve_keypair,
    z85_key,
)
from gtbus.transport.zmq.options import DEFAULT_MAX_FRAME_BYTES, SocketTuning
from gtbus.transport.zmq.server import ZmqServer
from gtbus.transport.zmq.zap import ZAP_DOMAIN

__all__ = [
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
]
