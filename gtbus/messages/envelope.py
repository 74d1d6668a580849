"""The wire envelope: frames, header, strict msgpack, Ed25519 signatures.

A message on the wire is a multipart ZeroMQ message (after any routing ids)::

    [0] magic       b"GTB" + version byte (1)
    [1] header      msgpack map, exactly the keys of :class:`Header`
    [2] body        msgpack map, the fields of the message type (see types.py)
    [3] signature   64 bytes, Ed25519
    [4..] blobs     raw bytes (bulk data never goes inside msgpack)

The signature covers, in this order::

    b"gtbus/msg/v1\\0" || u32 len(header) || header || u32 len(body) || body
                      || blob digest

where the blob digest is BLAKE3 over ``u32 count || (u64 len || blob)*``. Every
signature use in gtbus has its own domain tag, so a signature made for one
purpose never verifies for another.

Decoding is strict: size limits are checked before any parsing, msgpack runs
with explicit limits on every container and string, and maps with non-string
keys or extension types are refused. Nothing here trusts a value before the
signature over it has been verified, except what is needed to find the key.
"""

from __future__ import annotations

import math
import os
import struct
import time
from dataclasses import dataclass, fields
from typing import Any, Sequence

import blake3
import msgpack

from gtbus.errors import RejectedMessage

MAGIC = b"GTB\x01"
VERSION = 1
SIG_DOMAIN = b"gtbus/msg/v1\x00"
SIG_LEN = 64
BROADCAST = "*"


#: The largest bulk blob a message carries: one AEAD segment of a ship or remote
#: hop, ``gpu.channel.MAX_SEGMENT_SIZE`` (4 MiB) plus its 16-byte tag. (This
#: layer sits below ``gpu``; a test holds the two equal.)
MAX_BLOB = (4 << 20) + 16
#: The most blobs any declared message type takes (``ship.segment``: one; a test
#: holds this equal to the registry's largest ``max_blobs``).
MAX_BLOBS = 1
_MAX_HEADER = 1024
_MAX_BODY = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Size limits checked before anything is parsed.

    The defaults are exactly what the protocol needs: magic, header, body and
    signature, plus at most :data:`MAX_BLOBS` segments of :data:`MAX_BLOB`
    bytes. The zmq transport sets ``MAXMSGSIZE`` to :attr:`largest_frame` and
    drops a message over ``max_frames`` or ``max_total`` while reading it.
    """

    max_frames: int = 4 + MAX_BLOBS
    max_header: int = _MAX_HEADER
    max_body: int = _MAX_BODY
    max_blob: int = MAX_BLOB
    max_total: int = len(MAGIC) + _MAX_HEADER + _MAX_BODY + SIG_LEN + MAX_BLOBS * MAX_BLOB
    max_str: int = 1 << 16
    max_bin: int = 1 << 20
    max_array: int = 4096
    max_map: int = 256

    @property
    def largest_frame(self) -> int:
        """The largest single frame these limits let through (what ``MAXMSGSIZE`` should be)."""
        frames = [len(MAGIC), self.max_header, self.max_body, SIG_LEN]
        if self.max_frames > 4:
            frames.append(self.max_blob)
        return min(max(frames), self.max_total)


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Header:
    """Routing, ordering and fencing data of one message; signed with the body.

    ``session`` is 16 bytes: 8 bytes of the sender's start time in nanoseconds
    (big-endian, so later sessions sort higher) and 8 random bytes. ``seq``
    counts per sender and *stream* (the recipient, or ``*`` for broadcasts),
    because the request and event channels are separately ordered.
    """

    v: int
    id: bytes
    type: str
    sender: str
    recipient: str
    session: bytes
    seq: int
    ts: float
    exp: float
    epoch: int
    parent: bytes | None

    def to_wire(self) -> dict[str, Any]:
        """The header as a plain map."""
        return {name: getattr(self, name) for name in _HEADER_FIELDS}


_HEADER_FIELDS = tuple(f.name for f in fields(Header))
_new_object = object.__new__


def checked_header(wire: dict[str, Any]) -> Header:
    """The :class:`Header` of ``wire``, a map already checked to hold exactly its fields, each of its type.

    The generated ``__init__`` of a frozen dataclass sets each of the eleven
    fields through ``object.__setattr__``: 1-4 us a header, and every signed
    round trip builds four. The instance made here is the same (equal, hashable,
    frozen); only the two callers that have checked the map use it (the signer,
    which fills it, and :func:`parse_header`).
    """
    header: Header = _new_object(Header)
    header.__dict__.update(wire)
    return header


_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "v": (int,),
    "id": (bytes,),
    "type": (str,),
    "sender": (str,),
    "recipient": (str,),
    "session": (bytes,),
    "seq": (int,),
    "ts": (float, int),
    "exp": (float, int),
    "epoch": (int,),
    "parent": (bytes, type(None)),
}
_HEADER_KEYS = frozenset(_HEADER_TYPES)
# The same check as isinstance(value, types) and not bool, by exact type: msgpack
# only ever returns exact built-in types (and bool, which is refused everywhere).
_HEADER_EXACT = tuple((key, frozenset(types_)) for key, types_ in _HEADER_TYPES.items())
assert set(_HEADER_FIELDS) == _HEADER_KEYS


def new_session_id(now_ns: int | None = None) -> bytes:
    """A per-process session id that sorts after every earlier one of the same sender."""
    t = time.time_ns() if now_ns is None else now_ns
    return struct.pack(">Q", t) + os.urandom(8)


def new_message_id() -> bytes:
    """A random 16-byte message id."""
    return os.urandom(16)


def packb(obj: Any) -> bytes:
    """msgpack with bin/str distinguished (the only encoder gtbus uses on the wire)."""
    return msgpack.packb(obj, use_bin_type=True)


def _refuse_ext(code: int, data: bytes) -> Any:
    # max_ext_len=0 alone still lets a zero-length ext 8 through as an ExtType.
    raise ValueError(f"extension type {code} not allowed")


def unpackb_strict(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode msgpack refusing ext types, non-str map keys, and anything over the limits."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_str,
            max_bin_len=limits.max_bin,
            max_array_len=limits.max_array,
            max_map_len=limits.max_map,
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    except msgpack.StackError:
        raise RejectedMessage("decode-bomb", "msgpack nesting too deep") from None
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, UnicodeDecodeError) as exc:
        # ValueError covers "exceeds max_*_len" and truncated input.
        raise RejectedMessage("bad-msgpack", str(exc) or type(exc).__name__) from None


def blob_digest(blobs: Sequence[bytes | memoryview]) -> bytes:
    """BLAKE3 over the count and length-prefixed blobs (what the signature covers for bulk data)."""
    if not blobs:
        return _NO_BLOBS_DIGEST
    big = sum(memoryview(b).nbytes for b in blobs) >= 1 << 20
    # Bulk segments: let BLAKE3 use every core (it is on the ship and remote paths' critical path).
    h = blake3.blake3(max_threads=blake3.blake3.AUTO) if big else blake3.blake3()
    h.update(struct.pack(">I", len(blobs)))
    for b in blobs:
        mv = memoryview(b)
        h.update(struct.pack(">Q", mv.nbytes))
        h.update(mv)
    return h.digest()


_NO_BLOBS_DIGEST = blake3.blake3(struct.pack(">I", 0)).digest()  # a constant: most messages carry no blobs


def signing_input(header: bytes, body: bytes, blobs: Sequence[bytes | memoryview]) -> bytes:
    """The exact bytes an envelope signature covers."""
    return signing_input_digest(header, body, blob_digest(blobs))


def signing_input_digest(header: bytes, body: bytes, blobs_digest: bytes) -> bytes:
    """:func:`signing_input` given the blob digest (how a log without its blobs is verified)."""
    return b"".join((SIG_DOMAIN, _U32(len(header)), header, _U32(len(body)), body, blobs_digest))


_U32 = struct.Struct(">I").pack


@dataclass(frozen=True)
class Envelope:
    """A received message split into its parts; only the header has been parsed."""

    header: Header
    header_bytes: bytes
    body_bytes: bytes
    signature: bytes
    blobs: list[bytes]


def check_sizes(frames: Sequence[bytes], limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse a multipart message by its frame count and sizes, before parsing anything."""
    n = len(frames)
    if n < 4:
        raise RejectedMessage("malformed", f"{n} frames, need at least 4")
    if n > limits.max_frames:
        raise RejectedMessage("oversize", f"{n} frames, limit {limits.max_frames}")
    if len(frames[1]) > limits.max_header:
        raise RejectedMessage("oversize", f"header of {len(frames[1])} bytes, limit {limits.max_header}")
    if len(frames[2]) > limits.max_body:
        raise RejectedMessage("oversize", f"body of {len(frames[2])} bytes, limit {limits.max_body}")
    for b in frames[4:]:
        if len(b) > limits.max_blob:
            raise RejectedMessage("oversize", f"blob of {len(b)} bytes, limit {limits.max_blob}")
    total = sum(map(len, frames))
    if total > limits.max_total:
        raise RejectedMessage("oversize", f"message of {total} bytes, limit {limits.max_total}")


def parse_header(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Decode and type-check a header frame."""
    raw = unpackb_strict(data, limits)
    if not isinstance(raw, dict):
        raise RejectedMessage("bad-header", "header is not a map")
    if raw.keys() != _HEADER_KEYS:
        missing = sorted(_HEADER_KEYS - set(raw))
        extra = sorted(map(str, set(raw) - _HEADER_KEYS))
        raise RejectedMessage("bad-header", f"header keys wrong (missing {missing}, extra {extra})")
    for key, exact in _HEADER_EXACT:
        value = raw[key]
        if type(value) not in exact:
            raise RejectedMessage("bad-header", f"header field {key!r} has wrong type {type(value).__name__}")
    if raw["v"] != VERSION:
        raise RejectedMessage("bad-version", f"protocol version {raw['v']}, this node speaks {VERSION}")
    if len(raw["id"]) != 16 or len(raw["session"]) != 16:
        raise RejectedMessage("bad-header", "id and session must be 16 bytes")
    if raw["seq"] < 0 or raw["epoch"] < 0:
        raise RejectedMessage("bad-header", "negative seq or epoch")
    ts = raw["ts"] = float(raw["ts"])
    exp = raw["exp"] = float(raw["exp"])
    if not (_isfinite(ts) and _isfinite(exp)):
        # NaN compares false both ways: exp=NaN would never expire in the replay guard.
        raise RejectedMessage("bad-header", "ts and exp must be finite")
    return checked_header(raw)


_isfinite = math.isfinite


def split(frames: Sequence[bytes], limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Check sizes and magic, parse the header; the signature is NOT checked yet."""
    check_sizes(frames, limits)
    if bytes(frames[0]) != MAGIC:
        raise RejectedMessage("bad-magic", f"magic frame {bytes(frames[0][:8])!r}")
    if len(frames[3]) != SIG_LEN:
        raise RejectedMessage("malformed", f"signature frame of {len(frames[3])} bytes")
    header_bytes = bytes(frames[1])
    return Envelope(
        parse_header(header_bytes, limits),
        header_bytes,
        bytes(frames[2]),
        bytes(frames[3]),
        [f if isinstance(f, bytes) else bytes(f) for f in frames[4:]],
    )
