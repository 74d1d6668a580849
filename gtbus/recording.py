"""Message logs: every message a node sends or receives, exactly as signed.

File format (one file per node process, append-only)::

    b"GTLOG1\\n"                                  magic
    u32 length || msgpack map || chain[16]        the first record: kind "meta" (node, roster, start time)
    u32 length || msgpack map || chain[16]        each later record: "msg", "checkpoint", or "meta" after a restart

``chain`` is BLAKE3(previous chain || map)[:16] (the first record chains from 16
zero bytes), so a flipped byte anywhere in a log, signed or local, is found
at the first record it touches. The chain has no key: anyone who edits a log
on purpose can compute it again. What makes dropping, reordering or editing
records detectable is the **checkpoint**: the recorder signs the chain head with
the node's own Ed25519 key (domain ``gtbus/log-checkpoint/v1``, with the node
name, the record index and whether the log is being closed) right after each
meta record, every :data:`CHECKPOINT_EVERY` records or :data:`CHECKPOINT_SECONDS`
(whichever comes first, checked when a record is written) and when the log is
closed (``final``). Records after the last checkpoint (a crash leaves up to
that many) are an *unsigned tail*: verification reports them as such, never as
proven.

A ``msg`` record holds ``dir`` ("in" / "out"), ``t`` (local receive or send
time), ``verdict`` ("sent", "accepted" or "rejected:<reason>"), ``peer`` (the
authenticated connection, if any), ``ch`` (direct / event), ``frames`` (magic,
header, body, signature: the signed bytes) and, for messages with bulk blobs,
``blob_digest`` and ``blob_sizes`` in place of the blobs. The signature covers
the blob digest, not the blobs, so a log without gigabytes of ciphertext still
verifies offline. A *rejected* message is not expected to verify, and a peer
chooses its size and rate: it is kept as ``digest`` (:func:`~gtbus.messages.envelope.blob_digest` of its frames),
``sizes`` (each frame's length) and the reason in ``verdict``; ``frames`` keeps
only magic and header, each cut at 1 KiB, so replay can still say what it claimed. (Kept whole, a junk flood from one key grew a log by ~50 MiB in 2 s,
and one refused frame near the transport's limit made a record over
``MAX_RECORD`` that no longer read back.) Sealed channel parameters are part of the
signed body and are recorded sealed, never opened.

Reading trusts nothing in the file: records are read one at a time (never the
whole file), a length over :data:`MAX_RECORD` is refused before it is read, the
structure of each record is counted before it is decoded (at most
:data:`_MAX_ITEMS` values, nested at most :data:`_MAX_DEPTH` deep, no ext
types), and the decoded record must match its kind's schema field by field.
Anything else is one :class:`LogFormatError` naming the file, record and byte.

Writing: each record is one ``os.write`` on an ``O_APPEND`` descriptor (created
0600, never through a symlink: :mod:`gtbus.private_files`), made before a
message is sent and right after one is judged. A process crash then loses at
most the record being written, and the cost (a few microseconds; a checkpoint's
signature about 20 us, once per 256 records or second) stays off the signed
round trip. (A thread-backed async write per record, as aiofiles does, would
have been the largest cost on that path, and batching would lose queued
records in a crash.)
"""

from __future__ import annotations

import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import blake3
import msgpack

from gtbus.errors import ConfigError, GtbusError
from gtbus.messages.envelope import DEFAULT_LIMITS, blob_digest
from gtbus.messages.identity import NodeIdentity, PublicIdentity, Roster, check_node_name
from gtbus.private_files import open_private_append

LOG_MAGIC = b"GTLOG1\n"
LOG_SUFFIX = ".gtlog"
_LEN = struct.Struct(">I")
CHAIN = 16
# The largest record a recorder writes: a message's signed frames (body up to the
# pipeline's limit, header 1 KiB) with its local metadata, or a roster of a few
# thousand members. A longer length prefix is refused before anything is read.
MAX_RECORD = DEFAULT_LIMITS.max_body + (1 << 20)
# A record's structure is counted before msgpack builds it: a few dozen values in a
# message record, seven per roster member. Without this, a record of nested or many
# empty arrays costs gigabytes of Python objects (or a RecursionError downstream).
_MAX_ITEMS = 64 * 1024
_MAX_DEPTH = 3  # record map -> roster list -> member map
CHECKPOINT_EVERY = 256
CHECKPOINT_SECONDS = 1.0
CHECKPOINT_DOMAIN = b"gtbus/log-checkpoint/v1\x00"
# Bytes kept of a refused message's magic and header frames (the header limit, Limits.max_header).
_REFUSED_KEEP = 1024
_CHAIN0 = bytes(CHAIN)
_LEN_PACK = _LEN.pack
_blake3 = blake3.blake3


def _chain(prev: bytes, payload: bytes) -> bytes:
    h = blake3.blake3(prev)
    h.update(payload)
    return h.digest(CHAIN)


def checkpoint_message(node: str, index: int, head: bytes, final: bool) -> bytes:
    """What a checkpoint signs: the node, the checkpoint's record index, the chain head before it, and ``final``."""
    n = node.encode()
    return CHECKPOINT_DOMAIN + bytes([len(n)]) + n + struct.pack(">Q", index) + head + (b"\x01" if final else b"\x00")


@dataclass(frozen=True)
class LogRecord:
    """One record read back from a log; ``data`` matched its kind's schema when it was read."""

    index: int
    offset: int
    kind: str
    data: dict[str, Any]
    length: int = 0
    chain: bytes = b""
    prev: bytes = b""  # the chain value of the record before (what a checkpoint signs)

    @property
    def frames(self) -> list[bytes]:
        """The signed frames (magic, header, body, signature)."""
        return list(self.data.get("frames", []))


class Recorder:
    """Appends a node's messages to its log file, and signs checkpoints of it with the node's key.

    Without ``identity`` (benchmarks, tools) no checkpoint is written and the
    whole log verifies only as an unsigned tail.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        node: str,
        roster: Roster,
        *,
        identity: NodeIdentity | None = None,
        checkpoint_every: int = CHECKPOINT_EVERY,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
    ) -> None:
        if identity is not None and identity.name != node:
            raise ConfigError(f"log of {node!r} cannot be signed with the key of {identity.name!r}")
        self.path = Path(path)
        self.node = node
        self._identity = identity
        self._every = max(1, checkpoint_every)
        self._seconds = checkpoint_seconds
        self._prev = _CHAIN0
        self._count = 0  # records in the file
        self._unsigned = 0  # records since the last checkpoint
        self._last_checkpoint = time.monotonic()
        # One packer per recorder: the same bytes as msgpack.packb(..., use_bin_type=True)
        # without building a packer per record (a recorder is used by one thread, like its chain).
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._fd = open_private_append(self.path)
        try:
            size = os.fstat(self._fd).st_size
            if size == 0:
                os.write(self._fd, LOG_MAGIC)
            else:
                # Continue the chain after the last whole record; a record cut short
                # by a crash is dropped so the file stays well-framed. Whole records
                # after the last checkpoint are vouched for by this process's first one.
                good = len(LOG_MAGIC)
                with open(self.path, "rb") as fh:
                    for rec in _records(fh, self.path, tolerate_tail=True):
                        good = rec.offset + 4 + rec.length + CHAIN
                        self._prev = rec.chain
                        self._count = rec.index + 1
                if good < size:
                    os.ftruncate(self._fd, good)
        except BaseException:
            os.close(self._fd)
            raise
        # A restart appends a new meta record: a log may hold several process lifetimes.
        self._write(
            {
                "kind": "meta",
                "node": node,
                "t": time.time(),
                "pid": os.getpid(),
                "roster": [m.to_json() for m in roster],
            }
        )
        # Signed at once: it vouches for the roster this lifetime verifies against.
        self.checkpoint()

    def _write(self, record: dict[str, Any]) -> None:
        data = self._pack(record)
        if len(data) > MAX_RECORD:
            # Written, it would not read back, and a restart would cut the log there.
            raise GtbusError(f"{self.path}: a record of {len(data)} bytes is over the {MAX_RECORD}-byte record limit; message not sent")
        self._prev = prev = _blake3(self._prev + data).digest(CHAIN)  # = _chain(self._prev, data)
        os.write(self._fd, b"".join((_LEN_PACK(len(data)), data, prev)))
        self._count += 1
        self._unsigned += 1

    def _written(self) -> None:
        # After a message record: sign the head every N records or T seconds.
        if self._unsigned >= self._every or time.monotonic() - self._last_checkpoint >= self._seconds:
            self.checkpoint()

    def checkpoint(self, *, final: bool = False) -> None:
        """Append a checkpoint: the chain head signed with the node's key (nothing without a key)."""
        if self._identity is None or self._fd < 0:
            return
        index = self._count
        sig = self._identity.sign(checkpoint_message(self.node, index, self._prev, final))
        self._write({"kind": "checkpoint", "t": time.time(), "n": index, "head": self._prev, "final": final, "sig": sig})
        self._unsigned = 0
        self._last_checkpoint = time.monotonic()

    def record(
        self,
        direction: str,
        frames: Sequence[bytes | memoryview],
        verdict: str,
        *,
        peer: str | None = None,
        channel: str = "direct",
        blobs_digest: bytes | None = None,
    ) -> None:
        """Append one message; ``frames`` are the protocol frames (blobs are digested, not stored)."""
        signed = [f if type(f) is bytes else bytes(f) for f in frames[:4]]
        rec: dict[str, Any] = {
            "kind": "msg",
            "dir": direction,
            "t": time.time(),
            "verdict": verdict,
            "peer": peer,
            "ch": channel,
            "frames": signed,
        }
        if len(frames) > 4:
            blobs = frames[4:]
            rec["blob_digest"] = blobs_digest if blobs_digest is not None else blob_digest(blobs)
            rec["blob_sizes"] = [memoryview(b).nbytes for b in blobs]
        self._write(rec)
        self._written()

    def record_refused(
        self,
        frames: Sequence[bytes | memoryview],
        verdict: str,
        *,
        peer: str | None = None,
        channel: str = "direct",
    ) -> None:
        """Append a refused inbound message as its digest, frame sizes and reason only.

        A refused message was not judged authentic and its sender chose its size:
        keeping it whole lets one peer grow every log at the rate it can send.
        The digest still ties the record to a capture of the same bytes.
        """
        self._write(
            {
                "kind": "msg",
                "dir": "in",
                "t": time.time(),
                "verdict": verdict,
                "peer": peer,
                "ch": channel,
                # The first two frames (magic, header) are at most a few hundred bytes
                # (the pipeline refuses headers over Limits.max_header): enough to show
                # who claimed to send what, without storing what the peer sized.
                "frames": [bytes(f[:_REFUSED_KEEP]) for f in frames[:2]],
                # The envelope's own digest of a list of frames (count and length-prefixed).
                "digest": blob_digest(frames),
                # At most as many sizes as a message may have frames; the count says how many came.
                "sizes": [memoryview(f).nbytes for f in frames[: DEFAULT_LIMITS.max_frames]],
                "nframes": len(frames),
            }
        )
        self._written()

    def close(self) -> None:
        """Sign a final checkpoint and close the log (a second call does nothing)."""
        if self._fd >= 0:
            self.checkpoint(final=True)
            os.close(self._fd)
            self._fd = -1


class LogFormatError(ConfigError):
    """A log file is not a gtbus log, its framing is broken, or a record does not match its schema."""


# -- reading ---------------------------------------------------------------------------------------

# Bytes that follow a msgpack type byte, for the fixed-size scalars.
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
# Length-prefixed strings and binaries: size of the length field.
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # array16/32, map16/32: (length size, values per entry)


def _check_structure(data: bytes) -> str | None:
    """Walk msgpack ``data`` without building it: None if it is one value of at most
    _MAX_ITEMS values nested at most _MAX_DEPTH deep with no ext types, else why not."""
    pos, n, items = 0, len(data), 0
    pending = [1]  # values still to read at each open depth
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        items += 1
        if items > _MAX_ITEMS:
            return f"more than {_MAX_ITEMS} values"
        if pos >= n:
            return "truncated msgpack"
        b = data[pos]
        pos += 1
        count = -1
        if b <= 0x7F or b >= 0xE0:
            continue
        if 0x80 <= b <= 0x8F:
            count = 2 * (b & 0x0F)
        elif 0x90 <= b <= 0x9F:
            count = b & 0x0F
        elif 0xA0 <= b <= 0xBF:
            pos += b & 0x1F
        elif b in _FIXED:
            pos += _FIXED[b]
        elif b in _SIZED:
            w = _SIZED[b]
            pos += w + int.from_bytes(data[pos : pos + w], "big")
        elif b in _CONTAINERS:
            w, per = _CONTAINERS[b]
            count = per * int.from_bytes(data[pos : pos + w], "big")
            pos += w
        else:
            return f"msgpack type 0x{b:02x} not allowed in a log"
        if count >= 0:
            if len(pending) > _MAX_DEPTH:
                return f"nested deeper than {_MAX_DEPTH}"
            if count > _MAX_ITEMS:
                return f"a container of {count} values"
            pending.append(count)
    if pos != n:
        return "bytes after the record's value" if pos < n else "truncated msgpack"
    return None


def _is_str(v: Any) -> bool:
    return type(v) is str


def _is_bytes(v: Any) -> bool:
    return type(v) is bytes


def _is_opt_str(v: Any) -> bool:
    return v is None or type(v) is str


def _is_time(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _is_count(v: Any) -> bool:
    return type(v) is int and 0 <= v < 1 << 63


def _is_counts(v: Any) -> bool:
    return type(v) is list and len(v) <= DEFAULT_LIMITS.max_frames and all(_is_count(x) for x in v)


def _is_frames(v: Any) -> bool:
    return type(v) is list and len(v) <= 4 and all(type(f) is bytes for f in v)


def _is_roster(v: Any) -> bool:
    return type(v) is list and all(type(m) is dict and all(type(k) is str and type(x) is str for k, x in m.items()) for m in v)


# Per kind: field -> (required, check). Unknown fields are refused: a log holds what the recorder writes, nothing else.
_SCHEMA: dict[str, dict[str, tuple[bool, Callable[[Any], bool]]]] = {
    "meta": {"kind": (True, _is_str), "node": (True, _is_str), "t": (True, _is_time), "pid": (True, _is_count), "roster": (True, _is_roster)},
    "msg": {
        "kind": (True, _is_str),
        "dir": (True, lambda v: v in ("in", "out")),
        "t": (True, _is_time),
        "verdict": (True, lambda v: _is_str(v) and len(v) <= 1024),
        "peer": (True, _is_opt_str),
        "ch": (True, _is_str),
        "frames": (True, _is_frames),
        "blob_digest": (False, _is_bytes),
        "blob_sizes": (False, _is_counts),
        "digest": (False, _is_bytes),
        "sizes": (False, _is_counts),
        "nframes": (False, _is_count),
    },
    "checkpoint": {
        "kind": (True, _is_str),
        "t": (True, _is_time),
        "n": (True, _is_count),
        "head": (True, lambda v: _is_bytes(v) and len(v) == CHAIN),
        "final": (True, lambda v: type(v) is bool),
        "sig": (True, lambda v: _is_bytes(v) and len(v) == 64),
    },
}


def _check_schema(rec: Any) -> str | None:
    """None if ``rec`` is a record of a known kind with exactly its fields, each of the right type; else why not."""
    if type(rec) is not dict:
        return "not a log record (not a map)"
    kind = rec.get("kind")
    schema = _SCHEMA.get(kind) if type(kind) is str and all(type(k) is str for k in rec) else None
    if schema is None:
        return "not a log record (unknown kind)"
    for name, value in rec.items():
        spec = schema.get(name)
        if spec is None:
            return f"unexpected field {name!r}"
        if not spec[1](value):
            return f"field {name!r} is not what a {rec['kind']} record holds"
    missing = [name for name, (required, _) in schema.items() if required and name not in rec]
    if missing:
        return f"missing field {missing[0]!r}"
    if rec["kind"] == "meta":
        try:
            check_node_name(rec["node"])
        except ConfigError as exc:
            return str(exc)
    return None


def _decode(payload: bytes) -> Any:
    return msgpack.unpackb(
        payload, raw=False, strict_map_key=True, max_str_len=DEFAULT_LIMITS.max_str, max_bin_len=MAX_RECORD,
        max_array_len=_MAX_ITEMS, max_map_len=_MAX_ITEMS, max_ext_len=0,
    )


def _records(fh: BinaryIO, path: Path, *, tolerate_tail: bool = False) -> Iterator[LogRecord]:
    """Read records one by one from an open log; with ``tolerate_tail`` a cut-short last record ends the log quietly."""
    if fh.read(len(LOG_MAGIC)) != LOG_MAGIC:
        raise LogFormatError(f"{path}: not a gtbus message log (bad magic)")
    pos = len(LOG_MAGIC)
    index = 0
    prev = _CHAIN0
    while True:
        where = f"{path}: record {index} at byte {pos}"
        prefix = fh.read(4)
        if not prefix:
            return
        if len(prefix) < 4:
            if tolerate_tail:
                return
            raise LogFormatError(f"{where}: truncated length prefix")
        (n,) = _LEN.unpack(prefix)
        if n > MAX_RECORD:
            if tolerate_tail:
                return
            raise LogFormatError(f"{where}: length {n} is over the {MAX_RECORD}-byte record limit")
        rest = fh.read(n + CHAIN)
        if len(rest) < n + CHAIN:
            if tolerate_tail:
                return
            raise LogFormatError(f"{where}: length {n} runs past the end of the file")
        payload, chain = rest[:n], rest[n:]
        if _chain(prev, payload) != chain:
            if tolerate_tail and not fh.read(1):
                return
            raise LogFormatError(f"{where}: chain digest mismatch (record altered, dropped or reordered)")
        why = _check_structure(payload)
        if why is None:
            try:
                rec = _decode(payload)
            except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, UnicodeDecodeError) as exc:
                why = f"undecodable ({exc})"
            else:
                why = _check_schema(rec)
        if why is not None:
            raise LogFormatError(f"{where}: {why}")
        yield LogRecord(index=index, offset=pos, kind=rec["kind"], data=rec, length=n, chain=chain, prev=prev)
        prev = chain
        pos += 4 + n + CHAIN
        index += 1


def iter_log(path: str | os.PathLike[str]) -> Iterator[LogRecord]:
    """The records of a log file, read one at a time (LogFormatError naming the first bad one)."""
    p = Path(path)
    try:
        fh = open(p, "rb")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such log file") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, not a log file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    with fh:
        yield from _records(fh, p)


def read_log(path: str | os.PathLike[str]) -> list[LogRecord]:
    """Every record of a log file (LogFormatError naming the record if the framing is broken)."""
    return list(iter_log(path))


def log_files(path: str | os.PathLike[str]) -> list[Path]:
    """A log file, or every ``*.gtlog`` in a folder (recursively), sorted."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob(f"*{LOG_SUFFIX}"))
        if not files:
            raise ConfigError(f"{p}: no {LOG_SUFFIX} files in this folder")
        return files
    if not p.exists():
        raise ConfigError(f"{p}: no such log file or folder")
    return [p]


def roster_of(rec: LogRecord, path: Path) -> Roster:
    """The roster a meta record recorded (KeyFileError naming the record if a member does not verify)."""
    if rec.kind != "meta":
        raise LogFormatError(f"{path}: record {rec.index} is not a meta record")
    source = f"{path}: record {rec.index} roster"
    return Roster(PublicIdentity.from_json(m, source=source) for m in rec.data["roster"])
