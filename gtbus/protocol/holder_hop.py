"""The hop as a data holder sees it: events in, actions out.

Rules this module keeps (everything that decides what a holder does with a
grant lives here; the holder node and the simulator only execute actions):

* A grant is acted on only if its epoch is above every epoch this holder has
  seen (so a replayed or delayed grant cannot make it write again) and its
  lease has not already run out; a grant whose lease is over on arrival is
  declined, and its epoch is used up all the same.
* The same grant (same token id and epoch) delivered twice is idempotent: the
  holder acknowledges again and does not provision twice, even past its lease
  (a late copy must not turn into a decline of the hop being provisioned).
* A revoke for the hop in progress aborts it (:class:`StopWriting`); one for any
  other hop is ignored.
* A new grant with a higher epoch while provisioning means the orchestrator
  revoked the old hop (its revoke may have been lost): the old one is abandoned,
  and its writer finishing late changes nothing.
* The token goes back (:class:`SendReturn`) only for the hop in progress, once;
  a hop that failed locally is declined (:class:`SendDecline`) and is not
  "completed": a copy of its grant is simply stale.
* Any event in a phase with no rule for it is ignored with a reason
  (``HolderStep.reason``), never an exception.

What happens between :class:`Provision` and :class:`Written` (open the sealed
channel params, verify the measurement report, ack, seal the chunk into
staging or stream it) is the shell's; it feeds :class:`Refused` when any of it
fails. No I/O, no clock: times come in with the events.

Public API::

    m = HolderMachine(last_epoch=0)
    step = m.handle(Granted(token_id, epoch, lease_deadline, now))  # -> HolderStep(counted, reason, actions)
    m.handle(Written(token_id, epoch)) / m.handle(Refused(token_id, epoch, reason))
    m.handle(Revoked(token_id, epoch))
    m.is_current(token_id, epoch), m.phase, m.last_epoch, m.trace

``on_grant``/``on_revoke``/``returned``/``failed`` are the same events for a
shell that wants one decision back (the simulator, ``replay --redrive``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Union


#: Events a machine keeps in its trace (for debugging and tests).
TRACE_LEN = 256


class HolderPhase(str, Enum):
    """What the holder is doing with the token."""

    IDLE = "idle"
    PROVISIONING = "provisioning"


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Granted:
    """A ``token.grant`` for this holder arrived at ``now``."""

    token_id: str
    epoch: int
    lease_deadline: float
    now: float


@dataclass(frozen=True)
class Written:
    """The shell wrote the hop's segments (staging sealed, or every segment confirmed by the device agent)."""

    token_id: str
    epoch: int


@dataclass(frozen=True)
class Refused:
    """The hop failed here: the grant did not check out, or writing failed. ``reason`` goes into the decline."""

    token_id: str
    epoch: int
    reason: str = ""


@dataclass(frozen=True)
class Revoked:
    """A ``token.revoke`` from the orchestrator."""

    token_id: str
    epoch: int


HolderEvent = Union[Granted, Written, Refused, Revoked]


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provision:
    """Check the grant (channel params, measurement), ack it, write the chunk; feed Written or Refused."""

    token_id: str
    epoch: int


@dataclass(frozen=True)
class SendAck:
    """Acknowledge the grant again (a duplicate): nothing else is started."""

    token_id: str
    epoch: int


@dataclass(frozen=True)
class SendDecline:
    """Decline the hop with ``reason``."""

    token_id: str
    epoch: int
    reason: str


@dataclass(frozen=True)
class SendReturn:
    """Give the token back for the hop just written."""

    token_id: str
    epoch: int


@dataclass(frozen=True)
class StopWriting:
    """The hop was revoked: stop writing or streaming its segments at once."""

    token_id: str
    epoch: int


HolderAction = Union[Provision, SendAck, SendDecline, SendReturn, StopWriting]


@dataclass(frozen=True)
class HolderStep:
    """What one event did: whether it counted (``reason`` says why not) and the actions, in order."""

    counted: bool
    reason: str = ""
    actions: tuple[HolderAction, ...] = ()


def _ignored(reason: str) -> HolderStep:
    return HolderStep(False, reason)


# (phase, event type) -> handler. An event absent from its phase's row is ignored with a reason.
TRANSITIONS: dict[HolderPhase, dict[type, str]] = {
    HolderPhase.IDLE: {Granted: "_granted"},
    HolderPhase.PROVISIONING: {
        Granted: "_granted",  # a duplicate, or a newer hop replacing an abandoned one
        Written: "_written",
        Refused: "_refused",
        Revoked: "_revoked",
    },
}

# The phases a handler may move to (documentation and the exhaustive tests).
NEXT_PHASES: dict[HolderPhase, frozenset[HolderPhase]] = {
    HolderPhase.IDLE: frozenset({HolderPhase.IDLE, HolderPhase.PROVISIONING}),
    HolderPhase.PROVISIONING: frozenset({HolderPhase.IDLE, HolderPhase.PROVISIONING}),
}


class Action(str, Enum):
    """The one decision a grant leads to (for shells and re-driving that want it summed up)."""

    PROVISION = "provision"  # check, ack, write the chunk and return
    ACK_AGAIN = "ack-again"  # duplicate grant: ack again, do nothing else
    IGNORE = "ignore"  # stale or replayed grant
    DECLINE = "decline"  # lease already over: tell the orchestrator


_DECISION: dict[type, Action] = {Provision: Action.PROVISION, SendAck: Action.ACK_AGAIN, SendDecline: Action.DECLINE}


@dataclass(frozen=True)
class Decision:
    """The holder's decision about a grant, and why."""

    action: Action
    reason: str = ""


class HolderMachine:
    """One holder's token state: feed it events with :meth:`handle`, execute the actions it returns."""

    def __init__(self, *, last_epoch: int = 0) -> None:
        self.phase = HolderPhase.IDLE
        self.last_epoch = last_epoch
        self.current: tuple[str, int] | None = None  # (token id, epoch) of the hop in progress
        self.completed: set[tuple[str, int]] = set()
        # (phase, event, next, counted) of the last TRACE_LEN events: a machine may live for a
        # whole run and judge every segment and stale message, so the trace is bounded.
        self.trace: deque[tuple[HolderPhase, str, HolderPhase, bool]] = deque(maxlen=TRACE_LEN)

    def handle(self, event: HolderEvent) -> HolderStep:
        """Apply ``event``; never raises for an event in the wrong phase or for another hop."""
        before = self.phase
        name = TRANSITIONS[self.phase].get(type(event))
        step = getattr(self, name)(event) if name is not None else _ignored(f"{type(event).__name__} in phase {self.phase.value}")
        self.trace.append((before, type(event).__name__, self.phase, step.counted))
        return step

    def is_current(self, token_id: str, epoch: int) -> bool:
        """Whether (token, epoch) is the hop being provisioned now (the shell checks before writing)."""
        return self.current == (token_id, epoch) and self.phase is HolderPhase.PROVISIONING

    # -- handlers ----------------------------------------------------------------------------

    def _granted(self, ev: Granted) -> HolderStep:
        key = (ev.token_id, ev.epoch)
        if key == self.current or key in self.completed:
            return HolderStep(True, "grant delivered twice", (SendAck(*key),))
        if ev.epoch <= self.last_epoch:
            return _ignored(f"epoch {ev.epoch} not above last seen {self.last_epoch}")
        self.last_epoch = ev.epoch
        if not ev.now < ev.lease_deadline:  # a NaN deadline is over too
            self._end()  # a newer grant abandons the hop in progress, even one it declines
            return HolderStep(True, "lease already expired on arrival", (SendDecline(*key, "lease already expired on arrival"),))
        self.phase, self.current = HolderPhase.PROVISIONING, key
        return HolderStep(True, "", (Provision(*key),))

    def _this_hop(self, ev: Written | Refused | Revoked) -> HolderStep | None:
        if self.current != (ev.token_id, ev.epoch):
            return _ignored(f"{type(ev).__name__} for epoch {ev.epoch}, not the hop in progress")
        return None

    def _end(self) -> None:
        self.phase, self.current = HolderPhase.IDLE, None

    def _written(self, ev: Written) -> HolderStep:
        other = self._this_hop(ev)
        if other is not None:
            return other
        self._end()
        self.completed.add((ev.token_id, ev.epoch))
        return HolderStep(True, "", (SendReturn(ev.token_id, ev.epoch),))

    def _refused(self, ev: Refused) -> HolderStep:
        other = self._this_hop(ev)
        if other is not None:
            return other
        self._end()
        return HolderStep(True, "", (SendDecline(ev.token_id, ev.epoch, ev.reason),))

    def _revoked(self, ev: Revoked) -> HolderStep:
        other = self._this_hop(ev)
        if other is not None:
            return other
        self._end()
        return HolderStep(True, "", (StopWriting(ev.token_id, ev.epoch),))

    # -- one decision back -------------------------------------------------------------------

    def on_grant(self, token_id: str, epoch: int, lease_deadline: float, now: float) -> Decision:
        """:class:`Granted`, summed up as one :class:`Decision`."""
        step = self.handle(Granted(token_id, epoch, lease_deadline, now))
        action = _DECISION[type(step.actions[0])] if step.actions else Action.IGNORE
        return Decision(action, step.reason)

    def on_revoke(self, token_id: str, epoch: int) -> bool:
        """:class:`Revoked`; True if it aborts the hop in progress."""
        return self.handle(Revoked(token_id, epoch)).counted

    def returned(self, token_id: str, epoch: int) -> None:
        """:class:`Written`: the holder gave the token back for this hop."""
        self.handle(Written(token_id, epoch))

    def failed(self, token_id: str, epoch: int) -> None:
        """:class:`Refused`: provisioning failed locally; the hop is over for this holder."""
        self.handle(Refused(token_id, epoch))
