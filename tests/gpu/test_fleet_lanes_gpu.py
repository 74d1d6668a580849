"""A fleet on a real GPU: K lanes on the process's GPU.

Skipped cleanly where cupy or a GPU is absent (as in CI); the lead runs it on the GPU host.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cuda_guard import cupy_or_skip

cupy = cupy_or_skip()

from gtbus.gpu.backends import lane_gpus, make_devices  # noqa: E402
from gtbus.nodes.launcher import LocalDeployment, LocalRun  # noqa: E402
from gtbus.training.bytelm import ByteLM, ByteLMConfig  # noqa: E402
from gtbus.training.merge import InProcessAverage  # noqa: E402

pytestmark = pytest.mark.gpu


def test_lanes_get_their_own_devices_and_replicas_merge_on_the_gpu() -> None:
    devices = make_devices("cupy", 3)
    assert len({d.device_id for d in devices}) == 3  # one device (a lane's share of the GPU) each
    assert [d.ordinal for d in devices] == lane_gpus(3, cupy.cuda.runtime.getDeviceCount())  # one GPU: all three on it
    replicas = [ByteLM(ByteLMConfig(hidden=16, batch=4)) for _ in devices]
    for r in replicas:
        r.load(cupy)
    tokens = cupy.arange(4096, dtype=cupy.uint16) % 256
    replicas[0].train_on(tokens, 2)
    InProcessAverage().average(replicas)
    assert all(bool(cupy.array_equal(a, b)) for a, b in zip(replicas[0].parameter_views(), replicas[-1].parameter_views()))


def test_a_fleet_of_two_lanes_travels_on_the_gpu(tmp_path: Path) -> None:
    run = LocalRun(run_dir=tmp_path / "run", holders=3, backend="cupy", chunk_tokens=32768, steps="40", bytes_per_holder=128 * 1024, lease=60.0, gpus=2)
    summary = LocalDeployment(run).run_to_end(timeout=600)
    assert summary["gpus"] == 2 and all(n > 0 for n in summary["hops_per_gpu"])
    assert summary["outcomes"] == {"trained": summary["hops"]} and summary["merges"] >= 1
    assert summary["last_loss"] < summary["first_loss"]
