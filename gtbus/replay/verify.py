"""Offline verification of message logs: every signature and every sequence.

A record that the node sent or accepted must still verify against the roster
(the one recorded in the log, or a trusted key folder given by the user), and
within each stream (sender, recipient) its session and sequence must move
forward exactly as the replay guard required when it was live. Records the node
rejected are not expected to verify; they are counted, not failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gtbus.errors import RejectedMessage
from gtbus.messages.envelope import Header, Limits, blob_digest, parse_header, signing_input_digest, split
from gtbus.messages.identity import Roster
from gtbus.messages.primitives import Ed25519Verifier
from gtbus.messages.pipeline import declared_sender
from gtbus.recording import LogRecord, read_log, roster_of

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

    @property
    def ok(self) -> bool:
        """True when no record failed."""
        return self.error is None


def signed_frames(rec: LogRecord) -> list[bytes]:
    """A record's recorded frames, or RejectedMessage if they are not a list of byte strings.

    The chain digest only shows that a log was not altered by accident: a log
    edited on purpose can be re-chained, so nothing in a record is trusted to
    have the shape the recorder wrote.
    """
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


def verify_record_signature(rec: LogRecord, roster: Roster) -> Header:
    """Check one message record's signature; return its header or raise RejectedMessage."""
    frames = signed_frames(rec)
    if len(frames) != 4:
        raise RejectedMessage("malformed", f"{len(frames)} signed frames recorded, expected 4")
    env = split(frames, _LOG_LIMITS)
    h = env.header
    declared_sender(h, roster)
    member = roster[h.sender]
    digest = rec.data.get("blob_digest")
    if digest is None:
        digest = blob_digest(())
    if not isinstance(digest, bytes):
        raise RejectedMessage("malformed", "blob digest is not bytes")
    if not Ed25519Verifier(member.ed25519).verify(signing_input_digest(env.header_bytes, env.body_bytes, digest), env.signature):
        raise RejectedMessage("bad-signature", f"{h.type} from {h.sender} seq {h.seq}")
    return h


def verify_log(path: str | Path, roster: Roster | None = None) -> VerifyReport:
    """Verify one log; the report's ``error`` names the first bad record and why."""
    p = Path(path)
    report = VerifyReport(path=p)
    try:
        records = read_log(p)
        trusted = roster if roster is not None else roster_of(records, p)
    except Exception as exc:  # LogFormatError / KeyFileError: already one line naming the file
        report.error = str(exc)
        return report
    marks: dict[tuple[str, str], tuple[bytes, int]] = {}
    for rec in records:
        if rec.kind == "meta":
            report.node = str(rec.data.get("node", ""))
            if roster is None and rec.index > 0:
                # A restart (perhaps after a key rotation) records the roster it started with.
                try:
                    trusted = roster_of([rec], p)
                except Exception as exc:
                    report.error = f"{p}: record {rec.index} (byte {rec.offset}): {exc}"
                    return report
            continue
        verdict = str(rec.data.get("verdict", ""))
        if verdict.startswith("rejected"):
            report.rejected_records += 1
            continue
        where = f"{p}: record {rec.index} (byte {rec.offset})"
        try:
            h = verify_record_signature(rec, trusted)
        except RejectedMessage as exc:
            report.error = f"{where}: {exc}"
            return report
        if rec.data.get("dir") == "out" and report.node and h.sender != report.node:
            report.error = f"{where}: sent record claims sender {h.sender!r}, log belongs to {report.node!r}"
            return report
        key = (h.sender, h.recipient)
        prev = marks.get(key)
        if prev is not None:
            session, seq = prev
            if h.session < session or (h.session == session and h.seq <= seq):
                report.error = (
                    f"{where}: sequence goes back in stream {h.sender}->{h.recipient} "
                    f"(seq {h.seq} after {seq}{', older session' if h.session < session else ''})"
                )
                return report
        marks[key] = (h.session, h.seq)
        report.checked += 1
        report.by_type[h.type] = report.by_type.get(h.type, 0) + 1
    return report
