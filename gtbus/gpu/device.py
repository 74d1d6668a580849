"""The device interface every backend implements (host now, cupy next).

Protocol code never touches memory itself: it asks a :class:`Device` for
buffers and hands them back. The rules a backend keeps:

- Private buffers (the model, a hop's data buffer) are never exportable; they
  have no handle, and nothing outside the device's owner can map them.
- A hop's staging buffer is fresh: allocated for that one hop, exported under a
  new unguessable handle, and revoked when the hop ends so that the handle can
  never be mapped again. Staging only ever holds ciphertext.
- Nothing the device maps can be shrunk, grown or replaced by a holder. A
  holder may write anything into its own staging at any time, keep its mapping
  past the hop, or never map it at all; the worst outcome of any of these is
  that its own hop is refused. The device never faults, stalls or sizes
  anything on what a holder did to staging, and authenticates exactly the
  bytes it decrypts even while a holder writes.
- Plaintext appears only in private buffers, and only after every segment has
  authenticated (:meth:`Device.open_segments`).
- At the end of a hop the data buffer is scrubbed, verified to read zero, and
  released.

Two sides, two interfaces:

- :class:`Device`, the orchestrator's side: it owns the memory (allocates,
  exports and revokes staging, opens segments, scrubs, measures).
- :class:`HolderStaging`, the side of any process that writes one hop's
  staging (a local holder, the device agent): it has no Device instance and
  reaches the buffer only by handle, as a :class:`StagingWriter`. A backend's
  device class also answers for its holder side (``HostDevice`` is a
  ``HostStaging``), so one name per backend picks both.

A :class:`StagingWriter` writes ciphertext two ways, both production paths: a
local holder seals its plaintext straight into staging (:meth:`StagingWriter.seal_into`);
the device agent writes remote holders' segments, which it cannot read or
seal, at offsets it fixes (:meth:`StagingWriter.write_ciphertext`). Reading
staging back is for drills only.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any, NewType, Protocol, runtime_checkable

from gtbus.errors import DeviceError
from gtbus.gpu.channel import ChannelParams, SealSummary, SegmentContext

BufferHandle = NewType("BufferHandle", str)
"""Backend-specific name of an exported staging buffer; knowing it is the capability to map it."""


def check_staging_write(staging_bytes: int, offset: object, length: int) -> int:
    """``offset`` if ``length`` bytes written there lie inside the staging buffer, else DeviceError."""
    # The offset may come from a peer (the device agent's segment index): it is
    # checked against the mapping's real size, not against what anyone claimed.
    if type(offset) is not int or not 0 <= offset <= staging_bytes - length:
        raise DeviceError(f"{length} bytes at offset {offset!r} do not fit {staging_bytes} bytes of staging")
    return offset


@runtime_checkable
class DeviceBuffer(Protocol):
    """A region of device memory owned by one Device."""

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        ...

    @property
    def handle(self) -> BufferHandle | None:
        """The export handle of a staging buffer; ``None`` for private buffers."""
        ...


class StagingWriter(Protocol):
    """A writable mapping of one hop's staging buffer, obtained by handle (:meth:`HolderStaging.map_staging`)."""

    @property
    def nbytes(self) -> int:
        """Size of the mapped staging buffer."""
        ...

    def seal_into(self, plaintext: memoryview, params: ChannelParams, ctx: SegmentContext) -> SealSummary:
        """Seal the plaintext segment by segment into the staging buffer (once per hop)."""
        ...

    def write_ciphertext(self, offset: int, data: bytes) -> None:
        """Write ciphertext sealed elsewhere at ``offset`` (the device agent's path for remote holders).

        The writer cannot check the bytes (it has no key; the device
        authenticates them), only where they go: DeviceError unless ``offset``
        and ``data`` lie wholly inside the mapping's real size, whatever any
        peer announced.
        """
        ...

    def read_back(self, nbytes: int) -> bytes:
        """Read the first ``nbytes`` of staging back (failure drills only)."""
        ...

    def close(self) -> None:
        """Unmap; the holder must not keep a mapping past its token return."""
        ...


class HolderStaging(Protocol):
    """The side of a backend a staging writer uses: no device, only handles."""

    @classmethod
    def prepare_holder(cls, capacity: int) -> None:
        """Holder side, once at start: make this process ready to write hops of ``capacity`` bytes.

        Whatever is slow to set up (a CUDA context, a pinned host pool) is paid
        here, not inside the first hop.
        """
        ...

    @classmethod
    def map_staging(cls, handle: BufferHandle | str) -> StagingWriter:
        """Holder side, any process: map a staging buffer by handle.

        DeviceError if the hop is over (revoked or released): at once on the host
        backend, at the first use of the mapping on cupy, where IPC handles open
        in the background while sealing starts.
        """
        ...

    @staticmethod
    def unmap(mapping: StagingWriter) -> None:
        """Holder side: drop a mapping made by :meth:`map_staging`."""
        ...


class Device(Protocol):
    """One accelerator (or its host emulation) holding the model for a run: the orchestrator's side."""

    name: str
    """Backend name: ``"host"`` or ``"cupy"``."""

    device_id: str
    """Identity of this device instance, bound into every measurement report."""

    array_module: ModuleType
    """``numpy`` or ``cupy``: the module that works on :meth:`as_array` views."""

    exports_outlive_process: bool
    """True if a staging export can outlive the process that made it.

    Only then must a node record its live handles, so that a restart after a
    crash can remove them (:meth:`discard_export`).
    """

    frees_staging_while_mapped: bool
    """True if staging may be freed while a holder's process still maps it (host: the memfd lives on in
    that mapping). False on cupy: freeing memory another process holds open by an IPC handle is undefined
    in CUDA, so a staging a holder may still map is kept until it is known to have let go."""

    def alloc(self, nbytes: int) -> DeviceBuffer:
        """A zeroed private buffer; it can never be exported."""
        ...

    def alloc_hop_staging(self, nbytes: int) -> tuple[DeviceBuffer, BufferHandle]:
        """A fresh staging buffer exported for exactly one hop, and its handle."""
        ...

    def discard_export(self, handle: BufferHandle | str) -> None:
        """Remove a staging export left behind by a process that died mid-hop (nothing if gone).

        Needed only where :attr:`exports_outlive_process`; elsewhere it removes
        what older versions may have left, or does nothing.
        """
        ...

    def revoke_staging(self, buf: DeviceBuffer) -> None:
        """Unexport and free a staging buffer; its handle never maps again."""
        ...

    def open_segments(
        self,
        staging: DeviceBuffer,
        out: DeviceBuffer,
        params: ChannelParams,
        ctx: SegmentContext,
        count: int,
        nbytes: int,
    ) -> None:
        """Authenticate and decrypt a hop's segments from staging into a private buffer.

        Raises ChannelError (with ``out`` scrubbed) if any segment fails.
        """
        ...

    def scrub(self, buf: DeviceBuffer) -> None:
        """Overwrite the whole buffer with zeros.

        A staging buffer is then let go of: its holder may still write it, so
        the device reads none of it again (a second scrub does nothing).
        """
        ...

    def verify_zero(self, buf: DeviceBuffer) -> bool:
        """True if every byte of the buffer the device can read is zero (of scrubbed staging: none)."""
        ...

    def release(self, buf: DeviceBuffer) -> None:
        """Free a buffer (revoking it first if it is staging); later use raises DeviceError."""
        ...

    def measure(self, *parts: Any) -> bytes:
        """32-byte BLAKE3 model measurement of buffers or arrays, in order."""
        ...

    def as_array(self, buf: DeviceBuffer, dtype: Any) -> Any:
        """A flat array view of a private buffer, for training code."""
        ...

    def active(self) -> AbstractContextManager[Any]:
        """A context in which work outside the device (a trainer's steps on its replica) runs on this device.

        cupy: the device's GPU made current on the calling thread (cupy
        allocates and launches on the current GPU, kept per thread), so that a
        lane's replica lives on its lane's GPU; host: nothing to do.
        """
        ...
