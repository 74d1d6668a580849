"""The replay guard: sessions, sequences, expiry, clock skew and epoch fencing.

Rules (all of them live here):

1. A message's stream is ``(sender, recipient)``: a sender numbers direct
   messages to each peer and its broadcasts separately, because the ROUTER and
   PUB channels are each ordered but not ordered with respect to each other.
2. Within a stream, a message is accepted only if its session is the stream's
   current one and its ``seq`` is above the high-water mark, or its session is
   newer (the sender restarted; session ids sort by start time). Older sessions
   and sequences at or below the mark are replays. Gaps are allowed (a lost
   message is not an attack), going back is not.
3. ``ts`` may be at most ``max_skew`` seconds in the future; ``exp`` must not
   have passed; ``exp - ts`` may not exceed ``max_ttl``.
4. For fenced types, ``epoch`` below the fence is stale: a paused ex-holder
   cannot speak for an old hop. The node that owns the token epochs says
   where the fence is (it only rises): with one token, its newest epoch;
   with several travelling at once (a fleet), the lowest epoch still in
   flight on any of them, so a slower token's hop is never refused (each
   token then refuses the epochs above the fence that are not its own).
5. :meth:`ReplayGuard.check` has no side effects; :meth:`ReplayGuard.commit`
   records the message as seen. The pipeline calls commit only after the
   signature verified, so junk cannot move the marks.

Persistence: high-water marks and the fence are appended to a journal file
(one small record per accepted message, written with ``os.write`` on an
``O_APPEND`` descriptor: a process crash loses nothing that was committed) and
compacted when the guard opens. A restarted node therefore refuses everything
it accepted before, even within the expiry window.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import msgpack

from gtbus.clock import SYSTEM_CLOCK, Clock
from gtbus.errors import ConfigError, RejectedMessage
from gtbus.messages.envelope import Header
from gtbus.private_files import open_private_append, write_private

StreamKey = tuple[str, str]
_U16 = struct.Struct(">H").pack


@dataclass
class _Mark:
    session: bytes
    seq: int


def _record_ok(rec: object) -> bool:
    """A journal record is ("m", sender, recipient, session, seq) or ("f", epoch)."""
    if not isinstance(rec, list) or not rec:
        return False
    if rec[0] == "m" and len(rec) == 5:
        _, sender, rcpt, session, seq = rec
        return isinstance(sender, str) and isinstance(rcpt, str) and isinstance(session, bytes) and type(seq) is int
    return rec[0] == "f" and len(rec) == 2 and type(rec[1]) is int


class ReplayGuard:
    """Decides whether a verified header is fresh; remembers what it accepted."""

    def __init__(
        self,
        clock: Clock = SYSTEM_CLOCK,
        *,
        journal: str | os.PathLike[str] | None = None,
        max_skew: float = 5.0,
        max_ttl: float = 300.0,
    ) -> None:
        self.clock = clock
        self.max_skew = max_skew
        self.max_ttl = max_ttl
        self._marks: dict[StreamKey, _Mark] = {}
        self._fence = 0
        self._fd: int | None = None
        self._pack = msgpack.Packer(use_bin_type=True).pack  # = msgpack.packb(..., use_bin_type=True)
        self._journal = Path(journal) if journal is not None else None
        if self._journal is not None:
            self._load_and_compact(self._journal)

    # -- decisions -------------------------------------------------------------------------

    @property
    def fence(self) -> int:
        """The lowest token epoch still accepted for fenced message types."""
        return self._fence

    def check(self, header: Header, *, fenced: bool) -> None:
        """Raise RejectedMessage if ``header`` is a replay, stale, expired or from the future."""
        now = self.clock.time()
        if header.ts > now + self.max_skew:
            raise RejectedMessage("clock-skew", f"timestamp {header.ts - now:.1f}s in the future")
        if header.exp < now:
            raise RejectedMessage("expired", f"expired {now - header.exp:.1f}s ago")
        if header.exp - header.ts > self.max_ttl:
            raise RejectedMessage("bad-expiry", f"lifetime {header.exp - header.ts:.0f}s over {self.max_ttl:.0f}s")
        if fenced and header.epoch < self._fence:
            raise RejectedMessage("stale-epoch", f"epoch {header.epoch} below fence {self._fence}")
        mark = self._marks.get((header.sender, header.recipient))
        if mark is None:
            return
        if header.session == mark.session:
            if header.seq <= mark.seq:
                raise RejectedMessage("replay", f"seq {header.seq} from {header.sender} already seen (mark {mark.seq})")
        elif header.session < mark.session:
            raise RejectedMessage("replay", f"old session of {header.sender}")

    def commit(self, header: Header) -> None:
        """Record ``header`` as seen (call only after :meth:`check` and signature verification).

        The journal record is written (one ``os.write``) before this returns, so before
        the message is acted on: a crash after it cannot make the message fresh again.
        """
        sender, recipient, session, seq = header.sender, header.recipient, header.session, header.seq
        self._marks[(sender, recipient)] = _Mark(session, seq)
        self._append(("m", sender, recipient, session, seq))

    def raise_fence(self, epoch: int) -> None:
        """Refuse fenced messages with an epoch below ``epoch`` from now on (never lowers)."""
        if epoch > self._fence:
            self._fence = epoch
            self._append(("f", epoch))

    def marks(self) -> dict[StreamKey, tuple[bytes, int]]:
        """A copy of the high-water marks (for status and tests)."""
        return {k: (m.session, m.seq) for k, m in self._marks.items()}

    # -- persistence -----------------------------------------------------------------------

    def _append(self, record: tuple[object, ...]) -> None:
        if self._fd is None:
            return
        data = self._pack(record)
        os.write(self._fd, _U16(len(data)) + data)

    def _load_and_compact(self, path: Path) -> None:
        if path.exists():
            self._replay_journal(path.read_bytes(), path)
        records: list[tuple[object, ...]] = [("f", self._fence)] if self._fence else []
        records += [("m", sender, rcpt, m.session, m.seq) for (sender, rcpt), m in self._marks.items()]
        # Compacted into a fresh 0600 file renamed into place (never through a planted symlink).
        write_private(path, b"".join(_U16(len(d)) + d for d in map(self._pack, records)))
        self._fd = open_private_append(path)

    def _replay_journal(self, data: bytes, path: Path) -> None:
        pos = 0
        while pos + 2 <= len(data):
            (n,) = struct.unpack_from(">H", data, pos)
            if pos + 2 + n > len(data):
                break  # a record cut short by a crash: everything before it counts
            try:
                rec = msgpack.unpackb(data[pos + 2 : pos + 2 + n], raw=False)
                if not _record_ok(rec):
                    raise ValueError(f"unexpected record {rec!r:.60}")
            except Exception as exc:
                raise ConfigError(f"{path}: replay journal corrupt at byte {pos}: {exc}") from None
            pos += 2 + n
            if rec[0] == "m":
                _, sender, rcpt, session, seq = rec
                old = self._marks.get((sender, rcpt))
                if old is None or (session, seq) > (old.session, old.seq):
                    self._marks[(sender, rcpt)] = _Mark(session, seq)
            elif rec[0] == "f":
                self._fence = max(self._fence, rec[1])

    def close(self) -> None:
        """Close the journal."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
