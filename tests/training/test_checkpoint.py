"""The one checkpoint reader and writer: round trip, meta alone, private and atomic files, bad files in one line."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import numpy
import pytest

from gtbus.errors import ConfigError
from gtbus.training.bytelm import ByteLM, ByteLMConfig
from gtbus.training.checkpoint import META_KEY, Checkpoint, read_checkpoint, write_checkpoint

TINY = dict(context=4, embed=3, hidden=5, batch=6)


def _trained() -> ByteLM:
    model = ByteLM(ByteLMConfig(seed=1, **TINY), numpy)
    model.load(numpy)
    model.train_on(numpy.random.default_rng(0).integers(0, 256, 512).astype(numpy.uint16), 3)
    return model


def _ckpt(model: ByteLM, **meta: object) -> Checkpoint:
    base = dict(run_id="r1", epoch=7, schedule={"round": 1}, hops=[{"epoch": 7, "outcome": "trained"}], first_eval=5.5, last_eval=3.25)
    base.update(meta)
    return Checkpoint.of_trainer_state(model.state_dict(), **base)


def test_a_trainer_continues_from_what_was_written(tmp_path: Path) -> None:
    model = _trained()
    path = tmp_path / "c.npz"
    write_checkpoint(path, _ckpt(model))
    back = read_checkpoint(path)
    assert (back.run_id, back.epoch, back.schedule, back.hops, back.first_eval, back.last_eval) == (
        "r1", 7, {"round": 1}, [{"epoch": 7, "outcome": "trained"}], 5.5, 3.25)
    assert back.scalars and all(not hasattr(v, "shape") for v in back.scalars.values())
    other = ByteLM(ByteLMConfig(seed=1, **TINY), numpy)  # fresh, untrained
    other.load(numpy)
    other.load_state_dict(back.trainer_state())
    for a, b in zip(model.parameter_views(), other.parameter_views()):
        assert numpy.array_equal(a, b)
    tokens = numpy.arange(256, dtype=numpy.uint16)
    assert model.train_on(tokens, 2).loss_last == other.train_on(tokens, 2).loss_last


def test_meta_alone_loads_no_array(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    write_checkpoint(path, _ckpt(_trained()))
    meta = read_checkpoint(path, state=False)
    assert meta.arrays == {} and meta.hops == [{"epoch": 7, "outcome": "trained"}] and meta.scalars


def test_the_file_is_private_and_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    model = _trained()
    write_checkpoint(path, _ckpt(model, epoch=1))
    write_checkpoint(path, _ckpt(model, epoch=2))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_checkpoint(path, state=False).epoch == 2
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary file left beside it


def _npz(path: Path, **arrays: numpy.ndarray) -> Path:
    with open(path, "wb") as fh:
        numpy.savez(fh, **arrays)
    return path


def _meta(doc: object) -> numpy.ndarray:
    return numpy.frombuffer(json.dumps(doc).encode(), dtype=numpy.uint8)


BAD_FILES = {
    "missing": lambda p: p,
    "empty": lambda p: (p.write_bytes(b""), p)[1],
    "not a zip": lambda p: (p.write_bytes(b"\x93NUMPY junk" * 10), p)[1],
    "truncated": lambda p: (p.write_bytes(_npz(p, **{META_KEY: _meta({"run_id": "r", "epoch": 1})}).read_bytes()[:60]), p)[1],
    "no meta": lambda p: _npz(p, x=numpy.zeros(3)),
    "meta not json": lambda p: _npz(p, **{META_KEY: numpy.frombuffer(b"\xff{", dtype=numpy.uint8)}),
    "meta a list": lambda p: _npz(p, **{META_KEY: _meta([1, 2])}),
    "meta without epoch": lambda p: _npz(p, **{META_KEY: _meta({"run_id": "r"})}),
    "epoch not a number": lambda p: _npz(p, **{META_KEY: _meta({"run_id": "r", "epoch": "x"})}),
    "pickled array": lambda p: _npz(p, **{META_KEY: _meta({"run_id": "r", "epoch": 1}), "p.w": numpy.array([object()], dtype=object)}),
    "a folder": lambda p: (p.mkdir(), p)[1],
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_a_bad_file_is_one_line_naming_it(tmp_path: Path, kind: str) -> None:
    path = BAD_FILES[kind](tmp_path / "c.npz")
    with pytest.raises(ConfigError) as err:
        read_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert ("no checkpoint there" if kind == "missing" else "unreadable checkpoint") in msg


def test_zip_errors_are_caught_by_name() -> None:
    # Not an OSError: listed on its own in the reader.
    assert not issubclass(zipfile.BadZipFile, OSError)


def test_the_holders_admitted_data_is_kept_for_a_resume(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    datasets = {"h1": [8192, "ab" * 32], "h2": [100, "cd" * 32]}
    write_checkpoint(path, Checkpoint(run_id="r", epoch=3, datasets=datasets))
    assert read_checkpoint(path, state=False).datasets == datasets
