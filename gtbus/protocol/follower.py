"""Following the orchestrator's events as a late joiner (the zguide Clone pattern).

Rules:

* Events are applied in the order of their sequence numbers on the broadcast
  stream; the receive pipeline already refuses anything that goes back.
* Until a snapshot arrives, events are buffered, not applied.
* A snapshot says the state as of event sequence ``S``. Buffered and later
  events with a sequence at or below ``S`` are already in it and are dropped;
  those above ``S`` are applied on top.
* A new snapshot (after a reconnect, or a liveness refresh) replaces the state
  and the cut-off. Its reply travels apart from the broadcast, so it may come
  after events newer than it were applied: those (kept since the last
  snapshot) are applied again on top of it, so the state never goes back; a
  snapshot older than the events kept can only be a late one and is dropped.
  Sequence numbers are per orchestrator process (its session): a snapshot of
  another session (a restarted orchestrator) always replaces the state.
* A run that is complete stays complete: a snapshot taken before the end
  never takes it back (the orchestrator may be gone by the next one).
* Reports (``hop.report`` and the whole ``run.complete``) come directly, only
  to observers, outside the broadcast's sequence: they are applied by epoch
  (a report older than the loss already shown changes nothing), after the
  snapshot if they arrive before it.

No I/O: the node shell feeds in (sequence, message) pairs and snapshots.
"""

from __future__ import annotations

import copy
from typing import Any

from gtbus.messages.types import Heartbeat, HopRecord, HopReport, RunComplete, TokenState
from gtbus.protocol.hop import HopOutcome


class EventFollower:
    """The run's state as seen from outside the orchestrator: token, hops, bytes, loss."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None
        self.snapshot_seq: int | None = None
        self.session: bytes | None = None  # the orchestrator process the snapshot came from (None: not told)
        self.applied_seq = 0
        self._pending: list[tuple[int, object]] = []
        # Events applied since the last snapshot, to bring a snapshot older than them forward.
        self._applied: list[tuple[int, object]] = []
        self._applied_complete = True  # False once the list was cut at MAX_REPLAY
        self._pending_reports: list[HopReport | RunComplete] = []

    @property
    def synced(self) -> bool:
        """True once a snapshot has been applied."""
        return self.state is not None

    def on_event(self, seq: int, msg: object) -> bool:
        """Feed one broadcast event; True if it changed the state."""
        if self.state is None:
            self._pending.append((seq, msg))
            return False
        if self.snapshot_seq is not None and seq <= self.snapshot_seq:
            return False
        self.applied_seq = seq
        if len(self._applied) < MAX_REPLAY:
            self._applied.append((seq, msg))
        else:
            self._applied_complete = False
        return _apply(self.state, msg)

    def on_report(self, msg: HopReport | RunComplete) -> bool:
        """Feed one report sent directly to this observer; True if it changed the state."""
        if self.state is None:
            self._pending_reports.append(msg)
            return False
        return _apply_report(self.state, msg)

    def on_snapshot(self, state: dict[str, Any], event_seq: int, session: bytes | None = None) -> None:
        """Install a snapshot taken at ``event_seq`` by the orchestrator process ``session``; apply buffered events newer than it."""
        replay: list[tuple[int, object]] = []
        same_process = session is None or session == self.session
        if self.state is not None and same_process and event_seq < self.applied_seq:
            # Taken before events this follower already applied: bring it forward with them.
            if not self._applied_complete or (self.snapshot_seq is not None and event_seq < self.snapshot_seq):
                return  # older than the last snapshot, or events it lacks are no longer kept: the state shown is newer
            replay = [(seq, msg) for seq, msg in self._applied if seq > event_seq]
        previous = self.state or {}
        self.state = copy.deepcopy(state)
        self.state.setdefault("complete", False)
        if previous.get("complete"):
            self.state["complete"] = True
        for kept in ("last_report", "summary"):  # direct reports are not part of a snapshot: keep what came
            if kept in previous:
                self.state.setdefault(kept, previous[kept])
        if self.state["complete"]:
            _take_final_counters(self.state)
        self.snapshot_seq = event_seq
        self.session = session
        self.applied_seq = event_seq
        self._applied, self._applied_complete = [], True
        pending, self._pending = self._pending + replay, []
        for seq, msg in sorted(pending, key=lambda p: p[0]):
            self.on_event(seq, msg)
        reports, self._pending_reports = self._pending_reports, []
        for report in reports:
            self.on_report(report)


def _apply(state: dict[str, Any], msg: object) -> bool:
    if isinstance(msg, TokenState):
        state["token"] = {"id": msg.token_id, "owner": msg.owner, "epoch": msg.epoch, "phase": msg.phase}
        _move_lane(state, msg)
        return True
    if isinstance(msg, HopRecord):
        state["hops"] = _count(state.get("hops")) + 1
        if msg.outcome == HopOutcome.TRAINED:
            state["hops_trained"] = _count(state.get("hops_trained")) + 1
            state["bytes"] = _count(state.get("bytes")) + _count(msg.record.get("nbytes"))
        state["last_hop"] = {"epoch": msg.epoch, "holder": msg.holder, "chunk": msg.chunk_index, "outcome": msg.outcome}
        if state.get("complete"):
            _take_final_counters(state)  # an event the run's end overtook: the summary has already counted it
        return True
    if isinstance(msg, RunComplete):
        _complete(state, msg.summary, whole=False)
        return True
    if isinstance(msg, Heartbeat):
        state["orchestrator_state"] = msg.state
        return False
    return False


#: Events a follower keeps between two snapshots to bring a late snapshot forward (a refresh comes every second or so).
MAX_REPLAY = 10_000

#: Lanes (GPU tokens) a follower keeps: a fleet has a few; an event for yet another token is not kept.
MAX_LANES = 256


def _move_lane(state: dict[str, Any], msg: TokenState) -> None:
    """A fleet's snapshot lists its lanes; a token's event moves its lane (a token not listed yet is added)."""
    lanes = state.get("lanes")
    if not isinstance(lanes, list):
        lanes = state["lanes"] = []
    moved = {"owner": msg.owner, "epoch": msg.epoch, "phase": msg.phase}
    for lane in lanes:
        if isinstance(lane, dict) and lane.get("id") == msg.token_id:
            if lane.get("epoch") != msg.epoch:
                lane["hop_started"] = None  # the snapshot's time was the previous hop's; the next snapshot brings this one's
            lane.update(moved)
            return
    if len(lanes) < MAX_LANES:
        lanes.append({"lane": len(lanes), "id": msg.token_id, **moved, "hop_started": None})


# Values inside records and snapshots are free-form dicts: a wrong type counts as absent, never raises.
def _count(value: object) -> int:
    return value if type(value) is int and value >= 0 else 0


def _loss(value: object) -> float | None:
    if type(value) is float:
        return value
    return float(value) if type(value) is int and abs(value) < 1 << 64 else None


def _complete(state: dict[str, Any], summary: dict[str, Any], *, whole: bool) -> None:
    """The run is over: merge the broadcast (public) or the observer's whole summary, whichever came first."""
    prior = state.get("summary")
    prior = prior if isinstance(prior, dict) else {}
    state["complete"] = True
    state["summary"] = {**prior, **summary} if whole else {**summary, **prior}
    _take_final_counters(state)


def _take_final_counters(state: dict[str, Any]) -> None:
    """A finished run's counters are its summary's.

    The summary is counted from the orchestrator's own hop list, so it wins over the events counted so far: the
    direct report can overtake the last hop's event on the other socket, and a snapshot can predate the end.
    """
    summary = state.get("summary")
    if not isinstance(summary, dict):
        return
    for ours, theirs in (("hops", "hops"), ("hops_trained", "hops_trained"), ("bytes", "bytes_provisioned")):
        value = summary.get(theirs)
        if type(value) is int and value >= 0:
            state[ours] = value


def _apply_report(state: dict[str, Any], msg: HopReport | RunComplete) -> bool:
    if isinstance(msg, RunComplete):
        _complete(state, msg.summary, whole=True)
        return True
    r = msg.record
    state["last_report"] = {"epoch": msg.epoch, "holder": msg.holder, "chunk": msg.chunk_index, "outcome": msg.outcome,
                            "eval_before": _loss(r.get("eval_before")), "eval_after": _loss(r.get("eval_after")),
                            "detail": str(r.get("detail", ""))}
    before = _loss(r.get("eval_before"))
    shown = state.get("last_loss_epoch")
    if msg.outcome == HopOutcome.TRAINED and before is not None and (type(shown) is not int or msg.epoch > shown):
        state["last_loss"], state["last_loss_epoch"] = before, msg.epoch
    return True
