"""The workloads on a real GPU through cupy; skipped where there is none."""

from __future__ import annotations

import numpy
import pytest

from gtbus.training.bytelm import ByteLM, ByteLMConfig

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no CUDA device", allow_module_level=True)
except cupy.cuda.runtime.CUDARuntimeError:
    pytest.skip("no CUDA device", allow_module_level=True)


def _text(n: int = 200_000) -> numpy.ndarray:
    line = b"def add(a, b):\n    return a + b  # the sum of a and b\n"
    return numpy.frombuffer(line * (n // len(line)), dtype=numpy.uint8)


def test_bytelm_on_cupy_starts_like_numpy_and_tracks_it() -> None:
    config = ByteLMConfig(hidden=128)
    host, device = ByteLM(config, numpy), ByteLM(config, cupy)
    for a, b in zip(host.parameter_views(), device.parameter_views()):
        assert isinstance(b, cupy.ndarray) and b.flags.c_contiguous
        assert numpy.array_equal(a, b.get())
    tokens = _text()
    r_host = host.train_on(tokens, 30)
    r_device = device.train_on(cupy.asarray(tokens), 30)
    assert abs(r_host.loss_first - r_device.loss_first) < 1e-4
    assert abs(r_host.loss_last - r_device.loss_last) < 0.05
    assert device.evaluate(cupy.asarray(tokens)) < 1.5


def test_bytelm_checkpoint_on_cupy_is_bit_identical_and_portable() -> None:
    config = ByteLMConfig(hidden=128)
    tokens = cupy.asarray(_text())
    straight = ByteLM(config, cupy)
    straight.train_on(tokens, 10)
    state = straight.state_dict()
    assert all(isinstance(v, (int, numpy.ndarray)) for v in state.values())
    straight.train_on(tokens, 10)
    resumed = ByteLM(config, cupy)
    resumed.load_state_dict(state)
    resumed.train_on(tokens, 10)
    for a, b in zip(straight.parameter_views(), resumed.parameter_views()):
        assert bool((a == b).all())
    on_host = ByteLM(config, numpy)
    on_host.load_state_dict(state)
    assert on_host.step == 10


def test_torch_trainer_takes_a_cupy_buffer_without_copy() -> None:
    torch = pytest.importorskip("torch")
    from gtbus.training.gpt import gpt_tiny
    from gtbus.training.pytorch import TorchTrainer, TorchTrainerConfig

    buffer = cupy.asarray(_text())
    assert torch.from_dlpack(buffer).data_ptr() == buffer.data.ptr
    trainer = TorchTrainer(
        lambda: gpt_tiny(vocab=256, context=64), vocab=256,
        config=TorchTrainerConfig(context=64, batch=16, lr=3e-3, weight_decay=0.0),
    )
    trainer.load(cupy)
    views = trainer.parameter_views()
    assert all(isinstance(v, cupy.ndarray) for v in views)
    before = trainer.evaluate(buffer)
    trainer.train_on(buffer, 80)
    assert trainer.evaluate(buffer) < min(1.5, before - 2)
