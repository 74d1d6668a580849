"""Re-driving a node's sans-I/O state machine from its log.

The node's recorded inputs go through a fresh copy of its state machine, and
every decision the machine makes is compared with what the log shows the node
did. The first difference is reported with the record it concerns. A clean
run has none; a doctored log (an ack for a stale grant, a reused epoch, a
hop trained from an ignored return) is pointed at exactly.

* Holder (:class:`~gtbus.protocol.holder_hop.HolderMachine`): for each accepted
  ``token.grant`` the machine decides provision / ack again / ignore / decline;
  the log must show the matching reply (``token.ack`` or ``token.decline``
  for that token and epoch, or none for an ignored grant) before the next grant;
  accepted revokes and the holder's own returns and declines go through the
  machine too, and a return it would not send (after a revoke, twice, for a
  hop not in progress) is a difference.
* Device agent (:class:`~gtbus.protocol.agent_stage.AgentStageMachine`), from
  both its logs merged in time order: every ``agent.stage``, segment,
  ``agent.done`` and revoke goes through the machine; each stage and done must
  be answered as it decides (ready or refused; written, missing or nothing).
* Orchestrator (:class:`~gtbus.protocol.hop.HopMachine` driving the
  :class:`~gtbus.protocol.token.TokenMachine`): every grant starts a hop and
  must take the next epoch (a restart may skip ahead, never back); every
  accepted ack, return or decline goes through the hop machine; the hop record
  published for the epoch is the end of the hop, and the machine must decide
  the same outcome: trained, rejected or rolled back only from an accepted
  return of the granted chunk; declined only from an accepted decline; revoked
  only once the lease ran out (by the record's time); undelivered only before
  a return. Every revoke the machine decides (to the holder, to its device
  agent) must be in the log. What only the device knows (did the segments
  authenticate, did the re-measure match) is taken from the record; the chunk's
  size is taken from the return (the admitted manifest is checked live).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gtbus.console import printable
from gtbus.errors import ConfigError
from gtbus.messages.envelope import Header
from gtbus.messages.types import HopRecord
from gtbus.nodes.agent import HOLDERS_LOG
from gtbus.protocol.agent_stage import (
    AgentStageMachine,
    DoneRequested,
    MapFailed,
    MapStaging,
    Mapped,
    RefuseStage,
    RunOver,
    SegmentArrived,
    SegmentWritten,
    SendMissing,
    SendReady,
    SendWritten,
    StageEvent,
    StageRequested,
    StageRevoked,
    StageStep,
    WriteSegment,
)
from gtbus.protocol.holder_hop import Action, HolderMachine, Refused, Revoked, SendReturn, Written
from gtbus.protocol.hop import (
    Acked,
    Begin,
    Declined,
    HopAction,
    HopEvent,
    HopMachine,
    HopOutcome,
    HopPhase,
    LeaseExpired,
    Remeasured,
    Returned,
    Scrubbed,
    SegmentsOpened,
    SegmentsRefused,
    SendRevoke,
    Trained,
    Undelivered,
)
from gtbus.protocol.schedule import Assignment
from gtbus.protocol.token import Phase, TokenMachine
from gtbus.recording import LOG_SUFFIX, LogRecord, read_log
from gtbus.replay.verify import header_of, message_of


@dataclass(frozen=True)
class Difference:
    """The first decision that differs from the log."""

    record: int
    message: str

    def __str__(self) -> str:
        return f"record {self.record}: {self.message}"


class RedriveError(ConfigError):
    """A log that cannot be re-driven (a record the node sent or accepted does not decode as its type)."""


@dataclass(frozen=True)
class _Msg:
    rec: LogRecord
    header: Header
    body: Any  # the declared message class of header.type
    out: bool
    accepted: bool


def _messages(records: list[LogRecord]) -> list[_Msg | LogRecord]:
    """Meta records and the node's sent or accepted messages, each decoded as its declared class."""
    items: list[_Msg | LogRecord] = []
    for rec in records:
        if rec.kind == "meta":
            items.append(rec)
            continue
        if rec.kind != "msg" or rec.data["verdict"] not in ("sent", "accepted"):
            continue  # checkpoints; refused messages changed no decision
        h = header_of(rec)
        body = message_of(rec, h) if h is not None else None
        if h is None or body is None:
            # The node only sent or accepted messages that decoded: this record was altered.
            raise RedriveError(f"record {rec.index}: a {rec.data['verdict']} message whose frames do not decode as its declared type")
        items.append(_Msg(rec, h, body, rec.data["dir"] == "out", True))
    return items


def redrive_holder(records: list[LogRecord], node: str) -> Difference | None:
    """Re-drive a holder's hops through :class:`HolderMachine`; None when every decision matches the log.

    Accepted grants and revokes, and the holder's own returns and declines, are
    fed in log order. A grant's reply must be the one the machine decides (a
    grant it provisions may still be declined: the check of the sealed params
    and the measurement is the shell's); a ``token.return`` must be one the
    machine sends (for the hop in progress, once, not after its revoke); a
    decline after the ack ends the hop in progress. A restart (a meta record)
    starts a fresh machine, as the process does.
    """
    machine = HolderMachine()
    items = _messages(records)
    for k, item in enumerate(items):
        if isinstance(item, LogRecord):
            if k:
                machine = HolderMachine()
            continue
        h, b = item.header, item.body
        if not item.out and h.type == "token.revoke":
            machine.handle(Revoked(b.token_id, h.epoch))
            continue
        if item.out and h.type == "token.return":
            step = machine.handle(Written(b.token_id, h.epoch))
            if not any(isinstance(a, SendReturn) for a in step.actions):
                return Difference(item.rec.index, f"token.return epoch {h.epoch}: the state machine returns nothing ({step.reason}), the log shows a return")
            continue
        if item.out and h.type == "token.decline":
            machine.handle(Refused(b.token_id, h.epoch, b.reason))  # ends the hop in progress; any other decline was judged with its grant
            continue
        if item.out or h.type != "token.grant" or b.holder != node:
            continue
        decision = machine.on_grant(b.token_id, h.epoch, b.lease_deadline, float(item.rec.data["t"]))
        reply = _reply_to_grant(items[k + 1 :], b.token_id, h.epoch)
        want = {Action.PROVISION: "token.ack", Action.ACK_AGAIN: "token.ack", Action.DECLINE: "token.decline", Action.IGNORE: None}[decision.action]
        if decision.action is Action.PROVISION and reply == "token.decline":
            continue  # a holder may still decline after checking the sealed params and the measurement
        if reply != want:
            why = f" ({decision.reason})" if decision.reason else ""
            shown = reply or "no reply"
            return Difference(item.rec.index, f"token.grant epoch {h.epoch}: the state machine decides {decision.action.value}{why}, the log shows {shown}")
    return None


def _reply_to_grant(rest: list[_Msg | LogRecord], token_id: str, epoch: int) -> str | None:
    for item in rest:
        if isinstance(item, LogRecord):
            return None  # the process restarted before replying
        if not item.out and item.header.type == "token.grant" and item.accepted:
            return None
        if item.out and item.header.type in ("token.ack", "token.decline") and item.header.epoch == epoch and item.body.token_id == token_id:
            return item.header.type
    return None


def _return_sizes(rest: list[_Msg | LogRecord], token_id: str, epoch: int) -> tuple[int, int]:
    """(bytes, segment size) of the first accepted return of the hop, so it fits; (0, 1) when none.

    The admitted manifest that fixes a chunk's size is not re-derived from the
    log: the size rule is checked live, and re-driving takes the size the return
    names. The segment size is the smallest that cuts its bytes into its segments.
    """
    for i in rest:
        if isinstance(i, LogRecord):
            break
        if not i.out and i.header.type == "token.return" and i.header.epoch == epoch and i.body.token_id == token_id:
            nbytes, segments = i.body.nbytes, i.body.segments
            if type(nbytes) is int and type(segments) is int and nbytes > 0 and segments > 0:
                return nbytes, -(-nbytes // segments)
            break
    return 0, 1


# What the device said, as far as a hop record shows it (fed to a hop whose return was accepted).
_DEVICE_SAYS: dict[str, tuple[HopEvent, ...]] = {
    HopOutcome.TRAINED.value: (SegmentsOpened(), Remeasured(b""), Trained()),
    HopOutcome.ROLLED_BACK.value: (SegmentsOpened(), Remeasured(b"changed")),
    HopOutcome.REJECTED.value: (SegmentsRefused("as the log shows"),),
}


def _settle_hop(hop: HopMachine, record: HopRecord, at: float) -> tuple[str | None, list[HopAction]]:
    """Drive ``hop`` to the end its record shows; (why the machine disagrees or None, its actions)."""
    actions: list[HopAction] = []

    def feed(ev: HopEvent) -> bool:
        step = hop.handle(ev)
        actions.extend(step.actions)
        return step.verdict.accepted

    shown = record.outcome
    if hop.phase in (HopPhase.GRANTING, HopPhase.AWAITING):
        if shown == HopOutcome.UNDELIVERED.value:
            feed(Undelivered("as the log shows"))
        elif shown == HopOutcome.REVOKED.value and not feed(LeaseExpired(at)):
            return f"hop.record epoch {hop.epoch} says revoked at {at:.3f}, but its lease ran until {hop.wake_at:.3f}", actions
        elif shown in _DEVICE_SAYS:
            return f"hop.record epoch {hop.epoch} says {shown}, but the state machine accepted no return for that epoch", actions
    elif hop.phase is HopPhase.OPENING:
        for ev in _DEVICE_SAYS.get(shown, ()):
            feed(ev)
    if hop.phase is HopPhase.VERIFYING:
        feed(Remeasured(b""))  # a model restored after a hop that did not train is in no record
    decided = hop.outcome.value if hop.outcome is not None else f"nothing yet (phase {hop.phase.value})"
    if decided != shown:
        return f"hop.record epoch {hop.epoch}: the state machine decides {decided}, the log shows {shown}", actions
    feed(Scrubbed())
    return None, actions


def redrive_orchestrator(records: list[LogRecord], node: str) -> Difference | None:
    """Re-drive the orchestrator's hops through the hop and token machines; None when every decision matches the log."""
    token: TokenMachine | None = None
    hop: HopMachine | None = None
    actions: list[HopAction] = []  # the current hop's actions so far
    revoked_to: dict[int, set[str]] = {}  # epoch -> recipients of the token.revoke messages logged for it
    highest = 0
    staged: dict[int, str] = {}  # epoch -> the device agent asked to stage that hop
    items = _messages(records)
    for k, item in enumerate(items):
        if isinstance(item, LogRecord):
            token = hop = None  # a restart: a new token continues above every epoch issued so far
            continue
        h, b = item.header, item.body
        if item.out and h.type == "token.grant":
            if token is None:
                # After a restart the orchestrator starts above everything it reserved,
                # which may skip numbers; it must never go back to one already issued.
                token = TokenMachine(b.token_id, last_epoch=h.epoch - 1 if h.epoch > highest else highest)
            if token.phase is not Phase.IDLE:
                return Difference(item.rec.index, f"token.grant epoch {h.epoch} while the token is {token.phase.value} (owner {token.owner})")
            nbytes, seg = _return_sizes(items[k + 1 :], b.token_id, h.epoch)
            lease = max(1e-6, b.lease_deadline - h.ts)
            hop = HopMachine(token, Assignment(0, b.holder, b.chunk_index), chunk_bytes=nbytes, segment_size=seg, lease=lease, via=staged.pop(h.epoch, None))
            actions = list(hop.handle(Begin(h.ts, b"")).actions)
            if h.epoch != hop.epoch:
                what = "reuses an epoch" if h.epoch <= highest else "skips ahead"
                return Difference(item.rec.index, f"token.grant {what}: the state machine issues epoch {hop.epoch}, the log shows {h.epoch}")
            highest = max(highest, h.epoch)
            continue
        if not item.out and item.accepted and h.type in _WIRE and hop is not None:
            actions.extend(hop.handle(_WIRE[h.type](h, b)).actions)
            continue
        if item.out and h.type == "agent.stage":
            staged[h.epoch] = h.recipient
            continue
        if item.out and h.type == "token.revoke":
            revoked_to.setdefault(h.epoch, set()).add(h.recipient)
            continue
        if item.out and h.type == "hop.record":
            if b.outcome == HopOutcome.UNDELIVERED.value and h.epoch > highest and (hop is None or hop.done):
                # A grant that never left (its device agent refused or was gone before the
                # grant was sent) still took its epoch: re-drive it as such a hop.
                token = token or TokenMachine(last_epoch=h.epoch - 1)
                hop = HopMachine(token, Assignment(0, b.holder, b.chunk_index), chunk_bytes=0, segment_size=1, lease=1.0, via=staged.pop(h.epoch, None))
                actions = list(hop.handle(Begin(h.ts, b"")).actions)
                if h.epoch != hop.epoch:
                    return Difference(item.rec.index, f"hop.record skips ahead: the state machine issues epoch {hop.epoch}, the log shows {h.epoch}")
                highest = h.epoch
            if hop is None or h.epoch != hop.epoch or hop.done:
                if b.outcome == HopOutcome.TRAINED.value:
                    return Difference(item.rec.index, f"hop.record epoch {h.epoch} says trained, but the state machine accepted no return for that epoch")
                continue
            why, more = _settle_hop(hop, b, h.ts)
            actions.extend(more)
            if why is None:
                missing = sorted({a.to for a in actions if isinstance(a, SendRevoke)} - revoked_to.pop(h.epoch, set()))
                if missing:
                    why = f"hop epoch {hop.epoch}: the state machine revokes the token at {', '.join(missing)}; the log shows no token.revoke to it"
            if why is not None:
                return Difference(item.rec.index, why)
    return None


def _answer_to(rest: list[_Msg | LogRecord], parent: bytes, types: tuple[str, ...]) -> _Msg | None:
    """The node's first message of one of ``types`` answering ``parent``, before a restart."""
    for i in rest:
        if isinstance(i, LogRecord):
            return None
        if i.out and i.header.type in types and i.header.parent == parent:
            return i
    return None


def _stage_answer(step: StageStep) -> str | None:
    """What an agent's step tells the orchestrator or the holder, as the log shows it (message type, refusal code)."""
    for a in step.actions:
        if isinstance(a, (SendReady, SendWritten)):
            return "agent.ready" if isinstance(a, SendReady) else "agent.written"
        if isinstance(a, (RefuseStage, SendMissing)):
            return "refusal agent-stage" if isinstance(a, RefuseStage) else "refusal agent-missing"
    return None


def _shown(answer: _Msg | None) -> str | None:
    if answer is None:
        return None
    return f"refusal {answer.body.code}" if answer.header.type == "refusal" else answer.header.type


def _mapped_as_logged(epoch: int, announced: int, answer: _Msg | None, at: float) -> StageEvent:
    """What the mapping said, as far as the agent's answer shows it (the real size is in a refusal's words only)."""
    if answer is not None and answer.header.type == "refusal":
        words = str(answer.body.reason).split()
        if words[:2] == ["staging", "holds"] and len(words) > 2 and words[2].isdigit():
            return Mapped(epoch, int(words[2]), at)
        return MapFailed(epoch, str(answer.body.reason))
    return Mapped(epoch, announced, at)


def redrive_agent(records: list[LogRecord], node: str) -> Difference | None:
    """Re-drive a device agent's stages through :class:`AgentStageMachine`; None when every decision matches the log.

    ``records`` are both of the agent's logs (its link to the orchestrator and
    its server for remote holders) in time order. Every accepted ``agent.stage``
    must be answered as the machine decides (``agent.ready``, or a refusal when
    the sizes are unusable or the mapping is short); every segment the machine
    accepts is taken as written (a failed write is in no log); every
    ``agent.done`` must be answered ``agent.written`` exactly when the machine
    has every segment of the staged hop, a refusal when some are missing, and
    nothing when it is not the staged hop's. What only the device knows (could
    the handle be mapped, how big is the mapping) is taken from the answer. A
    stage dropped by the agent's idle timeout is in no log: re-drive logs of an
    agent run without one (the default).
    """
    machine = AgentStageMachine()
    mapping: dict[bytes, tuple[int, int]] = {}  # stage message id -> (epoch, bytes announced), while its staging is mapped
    items = _messages(records)
    for k, item in enumerate(items):
        if isinstance(item, LogRecord):
            if any(isinstance(i, _Msg) for i in items[:k]):
                machine, mapping = AgentStageMachine(), {}  # the process restarted
            continue
        h, b = item.header, item.body
        at = float(item.rec.data["t"])
        if item.out:
            # The mapping is done when the agent answers its stage: feed it then, not before,
            # so segments that came while it was mapped are judged as the agent judged them.
            if h.parent in mapping and h.type in ("agent.ready", "refusal"):
                epoch, announced = mapping.pop(h.parent)
                decided = _stage_answer(machine.handle(_mapped_as_logged(epoch, announced, item, at)))
                if decided != _shown(item):
                    return Difference(item.rec.index, f"agent.stage epoch {epoch}: the state machine answers {decided or 'nothing'}, the log shows {_shown(item)}")
            continue
        if h.type == "agent.stage":
            step = machine.handle(StageRequested(b.token_id, h.epoch, b.holder, b.staging_bytes, b.segment_size, at))
            if any(isinstance(a, MapStaging) for a in step.actions):
                mapping[h.id] = (h.epoch, b.staging_bytes)
                continue
            answer = _answer_to(items[k + 1 :], h.id, ("agent.ready", "refusal"))
            decided, shown = _stage_answer(step), _shown(answer)
            if decided != shown:
                return Difference(item.rec.index, f"agent.stage epoch {h.epoch}: the state machine answers {decided or 'nothing'}, the log shows {shown or 'no answer'}")
        elif h.type == "ship.segment":
            sizes = item.rec.data.get("blob_sizes")
            if not isinstance(sizes, list) or len(sizes) != 1:
                continue  # the shell refuses a segment without exactly one blob before the machine sees it
            step = machine.handle(SegmentArrived(h.sender, b.token_id, h.epoch, b.index, b.count, sizes[0], at))
            for a in step.actions:
                if isinstance(a, WriteSegment):
                    machine.handle(SegmentWritten(a.epoch, a.index))
        elif h.type == "agent.done":
            answer = _answer_to(items[k + 1 :], h.id, ("agent.written", "refusal"))
            decided, shown = _stage_answer(machine.handle(DoneRequested(h.sender, b.token_id, h.epoch, b.segments, b.nbytes))), _shown(answer)
            if decided != shown:
                return Difference(item.rec.index, f"agent.done epoch {h.epoch} from {h.sender}: the state machine answers {decided or 'nothing'}, the log shows {shown or 'no answer'}")
        elif h.type == "token.revoke":
            machine.handle(StageRevoked(b.token_id, h.epoch))
        elif h.type in ("run.complete", "shutdown"):
            machine.handle(RunOver())
    return None


def agent_logs(path: Path) -> list[Path]:
    """Both logs of a device agent given either: its link to the orchestrator and its ``-holders`` server (those that exist)."""
    stem, suffix = path.name[: -len(LOG_SUFFIX)] if path.name.endswith(LOG_SUFFIX) else path.stem, LOG_SUFFIX
    other = stem[: -len(HOLDERS_LOG)] if stem.endswith(HOLDERS_LOG) else stem + HOLDERS_LOG
    return [path] + ([path.with_name(other + suffix)] if path.with_name(other + suffix).is_file() else [])


def _by_time(logs: list[list[LogRecord]]) -> list[LogRecord]:
    """Records of one process's logs merged in time order (each log's own order kept)."""
    merged = [r for log in logs for r in log]
    return sorted(merged, key=lambda r: float(r.data.get("t", 0.0)))


_WIRE: dict[str, Callable[[Header, Any], HopEvent]] = {
    "token.ack": lambda h, b: Acked(h.sender, h.epoch, b.token_id),
    "token.return": lambda h, b: Returned(h.sender, h.epoch, b.token_id, b.chunk_index, b.segments, b.nbytes, b.chunk_commitment),
    "token.decline": lambda h, b: Declined(h.sender, h.epoch, b.token_id, b.reason),
}


def redrive(path: str | Path, node: str | None = None) -> tuple[str, Difference | None]:
    """Re-drive the log at ``path``; returns (node, first difference or None).

    Raises ConfigError (one line naming the log) for a log that cannot be re-driven.
    """
    records = read_log(path)
    meta = next((r for r in records if r.kind == "meta"), None)
    name = node or (meta.data["node"] if meta else Path(path).stem)
    roles = {m.get("name"): m.get("role") for m in (meta.data["roster"] if meta else [])}
    role = roles.get(name)
    if role == "agent":
        records = _by_time([records] + [read_log(other) for other in agent_logs(Path(path))[1:]])
    machines = {"holder": redrive_holder, "orchestrator": redrive_orchestrator, "agent": redrive_agent}
    if role not in machines:
        raise RedriveError(f"{path}: no state machine to re-drive for {printable(name)!r} (role {printable(role)})")
    try:
        return name, machines[role](records, name)
    except RedriveError as exc:
        raise RedriveError(f"{path}: {exc}") from None
