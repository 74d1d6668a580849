"""The orchestrator's staging pool on the real host device: fresh staging per hop, one private buffer reused, crash leftovers removed."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Iterator

import pytest

from gtbus.gpu.host import SHM_DIR, HostDevice
from gtbus.nodes.staging_pool import INFLIGHT_FILE, StagingPool


class OutlivingHostDevice(HostDevice):
    """The host device, declared to leave exports behind a killed process (as a backend with named exports does)."""

    exports_outlive_process = True


@pytest.fixture
def device() -> Iterator[HostDevice]:
    dev = HostDevice()
    yield dev
    dev.close()


def test_the_private_buffer_is_reused_only_when_it_fits(device: HostDevice, tmp_path: Path) -> None:
    pool = StagingPool(device, tmp_path)
    a = pool.take_private(4096)
    pool.keep_private(a)
    assert pool.take_private(4096) is a
    pool.keep_private(a)
    b = pool.take_private(8192)
    assert b is not a and b.nbytes == 8192
    pool.keep_private(b)
    pool.release_spares()
    assert pool.take_private(8192) is not b


def test_prepared_staging_is_fresh_and_used_once(device: HostDevice, tmp_path: Path) -> None:
    pool = StagingPool(device, tmp_path)
    first, h1 = pool.take_staging(1 << 16)
    pool.prepare_next(1 << 16)
    pool.prepare_next(1 << 16)  # already on its way: not a second one
    second, h2 = pool.take_staging(1 << 16)
    assert h2 != h1 and second is not first and second.nbytes == 1 << 16
    third, h3 = pool.take_staging(1 << 16)  # nothing prepared: a new one
    assert h3 not in (h1, h2)
    pool.prepare_next(1 << 16)
    fourth, h4 = pool.take_staging(1 << 17)  # prepared for another size: let go, a fitting one made
    assert fourth.nbytes == 1 << 17 and h4 not in (h1, h2, h3)
    for buf in (first, second, third, fourth):
        device.revoke_staging(buf)
        device.release(buf)
    pool.prepare_next(0)  # a ship hop needs no staging
    pool.release_spares()
    assert not (tmp_path / INFLIGHT_FILE).exists()  # exports of this backend end with the process


def test_live_exports_are_listed_privately_and_removed_after_a_crash(tmp_path: Path) -> None:
    dev = OutlivingHostDevice()
    try:
        pool = StagingPool(dev, tmp_path)
        buf, handle = pool.take_staging(4096)
        pool.prepare_next(4096)
        pool.take_private(64)
        listed = tmp_path / INFLIGHT_FILE
        pool.release_spares()  # the prepared staging goes, this hop's stays listed
        assert listed.read_text().split() == [str(handle)] and stat.S_IMODE(os.stat(listed).st_mode) == 0o600
        pool.track_export(str(handle), False)
        assert not listed.exists()
        dev.revoke_staging(buf)
        dev.release(buf)
    finally:
        dev.close()


def test_a_restart_discards_what_a_killed_process_left(tmp_path: Path) -> None:
    # What a process killed mid-hop leaves: a named export on disk, listed in the file.
    leftover = Path(SHM_DIR) / f"gtbus-hop-{secrets.token_hex(16)}"
    leftover.write_bytes(b"ciphertext")
    (tmp_path / INFLIGHT_FILE).write_text(leftover.name)
    dev = OutlivingHostDevice()
    try:
        StagingPool(dev, tmp_path).discard_inflight()
        assert not leftover.exists() and not (tmp_path / INFLIGHT_FILE).exists()
        StagingPool(dev, tmp_path).discard_inflight()  # nothing left: nothing to do
    finally:
        leftover.unlink(missing_ok=True)
        dev.close()


def test_a_private_buffer_prepared_ahead_is_the_first_hops_and_reads_zero(device: HostDevice, tmp_path: Path) -> None:
    pool = StagingPool(device, tmp_path)
    pool.prepare_private(1 << 16)
    buf = pool.take_private(1 << 16)
    assert device.verify_zero(buf)
    pool.keep_private(buf)
    pool.prepare_private(1 << 17)  # another size: the spare is let go and a fitting one made
    other = pool.take_private(1 << 17)
    assert other is not buf and other.nbytes == 1 << 17 and device.verify_zero(other)
    pool.keep_private(other)
    pool.release_spares()
