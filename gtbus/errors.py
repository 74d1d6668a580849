"""The small public set of errors gtbus raises.

Low-level failures (zmq, OS, msgpack, libsodium) are mapped into these in one
place per layer, so callers handle a handful of types and every message a user
sees is one clear line naming what is wrong.
"""

from __future__ import annotations


class GtbusError(Exception):
    """Base class of every error gtbus raises on purpose."""


class ConfigError(GtbusError):
    """A key file, runbook or option is missing, unreadable or invalid."""


class KeyFileError(ConfigError):
    """A key file is missing, malformed, or readable by others than its owner."""


class RejectedMessage(GtbusError):
    """An incoming message failed a check of the receive pipeline.

    ``reason`` is a short stable slug (``bad-signature``, ``replay``, ...) used
    for counters; the message text says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TransportError(GtbusError):
    """The network layer failed (socket closed, bind failed, peer unknown)."""


class PeerUnreachable(TransportError):
    """A direct message named a peer that is not connected."""


class ChannelError(GtbusError):
    """The per-hop encrypted channel failed: bad params, or a segment did not authenticate."""


class DeviceError(GtbusError):
    """The device layer failed: allocation, mapping, scrub verification, measurement."""


class ProtocolError(GtbusError):
    """A state machine was asked to do something its rules forbid."""
