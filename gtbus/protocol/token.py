"""The GPU token, as the orchestrator sees it: who owns it, at which epoch, in which phase.

Rules this module keeps (everything that decides token ownership lives here):

* Exactly one owner at any time. In ``idle`` the orchestrator owns the token;
  from ``granted`` to the return or revocation, the named holder does.
* Every grant has a new epoch, strictly greater than any epoch issued before,
  including before a restart (the caller passes the highest epoch ever issued).
* A message about the token counts only if it names the current token id,
  comes from the current owner, and carries the current epoch. Anything else
  is *ignored* with a reason (fencing), never an error: a paused ex-holder
  waking up late must not disturb the run.
* A grant delivered twice is idempotent on the holder's side (by token id);
  an ack delivered twice is accepted once and ignored after.
* A lease that expires before the return revokes the token.

This module does no I/O and reads no clock: times are passed in. The table
``TRANSITIONS`` is the whole state machine; methods only look things up in it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum

from gtbus.errors import ProtocolError


class Phase(str, Enum):
    """Where the token is."""

    IDLE = "idle"  # with the orchestrator, between hops
    GRANTED = "granted"  # grant sent, no ack yet
    HELD = "held"  # the holder acknowledged and is provisioning
    RETURNED = "returned"  # back with the orchestrator: verify, train, epilogue
    REVOKED = "revoked"  # taken back (lease expired, decline, bad return): epilogue, no training


class Event(str, Enum):
    """What can happen to the token."""

    GRANT = "grant"
    ACK = "ack"
    RETURN = "return"
    DECLINE = "decline"
    EXPIRE = "expire"
    REVOKE = "revoke"
    FINISH = "finish"


TRANSITIONS: dict[Phase, dict[Event, Phase]] = {
    Phase.IDLE: {Event.GRANT: Phase.GRANTED},
    Phase.GRANTED: {
        Event.ACK: Phase.HELD,
        Event.RETURN: Phase.RETURNED,  # an ack lost on the way is not fatal
        Event.DECLINE: Phase.REVOKED,
        Event.EXPIRE: Phase.REVOKED,
        Event.REVOKE: Phase.REVOKED,
    },
    Phase.HELD: {
        Event.RETURN: Phase.RETURNED,
        Event.DECLINE: Phase.REVOKED,
        Event.EXPIRE: Phase.REVOKED,
        Event.REVOKE: Phase.REVOKED,
    },
    Phase.RETURNED: {Event.FINISH: Phase.IDLE, Event.REVOKE: Phase.REVOKED},
    Phase.REVOKED: {Event.FINISH: Phase.IDLE},
}


@dataclass(frozen=True)
class Grant:
    """A grant the orchestrator is about to send."""

    token_id: str
    epoch: int
    holder: str
    deadline: float


@dataclass(frozen=True)
class Verdict:
    """Whether a message about the token counted; ``reason`` says why not."""

    accepted: bool
    reason: str = ""


ACCEPT = Verdict(True)


class TokenMachine:
    """The orchestrator's view of the one GPU token."""

    def __init__(self, token_id: str | None = None, *, last_epoch: int = 0) -> None:
        self.token_id = token_id or os.urandom(8).hex()
        self.phase = Phase.IDLE
        self.epoch = last_epoch
        self.owner: str | None = None
        self.deadline: float | None = None
        self.history: list[tuple[int, Event, Phase]] = []

    def _step(self, event: Event) -> Phase:
        nxt = TRANSITIONS[self.phase].get(event)
        if nxt is None:
            raise ProtocolError(f"token {self.token_id}: {event.value} not allowed in phase {self.phase.value}")
        self.history.append((self.epoch, event, nxt))
        self.phase = nxt
        return nxt

    def can(self, event: Event) -> bool:
        """Whether ``event`` is allowed in the current phase."""
        return event in TRANSITIONS[self.phase]

    def grant(self, holder: str, now: float, lease: float) -> Grant:
        """Start a hop: a fresh epoch, the holder becomes owner until ``now + lease``."""
        if lease <= 0:
            raise ProtocolError("lease must be positive")
        self._step(Event.GRANT)
        self.epoch += 1
        self.owner = holder
        self.deadline = now + lease
        return Grant(self.token_id, self.epoch, holder, self.deadline)

    def _fence(self, sender: str, epoch: int, token_id: str) -> Verdict | None:
        if token_id != self.token_id:
            return Verdict(False, f"unknown token {token_id[:16]!r}")
        if epoch != self.epoch:
            return Verdict(False, f"epoch {epoch} is not the current epoch {self.epoch}")
        if sender != self.owner:
            return Verdict(False, f"{sender} does not own the token (owner {self.owner})")
        return None

    def _wire_event(self, event: Event, sender: str, epoch: int, token_id: str) -> Verdict:
        bad = self._fence(sender, epoch, token_id)
        if bad is not None:
            return bad
        if not self.can(event):
            return Verdict(False, f"{event.value} in phase {self.phase.value}")
        self._step(event)
        return ACCEPT

    def on_ack(self, sender: str, epoch: int, token_id: str) -> Verdict:
        """A holder acknowledged a grant."""
        return self._wire_event(Event.ACK, sender, epoch, token_id)

    def on_return(self, sender: str, epoch: int, token_id: str) -> Verdict:
        """A holder gave the token back after writing its segments."""
        return self._wire_event(Event.RETURN, sender, epoch, token_id)

    def on_decline(self, sender: str, epoch: int, token_id: str) -> Verdict:
        """A holder refused the grant."""
        return self._wire_event(Event.DECLINE, sender, epoch, token_id)

    def expired(self, now: float) -> bool:
        """True (and the token is revoked) if the current lease ran out before the return."""
        if self.phase in (Phase.GRANTED, Phase.HELD) and self.deadline is not None and now >= self.deadline:
            self._step(Event.EXPIRE)
            return True
        return False

    def revoke(self) -> None:
        """Take the token back for a reason found by the orchestrator (bad return, tampering)."""
        self._step(Event.REVOKE)

    def finish(self) -> None:
        """Epilogue done: the buffer is scrubbed, the key dropped; the token is idle again."""
        self._step(Event.FINISH)
        self.owner = None
        self.deadline = None
