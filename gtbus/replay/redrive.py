"""Re-driving a node's sans-I/O state machine from its log.

The node's recorded inputs go through a fresh copy of its state machine, and
every decision the machine makes is compared with what the log shows the node
did. The first difference is reported with the record it concerns. A clean
run has none; a doctored log (an ack for a stale grant, a reused epoch, a
hop trained from an ignored return) is pointed at exactly.

* Holder (:class:`~gtbus.protocol.holder.HolderMachine`): for each accepted
  ``token.grant`` the machine decides provision / ack again / ignore / decline;
  the log must show the matching reply (``token.ack`` or ``token.decline``
  for that token and epoch, or none for an ignored grant) before the next grant.
* Orchestrator (:class:`~gtbus.protocol.token.TokenMachine`): every grant must
  take the next epoch (a restart may skip ahead, never back); every
  accepted return, ack or decline is judged by the machine, and the hop record
  published for that epoch must agree (a hop trained only from an accepted
  return; an ignored return changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtbus.console import printable
from gtbus.errors import ConfigError
from gtbus.messages.envelope import Header
from gtbus.protocol.holder import Action, HolderMachine
from gtbus.protocol.token import Phase, TokenMachine
from gtbus.recording import LogRecord, read_log
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
    """Re-drive a holder's grants; None when every decision matches the log."""
    machine = HolderMachine()
    items = _messages(records)
    for k, item in enumerate(items):
        if isinstance(item, LogRecord) or item.out or not item.accepted or item.header.type != "token.grant":
            continue
        h, b = item.header, item.body
        if b.holder != node:
            continue
        decision = machine.on_grant(b.token_id, h.epoch, b.lease_deadline, float(item.rec.data["t"]))
        reply = _reply_to_grant(items[k + 1 :], b.token_id, h.epoch)
        want = {Action.PROVISION: "token.ack", Action.ACK_AGAIN: "token.ack", Action.DECLINE: "token.decline", Action.IGNORE: None}[decision.action]
        if decision.action is Action.PROVISION and reply == "token.decline":
            # A holder may still decline after checking the sealed params and the measurement.
            machine.failed(b.token_id, h.epoch)
            continue
        if reply != want:
            why = f" ({decision.reason})" if decision.reason else ""
            shown = reply or "no reply"
            return Difference(item.rec.index, f"token.grant epoch {h.epoch}: the state machine decides {decision.action.value}{why}, the log shows {shown}")
        if decision.action is Action.PROVISION:
            if _returned(items[k + 1 :], b.token_id, h.epoch):
                machine.returned(b.token_id, h.epoch)
            else:
                machine.failed(b.token_id, h.epoch)
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


def _returned(rest: list[_Msg | LogRecord], token_id: str, epoch: int) -> bool:
    return any(
        isinstance(i, _Msg) and i.out and i.header.type == "token.return" and i.header.epoch == epoch and i.body.token_id == token_id
        for i in rest
    )


def redrive_orchestrator(records: list[LogRecord], node: str) -> Difference | None:
    """Re-drive the orchestrator's token decisions; None when every decision matches the log."""
    machine: TokenMachine | None = None
    highest = 0
    accepted_return: dict[int, bool] = {}
    for item in _messages(records):
        if isinstance(item, LogRecord):
            machine = None  # a restart: a new machine continues above every epoch issued so far
            continue
        h, b = item.header, item.body
        if item.out and h.type == "token.grant":
            if machine is None:
                # After a restart the orchestrator starts above everything it reserved,
                # which may skip numbers; it must never go back to one already issued.
                first = h.epoch - 1 if h.epoch > highest else highest
                machine = TokenMachine(b.token_id, last_epoch=first)
            if machine.phase is not Phase.IDLE:
                return Difference(item.rec.index, f"token.grant epoch {h.epoch} while the token is {machine.phase.value} (owner {machine.owner})")
            g = machine.grant(b.holder, float(item.rec.data["t"]), max(1e-6, b.lease_deadline - h.ts))
            if h.epoch != g.epoch:
                what = "reuses an epoch" if h.epoch <= highest else "skips ahead"
                return Difference(item.rec.index, f"token.grant {what}: the state machine issues epoch {g.epoch}, the log shows {h.epoch}")
            highest = max(highest, h.epoch)
            continue
        if machine is None:
            continue
        if not item.out and item.accepted and h.type in ("token.ack", "token.return", "token.decline"):
            judge = {"token.ack": machine.on_ack, "token.return": machine.on_return, "token.decline": machine.on_decline}[h.type]
            verdict = judge(h.sender, h.epoch, b.token_id)
            if h.type == "token.return":
                accepted_return[h.epoch] = accepted_return.get(h.epoch, False) or verdict.accepted
            continue
        if item.out and h.type == "token.revoke" and machine.phase in (Phase.GRANTED, Phase.HELD, Phase.RETURNED):
            machine.revoke()
            continue
        if item.out and h.type == "hop.record":
            trained = b.outcome == "trained"
            if trained and not accepted_return.get(h.epoch, False):
                return Difference(item.rec.index, f"hop.record epoch {h.epoch} says trained, but the state machine accepted no return for that epoch")
            if h.epoch == machine.epoch and machine.phase is not Phase.IDLE:
                if machine.phase in (Phase.GRANTED, Phase.HELD):
                    machine.revoke()
                machine.finish()
    return None


def redrive(path: str | Path, node: str | None = None) -> tuple[str, Difference | None]:
    """Re-drive the log at ``path``; returns (node, first difference or None).

    Raises ConfigError (one line naming the log) for a log that cannot be re-driven.
    """
    records = read_log(path)
    meta = next((r for r in records if r.kind == "meta"), None)
    name = node or (meta.data["node"] if meta else Path(path).stem)
    roles = {m.get("name"): m.get("role") for m in (meta.data["roster"] if meta else [])}
    role = roles.get(name)
    machines = {"holder": redrive_holder, "orchestrator": redrive_orchestrator}
    if role not in machines:
        raise RedriveError(f"{path}: no state machine to re-drive for {printable(name)!r} (role {printable(role)})")
    try:
        return name, machines[role](records, name)
    except RedriveError as exc:
        raise RedriveError(f"{path}: {exc}") from None
