"""The cupy backend's staging handle: what a CUDA IPC export is called inside a sealed grant.

Format (ASCII, one line)::

    cuda-ipc-<PCI bus id>-<size, hex>-<cudaIpcMemHandle_t, 128 hex digits>

e.g. ``cuda-ipc-0000:1b:00.0-200000-<128 hex>``. Rules the parser keeps:

* The GPU is named by its PCI bus id (``domain:bus:device.function``), never
  by its ordinal: ``CUDA_VISIBLE_DEVICES`` may number the GPUs differently in
  the holder's process than in the orchestrator's, and an IPC handle opens
  only on the device that owns the memory. The holder finds its ordinal for
  that bus id with ``cudaDeviceGetByPCIBusId``.
* The size is what the holder may write, at most :data:`MAX_STAGING_BYTES`
  (the largest staging any valid channel needs); it sizes the holder's view of
  the mapping, so an absurd one is refused before anything is opened.
* Anything else (another prefix, a missing or extra field, a non-hex digit,
  upper case, surrounding whitespace, the older handle without a bus id) is
  refused whole, with one line that never repeats the handle: a handle is a
  capability and does not belong in logs.

Pure: no CUDA here, so hostile handles are tested where there is no GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from gtbus.errors import DeviceError
from gtbus.gpu.channel import MAX_CAPACITY, MIN_SEGMENT_SIZE, staging_size

HANDLE_PREFIX: Final = "cuda-ipc-"
IPC_HANDLE_BYTES: Final = 64  # sizeof(cudaIpcMemHandle_t)
MAX_STAGING_BYTES: Final = staging_size(MAX_CAPACITY, MIN_SEGMENT_SIZE)
"""The largest staging a valid channel can need: ChannelParams' largest capacity in the smallest segments."""
_BUS_ID: Final = r"[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]"
_HANDLE_RE: Final = re.compile(
    re.escape(HANDLE_PREFIX) + rf"({_BUS_ID})-([0-9a-f]{{1,16}})-([0-9a-f]{{{2 * IPC_HANDLE_BYTES}}})"
)


@dataclass(frozen=True)
class IpcStagingHandle:
    """A parsed staging handle: which GPU, how many bytes, and the IPC handle proper."""

    bus_id: str
    nbytes: int
    raw: bytes

    def __post_init__(self) -> None:
        if not re.fullmatch(_BUS_ID, self.bus_id):
            raise DeviceError(f"not a PCI bus id: {self.bus_id!r}")
        if not 0 < self.nbytes <= MAX_STAGING_BYTES:
            raise DeviceError(f"staging handle names {self.nbytes} bytes (1..{MAX_STAGING_BYTES} allowed)")
        if len(self.raw) != IPC_HANDLE_BYTES:
            raise DeviceError(f"a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes, got {len(self.raw)}")

    def __str__(self) -> str:
        return f"{HANDLE_PREFIX}{self.bus_id}-{self.nbytes:x}-{self.raw.hex()}"

    @classmethod
    def parse(cls, handle: object) -> IpcStagingHandle:
        """The handle's fields, or DeviceError (one line, without the handle's text) for anything malformed."""
        match = _HANDLE_RE.fullmatch(handle) if isinstance(handle, str) else None
        if match is None:
            raise DeviceError("not a CUDA staging handle (cuda-ipc-<PCI bus id>-<size>-<IPC handle>)")
        return cls(match[1], int(match[2], 16), bytes.fromhex(match[3]))


def canonical_bus_id(bus_id: str) -> str:
    """``bus_id`` as handles carry it (lower case): CUDA spells hex digits either way."""
    return bus_id.strip().lower()
