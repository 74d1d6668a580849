"""The built-in byte-level language model: gradients, learning, determinism, checkpoints, the Trainer contract."""

from __future__ import annotations

import math

import numpy
import pytest

from gtbus.training.bytelm import ByteLM, ByteLMConfig
from gtbus.training.corpus import holder_bytes, stdlib_sources
from gtbus.training.trainer import ONE_PASS, Trainer, TrainReport, WorkloadError

TINY = dict(context=4, embed=3, hidden=5, batch=6, dtype="float64")


def _random_tokens(n: int, seed: int = 0) -> numpy.ndarray:
    return numpy.random.default_rng(seed).integers(0, 256, size=n).astype(numpy.uint16)


@pytest.fixture(scope="module")
def stdlib_text() -> tuple[numpy.ndarray, numpy.ndarray]:
    """512 KiB to train on and 64 KiB held out, from every 7th stdlib file."""
    data = holder_bytes(stdlib_sources()[::7], 576 * 1024)
    tokens = numpy.frombuffer(data, dtype=numpy.uint8)
    return tokens[: 512 * 1024], tokens[512 * 1024 :]


@pytest.mark.parametrize("layers", [1, 2])
def test_gradients_match_finite_differences(layers: int) -> None:
    model = ByteLM(ByteLMConfig(layers=layers, seed=3, **TINY), numpy)
    # Few distinct bytes so that embedding rows get gradient from several
    # positions; the rest must come out exactly zero.
    windows = numpy.random.default_rng(1).integers(0, 9, size=(6, 5)).astype(numpy.uint16)
    model.batch_loss(windows, backward=True)
    analytic = {name: g.copy() for name, g in model.gradient_views().items()}
    eps = 1e-6
    for name, param in zip(analytic, model.parameter_views()):
        numeric = numpy.zeros_like(param)
        for index in numpy.ndindex(param.shape):
            saved = param[index]
            param[index] = saved + eps
            up = float(model.batch_loss(windows, backward=False))
            param[index] = saved - eps
            down = float(model.batch_loss(windows, backward=False))
            param[index] = saved
            numeric[index] = (up - down) / (2 * eps)
        scale = max(numpy.abs(numeric).max(), 1e-8)
        assert numpy.abs(analytic[name] - numeric).max() / scale < 1e-6, name
    assert not analytic["embed"][9:].any()


def test_initial_loss_is_about_uniform() -> None:
    model = ByteLM(ByteLMConfig(), numpy)
    assert abs(model.evaluate(_random_tokens(5000)) - math.log(256)) < 0.05


def _unigram_entropy(tokens: numpy.ndarray) -> float:
    p = numpy.bincount(tokens, minlength=256) / len(tokens)
    p = p[p > 0]
    return float(-(p * numpy.log(p)).sum())


def _bigram_conditional_entropy(tokens: numpy.ndarray) -> float:
    """H(next | previous) of the text's own bigram counts: the best any bigram table can score on it."""
    joint = numpy.zeros((256, 256))
    numpy.add.at(joint, (tokens[:-1], tokens[1:]), 1)
    joint /= joint.sum()
    previous = joint.sum(axis=1, keepdims=True)
    nz = joint > 0
    return float(-(joint[nz] * numpy.log((joint / numpy.where(previous > 0, previous, 1))[nz])).sum())


def test_learns_structure_of_python_text(stdlib_text: tuple[numpy.ndarray, numpy.ndarray]) -> None:
    train, held_out = stdlib_text
    model = ByteLM(ByteLMConfig(), numpy)
    before = model.evaluate(held_out)
    # 3 "hops" of 150 steps on consecutive 160 KiB pieces, as a run would.
    reports = [model.train_on(train[i * 160 * 1024 : (i + 1) * 160 * 1024], 150) for i in range(3)]
    after = model.evaluate(held_out)
    unigram = _unigram_entropy(held_out)
    bigram = _bigram_conditional_entropy(held_out)
    assert before > 5.4
    assert after < unigram - 1.0, (after, unigram)
    # Beats even a bigram table fitted to the held-out text itself: the
    # model uses more than the previous byte.
    assert after < bigram, (after, bigram)
    assert reports[0].loss_first > 5.4 and reports[-1].loss_last < unigram


def test_same_seed_same_run_other_seed_other_run() -> None:
    tokens = _random_tokens(3000)
    runs = []
    for seed in (0, 0, 1):
        model = ByteLM(ByteLMConfig(seed=seed, hidden=64), numpy)
        model.train_on(tokens, 20)
        runs.append(numpy.concatenate([p.ravel() for p in model.parameter_views()]))
    assert numpy.array_equal(runs[0], runs[1])
    assert not numpy.array_equal(runs[0], runs[2])


def test_checkpoint_continues_bit_identically(stdlib_text: tuple[numpy.ndarray, numpy.ndarray]) -> None:
    chunk = stdlib_text[0][: 64 * 1024]
    config = ByteLMConfig(hidden=128, layers=2)
    straight = ByteLM(config, numpy)
    straight.train_on(chunk, 30)
    state = straight.state_dict()
    frozen = {k: (v.copy() if isinstance(v, numpy.ndarray) else v) for k, v in state.items()}
    straight.train_on(chunk, 30)

    resumed = ByteLM(config, numpy)
    resumed.load_state_dict(state)
    assert resumed.step == 30
    resumed.train_on(chunk, 30)
    for a, b in zip(straight.parameter_views(), resumed.parameter_views()):
        assert numpy.array_equal(a, b)
    assert numpy.array_equal(straight._adam.m, resumed._adam.m)
    assert straight.state_dict()["adam_t"] == resumed.state_dict()["adam_t"] == 60
    # state_dict hands out copies: training on did not change the snapshot.
    assert all(numpy.array_equal(state[k], frozen[k]) for k in state)


def test_bad_checkpoint_is_refused_and_changes_nothing() -> None:
    model = ByteLM(ByteLMConfig(hidden=32), numpy)
    before = [p.copy() for p in model.parameter_views()]
    other = ByteLM(ByteLMConfig(hidden=48), numpy).state_dict()
    with pytest.raises(WorkloadError, match="shape"):
        model.load_state_dict(other)
    state = model.state_dict()
    del state["adam_v/b_out"]
    with pytest.raises(WorkloadError, match="adam_v/b_out"):
        model.load_state_dict(state)
    assert all(numpy.array_equal(a, b) for a, b in zip(before, model.parameter_views()))


def test_train_report_and_one_pass() -> None:
    model = ByteLM(ByteLMConfig(hidden=32, batch=16), numpy)
    report = model.train_on(_random_tokens(1000), ONE_PASS)
    assert isinstance(report, TrainReport)
    assert report.steps == math.ceil((1000 - 16) / 16)
    assert report.tokens_seen == report.steps * 16
    assert report.seconds > 0 and math.isfinite(report.loss_first) and math.isfinite(report.loss_last)


def test_bytes_and_uint16_tokens_train_the_same() -> None:
    data = _random_tokens(2000).astype(numpy.uint8)
    a, b = ByteLM(ByteLMConfig(hidden=32), numpy), ByteLM(ByteLMConfig(hidden=32), numpy)
    a.train_on(data, 5)
    b.train_on(data.astype(numpy.uint16), 5)
    assert all(numpy.array_equal(x, y) for x, y in zip(a.parameter_views(), b.parameter_views()))


@pytest.mark.parametrize(
    ("tokens", "needle"),
    [
        (numpy.zeros(16, dtype=numpy.uint8), "at least 17"),
        (numpy.full(100, 256, dtype=numpy.uint16), "a token outside the vocabulary of 256"),
        (numpy.zeros((10, 10), dtype=numpy.uint8), "1-D"),
        (numpy.zeros(100, dtype=numpy.float32), "uint8 or uint16"),
        (numpy.zeros(100, dtype=numpy.int16), "uint8 or uint16"),
    ],
)
def test_unusable_buffers_are_refused(tokens: numpy.ndarray, needle: str) -> None:
    model = ByteLM(ByteLMConfig(hidden=32), numpy)
    with pytest.raises(WorkloadError, match=needle):
        model.train_on(tokens, 1)
    with pytest.raises(WorkloadError, match=needle):
        model.evaluate(tokens)
    assert model.step == 0


def test_not_loaded_is_a_clear_error() -> None:
    with pytest.raises(WorkloadError, match="load"):
        ByteLM().parameter_views()


def test_measurement_surface() -> None:
    model = ByteLM(ByteLMConfig(hidden=32), numpy)
    assert isinstance(model, Trainer)
    views = model.parameter_views()
    assert [v.shape for v in views] == [shape for _, shape in model.config.shapes()]
    assert all(v.flags.c_contiguous for v in views)
    before = [v.copy() for v in views]
    tokens = _random_tokens(500)
    loss = model.evaluate(tokens)
    assert model.evaluate(tokens) == loss
    assert all(numpy.array_equal(a, b) for a, b in zip(before, views)), "evaluate changes nothing"
    model.train_on(tokens, 1)
    # The views are the model's memory: training shows through them.
    assert not all(numpy.array_equal(a, b) for a, b in zip(before, views))
    code = model.code_bytes()
    assert b"class ByteLM" in code and b"class Adam" in code and b"class Trainer" in code
    assert code == ByteLM(ByteLMConfig(), numpy).code_bytes()


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        ByteLMConfig(layers=3)
    with pytest.raises(ValueError):
        ByteLMConfig(dtype="float16")
    assert ByteLMConfig().parameter_count() == 256 * 32 + 512 * 384 + 384 + 384 * 256 + 256


@pytest.mark.parametrize("value", [300, 50255, 65535])
def test_a_refused_buffer_is_described_without_its_values(value: int) -> None:
    """The refusal travels in hop reports and revokes: it names the problem, never a token of the holder's data."""
    model = ByteLM(ByteLMConfig(hidden=32), numpy)
    tokens = numpy.full(100, 7, dtype=numpy.uint16)
    tokens[50] = value
    for run in (lambda: model.train_on(tokens, 1), lambda: model.evaluate(tokens)):
        with pytest.raises(WorkloadError) as exc:
            run()
        assert str(value) not in str(exc.value) and "vocabulary of 256" in str(exc.value)
