"""Offline verification of message logs: signatures, sequences, and signed checkpoints.

What a log is checked against is never taken from later in the same file:

* the **roster** is the one given by the operator (``--keys``, repeatable: a
  record counts if a key of one of the given rosters signed it), or else the one
  recorded in the log's *first* record, pinned for the whole file. A restart
  records its roster again; without ``--keys`` that roster is adopted only when
  the checkpoint right after it is signed by the recording node's key that is
  already trusted (a holder's key rotated while the orchestrator kept its own
  key: the orchestrator vouches for the new roster). A roster that nothing
  trusted vouches for stops verification at that record: pass ``--keys``.
* **completeness and order** come from the recording node's signed checkpoints
  (see :mod:`gtbus.recording`): each names the chain head before it, so a
  record dropped, inserted, edited or moved before a checkpoint makes that
  checkpoint fail, even in a log whose unkeyed chain was recomputed. Records
  after the last checkpoint are reported as an *unsigned tail*: their
  signatures and sequences are checked, but nothing proves none were dropped
  or added after them. A log whose last checkpoint is not ``final`` was not
  closed cleanly (a crash, or a log truncated at a checkpoint).

Within each stream (sender, recipient) session and sequence must move forward
exactly as the replay guard required when it was live. Records the node
rejected are not expected to verify; they are counted, not failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from gtbus.errors import ConfigError, RejectedMessage
from gtbus.messages.envelope import Header, Limits, blob_digest, parse_header, signing_input_digest, split, unpackb_strict
from gtbus.messages.identity import PublicIdentity, Roster
from gtbus.messages.primitives import Ed25519Verifier
from gtbus.messages.pipeline import declared_sender
from gtbus.messages.registry import REGISTRY, body_from_wire
from gtbus.recording import LogRecord, checkpoint_message, iter_log, roster_of

# Logs hold what the node accepted under its own limits; verification only needs sanity bounds.
_LOG_LIMITS = Limits(max_frames=4, max_body=64 << 20, max_total=1 << 30, max_bin=64 << 20, max_str=1 << 20)


@dataclass
class VerifyReport:
    """Outcome of verifying one log file."""

    path: Path
    node: str = ""
    checked: int = 0
    rejected_records: int = 0
    error: str | None = None
    by_type: dict[str, int] = field(default_factory=dict)
    records: int = 0
    proven: int = 0  # records covered by a checkpoint signed with the node's trusted key
    closed: bool = False  # the last record is a final checkpoint

    @property
    def ok(self) -> bool:
        """True when no record failed (an unsigned tail is not a failure; see :attr:`unsigned_tail`)."""
        return self.error is None

    @property
    def unsigned_tail(self) -> int:
        """Records after the last signed checkpoint: checked, but not proven complete or in order."""
        return self.records - self.proven


def signed_frames(rec: LogRecord) -> list[bytes]:
    """A record's recorded frames, or RejectedMessage if they are not a list of byte strings."""
    frames = rec.data.get("frames")
    if not isinstance(frames, list) or not all(isinstance(f, bytes) for f in frames):
        raise RejectedMessage("malformed", "recorded frames are not a list of byte strings")
    return frames


def header_of(rec: LogRecord) -> Header | None:
    """A record's parsed header, or None when the recorded frames are damaged."""
    try:
        frames = signed_frames(rec)
        if len(frames) == 2:  # a refused message: only magic and header were kept
            return parse_header(frames[1], _LOG_LIMITS)
        return split(frames, _LOG_LIMITS).header
    except RejectedMessage:
        return None


def body_of(rec: LogRecord) -> dict[str, Any] | None:
    """A message record's decoded body (with the wire's msgpack limits), or None when it is not a map."""
    frames = rec.data.get("frames")
    if not isinstance(frames, list) or len(frames) < 3 or not isinstance(frames[2], bytes):
        return None
    try:
        body = unpackb_strict(frames[2], _LOG_LIMITS)
    except RejectedMessage:
        return None
    return body if isinstance(body, dict) else None


def message_of(rec: LogRecord, header: Header) -> object | None:
    """A message record's body as its declared class (checked field by field as on receipt), or None."""
    spec = REGISTRY.get(header.type)
    body = body_of(rec)
    if spec is None or body is None:
        return None
    try:
        return body_from_wire(spec, body)
    except RejectedMessage:
        return None


def _member(rosters: Sequence[Roster], name: str) -> list[PublicIdentity]:
    return [m for r in rosters if (m := r.get(name)) is not None]


def verify_record_signature(rec: LogRecord, roster: Roster | Sequence[Roster]) -> Header:
    """Check one message record's signature against the roster(s); return its header or raise RejectedMessage."""
    rosters = [roster] if isinstance(roster, Roster) else list(roster)
    frames = signed_frames(rec)
    if len(frames) != 4:
        raise RejectedMessage("malformed", f"{len(frames)} signed frames recorded, expected 4")
    env = split(frames, _LOG_LIMITS)
    h = env.header
    digest = rec.data.get("blob_digest")
    if digest is None:
        digest = blob_digest(())
    if not isinstance(digest, bytes):
        raise RejectedMessage("malformed", "blob digest is not bytes")
    signed = signing_input_digest(env.header_bytes, env.body_bytes, digest)
    refusal: RejectedMessage | None = None
    for r in rosters:
        try:
            declared_sender(h, r)
        except RejectedMessage as exc:
            refusal = refusal or exc
            continue
        if Ed25519Verifier(r[h.sender].ed25519).verify(signed, env.signature):
            return h
    if refusal is not None and not _member(rosters, h.sender):
        raise refusal
    raise RejectedMessage("bad-signature", f"{h.type} from {h.sender} seq {h.seq}")


def _same(a: Roster, b: Roster) -> bool:
    return sorted(sorted(m.to_json().items()) for m in a) == sorted(sorted(m.to_json().items()) for m in b)


class _LogVerifier:
    """The checks of one log, record by record (streaming: one record in memory at a time)."""

    def __init__(self, path: Path, given: Sequence[Roster]) -> None:
        self.path = path
        self.given = list(given)
        self.trusted: list[Roster] = list(given)
        self.pending: Roster | None = None  # a restart's roster, waiting for its endorsing checkpoint
        self.pending_at = -1
        self.report = VerifyReport(path=path)
        self.marks: dict[tuple[str, str], tuple[bytes, int]] = {}

    def fail(self, rec: LogRecord, why: str) -> None:
        raise _Failed(f"{self.path}: record {rec.index} (byte {rec.offset}): {why}")

    def feed(self, rec: LogRecord) -> None:
        self.report.records = rec.index + 1
        if self.pending is not None and rec.kind != "checkpoint":
            if rec.kind == "meta":  # the restart crashed before its first checkpoint: nothing was recorded under it
                self.pending = None
            else:
                self.fail(rec, self._unvouched())
        {"meta": self.meta, "checkpoint": self.checkpoint, "msg": self.message}[rec.kind](rec)

    def _unvouched(self) -> str:
        return (f"the roster recorded at record {self.pending_at} (a restart) is not vouched for by a checkpoint "
                f"signed with the trusted key of {self.report.node!r}; pass the keys you trust with --keys")

    def meta(self, rec: LogRecord) -> None:
        node = rec.data["node"]
        if rec.index == 0:
            self.report.node = node
            if not self.given:
                self.trusted = [self._roster(rec)]  # pinned: nothing later in the file replaces it on its own say
        elif node != self.report.node:
            self.fail(rec, f"a restart of node {node!r} in the log of {self.report.node!r}")
        elif not self.given:
            recorded = self._roster(rec)
            if not _same(recorded, self.trusted[0]):
                self.pending, self.pending_at = recorded, rec.index

    def _roster(self, rec: LogRecord) -> Roster:
        try:
            return roster_of(rec, self.path)
        except ConfigError as exc:
            raise _Failed(str(exc)) from None

    def checkpoint(self, rec: LogRecord) -> None:
        d = rec.data
        node = self.report.node
        if d["n"] != rec.index or d["head"] != rec.prev:
            self.fail(rec, "checkpoint does not match the records before it (records dropped, inserted, altered or reordered)")
        keys = _member(self.trusted, node)
        if not keys:
            self.fail(rec, f"no trusted key of {node!r}, the node whose log this is")
        message = checkpoint_message(node, rec.index, rec.prev, d["final"])
        if not any(Ed25519Verifier(m.ed25519).verify(message, d["sig"]) for m in keys):
            if self.pending is not None:
                self.fail(rec, self._unvouched())
            self.fail(rec, f"checkpoint signature does not verify with the trusted key of {node!r}")
        if self.pending is not None:
            self.trusted, self.pending = [self.pending], None  # endorsed by the key trusted until now
        self.report.proven = rec.index + 1
        self.report.closed = d["final"]

    def message(self, rec: LogRecord) -> None:
        report = self.report
        report.closed = False
        verdict = rec.data["verdict"]
        if verdict.startswith("rejected"):
            report.rejected_records += 1
            return
        try:
            h = verify_record_signature(rec, self.trusted)
        except RejectedMessage as exc:
            self.fail(rec, str(exc))
        if rec.data["dir"] == "out" and h.sender != report.node:
            self.fail(rec, f"sent record claims sender {h.sender!r}, log belongs to {report.node!r}")
        key = (h.sender, h.recipient)
        prev = self.marks.get(key)
        if prev is not None:
            session, seq = prev
            if h.session < session or (h.session == session and h.seq <= seq):
                self.fail(rec, f"sequence goes back in stream {h.sender}->{h.recipient} "
                               f"(seq {h.seq} after {seq}{', older session' if h.session < session else ''})")
        self.marks[key] = (h.session, h.seq)
        report.checked += 1
        report.by_type[h.type] = report.by_type.get(h.type, 0) + 1


class _Failed(Exception):
    """The first failed check of a log (its message names the record)."""


def verify_log(path: str | Path, roster: Roster | Sequence[Roster] | None = None) -> VerifyReport:
    """Verify one log; the report's ``error`` names the first bad record and why.

    ``roster``: the keys to trust (one roster or several); None pins the roster
    recorded in the log's first record.
    """
    p = Path(path)
    given = [] if roster is None else [roster] if isinstance(roster, Roster) else list(roster)
    v = _LogVerifier(p, given)
    try:
        for rec in iter_log(p):
            if rec.index == 0 and rec.kind != "meta":
                raise _Failed(f"{p}: record 0 is not a meta record")
            v.feed(rec)
        if v.report.records == 0:
            raise _Failed(f"{p}: no records (an empty log proves nothing)")
    except (_Failed, ConfigError) as exc:  # ConfigError: LogFormatError / KeyFileError, one line naming the file
        v.report.error = str(exc)
    return v.report
