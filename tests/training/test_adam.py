"""Our Adam against the textbook formula and, where torch is installed, against torch.optim.Adam."""

from __future__ import annotations

import numpy
import pytest

from gtbus.training.adam import Adam


def _gradients(steps: int, size: int) -> list[numpy.ndarray]:
    rng = numpy.random.default_rng(5)
    return [rng.standard_normal(size) for _ in range(steps)]


def test_matches_the_paper_step_by_step() -> None:
    theta = numpy.linspace(-1, 1, 7)
    adam = Adam(numpy, 7, numpy.float64, lr=0.01)
    expected = theta.copy()
    m = numpy.zeros(7)
    v = numpy.zeros(7)
    for t, g in enumerate(_gradients(20, 7), start=1):
        adam.step(theta, g)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        expected = expected - 0.01 * (m / (1 - 0.9**t)) / (numpy.sqrt(v / (1 - 0.999**t)) + 1e-8)
        numpy.testing.assert_allclose(theta, expected, rtol=1e-12, atol=1e-15)
    assert adam.t == 20


def test_first_step_moves_each_weight_by_lr() -> None:
    theta = numpy.zeros(3)
    Adam(numpy, 3, numpy.float64, lr=0.5).step(theta, numpy.array([3.0, -0.001, 20.0]))
    numpy.testing.assert_allclose(theta, [-0.5, 0.5, -0.5], rtol=1e-4)


def test_agrees_with_torch() -> None:
    torch = pytest.importorskip("torch")
    start = numpy.linspace(-1, 1, 11)
    ours = start.copy()
    adam = Adam(numpy, 11, numpy.float64, lr=0.02, beta1=0.8, beta2=0.99, eps=1e-6)
    param = torch.nn.Parameter(torch.from_numpy(start.copy()))
    reference = torch.optim.Adam([param], lr=0.02, betas=(0.8, 0.99), eps=1e-6)
    for g in _gradients(30, 11):
        adam.step(ours, g)
        param.grad = torch.from_numpy(g.copy())
        reference.step()
    numpy.testing.assert_allclose(ours, param.detach().numpy(), rtol=1e-10, atol=1e-12)
