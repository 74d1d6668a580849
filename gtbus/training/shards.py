"""Token data on disk: llm.c shards, raw byte files, and a holder's dataset.

An llm.c shard is a 256 x int32 little-endian header (magic 20240520,
version 1, token count, the rest zero) followed by that many uint16
little-endian tokens. A raw file is plain bytes; each byte is one token.

A :class:`Dataset` is what a holder offers: an ordered list of such files seen
as one token stream, cut into chunks by token count (a hop carries one chunk),
with a manifest that commits to every token by a BLAKE3 digest. The digest is
over the stream as uint16 little-endian, so a raw file and the shard made from
it commit to the same value, and ``b3sum`` of a lone shard's payload checks it.

Every error is a :class:`ShardError` whose one-line message names the file.
"""

from __future__ import annotations

import bisect
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy

from gtbus.errors import GtbusError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
#: The header stores the count as int32.
MAX_SHARD_TOKENS = 2**31 - 1
TOKEN_DTYPE = numpy.dtype("<u2")
_HEADER_DTYPE = numpy.dtype("<i4")
#: Raw bytes are widened to uint16 this many at a time when hashed or copied.
_WIDEN_BLOCK = 1 << 22


class ShardError(GtbusError):
    """A token file is missing, unreadable, or not a valid llm.c shard; the message names the file."""


@dataclass(frozen=True)
class ShardHeader:
    """The meaningful fields of an llm.c shard header."""

    magic: int
    version: int
    tokens: int


def write_shard(path: str | os.PathLike[str], tokens: Any) -> Path:
    """Write ``tokens`` (1-D integers in 0..65535) as an llm.c shard, atomically; returns the path."""
    path = Path(path)
    array = numpy.asarray(tokens)
    if array.ndim != 1:
        raise ShardError(f"{path}: tokens must be 1-D, got shape {array.shape}")
    if array.size == 0:
        array = array.astype(TOKEN_DTYPE)
    if array.dtype.kind not in "ui":
        raise ShardError(f"{path}: tokens must be integers, got {array.dtype}")
    if array.size > MAX_SHARD_TOKENS:
        raise ShardError(f"{path}: {array.size} tokens exceed the shard limit of {MAX_SHARD_TOKENS}")
    fits = array.dtype.kind == "u" and array.dtype.itemsize <= 2
    if not fits and (int(array.min()) < 0 or int(array.max()) > 0xFFFF):
        raise ShardError(f"{path}: tokens must lie in 0..65535 to fit uint16")
    header = numpy.zeros(HEADER_INTS, dtype=_HEADER_DTYPE)
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, array.size)
    payload = numpy.ascontiguousarray(array.astype(TOKEN_DTYPE, copy=False))
    # Write beside the target and rename, so a reader never sees half a shard.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    except OSError as err:
        raise ShardError(f"{path}: cannot write: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(memoryview(header).cast("B"))
            out.write(memoryview(payload).cast("B"))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_shard_header(path: str | os.PathLike[str]) -> ShardHeader:
    """Read and check the header of an llm.c shard, and that the file holds exactly its token count."""
    path = Path(path)
    size = _file_size(path)
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated shard: {size} bytes, the header alone is {HEADER_BYTES}")
    try:
        with path.open("rb") as f:
            header = numpy.frombuffer(f.read(HEADER_BYTES), dtype=_HEADER_DTYPE)
    except OSError as err:
        raise ShardError(f"{path}: cannot read: {err.strerror}") from None
    magic, version, count = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise ShardError(f"{path}: not an llm.c token shard (magic {magic}, expected {SHARD_MAGIC})")
    if version != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {version} (expected {SHARD_VERSION})")
    if count < 0:
        raise ShardError(f"{path}: header gives a negative token count {count}")
    payload = size - HEADER_BYTES
    if payload < count * TOKEN_DTYPE.itemsize:
        raise ShardError(
            f"{path}: truncated shard: header says {count} tokens, file holds {payload // 2}"
        )
    if payload != count * TOKEN_DTYPE.itemsize:
        raise ShardError(
            f"{path}: token count mismatch: header says {count} tokens, file holds {payload} bytes of tokens"
        )
    return ShardHeader(magic=magic, version=version, tokens=count)


def read_shard(path: str | os.PathLike[str]) -> numpy.ndarray:
    """The tokens of an llm.c shard as a read-only uint16 memory map (checked first)."""
    header = read_shard_header(path)
    if header.tokens == 0:
        return numpy.empty(0, dtype=TOKEN_DTYPE)
    return numpy.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(header.tokens,))


def read_raw(path: str | os.PathLike[str]) -> numpy.ndarray:
    """The bytes of a raw file as a read-only uint8 memory map: one token per byte."""
    path = Path(path)
    if _file_size(path) == 0:
        return numpy.empty(0, dtype=numpy.uint8)
    return numpy.memmap(path, dtype=numpy.uint8, mode="r")


class Dataset:
    """A holder's token stream: shards or raw files in order, chunked by tokens, committed to by a digest."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        raw: bool = False,
        name: str = "dataset",
    ) -> None:
        if not paths:
            raise ShardError(f"dataset {name!r} names no files")
        self.name = name
        self.paths = [Path(p) for p in paths]
        self.raw = raw
        # Open (and so check) every file now: a bad file should fail
        # registration, not a hop halfway through the run.
        self._arrays = [read_raw(p) if raw else read_shard(p) for p in self.paths]
        self._starts = [0]
        for array in self._arrays:
            self._starts.append(self._starts[-1] + array.shape[0])
        self._digest: bytes | None = None
        self._max_token: int | None = None

    @property
    def total_tokens(self) -> int:
        """Tokens in all files together."""
        return self._starts[-1]

    def chunk_count(self, chunk_tokens: int) -> int:
        """How many chunks of ``chunk_tokens`` the stream makes (the last may be shorter)."""
        _check_chunk_tokens(chunk_tokens)
        return -(-self.total_tokens // chunk_tokens)

    def chunk(self, index: int, chunk_tokens: int) -> numpy.ndarray:
        """Chunk ``index`` as uint16: a view into one shard, or a copy where it spans files or comes from raw bytes."""
        count = self.chunk_count(chunk_tokens)
        if not 0 <= index < count:
            raise IndexError(f"chunk {index} out of range: dataset {self.name!r} has {count} chunks")
        start = index * chunk_tokens
        return self._tokens(start, min(start + chunk_tokens, self.total_tokens))

    def chunks(self, chunk_tokens: int) -> Iterator[tuple[int, numpy.ndarray]]:
        """Yield ``(index, tokens)`` for every chunk in order (see :meth:`chunk`)."""
        for index in range(self.chunk_count(chunk_tokens)):
            yield index, self.chunk(index, chunk_tokens)

    def digest(self) -> bytes:
        """BLAKE3 (32 bytes) of the whole token stream as uint16 little-endian; computed once."""
        if self._digest is None:
            self._scan()
        assert self._digest is not None
        return self._digest

    @property
    def max_token(self) -> int:
        """The largest token id in the stream (-1 when it is empty); computed once, with the digest."""
        if self._max_token is None:
            self._scan()
        assert self._max_token is not None
        return self._max_token

    def _scan(self) -> None:
        # One pass over the data for both: the digest commitment and the largest id
        # (what the orchestrator needs to refuse a misfit at registration).
        hasher = blake3.blake3()
        top = -1
        for array in self._arrays:
            for start in range(0, array.shape[0], _WIDEN_BLOCK):
                block = array[start : start + _WIDEN_BLOCK]
                if block.shape[0]:
                    top = max(top, int(block.max()))
                if block.dtype != TOKEN_DTYPE:
                    block = block.astype(TOKEN_DTYPE)
                hasher.update(memoryview(numpy.ascontiguousarray(block)).cast("B"))
        self._digest, self._max_token = hasher.digest(), top

    def manifest(self) -> dict[str, Any]:
        """What a holder registers with: name, size, token width, largest id and the digest commitment.

        The chunk size is the run's (the orchestrator derives the chunk count),
        so a holder never has to guess it.
        """
        return {
            "name": self.name,
            "total_tokens": self.total_tokens,
            "token_dtype": "uint16",
            "max_token": self.max_token,
            "digest_alg": "blake3",
            "digest": self.digest().hex(),
        }

    def _tokens(self, start: int, stop: int) -> numpy.ndarray:
        first = bisect.bisect_right(self._starts, start) - 1
        array = self._arrays[first]
        local = start - self._starts[first]
        if array.dtype == TOKEN_DTYPE and stop <= self._starts[first + 1]:
            return array[local : local + (stop - start)]
        out = numpy.empty(stop - start, dtype=TOKEN_DTYPE)
        filled = 0
        index = first
        while filled < out.shape[0]:
            array = self._arrays[index]
            piece = array[local : local + (out.shape[0] - filled)]
            out[filled : filled + piece.shape[0]] = piece
            filled += piece.shape[0]
            index += 1
            local = 0
        return out


def _check_chunk_tokens(chunk_tokens: int) -> None:
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")


def _file_size(path: Path) -> int:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ShardError(f"{path}: no such file") from None
    except OSError as err:
        raise ShardError(f"{path}: cannot read: {err.strerror}") from None
    if not path.is_file():
        raise ShardError(f"{path}: not a regular file")
    return stat.st_size
