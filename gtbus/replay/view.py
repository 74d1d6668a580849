"""Readable views of message logs, with filters."""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgpack

from gtbus.messages.envelope import Header
from gtbus.recording import LogRecord, log_files, read_log
from gtbus.replay.verify import header_of


@dataclass(frozen=True)
class Entry:
    """One message record of one node's log, with its parsed header."""

    node: str
    path: Path
    record: LogRecord
    header: Header | None

    @property
    def time(self) -> float:
        """Local send/receive time (0.0 when the record's local time is not a finite number)."""
        t = self.record.data.get("t", 0.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            return 0.0
        return float(t)

    @property
    def body(self) -> dict[str, Any] | None:
        """The decoded body (for display only; it was checked when the node received it)."""
        frames = self.record.data.get("frames")
        if not isinstance(frames, list) or len(frames) < 3 or not isinstance(frames[2], bytes):
            return None
        try:
            body = msgpack.unpackb(frames[2], raw=False, strict_map_key=False)
        except Exception:
            return None
        return body if isinstance(body, dict) else None


def entries(path: str | Path) -> Iterator[Entry]:
    """Every message record in a log file or a folder of logs, in file order."""
    for p in log_files(path):
        node = p.stem
        for rec in read_log(p):
            if rec.kind == "meta":
                node = str(rec.data.get("node", node))
                continue
            yield Entry(node=node, path=p, record=rec, header=header_of(rec))


def select(
    items: Iterable[Entry],
    *,
    nodes: tuple[str, ...] = (),
    types: tuple[str, ...] = (),
) -> Iterator[Entry]:
    """Keep entries of the given nodes (log owners) and message types (prefix match: ``token``)."""
    for e in items:
        if nodes and e.node not in nodes:
            continue
        if types:
            t = e.header.type if e.header else "?"
            if not any(t == want or t.startswith(want + ".") for want in types):
                continue
        yield e


def _short(value: Any) -> str:
    if isinstance(value, bytes):
        return value[:8].hex() + ("…" if len(value) > 8 else "") + f"({len(value)}B)" if len(value) > 8 else value.hex()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_short(v)}" for k, v in list(value.items())[:6]) + ("…" if len(value) > 6 else "") + "}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_entry(e: Entry) -> str:
    """One line: time, node, direction, verdict, type, sender -> recipient, seq, epoch, body."""
    try:
        ts = _dt.datetime.fromtimestamp(e.time).strftime("%H:%M:%S.%f")[:-3]
    except (OverflowError, OSError, ValueError):  # a local time no clock gives
        ts = "??:??:??.???"
    d = e.record.data
    arrow = "<-" if d.get("dir") == "in" else "->"
    verdict = str(d.get("verdict", ""))
    if e.header is None:
        return f"{ts} {e.node:<8} {arrow} {verdict:<10} (damaged frames)"
    h = e.header
    body = e.body
    body_s = " ".join(f"{k}={_short(v)}" for k, v in (body or {}).items())
    if "blob_sizes" in d:
        body_s += f" blobs={d['blob_sizes']}"
    return (
        f"{ts} {e.node:<8} {arrow} {verdict:<10} {h.type:<16} {h.sender}->{h.recipient} "
        f"seq={h.seq} ep={h.epoch} {body_s}"
    )
