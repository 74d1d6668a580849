"""Messages: types, the registry, the signed envelope, the replay guard and the receive pipeline.

The wire reference is ``docs/protocol.md``; the modules are:

* :mod:`~gtbus.messages.identity` node keys, key files, the deployment roster
* :mod:`~gtbus.messages.primitives` Ed25519 / X25519 wrappers (what the conformance tests check)
* :mod:`~gtbus.messages.registry` declaring a type and who may send it; schema checks
* :mod:`~gtbus.messages.types` every message gtbus sends
* :mod:`~gtbus.messages.envelope` frames, header, strict msgpack, signing input
* :mod:`~gtbus.messages.signer` numbering, stamping and signing outgoing messages
* :mod:`~gtbus.messages.replay_guard` freshness rules and their persistent marks
* :mod:`~gtbus.messages.pipeline` the receive order of checks
"""

from gtbus.messages import types as types  # registers every message type
from gtbus.messages.envelope import BROADCAST, DEFAULT_LIMITS, Header, Limits
from gtbus.messages.identity import (
    NodeIdentity,
    PublicIdentity,
    Role,
    Roster,
    load_identity,
    load_public,
    write_identity,
)
from gtbus.messages.pipeline import Accepted, ReceivePipeline
from gtbus.messages.registry import REGISTRY, MessageSpec, message, spec_of
from gtbus.messages.replay_guard import ReplayGuard
from gtbus.messages.signer import MessageSigner
from gtbus.messages.types import *  # noqa: F401,F403

__all__ = [
    "BROADCAST",
    "DEFAULT_LIMITS",
    "Accepted",
    "Header",
    "Limits",
    "MessageSigner",
    "MessageSpec",
    "NodeIdentity",
    "PublicIdentity",
    "REGISTRY",
    "ReceivePipeline",
    "ReplayGuard",
    "Role",
    "Roster",
    "load_identity",
    "load_public",
    "message",
    "spec_of",
    "write_identity",
]
