"""`export_model` on a real CPU run: every tensor read back equals the checkpoint's, the digest is the device's, damage is refused.

The run is a real `gtbus demo` (processes, sockets, crypto; see conftest.py).
Files are read back with the `safetensors` package itself, not with our code.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import blake3
import numpy
import pytest
from safetensors.numpy import load_file, save_file

from export_kit import DemoRun, gtbus_here, one_error_line
from gtbus.errors import ConfigError
from gtbus.export import export_model, load_export, model_digest_of
from gtbus.gpu.host import HostDevice
from gtbus.training.bytelm import ByteLM, ByteLMConfig
from gtbus.training.checkpoint import read_checkpoint, write_checkpoint

pytestmark = pytest.mark.slow


def checkpoint_of(run: Path):
    return read_checkpoint(run / "checkpoints" / "orch.npz")


def test_the_demo_exported_the_final_model_and_every_tensor_reads_back(demo_run: DemoRun) -> None:
    out = demo_run.run_dir / "export"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    ckpt = checkpoint_of(demo_run.run_dir)
    assert ckpt.workload == {"trainer": "bytelm", "backend": "host"}
    tensors = load_file(out / "model.safetensors")
    names = [name for name, _ in ByteLMConfig().shapes()]
    assert sorted(tensors) == sorted(names)  # parameters only: no Adam moments
    for name in names:
        want = ckpt.arrays[f"param/{name}"]
        assert tensors[name].dtype == numpy.float32 and tensors[name].shape == want.shape
        assert numpy.array_equal(tensors[name], want), name
    config = json.loads((out / "config.json").read_text())
    assert config["trainer"] == "bytelm" and config["dtype"] == "float32" and config["run_id"] == ckpt.run_id
    assert config["shape"] == {"context": 16, "embed": 32, "hidden": 384, "layers": 1, "vocab": 256}
    assert config["measurement"]["backend"] == "host"
    assert [t["name"] for v in config["measurement"]["views"] for t in v["tensors"]] == names  # parameter_views() order


def test_the_digest_is_the_device_measurement_of_the_same_weights(run_copy: Path, tmp_path: Path) -> None:
    exported = export_model(run_copy, tmp_path / "out")
    trainer = ByteLM()
    trainer.load(numpy)
    trainer.load_state_dict(checkpoint_of(run_copy).trainer_state())
    device = HostDevice()
    assert exported.model_digest == device.measure(*trainer.parameter_views())
    assert model_digest_of(tmp_path / "out") == exported.model_digest
    assert exported.config["model_digest"] == exported.model_digest.hex()
    # and not the untrained model's: the export holds what the run trained
    fresh = ByteLM()
    fresh.load(numpy)
    assert device.measure(*fresh.parameter_views()) != exported.model_digest
    for name, digest in exported.files.items():
        assert blake3.blake3((tmp_path / "out" / name).read_bytes()).hexdigest() == digest


def test_export_replaces_only_its_own_files(run_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = export_model(run_copy, out)
    (out / "manifest.json").write_text("{}")  # what the provenance tooling puts beside the model
    again = export_model(run_copy, out)
    assert again.files == first.files and (out / "manifest.json").read_text() == "{}"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"someone's model")
    with pytest.raises(ConfigError, match=r"model\.safetensors: already there and not written by a gtbus export; refusing"):
        export_model(run_copy, foreign)
    assert (foreign / "model.safetensors").read_bytes() == b"someone's model"
    (foreign / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match=r"config\.json: not a gtbus export's config .*; refusing to overwrite it"):
        export_model(run_copy, foreign)


def test_a_checkpoint_that_does_not_name_its_workload_is_read_by_its_keys(run_copy: Path, tmp_path: Path) -> None:
    path = run_copy / "checkpoints" / "orch.npz"
    ckpt = read_checkpoint(path)
    ckpt.workload = {}
    write_checkpoint(path, ckpt)
    assert export_model(run_copy, tmp_path / "out").trainer == "bytelm"


@pytest.mark.parametrize(("damage", "expected"), [
    ("no run", r"no checkpoint there"),
    ("garbage checkpoint", r"orch\.npz: unreadable checkpoint"),
    ("two checkpoints", r"several checkpoints"),
    ("unknown trainer", r"unknown trainer 'resnet'"),
    ("wrong shapes", r"does not fit the bytelm trainer: checkpoint param/w1 has shape"),
])
def test_a_bad_run_folder_is_one_line(run_copy: Path, tmp_path: Path, damage: str, expected: str) -> None:
    path = run_copy / "checkpoints" / "orch.npz"
    if damage == "no run":
        run_copy = tmp_path / "nothing"
    elif damage == "garbage checkpoint":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif damage == "two checkpoints":
        (path.parent / "orch2.npz").write_bytes(path.read_bytes())
    else:
        ckpt = read_checkpoint(path)
        if damage == "unknown trainer":
            ckpt.workload = {"trainer": "resnet", "backend": "host"}
        else:
            ckpt.arrays["param/w1"] = ckpt.arrays["param/w1"][:-1]
        write_checkpoint(path, ckpt)
    with pytest.raises(ConfigError, match=expected):
        export_model(run_copy, tmp_path / "out")
    p = gtbus_here("sample", tmp_path / "out")
    one_error_line(p)


# -- damaged exports -----------------------------------------------------------------------------


def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def flip_a_weight_byte(out: Path) -> None:
    path = out / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8 + _header_length(path) + 1000] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(out: Path) -> None:
    path = out / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4096])


def rename_a_tensor(out: Path) -> None:
    tensors = load_file(out / "model.safetensors")
    tensors["w_hidden"] = tensors.pop("w1")
    save_file(tensors, out / "model.safetensors")


def reshape_a_tensor(out: Path) -> None:
    tensors = load_file(out / "model.safetensors")
    tensors["w1"] = tensors["w1"].reshape(-1, 16)  # same bytes, another shape
    save_file(tensors, out / "model.safetensors")


def retype_a_tensor(out: Path) -> None:
    tensors = load_file(out / "model.safetensors")
    tensors["b1"] = tensors["b1"].astype(numpy.float64)
    save_file(tensors, out / "model.safetensors")


def edit_config(change):
    def apply(out: Path) -> None:
        config = json.loads((out / "config.json").read_text())
        change(config)
        (out / "config.json").write_text(json.dumps(config))
    return apply


def _views(config: dict) -> list:
    return config["measurement"]["views"]


DAMAGE = {
    "flipped weight byte": (flip_a_weight_byte, r"do not give the model digest config\.json records"),
    "truncated": (truncate, r"model\.safetensors: not a readable safetensors file"),
    "renamed tensor": (rename_a_tensor, r"tensor 'w1' is not in model\.safetensors"),
    "reshaped tensor": (reshape_a_tensor, r"tensor w1 has shape \(12288, 16\), config\.json says \(512, 384\)"),
    "retyped tensor": (retype_a_tensor, r"tensor b1 is float64, config\.json says float32"),
    "missing model": (lambda out: (out / "model.safetensors").unlink(), r"model\.safetensors: missing"),
    "missing config": (lambda out: (out / "config.json").unlink(), r"not a gtbus export \(no config\.json\)"),
    "config not json": (lambda out: (out / "config.json").write_text("{nope"), r"config\.json: not JSON"),
    "config of another tool": (edit_config(lambda c: c.pop("format")), r"not a gtbus export's config"),
    "shape of another model": (edit_config(lambda c: c["shape"].update(hidden=385)), r"its shape makes \d+ parameters, model\.safetensors holds 303744"),
    "huge shape": (edit_config(lambda c: c["shape"].update(hidden=1 << 40)), r"shape\.hidden must be an integer"),
    "layout runs past its view": (edit_config(lambda c: _views(c)[1]["tensors"][0].update(offset=1)), r"tensors overlap or run past"),
    "layout places a tensor twice": (edit_config(lambda c: _views(c)[2]["tensors"].append(_views(c)[1]["tensors"][0])), r"'w1' is not in model\.safetensors \(or laid out twice\)"),
    "layout pads too much": (edit_config(lambda c: _views(c)[0].update(shape=[1 << 40])), r"too much padding"),
    "layout dtype": (edit_config(lambda c: _views(c)[0].update(dtype="|O")), r"dtype '\|O' is not one of"),
    "unknown backend": (edit_config(lambda c: c["measurement"].update(backend="tpu")), r"measurement\.backend must be one of host, cupy"),
    "forged digest": (edit_config(lambda c: c.update(model_digest="00" * 32)), r"do not give the model digest config\.json records"),
    "unknown trainer": (edit_config(lambda c: c.update(trainer="resnet")), r"unknown trainer 'resnet'"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_export_is_refused_in_one_line(export_copy: Path, name: str) -> None:
    damage, expected = DAMAGE[name]
    damage(export_copy)
    with pytest.raises(ConfigError) as refused:
        load_export(export_copy)
    assert refused.match(expected)
    assert "\n" not in str(refused.value)
    line = one_error_line(gtbus_here("sample", export_copy, "--prompt", "def "))
    assert str(refused.value) in line


def test_a_flipped_weight_byte_changes_the_recomputed_digest(export_copy: Path) -> None:
    before = model_digest_of(export_copy)
    flip_a_weight_byte(export_copy)
    assert model_digest_of(export_copy) != before  # what `gtbus export --check` compares with the signed manifest


def test_an_export_folder_that_is_a_file_or_a_symlink_is_refused(run_copy: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        export_model(run_copy, tmp_path / "file")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(ConfigError, match="is a symlink"):
        export_model(run_copy, tmp_path / "link")
