"""The export of a GPT-2 (124M) trained on the GPU: every tensor, llm.c's file, and the digest the GPU measured.

A real run (`--backend cupy --trainer gpt2`, orchestrator and 2 holders as
processes) trains GPT-2 a few steps; `export_model` writes its files on the
host. Checked: every tensor of model.safetensors and gpt2_llmc.bin against the
checkpoint; the model digest recomputed from the files equals what the GPU's
own measurement (the BLAKE3 kernel) gives for the same weights loaded on the
GPU; Hugging Face `transformers` (where installed) loads the folder and
computes the same logits as our GPT. Skipped cleanly without cupy, torch or a
GPU (as in CI).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy
import pytest

from cuda_guard import cupy_or_skip

# The export tests' kit (the real command in its own process): reuse it, do not copy it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "export"))

from export_kit import gtbus as run_command  # noqa: E402

cupy = cupy_or_skip()
torch = pytest.importorskip("torch")

from safetensors.numpy import load_file  # noqa: E402

from gtbus.export import export_model, load_export, model_digest_of  # noqa: E402
from gtbus.export.digest import digest_of_views  # noqa: E402
from gtbus.export.layout import gpt2_name  # noqa: E402
from gtbus.export.llmc import read_llmc  # noqa: E402
from gtbus.export.sample import generate  # noqa: E402
from gtbus.gpu.cupy_backend import CupyDevice  # noqa: E402
from gtbus.nodes.launcher import LocalDeployment, LocalRun  # noqa: E402
from gtbus.training.bytelm import ByteLM  # noqa: E402
from gtbus.training.checkpoint import read_checkpoint  # noqa: E402
from gtbus.training.workloads import make_trainer  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def gtbus(*args: str) -> str:
    """The real command's stdout (the test fails with its stderr if it fails)."""
    done = run_command(*args, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("gpt2-export")
    gtbus("data", "build", "--demo-corpus", "--holders", "2", "--bytes-per-holder", str(32 * 1024), "--out", str(base / "data"))
    pin = gtbus("measure", "--backend", "cupy", "--trainer", "gpt2").strip()
    # 2 holders x 32768 byte tokens, chunks of 16384: 4 hops of 2 GPT-2 steps.
    lr = LocalRun(run_dir=base / "run", holders=2, backend="cupy", trainer="gpt2", chunk_tokens=16384, steps="2",
                  data=sorted((base / "data").glob("holder*.bin")), pin=pin, lease=60.0)
    summary = LocalDeployment(lr).run_to_end(timeout=600)
    assert summary["hops_trained"] == summary["hops"] == 4, summary["outcomes"]
    return lr.run_dir


@pytest.fixture(scope="module")
def exported(run: Path) -> tuple[Path, bytes]:
    out = run / "export"
    result = export_model(run, out)
    assert result.trainer == "gpt2" and sorted(result.files) == ["config.json", "gpt2_llmc.bin", "model.safetensors"]
    return out, result.model_digest


def test_every_tensor_is_the_checkpoints(run: Path, exported: tuple[Path, bytes]) -> None:
    out, _ = exported
    ckpt = read_checkpoint(run / "checkpoints" / "orch.npz")
    assert ckpt.workload == {"trainer": "gpt2", "backend": "cupy"}
    model = {k[len("model/"):]: v for k, v in ckpt.arrays.items() if k.startswith("model/")}
    tensors = load_file(out / "model.safetensors")
    seen = set()
    for ours, array in model.items():
        if ours == "lm_head.weight":  # tied to wte
            assert numpy.array_equal(array, model["wte.weight"])
            continue
        name, transpose = gpt2_name(ours)
        assert numpy.array_equal(tensors[name], array.T if transpose else array), ours
        seen.add(name)
    assert seen == set(tensors) and len(tensors) == 2 + 2 + 12 * 12
    header, llmc = read_llmc(out / "gpt2_llmc.bin")
    assert (header.max_seq_len, header.vocab, header.layers, header.heads, header.channels, header.padded_vocab) == (1024, 50257, 12, 12, 768, 50304)
    assert numpy.array_equal(llmc["wte"][:50257], model["wte.weight"]) and not llmc["wte"][50257:].any()
    assert numpy.array_equal(llmc["wpe"], model["wpe.weight"])
    for i in range(12):
        assert numpy.array_equal(llmc["qkvw"][i], model[f"blocks.{i}.attn.qkv.weight"])
        assert numpy.array_equal(llmc["fcprojw"][i], model[f"blocks.{i}.mlp.proj.weight"])
        assert numpy.array_equal(llmc["ln2b"][i], model[f"blocks.{i}.ln2.bias"])
    assert numpy.array_equal(llmc["lnfw"], model["ln_f.weight"])


def test_the_digest_is_the_gpus_measurement_of_the_same_weights(run: Path, exported: tuple[Path, bytes]) -> None:
    out, digest = exported
    trainer = make_trainer("gpt2")
    trainer.load(cupy)
    trainer.load_state_dict(read_checkpoint(run / "checkpoints" / "orch.npz").trainer_state())
    device = CupyDevice()
    assert device.measure(*trainer.parameter_views()) == digest == model_digest_of(out)


def test_the_host_computes_the_cupy_form_of_any_model() -> None:
    trainer = ByteLM()
    trainer.load(cupy)
    host_views = [v.get() for v in trainer.parameter_views()]
    assert CupyDevice().measure(*trainer.parameter_views()) == digest_of_views("cupy", host_views)


def test_the_export_loads_samples_and_matches_hugging_face(exported: tuple[Path, bytes]) -> None:
    out, digest = exported
    loaded = load_export(out)
    assert loaded.model_digest == digest
    assert generate(loaded.trainer, b"def ", 4, seed=1) == generate(loaded.trainer, b"def ", 4, seed=1)
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    ids = torch.tensor([list(b"import os\ndef f(x):")])
    with torch.no_grad():
        ours = loaded.trainer.model.eval()(ids)
        theirs = hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()
