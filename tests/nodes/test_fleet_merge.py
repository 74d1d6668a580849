"""The fleet's in-process merge (gtbus.training.merge): model averaging of real ByteLM replicas."""

from __future__ import annotations

import numpy
import pytest

from gtbus.errors import GtbusError
from gtbus.training.bytelm import ByteLM, ByteLMConfig
from gtbus.training.merge import InProcessAverage

SMALL = dict(context=8, embed=4, hidden=8, batch=4)


def replicas(n: int, **cfg: int) -> list[ByteLM]:
    out = [ByteLM(ByteLMConfig(seed=0, **{**SMALL, **cfg})) for _ in range(n)]
    for r in out:
        r.load(numpy)
    return out


def test_replicas_trained_apart_become_their_mean_in_place_and_keep_their_optimizers() -> None:
    rs = replicas(3)
    assert all(numpy.array_equal(a, b) for a, b in zip(rs[0].parameter_views(), rs[1].parameter_views()))  # one seed
    rng = numpy.random.default_rng(1)
    for r in rs:  # each replica sees other data
        r.train_on(rng.integers(0, 256, 512).astype(numpy.uint16), 3)
    before = [[p.copy() for p in r.parameter_views()] for r in rs]
    views = [r.parameter_views() for r in rs]
    moments = [r.state_dict()["adam_m/embed"].copy() for r in rs]

    InProcessAverage().average(rs)

    for i, group in enumerate(zip(*before)):
        mean = (group[0] + group[1] + group[2]) / 3
        for r, v in zip(rs, views):
            numpy.testing.assert_allclose(v[i], mean, rtol=1e-6)  # written through the views the trainer trains
    assert all(numpy.array_equal(a, b) for a, b in zip(rs[0].parameter_views(), rs[2].parameter_views()))
    for r, m in zip(rs, moments):
        assert numpy.array_equal(r.state_dict()["adam_m/embed"], m)  # each keeps its own optimizer state
    # The merged replicas still train.
    rs[0].train_on(rng.integers(0, 256, 512).astype(numpy.uint16), 1)


def test_one_replica_is_left_as_it_is() -> None:
    (r,) = replicas(1)
    before = [p.copy() for p in r.parameter_views()]
    InProcessAverage().average([r])
    assert all(numpy.array_equal(a, b) for a, b in zip(before, r.parameter_views()))


def test_replicas_of_different_models_are_refused_before_anything_is_written() -> None:
    a, = replicas(1)
    b, = replicas(1, hidden=16)  # same first parameter (the embedding), other hidden layers
    a.train_on(numpy.arange(512, dtype=numpy.uint16) % 256, 2)  # so that a mean would differ from a
    before = [p.copy() for p in a.parameter_views()]
    with pytest.raises(GtbusError, match="different shapes"):
        InProcessAverage().average([a, b])
    assert all(numpy.array_equal(x, y) for x, y in zip(before, a.parameter_views()))
