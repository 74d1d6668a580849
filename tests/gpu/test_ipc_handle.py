"""The cupy backend's staging handle, parsed where there is no GPU: it names its GPU by PCI bus id, and refuses anything else in one line.

What a real GPU adds (the holder opening the handle on the GPU it names, an
unknown bus id) is in test_cupy_backend.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gtbus.errors import DeviceError
from gtbus.gpu.channel import MAX_CAPACITY
from gtbus.gpu.ipc_handle import HANDLE_PREFIX, IPC_HANDLE_BYTES, MAX_STAGING_BYTES, IpcStagingHandle, canonical_bus_id

RAW = bytes(range(IPC_HANDLE_BYTES))
GOOD = f"{HANDLE_PREFIX}0000:1b:00.0-200000-{RAW.hex()}"


def test_a_handle_round_trips_and_names_its_gpu_by_bus_id() -> None:
    parsed = IpcStagingHandle.parse(GOOD)
    assert (parsed.bus_id, parsed.nbytes, parsed.raw) == ("0000:1b:00.0", 0x200000, RAW)
    assert str(parsed) == GOOD
    # nvidia-smi spells domains with 8 digits and upper case; handles carry CUDA's, lower-cased.
    assert canonical_bus_id("00000000:1B:00.0") == "00000000:1b:00.0"
    assert IpcStagingHandle.parse(str(IpcStagingHandle("00000000:1b:00.0", 1, RAW))).bus_id == "00000000:1b:00.0"


@pytest.mark.parametrize("handle", [
    7, None, b"cuda-ipc-", "", "../etc/passwd",
    f"{HANDLE_PREFIX}200000-{RAW.hex()}",  # the format before bus ids: no GPU named
    f"{HANDLE_PREFIX}0000:1b:00.0-200000-{RAW.hex()[:-2]}",  # a byte short
    f"{HANDLE_PREFIX}0000:1b:00.0-200000-{RAW.hex()}00",  # a byte over
    f"{HANDLE_PREFIX}0000:1b:00.0-200000-{RAW.hex()[:-1]}g",  # not hex
    f"{HANDLE_PREFIX}0000:1b:00.0-200000-{RAW.hex().upper()}",  # not canonical
    f"{HANDLE_PREFIX}0000:1B:00.0-200000-{RAW.hex()}",
    f"{HANDLE_PREFIX}0:1b:00.0-200000-{RAW.hex()}",  # domain too short
    f"{HANDLE_PREFIX}0000:1b:00.8-200000-{RAW.hex()}",  # function out of range
    f"{HANDLE_PREFIX}0000:1b:00-200000-{RAW.hex()}",  # field missing
    f"{HANDLE_PREFIX}0000:1b:00.0-200000-extra-{RAW.hex()}",  # field too many
    f"{HANDLE_PREFIX}0000:1b:00.0--200000-{RAW.hex()}",  # negative size
    f"{HANDLE_PREFIX}0000:1b:00.0-{'f' * 17}-{RAW.hex()}",  # size past 64 bits
    f"{HANDLE_PREFIX}0000:1b:00.0-200000-{RAW.hex()}\n",
    f" {GOOD}",
    "host-memfd:" + GOOD[len(HANDLE_PREFIX):],
])
def test_malformed_handles_are_refused_in_one_line_without_echoing_them(handle: object) -> None:
    with pytest.raises(DeviceError) as err:
        IpcStagingHandle.parse(handle)
    text = str(err.value)
    assert "\n" not in text and RAW.hex() not in text and "not a CUDA staging handle" in text


@pytest.mark.parametrize("nbytes", [0, MAX_STAGING_BYTES + 1, (1 << 64) - 1])
def test_sizes_no_channel_can_need_are_refused(nbytes: int) -> None:
    # The size sizes the holder's view of the mapping: it is bounded before anything is opened.
    handle = f"{HANDLE_PREFIX}0000:1b:00.0-{nbytes:x}-{RAW.hex()}"
    with pytest.raises(DeviceError, match="staging handle names"):
        IpcStagingHandle.parse(handle)
    assert IpcStagingHandle.parse(f"{HANDLE_PREFIX}0000:1b:00.0-{MAX_STAGING_BYTES:x}-{RAW.hex()}").nbytes > MAX_CAPACITY


def test_fields_are_checked_when_a_handle_is_made_too() -> None:
    with pytest.raises(DeviceError, match="PCI bus id"):
        IpcStagingHandle("1b:00.0", 1, RAW)
    with pytest.raises(DeviceError, match="64 bytes"):
        IpcStagingHandle("0000:1b:00.0", 1, RAW[:-1])


@given(st.text(max_size=300))
def test_no_text_parses_unless_it_is_exactly_a_handle(text: str) -> None:
    try:
        parsed = IpcStagingHandle.parse(text)
    except DeviceError as exc:
        assert "\n" not in str(exc)
    else:
        assert str(parsed) == text
