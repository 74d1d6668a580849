"""The hop as a holder sees it: when to accept a grant, when to ack again, when to stop.

Rules:

* A grant is acted on only if its epoch is above every epoch this holder has
  seen (so a replayed or delayed grant cannot make it write again) and its
  lease has not already run out.
* The same grant (same token id and epoch) delivered twice is idempotent: the
  holder acknowledges again and does not provision twice.
* A revoke for the hop in progress aborts it; one for any other hop is ignored.
* A new grant with a higher epoch while provisioning means the orchestrator
  revoked the old hop (its revoke may have been lost): the old one is abandoned.

No I/O, no clock: the node shell passes times in and performs the actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class HolderPhase(str, Enum):
    """What the holder is doing with the token."""

    IDLE = "idle"
    PROVISIONING = "provisioning"


class Action(str, Enum):
    """What the node shell must do in response to a grant."""

    PROVISION = "provision"  # ack, then write the chunk and return
    ACK_AGAIN = "ack-again"  # duplicate grant: ack again, do nothing else
    IGNORE = "ignore"  # stale or replayed grant
    DECLINE = "decline"  # lease already over: tell the orchestrator


TRANSITIONS: dict[HolderPhase, dict[str, HolderPhase]] = {
    HolderPhase.IDLE: {"grant": HolderPhase.PROVISIONING},
    HolderPhase.PROVISIONING: {
        "grant": HolderPhase.PROVISIONING,  # a newer hop replaces an abandoned one
        "returned": HolderPhase.IDLE,
        "revoked": HolderPhase.IDLE,
        "failed": HolderPhase.IDLE,
    },
}


@dataclass(frozen=True)
class Decision:
    """The holder's decision about a grant, and why."""

    action: Action
    reason: str = ""


class HolderMachine:
    """One holder's token state."""

    def __init__(self, *, last_epoch: int = 0) -> None:
        self.phase = HolderPhase.IDLE
        self.last_epoch = last_epoch
        self.current: tuple[str, int] | None = None  # (token id, epoch) of the hop in progress
        self.completed: set[tuple[str, int]] = set()

    def _step(self, event: str) -> None:
        self.phase = TRANSITIONS[self.phase][event]

    def on_grant(self, token_id: str, epoch: int, lease_deadline: float, now: float) -> Decision:
        """Decide what to do with a grant for ``epoch``."""
        key = (token_id, epoch)
        if key == self.current or key in self.completed:
            return Decision(Action.ACK_AGAIN, "grant delivered twice")
        if epoch <= self.last_epoch:
            return Decision(Action.IGNORE, f"epoch {epoch} not above last seen {self.last_epoch}")
        self.last_epoch = epoch
        if now >= lease_deadline:
            return Decision(Action.DECLINE, "lease already expired on arrival")
        self._step("grant")
        self.current = key
        return Decision(Action.PROVISION)

    def is_current(self, token_id: str, epoch: int) -> bool:
        """Whether (token, epoch) is the hop being provisioned now (the shell checks before writing)."""
        return self.current == (token_id, epoch) and self.phase is HolderPhase.PROVISIONING

    def on_revoke(self, token_id: str, epoch: int) -> bool:
        """True if this revoke aborts the hop in progress."""
        if self.current == (token_id, epoch):
            self._step("revoked")
            self.current = None
            return True
        return False

    def returned(self, token_id: str, epoch: int) -> None:
        """The holder gave the token back for this hop."""
        if self.current == (token_id, epoch):
            self._step("returned")
            self.completed.add((token_id, epoch))
            self.current = None

    def failed(self, token_id: str, epoch: int) -> None:
        """Provisioning failed locally; the hop is over for this holder."""
        if self.current == (token_id, epoch):
            self._step("failed")
            self.current = None
