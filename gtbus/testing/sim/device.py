"""The simulated device: staging buffers that hold segment records, hop keys, scrub state, the model's digest.

No bytes and no crypto: the AEAD is modelled by what it binds. A segment is a
record of the key it was sealed under and its associated data (epoch, holder,
index, total), plus two facts the device never reads and only the invariant
checker does: who really wrote it and whose plaintext it carries. Opening
accepts a segment exactly when real AES-GCM would: right key, right AAD.

The model is a digest chain: training on a chunk makes
``model = H(model, chunk)``; restoring a checkpoint sets it back. Anything else
that changes it (a tampering fault) is what the orchestrator's re-measure must
catch, and what :mod:`invariants` calls a violation if training proceeds.

Every operation the invariants care about is reported to :attr:`SimDevice.watch`.
"""

from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, Sequence

MASK = (1 << 64) - 1
#: The model's digest before any training.
INITIAL_MODEL = 0x5EED
MERGE_SEED = 0xA7E2


def chunk_tag(holder: str, chunk: int) -> int:
    """A stable number for one chunk's plaintext (stable across processes, unlike ``hash(str)``)."""
    return zlib.crc32(f"{holder}/{chunk}".encode())


def merged_model(models: Sequence[int]) -> int:
    """The digest of the average of replicas ``models`` (order does not matter; identical replicas average to themselves)."""
    distinct = sorted(set(models))
    if len(distinct) == 1:
        return distinct[0]
    x = MERGE_SEED
    for m in distinct:
        x = model_after(x, m)
    return x


def model_after(before: int, chunk: int) -> int:
    """The model digest after training on ``chunk`` (a :func:`chunk_tag`) from ``before``."""
    x = (before * 0x9E3779B97F4A7C15 + chunk + 1) & MASK
    x ^= x >> 29
    return (x * 0xBF58476D1CE4E5B9) & MASK


@dataclass(frozen=True, slots=True)
class Segment:
    """One AEAD segment as the device sees it (key, AAD) plus ground truth (writer, content)."""

    key: int
    epoch: int
    holder: str
    index: int
    total: int
    content: int  # chunk_tag of the plaintext; 0 for garbage
    writer: str  # who wrote it (never read by the device)


@dataclass(slots=True)
class Staging:
    """A hop's staging buffer."""

    sid: int
    epoch: int
    holder: str  # the granted holder (ground truth for the checker)
    key: int
    capacity: int  # segments
    segments: dict[int, Segment] = field(default_factory=dict)
    exported: bool = True
    scrubbed: bool = True
    released: bool = False
    mapped_by: set[str] = field(default_factory=set)  # mappings open now
    mappers: set[str] = field(default_factory=set)  # everyone who mapped it: they may map again while it is exported
    token: str = ""  # the id of the token (lane) whose grant it was staged for
    # Prepared ahead (gtbus.nodes.hop_prepare): exported to ``holder`` before its grant, which may never come.
    # ``granted_to`` is whom the grant that used it went to (the checker compares it with ``holder``).
    granted: bool = True
    granted_to: str = ""


@dataclass(frozen=True, slots=True)
class Opened:
    """Plaintext of one hop in the device's private buffer (what training reads)."""

    staging: Staging
    segments: tuple[Segment, ...]


class DeviceWatch(Protocol):
    """Who hears of the device's operations (the invariant checker)."""

    def staged(self, device: "SimDevice", staging: Staging) -> None:
        """A staging buffer was exported for a grant (or a prepared one is granted now)."""

    def trained(self, device: "SimDevice", opened: Opened, key: tuple[int, str, int], before: int) -> None:
        """The model was trained on ``opened`` for assignment ``key``; it was ``before``."""

    def restored(self, device: "SimDevice", model: int) -> None:
        """The model was set back to a saved digest."""


class SimDevice:
    """The GPU host's device: outlives the orchestrator process, as the card does."""

    def __init__(self, *, exports_outlive_process: bool = True) -> None:
        self.model: int | None = INITIAL_MODEL
        self.stagings: dict[int, Staging] = {}  # not yet released
        self.released_unscrubbed: list[Staging] = []  # for the checker: released without a scrub
        self.keys: set[int] = set()
        self.exports_outlive_process = exports_outlive_process
        # Ciphertext crosses the untrusted staging path: anyone there may have kept a copy.
        self.captured: deque[Segment] = deque(maxlen=16)
        self.watch: DeviceWatch | None = None
        # A fleet's lane: each replica trains with its own randomness, so two lanes training one chunk
        # from one model make two models (the checker tells their histories apart). Lane 0 is a lone device.
        self.lane = 0

    # -- staging ------------------------------------------------------------------------------

    def alloc_staging(self, sid: int, epoch: int, holder: str, key: int, capacity: int, *, token: str = "", prepared: bool = False) -> Staging:
        """A fresh staging buffer exported for one grant (of token ``token``), and the hop's key made live.

        ``prepared``: exported to ``holder`` ahead of a grant that may never come (epoch not known yet);
        :meth:`grant_prepared` grants it.
        """
        s = Staging(sid, epoch, holder, key, capacity, token=token, granted=not prepared)
        self.stagings[sid] = s
        self.keys.add(key)
        if not prepared and self.watch is not None:
            self.watch.staged(self, s)
        return s

    def grant_prepared(self, staging: Staging, epoch: int, holder: str) -> None:
        """A prepared staging leaves in the grant of ``epoch`` to ``holder``."""
        staging.epoch, staging.granted, staging.granted_to = epoch, True, holder
        if self.watch is not None:
            self.watch.staged(self, staging)

    def map(self, sid: int, who: str) -> Staging | None:
        """Map a staging export by its handle; None if it is not exported (revoked, released, unknown)."""
        s = self.stagings.get(sid)
        if s is None or not s.exported:
            return None
        s.mapped_by.add(who)
        s.mappers.add(who)
        return s

    def unmap(self, sid: int, who: str) -> None:
        """Close ``who``'s mapping."""
        s = self.stagings.get(sid)
        if s is not None:
            s.mapped_by.discard(who)

    def write(self, sid: int, seg: Segment, who: str, *, at: int | None = None) -> bool:
        """Write one segment through a mapping at slot ``at`` (default: the index it was sealed with);
        False if the export is gone, ``who`` never mapped it, or the slot is outside the buffer."""
        s = self.stagings.get(sid)
        if s is None or not s.exported or who not in s.mapped_by:
            return False
        slot = seg.index if at is None else at
        if not 0 <= slot < s.capacity:
            return False
        s.segments[slot] = seg
        self.captured.append(seg)
        s.scrubbed = False
        return True

    def truncate(self, sid: int, who: str, keep: int) -> bool:
        """A holder drops segments from ``keep`` on (what shrinking a buffer would do); False if refused."""
        s = self.stagings.get(sid)
        if s is None or not s.exported or who not in s.mapped_by:
            return False
        for i in [i for i in s.segments if i >= keep]:
            del s.segments[i]
        return True

    def open_segments(self, staging: Staging, key: int, epoch: int, holder: str, total: int) -> Opened | str:
        """Authenticate segments 0..total-1 as AEAD would; the plaintext, or why the lowest bad one failed."""
        if key not in self.keys:
            return "the hop key is gone"
        out = []
        segs = staging.segments
        for i in range(total):
            seg = segs.get(i)
            if seg is None:
                return f"segment {i} missing"
            if seg.key != key or seg.epoch != epoch or seg.holder != holder or seg.index != i or seg.total != total:
                return f"segment {i} did not authenticate"
            out.append(seg)
        return Opened(staging, tuple(out))

    def revoke_export(self, staging: Staging) -> None:
        """No handle of this staging maps again; mappings held are cut."""
        staging.exported = False
        staging.mapped_by.clear()

    def scrub(self, staging: Staging) -> None:
        """Zero the staging buffer (verified zero)."""
        staging.segments.clear()
        staging.scrubbed = True

    def release(self, staging: Staging) -> None:
        """Free the buffer; its export ends."""
        self.revoke_export(staging)
        staging.released = True
        if not staging.scrubbed:
            self.released_unscrubbed.append(staging)
        self.stagings.pop(staging.sid, None)

    def drop_key(self, key: int) -> None:
        """Forget a hop key."""
        self.keys.discard(key)

    def discard_export(self, sid: int) -> None:
        """A restarted orchestrator removes an export its dead process left behind."""
        s = self.stagings.get(sid)
        if s is not None:
            self.scrub(s)
            self.release(s)

    # -- model --------------------------------------------------------------------------------

    def measure(self) -> int | None:
        """The model's digest (what re-measurement compares)."""
        return self.model

    def train(self, opened: Opened, key: tuple[int, str, int]) -> None:
        """Train on an opened hop for assignment ``key`` = (round, holder, chunk)."""
        before = self.model
        assert before is not None, "training with no model loaded"
        model = before
        for seg in opened.segments:
            model = model_after(model, seg.content + (self.lane << 32))
        self.model = model
        if self.watch is not None:
            self.watch.trained(self, opened, key, before)

    def restore(self, model: int) -> None:
        """Load a saved model (a checkpoint, or the initial one)."""
        self.model = model
        if self.watch is not None:
            self.watch.restored(self, model)

    def process_died(self) -> None:
        """The orchestrator's process died: its keys and the loaded model go with it.

        Staging exports outlive it where the backend says so (a restart must
        discard them); otherwise the OS frees them (zeroed before any reuse).
        """
        self.keys.clear()
        self.model = None
        if not self.exports_outlive_process:
            for s in list(self.stagings.values()):
                self.scrub(s)
                self.release(s)


class SimHost:
    """The GPU host of a fleet, as holders and the device agent reach it: a staging handle opens on
    the device (lane) that exported it; what crossed the staging path is captured in one place."""

    def __init__(self, devices: Sequence[SimDevice]) -> None:
        self.devices = list(devices)
        self.captured: deque[Segment] = self.devices[0].captured
        for d in self.devices[1:]:
            d.captured = self.captured

    def _of(self, sid: int) -> SimDevice | None:
        return next((d for d in self.devices if sid in d.stagings), None)

    def map(self, sid: int, who: str) -> Staging | None:
        """Map a staging export by its handle, on whichever device holds it; None if none does."""
        d = self._of(sid)
        return d.map(sid, who) if d is not None else None

    def unmap(self, sid: int, who: str) -> None:
        """Close ``who``'s mapping."""
        d = self._of(sid)
        if d is not None:
            d.unmap(sid, who)

    def write(self, sid: int, seg: Segment, who: str, *, at: int | None = None) -> bool:
        """Write one segment through a mapping (see :meth:`SimDevice.write`)."""
        d = self._of(sid)
        return d.write(sid, seg, who, at=at) if d is not None else False

    def truncate(self, sid: int, who: str, keep: int) -> bool:
        """Drop segments from ``keep`` on (see :meth:`SimDevice.truncate`)."""
        d = self._of(sid)
        return d.truncate(sid, who, keep) if d is not None else False
