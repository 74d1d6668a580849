"""The PyTorch trainer: zero-copy hop buffer, learning, checkpoints, GPT-2 sizes. Skipped without torch."""

from __future__ import annotations

import functools

import numpy
import pytest

torch = pytest.importorskip("torch")

from gtbus.training import gpt2_small  # noqa: E402
from gtbus.training.gpt import GPTConfig, gpt_tiny  # noqa: E402
from gtbus.training.pytorch import TorchTrainer, TorchTrainerConfig  # noqa: E402
from gtbus.training.trainer import Trainer, WorkloadError  # noqa: E402

CONFIG = TorchTrainerConfig(context=32, batch=8, lr=3e-3, weight_decay=0.0, eval_sequences=16)


def _trainer(seed: int = 0) -> TorchTrainer:
    factory = functools.partial(gpt_tiny, vocab=256, context=32)
    trainer = TorchTrainer(factory, vocab=256, config=TorchTrainerConfig(**{**CONFIG.__dict__, "seed": seed}))
    trainer.load(numpy)
    return trainer


def _text() -> numpy.ndarray:
    line = b"the quick brown fox jumps over the lazy dog; 0123456789.\n"
    return numpy.frombuffer(line * 200, dtype=numpy.uint8)


def test_hop_buffer_reaches_torch_without_a_copy() -> None:
    buffer = numpy.arange(1000, dtype=numpy.uint16)
    tensor = torch.from_dlpack(buffer)
    assert tensor.data_ptr() == buffer.ctypes.data


def test_learns_a_repeated_line() -> None:
    trainer = _trainer()
    assert isinstance(trainer, Trainer)
    text = _text()
    before = trainer.evaluate(text)
    report = trainer.train_on(text, 60)
    after = trainer.evaluate(text)
    assert before > 5.0
    assert after < 2.0, (before, after)
    assert report.steps == 60 and report.tokens_seen == 60 * 8 * 32


def test_checkpoint_continues_bit_identically() -> None:
    text = _text()
    straight = _trainer()
    straight.train_on(text, 4)
    state = straight.state_dict()
    straight.train_on(text, 4)
    resumed = _trainer(seed=0)
    resumed.load_state_dict(state)
    resumed.train_on(text, 4)
    for a, b in zip(straight.parameter_views(), resumed.parameter_views()):
        assert numpy.array_equal(a, b)
    assert resumed.state_dict()["adam_step"] == 8


def test_parameter_views_share_the_model_memory() -> None:
    # Every parameter lives in one flat buffer (the tied head once), which is what is
    # measured: one view holds them all, and a training step changes it in place.
    trainer = _trainer()
    views = trainer.parameter_views()
    params = list(trainer.model.parameters())
    flat = views[0]
    assert len(views) == 1 + len(list(trainer.model.buffers()))
    start = flat.ctypes.data
    for p in params:
        assert start <= p.data_ptr() and p.data_ptr() + p.numel() * 4 <= start + flat.nbytes
        assert (p.data_ptr() - start) % 256 == 0  # each parameter starts aligned
        offset = (p.data_ptr() - start) // 4
        assert numpy.array_equal(flat[offset : offset + p.numel()], p.detach().numpy().reshape(-1))
    before = flat.copy()
    trainer.train_on(_text(), 1)
    assert not numpy.array_equal(before, flat)
    code = trainer.code_bytes()
    assert b"class TorchTrainer" in code and b"class GPT" in code


def test_same_seed_same_weights() -> None:
    a, b, c = _trainer(0), _trainer(0), _trainer(1)
    assert all(numpy.array_equal(x, y) for x, y in zip(a.parameter_views(), b.parameter_views()))
    assert not numpy.array_equal(a.parameter_views()[0], c.parameter_views()[0])


def test_refuses_what_does_not_fit() -> None:
    trainer = _trainer()
    with pytest.raises(WorkloadError, match="outside the vocabulary"):
        trainer.train_on(numpy.full(100, 300, dtype=numpy.uint16), 1)
    with pytest.raises(WorkloadError, match="at least 33"):
        trainer.train_on(numpy.zeros(10, dtype=numpy.uint8), 1)
    state = trainer.state_dict()
    state["model/wte.weight"] = numpy.zeros((3, 3), dtype=numpy.float32)
    with pytest.raises(WorkloadError):
        trainer.load_state_dict(state)


def test_gpt2_small_is_124m_parameters() -> None:
    with torch.device("meta"):
        model = gpt2_small()
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    with pytest.raises(ValueError):
        GPTConfig(dim=100, heads=12)



def test_tokens_above_32767_survive_the_int16_view() -> None:
    from gtbus.training.pytorch import _gather, _wrap

    tokens = numpy.array([0, 1, 32767, 32768, 65535], dtype=numpy.uint16)
    buffer = _wrap(torch, tokens)
    assert buffer.data_ptr() == tokens.ctypes.data
    assert _gather(torch, buffer, torch.arange(5)).tolist() == [0, 1, 32767, 32768, 65535]


def test_gtbus_measure_gives_the_gpt2_pin_the_orchestrator_reports() -> None:
    # It failed with "TorchTrainer is not loaded": the PyTorch trainer measures the module of
    # the model it builds, so the pin is taken after loading, as the orchestrator takes it.
    from click.testing import CliRunner

    from gtbus.cli.main import main
    from gtbus.gpu.backends import make_device
    from gtbus.gpu.code_measure import code_measurement
    from gtbus.training.workloads import make_trainer

    result = CliRunner().invoke(main, ["measure", "--trainer", "gpt2"])
    assert result.exit_code == 0, result.output
    trainer, device = make_trainer("gpt2"), make_device("host")
    trainer.load(device.array_module)  # what Orchestrator.setup does before it measures
    assert result.output.strip() == code_measurement(trainer, device).hex()
