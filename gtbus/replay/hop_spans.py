"""Who held which GPU token when, and how each hop ended, read from the orchestrator's verified message log.

Rules:

* Only the orchestrator's own logs are read (those of the node whose roster
  role is ``orchestrator``), and only after they verify as ``gtbus replay
  --verify`` checks them: against the rosters the operator gives, or else each
  log's pinned roster. Nothing is read from a log that does not verify.
* Only what the orchestrator sent or accepted counts. A record it refused (a
  hostile or confused peer's message) draws nothing.
* A hop is keyed by its epoch: one counter across all tokens, so with several
  GPU tokens an epoch still names one hop. The grant names the token, the
  holder and the chunk; the holder's return or decline, or the orchestrator's
  revoke, ends the holding (with its reason); the hop record settles it with
  its outcome; the hop report adds the losses and the detail.
* A return or decline counts only from the holder the epoch was granted to,
  and only the first thing that ends a holding ends it.
* A hop still open when its orchestrator restarted, or when the log ends, is
  *unfinished*: it ends at the last record before the restart or the end.
* Values are taken from the checked message classes (field by field, as on
  receipt); the free-form fields of a hop report only when of the right type
  and finite. Strings stay as the peer wrote them: whoever shows them escapes.
* Times are the orchestrator's own clock (one clock, so no ordering across
  nodes is needed), in seconds since the first grant. A clock stepped back
  mid-run cannot end a hop before it began: each end is at least its start.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from gtbus.errors import ConfigError
from gtbus.messages.identity import Role, Roster
from gtbus.messages.types import HopRecord, HopReport, TokenDecline, TokenGrant, TokenReturn, TokenRevoke
from gtbus.recording import LogRecord, iter_log, log_files, roster_of
from gtbus.replay.verify import header_of, message_of, verify_log


@dataclass
class HopSpan:
    """One hop as a span of time on its GPU token (seconds since the run's first grant)."""

    epoch: int
    token_id: str
    holder: str
    chunk: int
    granted: float
    released: float | None = None  # the holder gave the token back, declined it, or it was revoked
    release: str = ""  # "returned", "declined" or "revoked"
    settled: float | None = None  # the hop record (or, for an unfinished hop, the last record before it was cut)
    outcome: str | None = None  # the hop record's outcome; None: unfinished
    reason: str = ""  # a decline's or revoke's reason, as the message gave it
    detail: str = ""  # the hop report's detail
    eval_before: float | None = None
    eval_after: float | None = None

    @property
    def held_until(self) -> float:
        """When the holder's part ended (the whole span if nothing ended it before it settled)."""
        return self.released if self.released is not None else self.end

    @property
    def end(self) -> float:
        """When the hop ended on its token."""
        if self.settled is not None:
            return self.settled
        return self.released if self.released is not None else self.granted


@dataclass
class RunHops:
    """Every hop of one run, on the orchestrator's clock."""

    run_id: str
    start: float  # the first grant's wall-clock time (seconds since the Unix epoch)
    hops: list[HopSpan] = field(default_factory=list)

    @property
    def tokens(self) -> list[str]:
        """The GPU tokens that were granted, in natural order (gpu2 before gpu10)."""
        return sorted({h.token_id for h in self.hops}, key=natural_key)

    @property
    def holders(self) -> list[str]:
        """The holders that were granted a token, in natural order."""
        return sorted({h.holder for h in self.hops}, key=natural_key)

    @property
    def end(self) -> float:
        """When the last hop ended."""
        return max((h.end for h in self.hops), default=0.0)

    def outcomes(self) -> dict[str, int]:
        """How many hops ended each way (``unfinished`` for those the log cut off)."""
        counts: dict[str, int] = {}
        for h in self.hops:
            key = h.outcome if h.outcome is not None else "unfinished"
            counts[key] = counts.get(key, 0) + 1
        return counts


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders the digits in a name as numbers."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)


def _finite(value: object) -> float | None:
    # A report's record is a free-form map: a loss that is not a finite number counts as absent.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _time(rec: LogRecord) -> float:
    t = rec.data.get("t")
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) else 0.0


def orchestrator_logs(path: str | Path, rosters: Sequence[Roster] | None = None) -> list[Path]:
    """The orchestrator's logs under ``path``, each verified; ConfigError naming the first that does not verify."""
    found = []
    for p in log_files(path):
        first = next(iter_log(p), None)
        if first is None or first.kind != "meta":
            raise ConfigError(f"{p}: not a gtbus message log (its first record is not a meta record)")
        node = first.data["node"]
        members = [m for r in rosters if (m := r.get(node)) is not None] if rosters else [roster_of(first, p).get(node)]
        if not any(m is not None and m.role is Role.ORCHESTRATOR for m in members):
            continue
        report = verify_log(p, rosters)
        if not report.ok:
            raise ConfigError(f"{report.error} (a picture is drawn only from logs that verify)")
        found.append(p)
    if not found:
        raise ConfigError(f"{path}: no orchestrator's message log here (the picture is drawn from the orchestrator's log)")
    return found


class _Fold:
    """Folds the orchestrator's records, in order, into hop spans."""

    def __init__(self) -> None:
        self.spans: dict[int, HopSpan] = {}
        self.run_id = ""
        self.start: float | None = None
        self.last = 0.0  # the time of the last record seen (absolute)

    def rel(self, t: float) -> float:
        return max(0.0, t - (self.start if self.start is not None else t))

    def cut(self) -> None:
        """The orchestrator restarted or the log ended: every open hop is unfinished."""
        for s in self.spans.values():
            if s.settled is None:
                s.settled = max(self.rel(self.last), s.released if s.released is not None else s.granted)

    def feed(self, rec: LogRecord) -> None:
        if rec.kind == "meta":
            if rec.index > 0:  # a restart of the orchestrator in the same log (a file's first meta is its start)
                self.cut()
            return
        if rec.kind != "msg" or str(rec.data["verdict"]).startswith("rejected"):
            return
        h = header_of(rec)
        if h is None:
            return
        msg = message_of(rec, h)
        if msg is None:
            return
        t = _time(rec)
        self.last = max(self.last, t)
        incoming = rec.data["dir"] == "in"
        if isinstance(msg, TokenGrant) and not incoming:
            if self.start is None:
                self.start = t
                self.run_id = msg.run_id
            self.spans.setdefault(h.epoch, HopSpan(h.epoch, msg.token_id, msg.holder, msg.chunk_index, self.rel(t)))
            return
        span = self.spans.get(msg.epoch if isinstance(msg, (HopRecord, HopReport)) else h.epoch)
        if span is None:
            return
        if incoming and isinstance(msg, (TokenReturn, TokenDecline)):
            if h.sender == span.holder and span.released is None and span.settled is None:
                span.released = max(self.rel(t), span.granted)
                span.release = "returned" if isinstance(msg, TokenReturn) else "declined"
                if isinstance(msg, TokenDecline):
                    span.reason = msg.reason
        elif not incoming and isinstance(msg, TokenRevoke):
            if span.released is None and span.settled is None:
                span.released, span.release, span.reason = max(self.rel(t), span.granted), "revoked", msg.reason
        elif not incoming and isinstance(msg, HopRecord):
            if span.settled is None:
                span.settled, span.outcome = max(self.rel(t), span.held_until), msg.outcome
        elif not incoming and isinstance(msg, HopReport):
            _report(span, msg.record)


def _report(span: HopSpan, record: dict[str, Any]) -> None:
    span.eval_before = _finite(record.get("eval_before"))
    span.eval_after = _finite(record.get("eval_after"))
    detail = record.get("detail")
    if isinstance(detail, str) and detail:
        span.detail = detail


def _records(files: list[Path]) -> Iterator[LogRecord]:
    for p in files:
        yield from iter_log(p)


def read_hops(path: str | Path, rosters: Sequence[Roster] | None = None) -> RunHops:
    """Every hop of the run whose logs are at ``path`` (a folder or one log); ConfigError if there are none."""
    files = orchestrator_logs(path, rosters)
    fold = _Fold()
    for rec in _records(files):
        fold.feed(rec)
    fold.cut()
    if fold.start is None:
        raise ConfigError(f"{path}: the orchestrator's log holds no token grant: no hop to draw")
    return RunHops(fold.run_id, fold.start, sorted(fold.spans.values(), key=lambda s: s.epoch))
