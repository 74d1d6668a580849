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

import msgpack

from gtbus.messages.envelope import Header
from gtbus.protocol.holder import Action, HolderMachine
from gtbus.protocol.token import Phase, TokenMachine
from gtbus.recording import LogRecord, read_log
from gtbus.replay.verify import header_of


@dataclass(frozen=True)
class Difference:
    """The first decision that differs from the log."""

    record: int
    message: str

    def __str__(self) -> str:
        return f"record {self.record}: {self.message}"


@dataclass(frozen=True)
class _Msg:
    rec: LogRecord
    header: Header
    body: dict[str, Any]
    out: bool
    accepted: bool


def _messages(records: list[LogRecord]) -> list[_Msg | LogRecord]:
    items: list[_Msg | LogRecord] = []
    for rec in records:
        if rec.kind == "meta":
            items.append(rec)
            continue
        h = header_of(rec)
        if h is None:
            continue
        try:
            body = msgpack.unpackb(rec.frames[2], raw=False, strict_map_key=False)
        except Exception:
            body = {}
        verdict = str(rec.data.get("verdict", ""))
        items.append(_Msg(rec, h, body if isinstance(body, dict) else {}, rec.data.get("dir") == "out", verdict in ("sent", "accepted")))
    return items


def redrive_holder(records: list[LogRecord], node: str) -> Difference | None:
    """Re-drive a holder's grants; None when every decision matches the log."""
    machine = HolderMachine()
    items = _messages(records)
    for k, item in enumerate(items):
        if isinstance(item, LogRecord) or item.out or not item.accepted or item.header.type != "token.grant":
            continue
        h, b = item.header, item.body
        if b.get("holder") != node:
            continue
        decision = machine.on_grant(str(b["token_id"]), h.epoch, float(b["lease_deadline"]), float(item.rec.data.get("t", 0.0)))
        reply = _reply_to_grant(items[k + 1 :], str(b["token_id"]), h.epoch)
        want = {Action.PROVISION: "token.ack", Action.ACK_AGAIN: "token.ack", Action.DECLINE: "token.decline", Action.IGNORE: None}[decision.action]
        if decision.action is Action.PROVISION and reply == "token.decline":
            # A holder may still decline after checking the sealed params and the measurement.
            machine.failed(str(b["token_id"]), h.epoch)
            continue
        if reply != want:
            why = f" ({decision.reason})" if decision.reason else ""
            shown = reply or "no reply"
            return Difference(item.rec.index, f"token.grant epoch {h.epoch}: the state machine decides {decision.action.value}{why}, the log shows {shown}")
        if decision.action is Action.PROVISION:
            if _returned(items[k + 1 :], str(b["token_id"]), h.epoch):
                machine.returned(str(b["token_id"]), h.epoch)
            else:
                machine.failed(str(b["token_id"]), h.epoch)
    return None


def _reply_to_grant(rest: list[_Msg | LogRecord], token_id: str, epoch: int) -> str | None:
    for item in rest:
        if isinstance(item, LogRecord):
            return None  # the process restarted before replying
        if not item.out and item.header.type == "token.grant" and item.accepted:
            return None
        if item.out and item.header.type in ("token.ack", "token.decline") and item.header.epoch == epoch and item.body.get("token_id") == token_id:
            return item.header.type
    return None


def _returned(rest: list[_Msg | LogRecord], token_id: str, epoch: int) -> bool:
    return any(
        isinstance(i, _Msg) and i.out and i.header.type == "token.return" and i.header.epoch == epoch and i.body.get("token_id") == token_id
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
                machine = TokenMachine(str(b["token_id"]), last_epoch=first)
            if machine.phase is not Phase.IDLE:
                return Difference(item.rec.index, f"token.grant epoch {h.epoch} while the token is {machine.phase.value} (owner {machine.owner})")
            g = machine.grant(str(b["holder"]), float(item.rec.data.get("t", 0.0)), max(1e-6, float(b["lease_deadline"]) - h.ts))
            if h.epoch != g.epoch:
                what = "reuses an epoch" if h.epoch <= highest else "skips ahead"
                return Difference(item.rec.index, f"token.grant {what}: the state machine issues epoch {g.epoch}, the log shows {h.epoch}")
            highest = max(highest, h.epoch)
            continue
        if machine is None:
            continue
        if not item.out and item.accepted and h.type in ("token.ack", "token.return", "token.decline"):
            judge = {"token.ack": machine.on_ack, "token.return": machine.on_return, "token.decline": machine.on_decline}[h.type]
            verdict = judge(h.sender, h.epoch, str(b.get("token_id", "")))
            if h.type == "token.return":
                accepted_return[h.epoch] = accepted_return.get(h.epoch, False) or verdict.accepted
            continue
        if item.out and h.type == "token.revoke" and machine.phase in (Phase.GRANTED, Phase.HELD, Phase.RETURNED):
            machine.revoke()
            continue
        if item.out and h.type == "hop.record":
            trained = b.get("outcome") == "trained"
            if trained and not accepted_return.get(h.epoch, False):
                return Difference(item.rec.index, f"hop.record epoch {h.epoch} says trained, but the state machine accepted no return for that epoch")
            if h.epoch == machine.epoch and machine.phase is not Phase.IDLE:
                if machine.phase in (Phase.GRANTED, Phase.HELD):
                    machine.revoke()
                machine.finish()
    return None


def redrive(path: str | Path, node: str | None = None) -> tuple[str, Difference | None]:
    """Re-drive the log at ``path``; returns (node, first difference or None)."""
    records = read_log(path)
    meta = next((r for r in records if r.kind == "meta"), None)
    name = node or (str(meta.data.get("node")) if meta else Path(path).stem)
    roles = {m.get("name"): m.get("role") for m in (meta.data.get("roster", []) if meta else [])}
    role = roles.get(name)
    if role == "holder":
        return name, redrive_holder(records, name)
    if role == "orchestrator":
        return name, redrive_orchestrator(records, name)
    raise ValueError(f"{path}: no state machine to re-drive for {name!r} (role {role})")
