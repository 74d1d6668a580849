"""The lockstep merge's barrier (gtbus.training.lockstep) with real ByteLM replicas training on real threads.

Nothing waits on time: every thread is joined (with a generous bound that only a
deadlock would reach, and then the test fails saying so).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy
import pytest

from gtbus.errors import ConfigError, GtbusError
from gtbus.training.bytelm import ByteLM, ByteLMConfig
from gtbus.training.lockstep import LockstepGroup
from gtbus.training.merge import InProcessGradientMean, LockstepAverage, merge_policy

SMALL = dict(context=8, embed=4, hidden=8, batch=4)
DEADLOCK = 60.0  # seconds: only a barrier that never opens gets near it


def replicas(n: int, **cfg: int) -> list[ByteLM]:
    out = [ByteLM(ByteLMConfig(seed=0, **{**SMALL, **cfg})) for _ in range(n)]
    for r in out:
        r.load(numpy)
    return out


def chunks(n: int, size: int = 512) -> list[numpy.ndarray]:
    rng = numpy.random.default_rng(7)
    return [rng.integers(0, 256, size).astype(numpy.uint16) for _ in range(n)]


def run_threads(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run each job on its own thread; each one's result or exception, in order."""
    out: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            out[i] = jobs[i]()
        except BaseException as exc:  # noqa: BLE001 - the test looks at what each member raised
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLOCK)
        assert not t.is_alive(), "a lockstep member is still waiting: the barrier deadlocked"
    return out


def member_job(group: LockstepGroup, lane: int, trainer: ByteLM, tokens: Any, steps: int) -> Callable[[], Any]:
    """What the hop runner does on a lane's thread: train with the group's hook, leave when done or failed."""
    def job() -> Any:
        try:
            report = trainer.train_on(tokens, steps, grad_sync=group.member(lane))
        except BaseException:
            group.leave(lane, finished=False)
            raise
        group.leave(lane, finished=True)
        return report
    return job


def same(a: ByteLM, b: ByteLM) -> bool:
    return all(numpy.array_equal(x, y) for x, y in zip(a.parameter_views(), b.parameter_views()))


def test_a_wave_on_different_chunks_keeps_its_replicas_bit_identical_and_trains_them() -> None:
    rs = replicas(3)
    start = [p.copy() for p in rs[0].parameter_views()]
    group = LockstepGroup(InProcessGradientMean())
    group.open_wave([0, 1, 2])
    out = run_threads([member_job(group, i, r, c, 6) for i, (r, c) in enumerate(zip(rs, chunks(3)))])
    assert all(o.steps == 6 for o in out), out
    assert same(rs[0], rs[1]) and same(rs[0], rs[2])  # every member applied the same mean gradient
    assert not all(numpy.array_equal(a, b) for a, b in zip(start, rs[0].parameter_views()))  # and it trained
    assert group.steps == {0: 6, 1: 6, 2: 6} and group.tainted == [] and group.members == []


def test_the_mean_gradient_is_what_one_model_steps_on_and_replicas_apart_would_differ() -> None:
    # The same chunks trained apart (no hook) give different replicas: the identity above is the reduction's doing.
    apart = replicas(2)
    for r, c in zip(apart, chunks(2)):
        r.train_on(c, 3)
    assert not same(apart[0], apart[1])
    # One lockstep step is Adam on the mean of the members' gradients, computed here by hand.
    a, b = replicas(2)
    ref, = replicas(1)
    c0, c1 = chunks(2)
    grads = []
    for r, c in ((a, c0), (b, c1)):
        probe, = replicas(1)
        probe.train_on(c, 1, grad_sync=lambda g: grads.append(g[0].copy()))
    mean = (grads[0] + grads[1]) / 2
    ref.train_on(c0, 1, grad_sync=lambda g: g[0].__setitem__(Ellipsis, mean))
    group = LockstepGroup(InProcessGradientMean())
    group.open_wave([0, 1])
    run_threads([member_job(group, 0, a, c0, 1), member_job(group, 1, b, c1, 1)])
    assert same(a, ref) and same(b, ref)


def test_a_member_with_fewer_steps_leaves_and_the_rest_go_on_among_themselves() -> None:
    rs = replicas(3)
    group = LockstepGroup(InProcessGradientMean())
    group.open_wave([0, 1, 2])
    out = run_threads([member_job(group, i, r, c, n) for i, (r, c, n) in enumerate(zip(rs, chunks(3), (2, 5, 5)))])
    assert [o.steps for o in out] == [2, 5, 5]
    assert group.steps == {0: 2, 1: 5, 2: 5} and group.tainted == []  # it finished: nothing to roll back
    assert same(rs[1], rs[2]) and not same(rs[0], rs[1])  # the wave-end merge re-syncs them (below)
    LockstepAverage().average(rs)
    assert same(rs[0], rs[1]) and same(rs[0], rs[2])


def test_a_member_that_fails_mid_wave_releases_its_mates_and_taints_the_wave() -> None:
    rs = replicas(3)
    group = LockstepGroup(InProcessGradientMean())
    group.open_wave([0, 1, 2])
    calls = 0

    def failing(grads: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("device lost")  # a failure between two of its steps
        group.sync(1, grads)

    def lane1() -> Any:
        try:
            return rs[1].train_on(chunks(1)[0], 6, grad_sync=failing)
        finally:
            group.leave(1, finished=False)

    cs = chunks(3)
    out = run_threads([member_job(group, 0, rs[0], cs[0], 6), lane1, member_job(group, 2, rs[2], cs[2], 6)])
    assert out[0].steps == 6 and out[2].steps == 6 and isinstance(out[1], RuntimeError)
    assert group.steps[1] == 2 and group.tainted == [1]  # its two steps' gradients are in lanes 0 and 2
    assert same(rs[0], rs[2])


def test_a_member_whose_hop_never_trains_leaves_and_nobody_waits_for_it() -> None:
    # Lane 1's hop was declined (or its holder died): its runner leaves at the hop's end, from another thread.
    rs = replicas(2)
    group = LockstepGroup(InProcessGradientMean())
    group.open_wave([0, 1])
    gone = threading.Event()

    def leaver() -> None:
        gone.wait(DEADLOCK)
        group.leave(1, finished=False)

    def member() -> Any:
        gone.set()  # lane 0 may already be waiting at its first step: the leave must release it
        return member_job(group, 0, rs[0], chunks(1)[0], 4)()

    out = run_threads([member, leaver])
    assert out[0].steps == 4 and group.tainted == [] and group.steps[1] == 0


def test_different_gradient_shapes_are_refused_for_every_member_in_one_line() -> None:
    a, = replicas(1)
    b, = replicas(1, hidden=16)
    group = LockstepGroup(InProcessGradientMean())
    group.open_wave([0, 1])
    out = run_threads([member_job(group, 0, a, chunks(1)[0], 3), member_job(group, 1, b, chunks(1)[0], 3)])
    for o in out:
        assert isinstance(o, GtbusError) and "\n" not in str(o)
        assert "lockstep step refused" in str(o) and "different shapes" in str(o)
    assert group.tainted == [] and group.members == []  # refused at the first step: nothing was averaged


def test_closing_the_group_releases_a_member_waiting_for_a_mate() -> None:
    a, = replicas(1)
    group = LockstepGroup(InProcessGradientMean())
    group.open_wave([0, 1])  # lane 1 never arrives
    started = threading.Event()

    def closer() -> None:
        started.wait(DEADLOCK)
        group.close("the run stops")

    def member() -> Any:
        started.set()
        return member_job(group, 0, a, chunks(1)[0], 3)()

    out = run_threads([member, closer])
    assert isinstance(out[0], GtbusError) and str(out[0]) == "the run stops"


def test_misuse_is_refused_in_one_line() -> None:
    group = LockstepGroup(InProcessGradientMean())
    group.open_wave([0])
    with pytest.raises(GtbusError, match="lane 3 is not a member"):
        group.sync(3, [numpy.zeros(2)])
    with pytest.raises(GtbusError, match="had not left"):
        group.open_wave([1])
    group.leave(0, finished=True)
    group.leave(0, finished=True)  # twice is nothing
    group.open_wave([1])
    with pytest.raises(ConfigError, match="--merge 'lockstep:2'"):
        merge_policy("lockstep:2")
    assert merge_policy(" lockstep ").name == "lockstep" and merge_policy("lockstep").gradients is not None
    assert merge_policy("average").gradients is None


def test_the_wave_end_average_leaves_equal_replicas_exactly_as_they_are() -> None:
    rs = replicas(3)
    for r in rs:
        r.train_on(chunks(1)[0], 2)  # the same chunk: equal replicas, not the initial model
    before = [p.copy() for p in rs[0].parameter_views()]
    LockstepAverage().average(rs)
    assert all(numpy.array_equal(a, b) for a, b in zip(before, rs[2].parameter_views()))
