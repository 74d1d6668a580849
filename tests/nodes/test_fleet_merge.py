"""The fleet's in-process merges (gtbus.training.merge) on real ByteLM replicas, and the host lanes' BLAS thread cap."""

from __future__ import annotations

from pathlib import Path

import numpy
import pytest

from gtbus.errors import ConfigError, GtbusError
from gtbus.gpu.blas_threads import blas_threads, cap_blas_threads, threads_per_lane
from gtbus.nodes.run_config import RunConfig
from gtbus.training.bytelm import ByteLM, ByteLMConfig
from gtbus.training.merge import DeltaMerge, InProcessAverage, merge_policy

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


def _trained_apart(rs: list[ByteLM], steps: int = 3) -> None:
    rng = numpy.random.default_rng(1)
    for r in rs:  # each replica sees other data
        r.train_on(rng.integers(0, 256, 512).astype(numpy.uint16), steps)


def test_sum_adds_every_replicas_update_to_the_last_merged_model_and_takes_the_result_as_its_anchor() -> None:
    rs = replicas(3)
    merge = merge_policy("sum")
    merge.start(rs[0])
    start = [p.copy() for p in rs[0].parameter_views()]
    _trained_apart(rs)
    moved = [[p.copy() for p in r.parameter_views()] for r in rs]
    moments = [r.state_dict()["adam_m/embed"].copy() for r in rs]

    merge.average(rs)

    for i, s in enumerate(start):
        expect = s + sum(m[i] - s for m in moved)
        for r in rs:
            numpy.testing.assert_allclose(r.parameter_views()[i], expect, rtol=1e-5, atol=1e-6)
    for r, m in zip(rs, moments):
        assert numpy.array_equal(r.state_dict()["adam_m/embed"], m)  # each keeps its own optimizer state
    # The next merge measures updates from this merge's model, not from the start.
    merged = [p.copy() for p in rs[0].parameter_views()]
    _trained_apart(rs[:1], 1)  # only the first replica trains; the others' updates are zero
    one_moved = [p.copy() for p in rs[0].parameter_views()]
    merge.average(rs)
    for i in range(len(merged)):
        numpy.testing.assert_allclose(rs[2].parameter_views()[i], one_moved[i], rtol=1e-5, atol=1e-6)
    assert not all(numpy.array_equal(x, y) for x, y in zip(one_moved, merged))  # the one step did move the model


def test_delta_with_outer_rate_one_is_the_average() -> None:
    a, b = replicas(3), replicas(3)
    merge = merge_policy("delta:1")
    merge.start(a[0])
    _trained_apart(a)
    _trained_apart(b)
    merge.average(a)
    InProcessAverage().average(b)
    for x, y in zip(a[1].parameter_views(), b[1].parameter_views()):
        numpy.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_delta_merge_refuses_before_start_or_another_model_and_writes_nothing() -> None:
    rs = replicas(2)
    _trained_apart(rs)
    before = [[p.copy() for p in r.parameter_views()] for r in rs]
    merge = DeltaMerge()
    with pytest.raises(GtbusError, match="before start"):
        merge.average(rs)
    other, = replicas(1, hidden=16)
    merge.start(other)
    with pytest.raises(GtbusError, match="not of the model"):
        merge.average(rs)
    for r, b in zip(rs, before):
        assert all(numpy.array_equal(x, y) for x, y in zip(r.parameter_views(), b))


@pytest.mark.parametrize("text, kind, lr", [("average", InProcessAverage, None), ("sum", DeltaMerge, None),
                                            (" delta:0.5 ", DeltaMerge, 0.5), ("delta:4", DeltaMerge, 4.0)])
def test_policies_by_name(text: str, kind: type, lr: float | None) -> None:
    m = merge_policy(text)
    assert isinstance(m, kind) and getattr(m, "outer_lr", None) == lr


@pytest.mark.parametrize("text", ["", "mean", "sum:2", "average:1", "delta", "delta:", "delta:x", "delta:0", "delta:-1", "delta:nan", "delta:inf"])
def test_bad_policies_are_one_line_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--merge .*average, sum, or delta:LR") as e:
        merge_policy(text)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--merge"):
        RunConfig(run_dir=Path("unused"), holders=["h1"], gpus=2, merge=text)


def test_blas_threads_are_capped_for_lanes_and_lifted_after() -> None:
    before = blas_threads()
    assert before, "numpy's BLAS library is not seen by threadpoolctl"
    with cap_blas_threads(1) as n:  # one lane: nothing capped
        assert n is None and blas_threads() == before
    with cap_blas_threads(2, cores=2) as n:
        assert n == 1 and set(blas_threads().values()) == {1}
    assert blas_threads() == before
    with cap_blas_threads(4, cores=16) as n:
        assert n == 4 and set(blas_threads().values()) == {4}
    assert blas_threads() == before
    assert threads_per_lane(3, 2) == 1 and threads_per_lane(4, 64) == 16 and threads_per_lane(1, 8) == 8


@pytest.mark.parametrize("policy", ["average", "lockstep", "delta:1", "sum"])
def test_a_merge_writes_its_model_into_replicas_that_took_no_part_and_counts_only_those_that_did(policy: str) -> None:
    rs = replicas(4)
    merge = merge_policy(policy)
    merge.start(rs[0])
    took, sat_out = rs[:2], rs[2:]
    _trained_apart(took)
    sat_out[1].train_on(numpy.arange(512, dtype=numpy.uint16) % 256, 2)  # whatever a receiver holds is replaced, not counted
    # The merge of the two that trained: anchor + lr x (mean - anchor); the mean itself for lr = 1 (sum: lr = 2).
    start = replicas(1)[0].parameter_views()
    lr = 2.0 if policy == "sum" else 1.0
    want = [s + lr * ((a + b) / 2 - s) for s, a, b in zip(start, *(t.parameter_views() for t in took))]

    merge.average(took, into=sat_out)

    for r in rs:
        for got, w in zip(r.parameter_views(), want):
            numpy.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
    assert all(numpy.array_equal(a, b) for a, b in zip(rs[0].parameter_views(), rs[3].parameter_views()))


def test_one_replica_is_written_into_the_rest_and_a_refusal_writes_nothing() -> None:
    (one,) = replicas(1)
    _trained_apart([one])
    rest = replicas(2)
    InProcessAverage().average([one], into=rest)
    assert all(numpy.array_equal(a, b) for r in rest for a, b in zip(r.parameter_views(), one.parameter_views()))
    other, = replicas(1, hidden=16)
    before = [p.copy() for p in rest[0].parameter_views()]
    with pytest.raises(GtbusError, match="different shapes"):
        InProcessAverage().average([other], into=rest[:1])
    assert all(numpy.array_equal(a, b) for a, b in zip(before, rest[0].parameter_views()))
