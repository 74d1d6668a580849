"""The per-hop encrypted channel: AEAD segments from a holder into device staging.

Rules this module keeps (DESIGN.md section 6):

- A hop has its own :class:`ChannelParams`: a fresh 256-bit key, a nonce prefix,
  the name of the one staging buffer exported for this hop, the plaintext
  capacity and the segment size. The orchestrator generates them and seals them
  to the holder (:mod:`gtbus.gpu.sealing`); they are never reused.
- Plaintext is cut into segments of ``segment_size`` bytes (the last may be
  short). Segment ``i`` is sealed with nonce ``prefix || u64be(i)`` and the
  associated data of :class:`SegmentContext`, which binds run id, epoch, holder,
  index and total count. Reordering, truncation, and replay of a segment into
  another hop, holder or run therefore all fail authentication.
- Every hop carries at least one segment, even with zero bytes of data, so that
  an empty hop still proves the writer held this hop's key.
- Staging layout: segment ``i`` starts at ``i * (segment_size + 16)`` and holds
  its ciphertext followed by its 16-byte tag. Nothing else is in staging.
- The device side never leaves unauthenticated plaintext behind: if any segment
  fails, the whole output buffer is scrubbed before the error is raised.

Bulk work uses ``cryptography``'s ``encrypt_into``/``decrypt_into``, which write
into caller memory and release the GIL, so segments are spread over a thread
pool with no per-segment allocation of payload-sized buffers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Final

import blake3
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from gtbus.errors import ChannelError

AES_256_GCM: Final = "aes-256-gcm"
CHACHA20_POLY1305: Final = "chacha20-poly1305"
SUITES: Final = (AES_256_GCM, CHACHA20_POLY1305)

KEY_SIZE: Final = 32
NONCE_PREFIX_SIZE: Final = 4
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
MIN_SEGMENT_SIZE: Final = 1
MAX_SEGMENT_SIZE: Final = 4 << 20
DEFAULT_SEGMENT_SIZE: Final = 1 << 20
# Far above any hop gtbus runs (the paper's largest chunk is 512 MiB), small
# enough that a forged capacity cannot make anyone size a buffer absurdly.
MAX_CAPACITY: Final = 1 << 40
MAX_HANDLE_LENGTH: Final = 255

SEGMENT_DOMAIN: Final = b"gtbus/segment/v1"

# Below this much payload the thread hand-off costs more than it saves; the
# 0-byte hop must stay well inside the 5 ms control budget.
_PARALLEL_MIN_BYTES: Final = 2 << 20

_WIRE_FIELDS: Final = frozenset(
    {"suite", "key", "nonce_prefix", "buffer_handle", "capacity", "segment_size"}
)

Buffer = Any
"""Anything exposing the buffer protocol over C-contiguous memory (bytes, memoryview, ndarray, mmap)."""


def segment_count(nbytes: int, segment_size: int) -> int:
    """Number of segments that carry ``nbytes`` of plaintext (at least one)."""
    if nbytes < 0:
        raise ChannelError(f"nbytes must be >= 0, got {nbytes}")
    return max(1, -(-nbytes // segment_size))


def staging_size(nbytes: int, segment_size: int) -> int:
    """Bytes of staging that ``nbytes`` of plaintext occupy once sealed."""
    return nbytes + TAG_SIZE * segment_count(nbytes, segment_size)


def segment_bounds(index: int, nbytes: int, segment_size: int) -> tuple[int, int, int]:
    """``(plaintext_offset, staging_offset, plaintext_length)`` of segment ``index``."""
    start = index * segment_size
    return start, index * (segment_size + TAG_SIZE), max(0, min(segment_size, nbytes - start))


def _check_bytes(name: str, value: object, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise ChannelError(f"channel params: {name} must be {size} bytes")
    return value


def _check_int(name: str, value: object, low: int, high: int) -> int:
    # bool is an int subclass; a True capacity is a bug, not a 1.
    if type(value) is not int or not low <= value <= high:
        raise ChannelError(f"channel params: {name} must be an integer in [{low}, {high}]")
    return value


@dataclass(frozen=True)
class ChannelParams:
    """Everything a holder needs to write one hop: travels sealed inside a grant."""

    buffer_handle: str
    capacity: int
    key: bytes = field(repr=False)
    nonce_prefix: bytes
    suite: str = AES_256_GCM
    segment_size: int = DEFAULT_SEGMENT_SIZE

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ChannelError(f"channel params: suite must be one of {', '.join(SUITES)}")
        _check_bytes("key", self.key, KEY_SIZE)
        _check_bytes("nonce_prefix", self.nonce_prefix, NONCE_PREFIX_SIZE)
        if (
            not isinstance(self.buffer_handle, str)
            or not 0 < len(self.buffer_handle) <= MAX_HANDLE_LENGTH
            or not self.buffer_handle.isprintable()
        ):
            raise ChannelError(
                f"channel params: buffer_handle must be 1..{MAX_HANDLE_LENGTH} printable characters"
            )
        _check_int("capacity", self.capacity, 0, MAX_CAPACITY)
        _check_int("segment_size", self.segment_size, MIN_SEGMENT_SIZE, MAX_SEGMENT_SIZE)

    @classmethod
    def generate(
        cls,
        buffer_handle: str,
        capacity: int,
        *,
        suite: str = AES_256_GCM,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
    ) -> ChannelParams:
        """Fresh params for one hop: new random key and nonce prefix from the OS CSPRNG."""
        return cls(
            buffer_handle=buffer_handle,
            capacity=capacity,
            key=secrets.token_bytes(KEY_SIZE),
            nonce_prefix=secrets.token_bytes(NONCE_PREFIX_SIZE),
            suite=suite,
            segment_size=segment_size,
        )

    @property
    def staging_bytes(self) -> int:
        """Size of the staging buffer a hop of full capacity needs."""
        return staging_size(self.capacity, self.segment_size)

    def to_wire(self) -> dict[str, str | bytes | int]:
        """A plain dict of msgpack-able values (bytes stay bytes)."""
        return {
            "suite": self.suite,
            "key": self.key,
            "nonce_prefix": self.nonce_prefix,
            "buffer_handle": self.buffer_handle,
            "capacity": self.capacity,
            "segment_size": self.segment_size,
        }

    @classmethod
    def from_wire(cls, wire: object) -> ChannelParams:
        """Rebuild params from :meth:`to_wire` output; every field is checked."""
        if not isinstance(wire, dict):
            raise ChannelError("channel params: expected a map")
        missing = sorted(_WIRE_FIELDS - wire.keys())
        if missing:
            raise ChannelError(f"channel params: missing field {missing[0]}")
        extra = sorted(str(k) for k in wire.keys() - _WIRE_FIELDS)
        if extra:
            raise ChannelError(f"channel params: unknown field {extra[0]!r}")
        if not isinstance(wire["suite"], str):
            raise ChannelError(f"channel params: suite must be one of {', '.join(SUITES)}")
        return cls(
            buffer_handle=wire["buffer_handle"],
            capacity=wire["capacity"],
            key=wire["key"],
            nonce_prefix=wire["nonce_prefix"],
            suite=wire["suite"],
            segment_size=wire["segment_size"],
        )

    def nonce(self, index: int) -> bytes:
        """The 96-bit nonce of segment ``index``."""
        return self.nonce_prefix + index.to_bytes(8, "big")


@dataclass(frozen=True)
class SegmentContext:
    """What the associated data of every segment of one hop binds."""

    run_id: str
    epoch: int
    holder: str
    count: int
    _prefix: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        run = _encode_name("run_id", self.run_id)
        holder = _encode_name("holder", self.holder)
        if type(self.epoch) is not int or not 0 <= self.epoch < 1 << 64:
            raise ChannelError("segment context: epoch must be an integer in [0, 2**64)")
        if type(self.count) is not int or not 1 <= self.count < 1 << 64:
            raise ChannelError("segment context: count must be an integer in [1, 2**64)")
        prefix = (
            SEGMENT_DOMAIN
            + struct.pack(">H", len(run)) + run
            + struct.pack(">H", len(holder)) + holder
            + struct.pack(">Q", self.epoch)
        )
        object.__setattr__(self, "_prefix", prefix)

    def associated_data(self, index: int) -> bytes:
        """AAD of segment ``index``: tag, len-prefixed run id and holder, epoch, index, count."""
        if not 0 <= index < self.count:
            raise ChannelError(f"segment index {index} outside [0, {self.count})")
        return self._prefix + struct.pack(">QQ", index, self.count)


def _encode_name(what: str, value: object) -> bytes:
    if not isinstance(value, str) or not value:
        raise ChannelError(f"segment context: {what} must be a non-empty string")
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ChannelError(f"segment context: {what} longer than 65535 bytes")
    return raw


class SegmentCipher:
    """One AEAD key applied to single segments, writing into caller memory.

    This is the primitive the sealer and opener loop over, and the one the
    Wycheproof conformance tests drive with arbitrary nonces and AAD.
    """

    def __init__(self, suite: str, key: bytes) -> None:
        _check_bytes("key", key, KEY_SIZE)
        if suite == AES_256_GCM:
            self._aead: AESGCM | ChaCha20Poly1305 = AESGCM(key)
        elif suite == CHACHA20_POLY1305:
            self._aead = ChaCha20Poly1305(key)
        else:
            raise ChannelError(f"unknown AEAD suite {suite!r}")
        self.suite = suite

    def seal_segment(self, nonce: bytes, plaintext: Buffer, aad: bytes, out: Buffer) -> None:
        """Write ``ciphertext || tag`` of ``plaintext`` into ``out`` (exactly len+16 bytes)."""
        try:
            self._aead.encrypt_into(nonce, plaintext, aad, out)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ChannelError(f"segment seal failed: {exc}") from None

    def open_segment(self, nonce: bytes, sealed: Buffer, aad: bytes, out: Buffer) -> None:
        """Authenticate ``sealed`` (ciphertext || tag) and write its plaintext into ``out``.

        On failure ``out`` may hold unauthenticated bytes; callers scrub it.
        """
        try:
            self._aead.decrypt_into(nonce, sealed, aad, out)
        except InvalidTag:
            raise ChannelError("segment did not authenticate") from None
        except (ValueError, TypeError, OverflowError) as exc:
            raise ChannelError(f"segment open failed: {exc}") from None


@dataclass(frozen=True)
class SealSummary:
    """What a holder reports in its TokenReturn after writing a hop."""

    count: int
    nbytes: int
    ciphertext_digest: bytes


def ciphertext_digest(staging: Buffer, nbytes: int, segment_size: int) -> bytes:
    """BLAKE3 over exactly the staging bytes that ``nbytes`` of plaintext occupy."""
    size = staging_size(nbytes, segment_size)
    threads = blake3.blake3.AUTO if size >= _PARALLEL_MIN_BYTES else 1
    with _byte_view(staging, "staging") as view:
        if len(view) < size:
            raise ChannelError(f"staging holds {len(view)} bytes, {size} claimed")
        return blake3.blake3(view[:size], max_threads=threads).digest()


class SegmentSealer:
    """Holder side: seals one hop's plaintext into staging. Single use.

    A second :meth:`seal_into` with the same params would reuse (key, nonce)
    pairs, which breaks GCM and Poly1305 outright, so it is refused.
    """

    def __init__(self, params: ChannelParams) -> None:
        self.params = params
        self._cipher = SegmentCipher(params.suite, params.key)
        self._used = False
        self._lock = threading.Lock()

    def seal_into(self, plaintext: Buffer, staging: Buffer, ctx: SegmentContext) -> SealSummary:
        """Encrypt ``plaintext`` segment by segment straight into ``staging``."""
        seg = self.params.segment_size
        src = _byte_view(plaintext, "plaintext")
        dst = _byte_view(staging, "staging")
        nbytes = len(src)
        if nbytes > self.params.capacity:
            raise ChannelError(f"plaintext of {nbytes} bytes exceeds hop capacity {self.params.capacity}")
        count = segment_count(nbytes, seg)
        if ctx.count != count:
            raise ChannelError(f"context says {ctx.count} segments, {nbytes} bytes need {count}")
        if dst.readonly:
            raise ChannelError("staging is read-only")
        if len(dst) < staging_size(nbytes, seg):
            raise ChannelError(f"staging holds {len(dst)} bytes, {staging_size(nbytes, seg)} needed")
        with self._lock:
            if self._used:
                raise ChannelError("these channel params already sealed a hop; nonces would repeat")
            self._used = True

        cipher, nonce = self._cipher, self.params.nonce

        def seal_range(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                p, s, n = segment_bounds(i, nbytes, seg)
                cipher.seal_segment(nonce(i), src[p : p + n], ctx.associated_data(i), dst[s : s + n + TAG_SIZE])

        try:
            _split_over_cores(count, nbytes, seal_range)
            return SealSummary(count, nbytes, ciphertext_digest(dst, nbytes, seg))
        finally:
            _release(src, dst)


class SegmentOpener:
    """Device side (CPU): authenticates and decrypts one hop's staging into a private buffer."""

    def __init__(self, params: ChannelParams) -> None:
        self.params = params
        self._cipher = SegmentCipher(params.suite, params.key)

    def open_into(
        self, staging: Buffer, out: Buffer, ctx: SegmentContext, count: int, nbytes: int, *, private_copy: bool = False
    ) -> None:
        """Decrypt all ``count`` segments into ``out[:nbytes]``.

        The claims (count, nbytes, context, capacity, buffer sizes) are checked
        before anything is decrypted. If any segment fails, ``out`` is zeroed
        and :class:`ChannelError` names the lowest failing index.
        ``private_copy``: copy each segment out of staging before opening it
        (for staging that parties without the key can write; see below).
        """
        seg = self.params.segment_size
        src = _byte_view(staging, "staging")
        dst = _byte_view(out, "output")
        if type(nbytes) is not int or not 0 <= nbytes <= self.params.capacity:
            raise ChannelError(f"claimed {nbytes} bytes, hop capacity is {self.params.capacity}")
        expected = segment_count(nbytes, seg)
        if count != expected or ctx.count != expected:
            raise ChannelError(
                f"claimed {count} segments (context {ctx.count}), {nbytes} bytes make {expected}"
            )
        if len(src) < staging_size(nbytes, seg):
            raise ChannelError(f"staging holds {len(src)} bytes, {staging_size(nbytes, seg)} claimed")
        if dst.readonly or len(dst) < nbytes:
            raise ChannelError(f"output must be writable and hold {nbytes} bytes")

        # Without ``private_copy`` segments are authenticated and decrypted
        # straight out of staging: right where only the key's holder can write
        # it, who can produce any authenticated plaintext anyway. A backend
        # whose staging is writable by parties without the key (the device
        # agent, for one) must ask for the private copy.
        cipher, nonce = self._cipher, self.params.nonce
        first_bad: list[int] = []  # guarded by lock; lowest failing index so far
        lock = threading.Lock()

        def open_range(lo: int, hi: int) -> None:
            copy = memoryview(bytearray(seg + TAG_SIZE)) if private_copy else None
            for i in range(lo, hi):
                # Segments past a known failure cannot change the verdict;
                # segments before it still must run to find the lowest one.
                if first_bad and i > first_bad[0]:
                    return
                p, s, n = segment_bounds(i, nbytes, seg)
                sealed = src[s : s + n + TAG_SIZE]
                if copy is not None:
                    # The AEAD reads its input twice (tag, then plaintext): from
                    # shared memory a concurrent writer could change the bytes in
                    # between. A private copy makes both reads see the same bytes.
                    copy[: n + TAG_SIZE] = sealed
                    sealed = copy[: n + TAG_SIZE]
                try:
                    cipher.open_segment(nonce(i), sealed, ctx.associated_data(i), dst[p : p + n])
                except ChannelError:
                    with lock:
                        if not first_bad or i < first_bad[0]:
                            first_bad[:] = [i]
                    return

        try:
            try:
                _split_over_cores(count, nbytes, open_range)
            except BaseException:
                _zero(dst)
                raise
            if first_bad:
                _zero(dst)
                raise ChannelError(
                    f"segment {first_bad[0]} of {count} did not authenticate "
                    f"(run {ctx.run_id!r}, epoch {ctx.epoch}, holder {ctx.holder!r})"
                )
        finally:
            _release(src, dst)


def _byte_view(obj: Buffer, what: str) -> memoryview:
    try:
        view = memoryview(obj)
    except TypeError:
        raise ChannelError(f"{what} does not expose a buffer") from None
    if not view.c_contiguous:
        raise ChannelError(f"{what} must be C-contiguous memory")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _release(*views: memoryview) -> None:
    # A traceback that outlives the call keeps its frame's locals alive; an
    # unreleased view would then pin a shared mapping, and the caller could
    # neither unmap nor revoke it while handling the error.
    for view in views:
        with contextlib.suppress(BufferError):
            view.release()


def _zero(view: memoryview) -> None:
    if len(view):
        np.frombuffer(view, dtype=np.uint8).fill(0)


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, _cores() - 1), thread_name_prefix="gtbus-aead")
        return _pool


def _forget_pool_after_fork() -> None:
    # A forked child inherits the executor object but none of its threads.
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _split_over_cores(count: int, nbytes: int, work: Callable[[int, int], None]) -> None:
    """Run ``work(lo, hi)`` over contiguous index ranges, one per core.

    The calling thread takes the first range itself. Returns only after every
    range has finished, so a caller that scrubs afterwards races no writer.
    """
    workers = min(_cores(), count) if nbytes >= _PARALLEL_MIN_BYTES else 1
    if workers <= 1:
        work(0, count)
        return
    bounds = [count * k // workers for k in range(workers + 1)]
    pool = _executor()
    futures: list[Future[None]] = [pool.submit(work, bounds[k], bounds[k + 1]) for k in range(1, workers)]
    try:
        work(bounds[0], bounds[1])
    finally:
        wait(futures)
    for fut in futures:
        fut.result()
