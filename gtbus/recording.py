"""Message logs: every message a node sends or receives, exactly as signed.

File format (one file per node process, append-only)::

    b"GTLOG1\\n"                                  magic
    u32 length || msgpack map || chain[16]        the first record: kind "meta" (node, roster, start time)
    u32 length || msgpack map || chain[16]        each later record: kind "msg" (or "meta" after a restart)

``chain`` is BLAKE3(previous chain || map)[:16] (the first record chains from 16
zero bytes), so a flipped byte anywhere in a log, signed or local, is found
at the first record it touches, and records cannot be dropped or reordered
without it showing.

A ``msg`` record holds ``dir`` ("in" / "out"), ``t`` (local receive or send
time), ``verdict`` ("sent", "accepted" or "rejected:<reason>"), ``peer`` (the
authenticated connection, if any), ``ch`` (direct / event), ``frames`` (magic,
header, body, signature: the signed bytes) and, for messages with bulk blobs,
``blob_digest`` and ``blob_sizes`` in place of the blobs. The signature covers
the blob digest, not the blobs, so a log without gigabytes of ciphertext still
verifies offline. A *rejected* message is not expected to verify, and a peer
chooses its size and rate: it is kept as ``digest`` (see :func:`refused_digest`),
``sizes`` (each frame's length) and the reason in ``verdict``; ``frames`` keeps
only magic and header, each cut at 1 KiB, so replay can still say what it claimed. (Kept whole, a junk flood from one key grew a log by ~50 MiB in 2 s,
and one refused frame near the transport's limit made a record over
``MAX_RECORD`` that no longer read back.) Sealed channel parameters are part of the
signed body and are recorded sealed, never opened.

Writing: each record is one ``os.write`` on an ``O_APPEND`` descriptor, made
before a message is sent and right after one is judged. A process crash then
loses at most the record being written, and the cost (a few microseconds) stays
off the signed round trip. (A thread-backed async write per record, as
aiofiles does, would have been the largest cost on that path, and batching
would lose queued records in a crash.) Reading for replay and status is async,
with aiofiles.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

import aiofiles
import blake3
import msgpack

from gtbus.errors import ConfigError
from gtbus.messages.envelope import blob_digest
from gtbus.messages.identity import PublicIdentity, Roster

LOG_MAGIC = b"GTLOG1\n"
LOG_SUFFIX = ".gtlog"
_LEN = struct.Struct(">I")
MAX_RECORD = 64 << 20
CHAIN = 16
# Bytes kept of a refused message's magic and header frames (the header limit, Limits.max_header).
_REFUSED_KEEP = 1024
_CHAIN0 = bytes(CHAIN)
_LEN_PACK = _LEN.pack
_blake3 = blake3.blake3


def _chain(prev: bytes, payload: bytes) -> bytes:
    h = blake3.blake3(prev)
    h.update(payload)
    return h.digest(CHAIN)


@dataclass(frozen=True)
class LogRecord:
    """One record read back from a log."""

    index: int
    offset: int
    kind: str
    data: dict[str, Any]
    length: int = 0
    chain: bytes = b""

    @property
    def frames(self) -> list[bytes]:
        """The signed frames (magic, header, body, signature)."""
        return list(self.data.get("frames", []))


def refused_digest(frames: Sequence[bytes | memoryview]) -> bytes:
    """BLAKE3 over the length-prefixed frames of a refused message (what its log record keeps)."""
    h = _blake3()
    for f in frames:
        h.update(_LEN_PACK(memoryview(f).nbytes))
        h.update(f)
    return h.digest()


class Recorder:
    """Appends a node's messages to its log file."""

    def __init__(self, path: str | os.PathLike[str], node: str, roster: Roster) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prev = _CHAIN0
        # One packer per recorder: the same bytes as msgpack.packb(..., use_bin_type=True)
        # without building a packer per record (a recorder is used by one thread, like its chain).
        self._pack = msgpack.Packer(use_bin_type=True).pack
        if self.path.exists() and self.path.stat().st_size > 0:
            # Continue the chain after the last whole record; a record cut short
            # by a crash is dropped so the file stays well-framed.
            data = self.path.read_bytes()
            good = len(LOG_MAGIC)
            for rec in _parse(data, self.path, tolerate_tail=True):
                good = rec.offset + 4 + rec.length + CHAIN
                self._prev = rec.chain
            if good < len(data):
                os.truncate(self.path, good)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.write(self._fd, LOG_MAGIC)
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

    def _write(self, record: dict[str, Any]) -> None:
        data = self._pack(record)
        self._prev = prev = _blake3(self._prev + data).digest(CHAIN)  # = _chain(self._prev, data)
        os.write(self._fd, b"".join((_LEN_PACK(len(data)), data, prev)))

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
        if verdict.startswith("rejected"):
            self.record_refused(frames, verdict, peer=peer, channel=channel)
            return
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
                "verdict": verdict if verdict.startswith("rejected") else f"rejected:{verdict}",
                "peer": peer,
                "ch": channel,
                # The first two frames (magic, header) are at most a few hundred bytes
                # (the pipeline refuses headers over Limits.max_header): enough to show
                # who claimed to send what, without storing what the peer sized.
                "frames": [bytes(f[:_REFUSED_KEEP]) for f in frames[:2]],
                "digest": refused_digest(frames),
                "sizes": [memoryview(f).nbytes for f in frames],
            }
        )

    def close(self) -> None:
        """Close the log."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LogFormatError(ConfigError):
    """A log file is not a gtbus log or its framing is broken at a given record."""


def _parse(data: bytes, path: Path, *, tolerate_tail: bool = False) -> Iterator[LogRecord]:
    if not data.startswith(LOG_MAGIC):
        raise LogFormatError(f"{path}: not a gtbus message log (bad magic)")
    pos = len(LOG_MAGIC)
    index = 0
    prev = _CHAIN0
    while pos < len(data):
        where = f"{path}: record {index} at byte {pos}"
        if pos + 4 > len(data):
            if tolerate_tail:
                return
            raise LogFormatError(f"{where}: truncated length prefix")
        (n,) = _LEN.unpack_from(data, pos)
        end = pos + 4 + n + CHAIN
        if n > MAX_RECORD or end > len(data):
            if tolerate_tail:
                return
            raise LogFormatError(f"{where}: length {n} runs past the end of the file")
        payload = data[pos + 4 : pos + 4 + n]
        chain = data[pos + 4 + n : end]
        if _chain(prev, payload) != chain:
            if tolerate_tail and end == len(data):
                return
            raise LogFormatError(f"{where}: chain digest mismatch (record altered, dropped or reordered)")
        try:
            rec = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as exc:
            raise LogFormatError(f"{where}: undecodable ({exc})") from None
        if not isinstance(rec, dict) or rec.get("kind") not in ("meta", "msg"):
            raise LogFormatError(f"{where}: not a log record")
        yield LogRecord(index=index, offset=pos, kind=rec["kind"], data=rec, length=n, chain=chain)
        prev = chain
        pos = end
        index += 1


def read_log(path: str | os.PathLike[str]) -> list[LogRecord]:
    """Every record of a log file (LogFormatError naming the record if the framing is broken)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such log file") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, not a log file") from None
    return list(_parse(data, p))


async def aread_log(path: str | os.PathLike[str]) -> AsyncIterator[LogRecord]:
    """Async variant of :func:`read_log` (aiofiles), for the live status view."""
    p = Path(path)
    try:
        async with aiofiles.open(p, "rb") as fh:
            data = await fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such log file") from None
    for rec in _parse(data, p):
        yield rec


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


def roster_of(records: Sequence[LogRecord], path: Path) -> Roster:
    """The roster a log recorded in its first meta record."""
    for rec in records:
        if rec.kind == "meta":
            return Roster(PublicIdentity.from_json(m, source=f"{path} roster") for m in rec.data.get("roster", []))
    raise LogFormatError(f"{path}: no meta record")
