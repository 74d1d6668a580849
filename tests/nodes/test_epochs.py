"""Epoch reservation on disk: blocks, never reused across restarts, the resume rule, bad files in one line."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gtbus.errors import ConfigError
from gtbus.nodes.epochs import EPOCH_BLOCK, EpochReservation


def test_a_block_is_written_once_and_covers_its_epochs(tmp_path: Path) -> None:
    path = tmp_path / "epoch"
    r = EpochReservation(path)
    assert r.reserved_upto == 0 and not path.exists()
    r.reserve(1)
    assert path.read_text() == f"{EPOCH_BLOCK}\n" and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    before = os.stat(path).st_ino
    for e in range(2, EPOCH_BLOCK + 1):
        r.reserve(e)
    assert os.stat(path).st_ino == before  # no write inside the block (each write is a fresh file renamed in)
    r.reserve(EPOCH_BLOCK + 1)
    assert path.read_text() == f"{2 * EPOCH_BLOCK}\n" and r.reserved_upto == 2 * EPOCH_BLOCK


def test_a_restart_starts_above_everything_reserved(tmp_path: Path) -> None:
    path = tmp_path / "epoch"
    first = EpochReservation(path, block=8)
    for e in (1, 2, 3):  # the process issues 1..3, then dies
        first.reserve(e)
    second = EpochReservation(path, block=8)
    assert second.reserved_upto == 8  # epochs 4..8 are skipped, never issued again
    second.reserve(9)
    assert EpochReservation(path, block=8).reserved_upto == 16


@pytest.mark.parametrize(("reserved", "checkpointed", "expected"), [(64, 10, 64), (64, 200, 200), (0, 0, 0)])
def test_resume_continues_above_reservation_and_checkpoint(tmp_path: Path, reserved: int, checkpointed: int, expected: int) -> None:
    path = tmp_path / "epoch"
    if reserved:
        path.write_text(f"{reserved}\n")
    assert EpochReservation(path).resume_from(checkpointed) == expected


@pytest.mark.parametrize("content", [b"seven\n", b"-3\n", b"\xff\xfe", b"1e9\n"])
def test_a_bad_reservation_file_is_one_line_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "epoch"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        EpochReservation(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_an_empty_file_means_nothing_reserved(tmp_path: Path) -> None:
    path = tmp_path / "epoch"
    path.write_text("")
    assert EpochReservation(path).reserved_upto == 0


def test_a_block_of_nothing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one epoch"):
        EpochReservation(tmp_path / "epoch", block=0)
