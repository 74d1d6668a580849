"""One hop of the GPU token, as the orchestrator runs it: events in, actions out.

Rules this module keeps (everything that decides what a hop does lives here;
DESIGN section 6):

* A hop is built with the shell's buffers already taken (fresh staging, the
  private buffer, the channel params). Whatever happens afterwards, the hop
  ends with exactly one :class:`Scrub` (scrub, verify zero, release, drop the
  key), and nothing is granted again before it: the token goes back to idle
  only on :class:`Scrubbed`.
* :class:`Begin` grants the token (a fresh epoch from the
  :class:`~gtbus.protocol.token.TokenMachine`) and asks the shell to reserve
  that epoch on disk and raise the receive fence (:class:`NewEpoch`) before
  :class:`SendGrant` leaves.
* Messages from the network (:class:`Acked`, :class:`Returned`,
  :class:`Declined`, :class:`SegmentShipped`) are judged by the token first:
  wrong token, epoch, sender or token phase -> ignored with the token's reason,
  in every hop phase. A late or duplicated message never moves a hop.
* A return counts only if it names the granted chunk and carries exactly the
  bytes and segments that chunk has in the admitted manifest (and, in ship
  mode, every segment arrived); anything else is REJECTED before a segment is
  opened. Nothing a holder claims sizes any work.
* A decline, or a lease that ran out (:class:`LeaseExpired` at or after the
  deadline), revokes the token and tells the holder (and its device agent).
  A grant that could not be delivered is UNDELIVERED: the chunk is deferred,
  not failed.
* Training happens only after the segments opened and the re-measure found the
  model digest and the loaded code unchanged since the grant. A changed model
  or code is ROLLED_BACK (the model restored from the last checkpoint); changed
  code also stops the run, since a checkpoint restores the model, not the code.
  A trainer that refuses the buffer is REJECTED and the model restored.
* A hop that ends without training (declined, revoked, undelivered, or
  rejected before the trainer saw it) is re-measured too before its scrub: a
  model or code changed while a holder held the token is restored from the
  last checkpoint (the detail says so) and never checkpointed as the run's
  model; changed code stops the run. The outcome stays what was decided.
* Every hop has exactly one :class:`HopOutcome`; it decides the schedule's
  verdict (:class:`Settlement`): TRAINED completes the chunk, UNDELIVERED
  defers it, everything else fails it (retried per policy). An ABORTED hop (the
  run is being cancelled) is scrubbed and settles nothing.
* A scrub that did not read back zero stops the run (:class:`StopRun`).
* Any event in a phase that has no rule for it is ignored with a reason
  (``Step.verdict``), never an exception: the machine cannot be driven into
  an undefined state.

The :class:`~gtbus.protocol.token.TokenMachine` stays the owner of the token's
phases, epochs and fencing, and outlives hops (epochs are monotonic across
hops and restarts, and a stale message arriving between hops must still be
judged). A ``HopMachine`` is built per hop around the run's token and drives
it: grant on :class:`Begin`, ack/return/decline through the token's verdicts,
revoke when the hop fails, finish after the scrub.

Public API (what the orchestrator shell, ``replay --redrive`` and the simulator use)::

    m = HopMachine(token, Assignment(round, holder, chunk), chunk_bytes=n,
                   segment_size=s, lease=10.0, ship=False, via=None)
    step = m.handle(Begin(now, model_digest))   # -> Step(verdict, actions)
    ... execute step.actions in order; feed what they produce back:
    m.handle(Delivered()) / m.handle(Undelivered("not connected"))
    m.handle(Acked(sender, epoch, token_id)), Returned(...), Declined(...)
    m.handle(LeaseExpired(now))                  # when now >= m.wake_at
    m.handle(SegmentsOpened()) / SegmentsRefused(reason)
    m.handle(Remeasured(model_digest, code_changed=None))  # also after a hop that did not train
    m.handle(Trained(loss_first, loss_last, eval_before, eval_after)) / TrainingRefused(reason)
    m.handle(Scrubbed(ok=True))
    m.handle(Aborted("cancelled"))               # the run is unwinding
    m.done, m.outcome (HopOutcome), m.detail, m.returned, m.trained, m.trace

Actions: :class:`NewEpoch`, :class:`SendGrant`, :class:`PublishTokenState`,
:class:`SendRevoke`, :class:`OpenSegments`, :class:`Remeasure`,
:class:`Train`, :class:`RestoreModel`, :class:`Scrub`, :class:`Settle`,
:class:`Checkpoint`, :class:`PublishRecord`, :class:`StopRun`.

No I/O, no clock: times come in with the events.
"""

from __future__ import annotations

import hmac
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Union

from gtbus.errors import ProtocolError
from gtbus.gpu.channel import TAG_SIZE, segment_bounds, segment_count
from gtbus.protocol.schedule import Assignment
from gtbus.protocol.token import ACCEPT, Grant, Phase, TokenMachine, Verdict

#: Events a machine keeps in its trace (for debugging and tests).
TRACE_LEN = 256


class HopOutcome(str, Enum):
    """How a hop ended (the value is what records, checkpoints and summaries carry)."""

    TRAINED = "trained"  # segments opened, model and code unchanged, trained
    DECLINED = "declined"  # the holder refused the grant
    REVOKED = "revoked"  # the lease ran out before the return
    REJECTED = "rejected"  # the return did not fit the grant, a segment failed, or the trainer refused
    ROLLED_BACK = "rolled-back"  # model or code changed during the hop; model restored
    UNDELIVERED = "undelivered"  # the grant never reached the holder (or its device agent)
    ABORTED = "aborted"  # the run is unwinding (cancelled); never published or settled


class Settlement(str, Enum):
    """What the schedule does with the hop's chunk."""

    COMPLETE = "complete"
    FAIL = "fail"
    DEFER = "defer"


SETTLEMENT: dict[HopOutcome, Settlement] = {
    HopOutcome.TRAINED: Settlement.COMPLETE,
    HopOutcome.UNDELIVERED: Settlement.DEFER,
    HopOutcome.DECLINED: Settlement.FAIL,
    HopOutcome.REVOKED: Settlement.FAIL,
    HopOutcome.REJECTED: Settlement.FAIL,
    HopOutcome.ROLLED_BACK: Settlement.FAIL,
}


class HopPhase(str, Enum):
    """Where the hop is."""

    READY = "ready"  # buffers taken, nothing sent
    GRANTING = "granting"  # SendGrant issued; delivery not known yet
    AWAITING = "awaiting"  # the grant reached the holder: waiting for its return
    OPENING = "opening"  # the return fits the grant: segments being authenticated
    VERIFYING = "verifying"  # ended without training: model and code measured again before the scrub
    REMEASURING = "remeasuring"  # plaintext on the device: model and code measured again
    TRAINING = "training"
    SCRUBBING = "scrubbing"  # epilogue: buffers scrubbed and released, key dropped
    DONE = "done"


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Begin:
    """Start the hop at ``now``; ``model_digest`` is the model's measurement the grant reports."""

    now: float
    model_digest: bytes


@dataclass(frozen=True)
class Delivered:
    """The grant was handed to the holder's connection (and its device agent staged)."""


@dataclass(frozen=True)
class Undelivered:
    """The grant could not be sent: holder or device agent not connected, or the agent refused."""

    reason: str


@dataclass(frozen=True)
class TokenMessage:
    """A holder's message about the token, with the fields the token fences on."""

    sender: str
    epoch: int
    token_id: str


@dataclass(frozen=True)
class Acked(TokenMessage):
    """A ``token.ack`` that passed the receive pipeline."""


@dataclass(frozen=True)
class Returned(TokenMessage):
    """A ``token.return``: the holder says it wrote ``nbytes`` of chunk ``chunk_index`` in ``segments``.

    ``commitment`` is the holder's signed chunk commitment; the machine decides
    nothing by it, the hop's provenance keeps the one of the return it accepted.
    """

    chunk_index: int
    segments: int
    nbytes: int
    commitment: bytes = b""


@dataclass(frozen=True)
class Declined(TokenMessage):
    """A ``token.decline`` with the holder's reason."""

    reason: str


@dataclass(frozen=True)
class SegmentShipped(TokenMessage):
    """A ``ship.segment`` (ship mode): segment ``index`` of ``count``, ``size`` bytes of ciphertext and tag."""

    index: int
    count: int
    size: int


@dataclass(frozen=True)
class LeaseExpired:
    """The shell's timer: it is ``at`` now (the machine checks it against the lease)."""

    at: float


@dataclass(frozen=True)
class SegmentsOpened:
    """Every segment authenticated; the plaintext is in the private buffer."""


@dataclass(frozen=True)
class SegmentsRefused:
    """A segment did not authenticate (or the device refused the buffer)."""

    reason: str


@dataclass(frozen=True)
class Remeasured:
    """The model's digest now, and the name of the first loaded code object that changed (None: none)."""

    model_digest: bytes
    code_changed: str | None = None


@dataclass(frozen=True)
class Trained:
    """The trainer's report: losses of the first and last step, held-out loss before and after."""

    loss_first: float | None = None
    loss_last: float | None = None
    eval_before: float | None = None
    eval_after: float | None = None


@dataclass(frozen=True)
class TrainingRefused:
    """The trainer refused the buffer (e.g. token ids outside its vocabulary)."""

    reason: str


@dataclass(frozen=True)
class Scrubbed:
    """The epilogue ran; ``ok`` False when a buffer did not read back zero (``reason`` says which)."""

    ok: bool = True
    reason: str = ""


@dataclass(frozen=True)
class Aborted:
    """The run is unwinding (shutdown, Ctrl-C) in the middle of this hop."""

    reason: str


HopEvent = Union[
    Begin, Delivered, Undelivered, Acked, Returned, Declined, SegmentShipped, LeaseExpired,
    SegmentsOpened, SegmentsRefused, Remeasured, Trained, TrainingRefused, Scrubbed, Aborted,
]  # fmt: skip
EVENT_TYPES: tuple[type, ...] = HopEvent.__args__  # type: ignore[attr-defined]


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewEpoch:
    """Reserve ``epoch`` on disk (synced) and fence older epochs, before the grant leaves."""

    epoch: int


@dataclass(frozen=True)
class SendGrant:
    """Send the grant; with ``via``, have that device agent stage the buffer first. Answer: Delivered/Undelivered."""

    grant: Grant
    chunk: int
    via: str | None = None


@dataclass(frozen=True)
class PublishTokenState:
    """Publish the token's owner, epoch and phase."""


@dataclass(frozen=True)
class SendRevoke:
    """Tell ``to`` (the holder, or the device agent it writes through) that the hop is over; best effort."""

    to: str
    reason: str


@dataclass(frozen=True)
class OpenSegments:
    """Authenticate and decrypt ``segments`` (``nbytes`` of plaintext) into the private buffer, then
    scrub the staging and revoke its export whatever the result. Answer: SegmentsOpened/SegmentsRefused."""

    epoch: int
    holder: str
    segments: int
    nbytes: int


@dataclass(frozen=True)
class Remeasure:
    """Measure the model and the loaded code again. Answer: Remeasured."""


@dataclass(frozen=True)
class Train:
    """Evaluate, train and evaluate on the first ``nbytes`` of the private buffer. Answer: Trained/TrainingRefused."""

    nbytes: int


@dataclass(frozen=True)
class RestoreModel:
    """Load the model of the last checkpoint (or the initial model) back onto the device."""


@dataclass(frozen=True)
class Scrub:
    """Epilogue: scrub what is left of the hop's buffers, verify zero, release, drop the key. Answer: Scrubbed."""


@dataclass(frozen=True)
class Settle:
    """Tell the schedule (and the liveness bookkeeping) how the chunk went."""

    outcome: HopOutcome
    settlement: Settlement


@dataclass(frozen=True)
class Checkpoint:
    """Save model, schedule and hops (after Settle, so a resume continues after this hop)."""


@dataclass(frozen=True)
class PublishRecord:
    """Publish the signed hop record (and the metrics to the holder and observers)."""


@dataclass(frozen=True)
class StopRun:
    """Nothing more may be trained by this process: announce the shutdown and stop with ``reason``."""

    reason: str


HopAction = Union[
    NewEpoch, SendGrant, PublishTokenState, SendRevoke, OpenSegments, Remeasure, Train,
    RestoreModel, Scrub, Settle, Checkpoint, PublishRecord, StopRun,
]  # fmt: skip


@dataclass(frozen=True)
class Step:
    """What one event did: whether it counted (``verdict``) and what the shell must do now, in order."""

    verdict: Verdict
    actions: tuple[HopAction, ...] = ()


def _ignored(reason: str) -> Step:
    return Step(Verdict(False, reason))


# -- the machine --------------------------------------------------------------------------

_Handler = Callable[["HopMachine", HopEvent], Step]

# (phase, event type) -> handler. An event absent from its phase's row is ignored
# with a reason; wire events absent from a row are still judged by the token,
# which cannot accept them there (its phase is idle, returned or revoked).
TRANSITIONS: dict[HopPhase, dict[type, str]] = {
    HopPhase.READY: {Begin: "_begin", Aborted: "_abort"},
    HopPhase.GRANTING: {
        Delivered: "_delivered",
        Undelivered: "_undelivered",
        Acked: "_acked",  # the holder may answer before the send is known to be done
        Returned: "_returned",
        Declined: "_declined",
        SegmentShipped: "_shipped",
        LeaseExpired: "_lease_expired",
        Aborted: "_abort",
    },
    HopPhase.AWAITING: {
        # Reached by an ack before the send was known done: the send may still fail
        # (a device agent that would not stage), and that ends the hop undelivered.
        Undelivered: "_undelivered",
        Acked: "_acked",
        Returned: "_returned",
        Declined: "_declined",
        SegmentShipped: "_shipped",
        LeaseExpired: "_lease_expired",
        Aborted: "_abort",
    },
    HopPhase.OPENING: {SegmentsOpened: "_opened", SegmentsRefused: "_open_refused", Aborted: "_abort"},
    HopPhase.REMEASURING: {Remeasured: "_remeasured", Aborted: "_abort"},
    HopPhase.TRAINING: {Trained: "_trained", TrainingRefused: "_training_refused", Aborted: "_abort"},
    HopPhase.VERIFYING: {Remeasured: "_verified"},  # decided: an abort changes nothing now
    HopPhase.SCRUBBING: {Scrubbed: "_scrubbed"},
    HopPhase.DONE: {},
}

# The phases a handler may move to (documentation and the exhaustive tests).
NEXT_PHASES: dict[HopPhase, frozenset[HopPhase]] = {
    HopPhase.READY: frozenset({HopPhase.GRANTING, HopPhase.SCRUBBING}),
    HopPhase.GRANTING: frozenset({HopPhase.GRANTING, HopPhase.AWAITING, HopPhase.OPENING, HopPhase.VERIFYING, HopPhase.SCRUBBING}),
    HopPhase.AWAITING: frozenset({HopPhase.AWAITING, HopPhase.OPENING, HopPhase.VERIFYING, HopPhase.SCRUBBING}),
    HopPhase.OPENING: frozenset({HopPhase.REMEASURING, HopPhase.VERIFYING, HopPhase.SCRUBBING}),
    HopPhase.VERIFYING: frozenset({HopPhase.SCRUBBING}),
    HopPhase.REMEASURING: frozenset({HopPhase.TRAINING, HopPhase.SCRUBBING}),
    HopPhase.TRAINING: frozenset({HopPhase.SCRUBBING}),
    HopPhase.SCRUBBING: frozenset({HopPhase.DONE}),
    HopPhase.DONE: frozenset(),
}


class HopMachine:
    """One hop of the run's token: feed it events with :meth:`handle`, execute the actions it returns."""

    def __init__(
        self,
        token: TokenMachine,
        assignment: Assignment,
        *,
        chunk_bytes: int,
        segment_size: int,
        lease: float,
        ship: bool = False,
        via: str | None = None,
    ) -> None:
        if token.phase is not Phase.IDLE:
            raise ProtocolError(f"a hop needs the token idle; it is {token.phase.value}")
        if chunk_bytes < 0 or segment_size <= 0 or lease <= 0:
            raise ProtocolError("chunk_bytes must be >= 0, segment_size and lease positive")
        self.token = token
        self.assignment = assignment
        self.chunk_bytes = chunk_bytes
        self.segment_size = segment_size
        self.expected_segments = segment_count(chunk_bytes, segment_size)
        self.lease = lease
        self.ship = ship
        self.via = None if ship else via  # ship mode writes through the orchestrator, never an agent
        self.phase = HopPhase.READY
        self.grant: Grant | None = None
        self.model_digest = b""
        self.outcome: HopOutcome | None = None
        self.detail = ""
        self.returned: Returned | None = None
        self.trained: Trained | None = None
        self.code_changed: str | None = None
        self.shipped: set[int] = set()  # ship mode: indices of the segments stored so far
        # (phase, event, next, counted) of the last TRACE_LEN events: a machine may live for a
        # whole run and judge every segment and stale message, so the trace is bounded.
        self.trace: deque[tuple[HopPhase, str, HopPhase, bool]] = deque(maxlen=TRACE_LEN)

    # -- the caller's view ---------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the hop is scrubbed and settled (or stopped the run)."""
        return self.phase is HopPhase.DONE

    @property
    def epoch(self) -> int:
        """The hop's token epoch (0 before :class:`Begin`)."""
        return self.grant.epoch if self.grant is not None else 0

    @property
    def wake_at(self) -> float | None:
        """When the shell must feed :class:`LeaseExpired` if nothing else happened (None: no lease running)."""
        if self.phase in (HopPhase.GRANTING, HopPhase.AWAITING) and self.grant is not None:
            return self.grant.deadline
        return None

    def handle(self, event: HopEvent) -> Step:
        """Apply ``event``; never raises for an event in the wrong phase or from the wrong peer."""
        before = self.phase
        name = self._row_handler(event)
        if name is None:
            step = self._unexpected(event)
        else:
            step = getattr(self, name)(event)
        self.trace.append((before, type(event).__name__, self.phase, step.verdict.accepted))
        return step

    def _row_handler(self, event: HopEvent) -> str | None:
        return TRANSITIONS[self.phase].get(type(event))

    def _unexpected(self, event: HopEvent) -> Step:
        if isinstance(event, TokenMessage):
            verdict = self._token_verdict(event)
            assert not verdict.accepted, "the token accepted a message in a hop phase without a rule for it"
            return Step(verdict)
        return _ignored(f"{type(event).__name__} in hop phase {self.phase.value}")

    # -- outcomes --------------------------------------------------------------------------------

    def _end(self, outcome: HopOutcome, detail: str, *first: HopAction) -> Step:
        """Decide the outcome and start the epilogue; ``first`` runs before the re-measure or the scrub."""
        self.outcome, self.detail = outcome, detail
        if self.token.phase in (Phase.GRANTED, Phase.HELD, Phase.RETURNED):
            self.token.revoke()  # only a TRAINED hop keeps its return until the finish
        if outcome is HopOutcome.ABORTED or any(isinstance(a, RestoreModel) for a in first):
            self.phase = HopPhase.SCRUBBING  # nothing is settled, or the model is restored anyway
            return Step(ACCEPT, (*first, Scrub()))
        self.phase = HopPhase.VERIFYING
        return Step(ACCEPT, (*first, Remeasure()))

    def _revokes(self, reason: str, *, holder: bool) -> tuple[SendRevoke, ...]:
        # The device agent may still hold this hop's staging mapping: it must drop it
        # before the staging goes. The holder is told when it still holds the token.
        out = [SendRevoke(self.assignment.holder, reason)] if holder else []
        if self.via is not None:
            out.append(SendRevoke(self.via, reason))
        return tuple(out)

    # -- handlers ----------------------------------------------------------------------------

    def _begin(self, ev: Begin) -> Step:
        self.model_digest = ev.model_digest
        self.grant = self.token.grant(self.assignment.holder, ev.now, self.lease)
        self.phase = HopPhase.GRANTING
        return Step(ACCEPT, (NewEpoch(self.grant.epoch), SendGrant(self.grant, self.assignment.chunk, self.via)))

    def _delivered(self, ev: Delivered) -> Step:
        self.phase = HopPhase.AWAITING
        return Step(ACCEPT, (PublishTokenState(),))

    def _undelivered(self, ev: Undelivered) -> Step:
        detail = f"grant not delivered: {ev.reason}"
        # A holder that already acked holds a grant it cannot use: it is told to stop.
        acked = self.phase is HopPhase.AWAITING
        return self._end(HopOutcome.UNDELIVERED, detail, *self._revokes(detail, holder=acked))

    def _token_verdict(self, ev: TokenMessage) -> Verdict:
        t = self.token
        if isinstance(ev, Acked):
            return t.on_ack(ev.sender, ev.epoch, ev.token_id)
        if isinstance(ev, Returned):
            return t.on_return(ev.sender, ev.epoch, ev.token_id)
        if isinstance(ev, Declined):
            return t.on_decline(ev.sender, ev.epoch, ev.token_id)
        assert isinstance(ev, SegmentShipped)
        # A shipped segment moves no token phase: fenced like the others, then
        # accepted only while the holder still has the token.
        if not self.ship:
            return Verdict(False, "ship-segment-outside-a-ship-hop")
        if ev.sender != t.owner or ev.epoch != t.epoch or ev.token_id != t.token_id:
            return Verdict(False, "ship-segment-of-another-hop")
        if t.phase not in (Phase.GRANTED, Phase.HELD):
            return Verdict(False, "ship-segment-after-the-return")
        return ACCEPT

    def _acked(self, ev: Acked) -> Step:
        v = self._token_verdict(ev)
        if v.accepted and self.phase is HopPhase.GRANTING:
            self.phase = HopPhase.AWAITING  # an ack proves the grant arrived
        return Step(v)

    def _declined(self, ev: Declined) -> Step:
        v = self._token_verdict(ev)
        if not v.accepted:
            return Step(v)
        return self._end(HopOutcome.DECLINED, ev.reason, *self._revokes(ev.reason, holder=True))

    def _lease_expired(self, ev: LeaseExpired) -> Step:
        if not self.token.expired(ev.at):
            return _ignored(f"the lease runs until {self.token.deadline}, it is {ev.at}")
        detail = "lease expired before the return"
        return self._end(HopOutcome.REVOKED, detail, *self._revokes(detail, holder=True))

    def _shipped(self, ev: SegmentShipped) -> Step:
        # Every number of a shipped segment is checked against what the grant fixed
        # before the shell stores a byte of it.
        v = self._token_verdict(ev)
        if not v.accepted:
            return Step(v)
        count = self.expected_segments
        if type(ev.index) is not int or type(ev.count) is not int or ev.count != count or not 0 <= ev.index < count:
            return _ignored("ship-segment-index-or-count-out-of-range")
        if ev.index in self.shipped:
            return _ignored("ship-segment-duplicate")
        _, _, length = segment_bounds(ev.index, self.chunk_bytes, self.segment_size)
        if ev.size != length + TAG_SIZE:
            return _ignored("ship-segment-wrong-size")
        self.shipped.add(ev.index)
        return Step(ACCEPT)

    def _returned(self, ev: Returned) -> Step:
        v = self._token_verdict(ev)
        if not v.accepted:
            return Step(v)
        self.returned = ev
        a = self.assignment
        why = None
        if ev.chunk_index != a.chunk:
            why = f"returned chunk {ev.chunk_index}, granted chunk {a.chunk}"
        elif (ev.segments, ev.nbytes) != (self.expected_segments, self.chunk_bytes):
            why = (
                f"returned {ev.nbytes} bytes in {ev.segments} segments; "
                f"chunk {a.chunk} is {self.chunk_bytes} bytes in {self.expected_segments} segments"
            )
        elif self.ship and len(self.shipped) != ev.segments:
            why = f"received {len(self.shipped)} of {ev.segments} shipped segments"
        if why is not None:
            return self._end(HopOutcome.REJECTED, f"segments refused: {why}")
        self.phase = HopPhase.OPENING
        return Step(ACCEPT, (OpenSegments(self.epoch, a.holder, ev.segments, ev.nbytes),))

    def _opened(self, ev: SegmentsOpened) -> Step:
        self.phase = HopPhase.REMEASURING
        return Step(ACCEPT, (Remeasure(),))

    def _open_refused(self, ev: SegmentsRefused) -> Step:
        return self._end(HopOutcome.REJECTED, f"segments refused: {ev.reason}")

    def _remeasured(self, ev: Remeasured) -> Step:
        model_ok = hmac.compare_digest(ev.model_digest, self.model_digest)
        if model_ok and ev.code_changed is None:
            assert self.returned is not None
            self.phase = HopPhase.TRAINING
            return Step(ACCEPT, (Train(self.returned.nbytes),))
        self.code_changed = ev.code_changed
        what = "model" if not model_ok else f"code ({ev.code_changed})"
        return self._end(HopOutcome.ROLLED_BACK, f"{what} changed during the hop; restored the last checkpoint", RestoreModel())

    def _verified(self, ev: Remeasured) -> Step:
        self.phase = HopPhase.SCRUBBING
        if hmac.compare_digest(ev.model_digest, self.model_digest) and ev.code_changed is None:
            return Step(ACCEPT, (Scrub(),))
        self.code_changed = ev.code_changed
        what = "model" if ev.code_changed is None else f"code ({ev.code_changed})"
        self.detail += f" ({what} changed during the hop: restored the last checkpoint)"
        return Step(ACCEPT, (RestoreModel(), Scrub()))

    def _trained(self, ev: Trained) -> Step:
        self.trained = ev
        self.outcome, self.detail = HopOutcome.TRAINED, ""
        self.phase = HopPhase.SCRUBBING
        return Step(ACCEPT, (Scrub(),))

    def _training_refused(self, ev: TrainingRefused) -> Step:
        return self._end(HopOutcome.REJECTED, f"training refused the buffer: {ev.reason}", RestoreModel())

    def _abort(self, ev: Aborted) -> Step:
        # Unwinding while a holder has the token: take it back first, so the real
        # error (the cancellation) is what surfaces; scrub still runs.
        before_return = self.phase in (HopPhase.GRANTING, HopPhase.AWAITING)
        return self._end(HopOutcome.ABORTED, ev.reason, *self._revokes(ev.reason, holder=False) if before_return else ())

    def _scrubbed(self, ev: Scrubbed) -> Step:
        self.phase = HopPhase.DONE
        if not ev.ok:
            # The token stays out of idle: nothing may be granted after a failed scrub.
            return Step(ACCEPT, (StopRun(ev.reason or "hop buffer did not read zero after scrub"),))
        if self.token.phase is not Phase.IDLE:  # an abort before the grant never took it
            self.token.finish()
        actions: list[HopAction] = [PublishTokenState()]
        assert self.outcome is not None
        if self.outcome is not HopOutcome.ABORTED:
            actions += [Settle(self.outcome, SETTLEMENT[self.outcome]), Checkpoint(), PublishRecord()]
            if self.code_changed is not None:
                actions.append(StopRun(f"loaded code changed during hop {self.epoch} ({self.code_changed}); the run stops"))
        return Step(ACCEPT, tuple(actions))
