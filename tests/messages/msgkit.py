"""Helpers of the messages-layer tests: a fake clock, a small deployment, frame crafting, a body builder.

Everything uses real keys and real signatures; nothing is mocked. The only
stand-in is the clock, which the tests move by hand.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Sequence

from gtbus.messages import NodeIdentity, Role, Roster
from gtbus.messages.envelope import (
    MAGIC,
    VERSION,
    Header,
    new_message_id,
    new_session_id,
    packb,
    signing_input,
)
from gtbus.messages.registry import MessageSpec

T0 = 1_700_000_000.0


class FakeClock:
    """A clock the test moves by hand (``time`` and ``monotonic`` advance together)."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now - T0

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Deployment:
    """One orchestrator, two holders, a device agent and an observer, plus an outsider."""

    orch: NodeIdentity
    h1: NodeIdentity
    h2: NodeIdentity
    agent: NodeIdentity
    obs: NodeIdentity
    outsider: NodeIdentity  # valid keys, but not in the roster
    roster: Roster

    def by_role(self, role: Role) -> NodeIdentity:
        return {Role.ORCHESTRATOR: self.orch, Role.HOLDER: self.h1, Role.AGENT: self.agent, Role.OBSERVER: self.obs}[role]


def make_deployment() -> Deployment:
    ids = {
        "orch": NodeIdentity.generate("orch", Role.ORCHESTRATOR),
        "h1": NodeIdentity.generate("h1", Role.HOLDER),
        "h2": NodeIdentity.generate("h2", Role.HOLDER),
        "agent": NodeIdentity.generate("agent", Role.AGENT),
        "obs": NodeIdentity.generate("obs", Role.OBSERVER),
    }
    outsider = NodeIdentity.generate("eve", Role.HOLDER)
    return Deployment(**ids, outsider=outsider, roster=Roster(i.public for i in ids.values()))


def craft(
    identity: NodeIdentity,
    type_name: str,
    body: Any,
    recipient: str,
    *,
    now: float,
    blobs: Sequence[bytes] = (),
    body_bytes: bytes | None = None,
    session: bytes | None = None,
    seq: int = 1,
    ttl: float = 30.0,
    sender: str | None = None,
    **header_overrides: Any,
) -> list[bytes]:
    """Frames built by hand and signed with ``identity``'s real key.

    This bypasses :class:`MessageSigner`'s own checks (role, broadcast, blob
    count), so tests can produce messages a well-behaved signer would refuse
    to make, and bodies that are not valid msgpack at all.
    """
    header = Header(
        v=VERSION,
        id=new_message_id(),
        type=type_name,
        sender=identity.name if sender is None else sender,
        recipient=recipient,
        session=new_session_id(int(now * 1e9)) if session is None else session,
        seq=seq,
        ts=now,
        exp=now + ttl,
        epoch=0,
        parent=None,
    )
    header = dataclasses.replace(header, **header_overrides)
    hb = packb(header.to_wire())
    bb = packb(body) if body_bytes is None else body_bytes
    sig = identity.sign(signing_input(hb, bb, list(blobs)))
    return [MAGIC, hb, bb, sig, *blobs]


def resign(identity: NodeIdentity, frames: Sequence[bytes], *, body_bytes: bytes) -> list[bytes]:
    """Same header (same seq and session), new body, signed again by ``identity``."""
    blobs = list(frames[4:])
    sig = identity.sign(signing_input(frames[1], body_bytes, blobs))
    return [frames[0], frames[1], body_bytes, sig, *blobs]




# -- a valid body for any registered type, from its field annotations ----------------------------

# Fields whose __post_init__ narrows the annotated type. The builder fails loudly
# (naming the type) when a new constrained field appears and is not listed here.
CONSTRAINED_VALUES: dict[tuple[str, str], Any] = {
    ("token.grant", "mode"): "ship",
    ("attest.request", "nonce"): b"n" * 32,
    ("attest.request", "kind"): "emulated",
    ("token.return", "chunk_commitment"): b"c" * 32,
}


def sample_value(tp: Any, depth: int = 0) -> Any:
    """A non-trivial value of annotation ``tp`` that survives a msgpack round trip unchanged."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return True
    if tp is int:
        return 2**40 + 7 + depth
    if tp is float:
        return 1234.5 + depth
    if tp is str:
        return f"s\u00e9l-{depth}"
    if tp is bytes:
        return bytes(range(256))[depth::7]
    if origin is list:
        (inner,) = typing.get_args(tp)
        return [sample_value(inner, depth + 1), sample_value(inner, depth + 2)]
    if origin is dict:
        return {"n": 1, "f": 0.25, "s": "x", "b": b"\x00\xff", "none": None, "l": [1, "2", [3.5]], "m": {"k": True}}
    if origin in (typing.Union, types.UnionType):
        # Prefer the non-None member: a None never tests the value encoding.
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        return sample_value(arms[0], depth)
    raise TypeError(f"no sample for {tp!r}")


def build_instance(spec: MessageSpec) -> Any:
    """A valid instance of ``spec.cls`` built only from ``spec.fields``."""
    kwargs = {
        name: CONSTRAINED_VALUES.get((spec.name, name), sample_value(tp)) for name, tp in spec.fields
    }
    try:
        return spec.cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise AssertionError(
            f"{spec.name}: generic builder could not build a valid instance ({exc}); "
            f"add the field to CONSTRAINED_VALUES in tests/messages/msgkit.py"
        ) from exc


def format_type(tp: Any) -> str:
    """How docs/protocol.md spells a field type (no '|', which would split a table cell)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return "Any"
    if isinstance(tp, type) and origin is None:
        return tp.__name__
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else format_type(a) for a in typing.get_args(tp))
    return f"{origin.__name__}[{', '.join(format_type(a) for a in typing.get_args(tp))}]"
