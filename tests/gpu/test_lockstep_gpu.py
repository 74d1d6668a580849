"""``--merge lockstep`` on a real GPU: replicas on cupy (ByteLM, and the torch trainer through DLPack)
trained in one wave on threads stay bit-identical, and a lockstep fleet of two lanes travels end to end.

Skipped cleanly where cupy or a GPU is absent (as in CI); the lead runs it on the GPU host.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import pytest

from cuda_guard import cupy_or_skip

cupy = cupy_or_skip()

from gtbus.nodes.launcher import LocalDeployment, LocalRun  # noqa: E402
from gtbus.training.bytelm import ByteLM, ByteLMConfig  # noqa: E402
from gtbus.training.lockstep import LockstepGroup  # noqa: E402
from gtbus.training.merge import InProcessGradientMean  # noqa: E402

pytestmark = pytest.mark.gpu
DEADLOCK = 120.0  # seconds: only a barrier that never opens gets near it


def _wave(trainers: list[Any], chunks: list[Any], steps: int) -> list[Any]:
    """One lockstep wave: each replica trains on its own thread (its GPU current there), as the hop runner does."""
    group = LockstepGroup(InProcessGradientMean())
    group.open_wave(range(len(trainers)))

    def member(i: int) -> Any:
        with cupy.cuda.Device(0):
            try:
                report = trainers[i].train_on(chunks[i], steps, grad_sync=group.member(i))
            except BaseException:
                group.leave(i, finished=False)
                raise
            group.leave(i, finished=True)
            return report

    pool = ThreadPoolExecutor(len(trainers))
    futures = [pool.submit(member, i) for i in range(len(trainers))]
    _, waiting = wait(futures, DEADLOCK)
    pool.shutdown(wait=not waiting)  # a deadlocked member must fail the test, not hang it
    assert not waiting, "a lockstep member is still waiting: the barrier deadlocked"
    return [f.result() for f in futures]


def _identical(a: Any, b: Any) -> bool:
    return all(bool(cupy.array_equal(x, y)) for x, y in zip(a.parameter_views(), b.parameter_views()))


def _chunks(n: int, size: int) -> list[Any]:
    rng = cupy.random.default_rng(3)
    return [rng.integers(0, 256, size).astype(cupy.uint16) for _ in range(n)]


def test_bytelm_replicas_on_the_gpu_stay_identical_through_a_wave() -> None:
    rs = [ByteLM(ByteLMConfig(seed=0, hidden=32, batch=8)) for _ in range(2)]
    for r in rs:
        r.load(cupy)
    start = [p.copy() for p in rs[0].parameter_views()]
    out = _wave(rs, _chunks(2, 4096), 8)
    assert all(o.steps == 8 for o in out), out
    assert _identical(rs[0], rs[1])
    assert not all(bool(cupy.array_equal(a, b)) for a, b in zip(start, rs[0].parameter_views()))


def test_torch_replicas_on_the_gpu_stay_identical_through_a_wave() -> None:
    pytest.importorskip("torch")
    from gtbus.training.gpt import gpt_tiny
    from gtbus.training.pytorch import TorchTrainer, TorchTrainerConfig

    cfg = TorchTrainerConfig(context=64, batch=8, lr=3e-3, weight_decay=0.0, seed=0)
    rs = [TorchTrainer(lambda: gpt_tiny(vocab=256, context=64), vocab=256, config=cfg) for _ in range(2)]
    for r in rs:
        r.load(cupy)
    out = _wave(rs, _chunks(2, 8192), 6)
    assert all(o.steps == 6 for o in out), out
    assert _identical(rs[0], rs[1])


def test_a_lockstep_fleet_of_two_lanes_travels_on_the_gpu(tmp_path: Path) -> None:
    run = LocalRun(run_dir=tmp_path / "run", holders=2, backend="cupy", chunk_tokens=32768, steps="20", bytes_per_holder=128 * 1024,
                   lease=60.0, gpus=2, extra_orchestrator_args=("--merge", "lockstep"))
    summary = LocalDeployment(run).run_to_end(timeout=600)
    assert summary["merge"] == "lockstep" and summary["gpus"] == 2
    assert summary["outcomes"] == {"trained": summary["hops"]} and summary["merges"] >= 1
    assert summary["last_loss"] < summary["first_loss"]
