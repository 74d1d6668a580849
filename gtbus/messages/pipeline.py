"""The receive pipeline: every incoming multipart message goes through here, in this order.

1. size limits (frame count, header, body, blob and total sizes), magic
2. parse the header with strict msgpack limits
3. known message type, known sender, sender's role allowed for the type;
   the CURVE key ZeroMQ authenticated belongs to that sender
4. verify the Ed25519 signature
5. recipient is this node (or ``*`` for broadcast types)
6. replay guard: session/sequence, expiry, clock skew, epoch fencing
7. only now: record as seen, decode the body against its schema, hand it on

Each refusal raises :class:`~gtbus.errors.RejectedMessage` with a reason slug;
:class:`ReceivePipeline` counts them. Nothing before step 4 changes any state,
so a flood of junk or forged messages cannot move a high-water mark.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Generic, Sequence, TypeVar

from gtbus.errors import RejectedMessage
from gtbus.messages.envelope import BROADCAST, DEFAULT_LIMITS, Header, Limits, blob_digest, signing_input_digest, split, unpackb_strict
from gtbus.messages.identity import Roster
from gtbus.messages.primitives import Ed25519Verifier
from gtbus.messages.registry import REGISTRY, MessageSpec, body_from_wire
from gtbus.messages.replay_guard import ReplayGuard


#: The declared class of an accepted message (covariant: an ``Accepted[TokenReturn]`` is an
#: ``Accepted[object]``, so one handler may take several classes).
M_co = TypeVar("M_co", covariant=True)


@dataclass(frozen=True)
class Accepted(Generic[M_co]):
    """A message that passed every check; ``message`` is an instance of its declared class."""

    header: Header
    message: M_co
    spec: MessageSpec
    blobs: list[bytes]
    blob_digest: bytes = b""  # what the signature covered for the blobs (the recorder stores it)


def declared_sender(h: Header, roster: Roster) -> MessageSpec:
    """Steps 3 of the receive order: the type is declared, the sender known, its role allowed to send it.

    Shared with offline log verification, so a log is judged by the same rules as the wire.
    """
    spec = REGISTRY.get(h.type)
    if spec is None:
        raise RejectedMessage("unknown-type", f"type {h.type[:40]!r} is not declared")
    member = roster.get(h.sender)
    if member is None:
        raise RejectedMessage("unknown-sender", f"sender {h.sender[:40]!r} is not in the deployment")
    if member.role not in spec.senders:
        raise RejectedMessage("wrong-role", f"a {member.role.value} ({h.sender}) may not send {spec.name}")
    return spec


class ReceivePipeline:
    """Checks incoming frames for one node, in the order the module docstring gives."""

    def __init__(self, me: str, roster: Roster, guard: ReplayGuard, limits: Limits = DEFAULT_LIMITS) -> None:
        self.me = me
        self.roster = roster
        self.guard = guard
        self.limits = limits
        self.rejected: Counter[str] = Counter()
        self.accepted = 0
        self._verifiers = {m.name: Ed25519Verifier(m.ed25519) for m in roster}

    def accept(self, frames: Sequence[bytes], authenticated_as: str | None = None) -> Accepted:
        """Run every check; return the decoded message or raise RejectedMessage (and count it)."""
        try:
            result = self._accept(frames, authenticated_as)
        except RejectedMessage as exc:
            self.rejected[exc.reason] += 1
            raise
        self.accepted += 1
        return result

    def _accept(self, frames: Sequence[bytes], authenticated_as: str | None) -> Accepted:
        env = split(frames, self.limits)
        h = env.header
        spec = declared_sender(h, self.roster)
        sender = h.sender
        if authenticated_as is not None and authenticated_as != sender:
            raise RejectedMessage(
                "wrong-peer", f"signed as {sender} but the connection belongs to {authenticated_as}"
            )
        blobs = env.blobs
        if len(blobs) > spec.max_blobs:
            raise RejectedMessage("malformed", f"{spec.name} takes at most {spec.max_blobs} blobs")
        digest = blob_digest(blobs)
        if not self._verifiers[sender].verify(signing_input_digest(env.header_bytes, env.body_bytes, digest), env.signature):
            raise RejectedMessage("bad-signature", f"{spec.name} from {sender}: signature does not verify")
        if h.recipient != self.me and not (h.recipient == BROADCAST and spec.broadcast):
            raise RejectedMessage("wrong-recipient", f"{spec.name} from {sender} is addressed to {h.recipient[:40]!r}")
        self.guard.check(h, fenced=spec.fenced)
        self.guard.commit(h)  # journalled before anything acts on the message
        message = body_from_wire(spec, unpackb_strict(env.body_bytes, self.limits))
        return Accepted(h, message, spec, blobs, digest)
