"""Readable views of message logs, with filters."""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from gtbus.messages.envelope import Header
from gtbus.console import printable
from gtbus.recording import LogRecord, iter_log, log_files
from gtbus.replay.verify import body_of, header_of


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
        """The decoded body (for display only), under the wire's msgpack limits."""
        return body_of(self.record)


def entries(path: str | Path) -> Iterator[Entry]:
    """Every message record in a log file or a folder of logs, in file order."""
    for p in log_files(path):
        node = p.stem
        for rec in iter_log(p):
            if rec.kind == "meta":
                node = rec.data["node"]
                continue
            if rec.kind != "msg":
                continue  # checkpoints: verify's business
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


def _short(value: Any, depth: int = 0) -> str:
    # Bounded whatever the body holds: two levels, six items, 80 characters of a string.
    if isinstance(value, bytes):
        return value[:8].hex() + ("…" if len(value) > 8 else "") + f"({len(value)}B)" if len(value) > 8 else value.hex()
    if isinstance(value, (dict, list)):
        if depth >= 2:
            return "{…}" if isinstance(value, dict) else "[…]"
        items = list(value.items())[:6] if isinstance(value, dict) else list(enumerate(value[:6]))
        inner = ", ".join(f"{_short(k, 2)}={_short(v, depth + 1)}" if isinstance(value, dict) else _short(v, depth + 1) for k, v in items)
        more = "…" if len(value) > 6 else ""
        return "{" + inner + more + "}" if isinstance(value, dict) else "[" + inner + more + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 80 else text[:80] + "…"


def format_entry(e: Entry) -> str:
    """One line: time, node, direction, verdict, type, sender -> recipient, seq, epoch, body."""
    try:
        ts = _dt.datetime.fromtimestamp(e.time).strftime("%H:%M:%S.%f")[:-3]
    except (OverflowError, OSError, ValueError):  # a local time no clock gives
        ts = "??:??:??.???"
    d = e.record.data
    arrow = "<-" if d["dir"] == "in" else "->"
    verdict = d["verdict"]
    if e.header is None:
        return printable(f"{ts} {e.node:<8} {arrow} {verdict:<10} (damaged frames)")
    h = e.header
    body = e.body
    body_s = " ".join(f"{k}={_short(v)}" for k, v in (body or {}).items())
    if "blob_sizes" in d:
        body_s += f" blobs={d['blob_sizes']}"
    if "sizes" in d:  # a refused message: what it claimed, and how large it was
        body_s += f" refused-frames={d['sizes'][:8]} digest={_short(d.get('digest', b''))}"
    # Everything on the line may come from a peer (names, types, a decline reason): escaped, one line.
    return printable(
        f"{ts} {e.node:<8} {arrow} {verdict:<10} {h.type:<16} {h.sender}->{h.recipient} "
        f"seq={h.seq} ep={h.epoch} {body_s}"
    )


def timeline(items: Iterable[Entry]) -> list[Entry]:
    """Merge several nodes' entries into one order consistent with causality.

    Within a log, records keep their order; a message's receipt comes after its
    sending (matched by message id). Among entries free to go next, the one with
    the earliest local time goes first, so clocks only break ties and never
    reorder cause and effect.
    """
    import heapq

    per_log: dict[Path, list[Entry]] = {}
    for e in items:
        per_log.setdefault(e.path, []).append(e)
    sent_at: dict[bytes, tuple[Path, int]] = {}
    for path, es in per_log.items():
        for i, e in enumerate(es):
            if e.header is not None and e.record.data.get("dir") == "out":
                sent_at[e.header.id] = (path, i)
    pos = {path: 0 for path in per_log}
    out: list[Entry] = []
    emitted: set[tuple[Path, int]] = set()

    def ready(path: Path) -> bool:
        i = pos[path]
        e = per_log[path][i]
        if e.header is None or e.record.data.get("dir") != "in":
            return True
        src = sent_at.get(e.header.id)
        return src is None or src in emitted

    heap: list[tuple[float, str, Path]] = []
    blocked: set[Path] = set()

    def offer(path: Path) -> None:
        if pos[path] < len(per_log[path]):
            if ready(path):
                heapq.heappush(heap, (per_log[path][pos[path]].time, str(path), path))
            else:
                blocked.add(path)

    for path in per_log:
        offer(path)
    while heap or blocked:
        if not heap:  # a receive whose send is missing from the logs given: take it by time
            path = min(blocked, key=lambda p: per_log[p][pos[p]].time)
            blocked.discard(path)
        else:
            _, _, path = heapq.heappop(heap)
        e = per_log[path][pos[path]]
        out.append(e)
        emitted.add((path, pos[path]))
        pos[path] += 1
        offer(path)
        for other in list(blocked):
            if ready(other):
                blocked.discard(other)
                heapq.heappush(heap, (per_log[other][pos[other]].time, str(other), other))
    return out


def in_window(items: Iterable[Entry], *, since: float | None = None, until: float | None = None, epochs: tuple[int, int] | None = None) -> Iterator[Entry]:
    """Keep entries within a local-time window and a token-epoch range (inclusive)."""
    for e in items:
        if since is not None and e.time < since:
            continue
        if until is not None and e.time > until:
            continue
        if epochs is not None:
            if e.header is None or not epochs[0] <= e.header.epoch <= epochs[1]:
                continue
        yield e


def format_detail(e: Entry) -> str:
    """Several lines: the entry, its header fields and its whole body."""
    lines = [format_entry(e)]
    if e.header is not None:
        h = e.header
        lines.append(f"    id={h.id.hex()} parent={h.parent.hex() if h.parent else '-'} session={h.session.hex()[:16]} ts={h.ts:.3f} exp={h.exp:.3f}")
    for k, v in (e.body or {}).items():
        lines.append(f"    {k} = {_short(v)}")
    lines.append(f"    log {e.path} record {e.record.index}, peer {e.record.data.get('peer')}, channel {e.record.data.get('ch')}")
    return "\n".join(lines[:1] + [printable(line) for line in lines[1:]])
