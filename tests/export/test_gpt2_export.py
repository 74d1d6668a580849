"""The GPT-2 trainer's export on the CPU: Hugging Face names and layout, llm.c's checkpoint, the flat-buffer digest.

A small GPT (2 layers, width 64, vocabulary 300 so llm.c's padding shows)
trained a few steps with the real TorchTrainer; every tensor of both files is
compared with the torch module's own parameters, so a wrong transpose or order
fails here. Skipped cleanly without torch (as in CI).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest

torch = pytest.importorskip("torch")

from safetensors.numpy import load_file  # noqa: E402

from export_kit import gtbus_here, one_error_line  # noqa: E402
from gtbus.errors import ConfigError  # noqa: E402
from gtbus.export import export_trainer, load_export, model_digest_of  # noqa: E402
from gtbus.export.llmc import LLMC_NAMES, padded_vocab, read_llmc  # noqa: E402
from gtbus.export.sample import generate  # noqa: E402
from gtbus.gpu.host import HostDevice  # noqa: E402
from gtbus.training.gpt import GPT, GPTConfig  # noqa: E402
from gtbus.training.pytorch import TorchTrainer, TorchTrainerConfig  # noqa: E402

SHAPE = GPTConfig(vocab=300, context=32, layers=2, heads=4, dim=64)


def trained_gpt() -> TorchTrainer:
    trainer = TorchTrainer(lambda: GPT(SHAPE), vocab=SHAPE.vocab, config=TorchTrainerConfig(context=SHAPE.context, batch=4))
    trainer.load(numpy)
    tokens = numpy.frombuffer(b"def f(x):\n    return x + 1\n" * 40, dtype=numpy.uint8).copy()
    trainer.train_on(tokens, steps=3)
    return trainer


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[TorchTrainer, Path, bytes]:
    trainer = trained_gpt()
    out = tmp_path_factory.mktemp("gpt") / "export"
    result = export_trainer(trainer, out, trainer_name="gpt2", run_id="r1")
    assert sorted(result.files) == ["config.json", "gpt2_llmc.bin", "model.safetensors"]
    return trainer, out, result.model_digest


def block_params(trainer: TorchTrainer, i: int) -> dict[str, numpy.ndarray]:
    b = trainer.model.blocks[i]
    return {k: v.detach().numpy() for k, v in b.named_parameters()}


def test_safetensors_has_hugging_face_names_and_layout(exported: tuple[TorchTrainer, Path, bytes]) -> None:
    trainer, out, _ = exported
    tensors = load_file(out / "model.safetensors")
    model = trainer.model
    assert numpy.array_equal(tensors["wte.weight"], model.wte.weight.detach().numpy())
    assert numpy.array_equal(tensors["wpe.weight"], model.wpe.weight.detach().numpy())
    assert numpy.array_equal(tensors["ln_f.bias"], model.ln_f.bias.detach().numpy())
    for i in range(SHAPE.layers):
        p = block_params(trainer, i)
        pairs = {
            f"h.{i}.ln_1.weight": p["ln1.weight"], f"h.{i}.ln_1.bias": p["ln1.bias"],
            f"h.{i}.attn.c_attn.weight": p["attn.qkv.weight"].T, f"h.{i}.attn.c_attn.bias": p["attn.qkv.bias"],
            f"h.{i}.attn.c_proj.weight": p["attn.proj.weight"].T, f"h.{i}.attn.c_proj.bias": p["attn.proj.bias"],
            f"h.{i}.ln_2.weight": p["ln2.weight"], f"h.{i}.ln_2.bias": p["ln2.bias"],
            f"h.{i}.mlp.c_fc.weight": p["mlp.fc.weight"].T, f"h.{i}.mlp.c_fc.bias": p["mlp.fc.bias"],
            f"h.{i}.mlp.c_proj.weight": p["mlp.proj.weight"].T, f"h.{i}.mlp.c_proj.bias": p["mlp.proj.bias"],
        }
        for name, want in pairs.items():
            assert numpy.array_equal(tensors[name], want), name
    assert tensors[f"h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D: (in, out)
    assert len(tensors) == 4 + 12 * SHAPE.layers  # no tied head, no optimizer moments
    config = json.loads((out / "config.json").read_text())
    assert config["shape"] == {"vocab": 300, "context": 32, "layers": 2, "heads": 4, "dim": 64}
    assert (config["model_type"], config["n_embd"], config["n_layer"], config["n_head"], config["n_positions"], config["vocab_size"]) == (
        "gpt2", 64, 2, 4, 32, 300)


def test_the_llmc_checkpoint_has_llmc_header_order_and_padding(exported: tuple[TorchTrainer, Path, bytes]) -> None:
    trainer, out, _ = exported
    raw = numpy.fromfile(out / "gpt2_llmc.bin", dtype="<i4", count=256)
    assert list(raw[:8]) == [20240326, 3, 32, 300, 2, 4, 64, 384] and not raw[8:].any()
    header, t = read_llmc(out / "gpt2_llmc.bin")
    assert header.padded_vocab == padded_vocab(300) == 384 and padded_vocab(50257) == 50304
    model = trainer.model
    assert numpy.array_equal(t["wte"][:300], model.wte.weight.detach().numpy()) and not t["wte"][300:].any()
    assert numpy.array_equal(t["wpe"], model.wpe.weight.detach().numpy())
    ours = {"ln1w": "ln1.weight", "ln1b": "ln1.bias", "qkvw": "attn.qkv.weight", "qkvb": "attn.qkv.bias",
            "attprojw": "attn.proj.weight", "attprojb": "attn.proj.bias", "ln2w": "ln2.weight", "ln2b": "ln2.bias",
            "fcw": "mlp.fc.weight", "fcb": "mlp.fc.bias", "fcprojw": "mlp.proj.weight", "fcprojb": "mlp.proj.bias"}
    for llmc, name in ours.items():
        for i in range(SHAPE.layers):
            assert numpy.array_equal(t[llmc][i], block_params(trainer, i)[name]), (llmc, i)  # nn.Linear (out, in), as llm.c
    assert numpy.array_equal(t["lnfw"], model.ln_f.weight.detach().numpy())
    assert numpy.array_equal(t["lnfb"], model.ln_f.bias.detach().numpy())
    assert list(t) == list(LLMC_NAMES)


def test_the_digest_is_the_flat_buffer_measurement(exported: tuple[TorchTrainer, Path, bytes]) -> None:
    trainer, out, digest = exported
    views = trainer.parameter_views()
    assert len(views) == 1  # the one flat buffer, with aligned gaps
    assert digest == HostDevice().measure(*views) == model_digest_of(out)
    loaded = load_export(out)
    assert loaded.model_digest == digest
    assert HostDevice().measure(*loaded.trainer.parameter_views()) == digest
    # the loaded model is the same function: same logits
    ids = torch.tensor([list(b"def f(x)")])
    with torch.no_grad():
        assert torch.equal(loaded.trainer.model(ids), trainer.model(ids))
    assert generate(loaded.trainer, b"def ", 8, seed=3) == generate(loaded.trainer, b"def ", 8, seed=3)


@pytest.mark.parametrize(("damage", "expected"), [
    ("truncated", r"bytes, its header makes \d+ \(truncated or not this model\)"),
    ("magic", r"not an llm\.c model file \(magic 7"),
    ("version", r"llm\.c model version 5; only 3"),
    ("huge header", r"header sizes out of range"),
    ("claims more than it holds", r"bytes, its header makes"),
    ("short", r"shorter than llm\.c's 1024-byte header"),
])
def test_a_bad_llmc_file_is_one_line(exported: tuple[TorchTrainer, Path, bytes], tmp_path: Path, damage: str, expected: str) -> None:
    data = bytearray((exported[1] / "gpt2_llmc.bin").read_bytes())
    header = numpy.frombuffer(data, dtype="<i4", count=256).copy()
    if damage == "truncated":
        data = data[:-4]
    elif damage == "short":
        data = data[:100]
    else:
        index, value = {"magic": (0, 7), "version": (1, 5), "huge header": (6, 1 << 30), "claims more than it holds": (4, 1000)}[damage]
        header[index] = value
        data[:1024] = header.tobytes()
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=expected):
        read_llmc(path)


def test_gpt2_export_samples_through_the_cli(exported: tuple[TorchTrainer, Path, bytes]) -> None:
    out = exported[1]
    first = gtbus_here("sample", out, "--prompt", "def ", "--bytes", "6", "--seed", "5")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("def ") and first.stdout == gtbus_here("sample", out, "--prompt", "def ", "--bytes", "6", "--seed", "5").stdout


def test_a_tampered_gpt2_export_is_refused(exported: tuple[TorchTrainer, Path, bytes], tmp_path: Path) -> None:
    import shutil

    out = Path(shutil.copytree(exported[1], tmp_path / "export"))
    config = json.loads((out / "config.json").read_text())
    config["shape"]["heads"] = 5  # 64 is not a multiple of 5
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"shape does not make a model: dim 64 is not a multiple of heads 5"):
        load_export(out)
    one_error_line(gtbus_here("sample", out))
