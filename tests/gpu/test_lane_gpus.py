"""Lanes spread over a host's GPUs, and the merge engine chosen for them: the parts that need no GPU.

The NCCL reductions themselves run in test_nccl_gpu.py, on GPUs.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from gtbus.errors import ConfigError, DeviceError
from gtbus.gpu.backends import device_gpu, lane_gpus, make_devices
from gtbus.gpu.host import HostDevice
from gtbus.gpu.nccl import all_reduce_mean, communicators
from gtbus.training.bytelm import ByteLM, ByteLMConfig
from gtbus.training.merge import DeltaMerge, InProcessAverage, LockstepAverage
from gtbus.training.nccl_merge import NcclAverage, NcclGradientReduce, NcclLockstepAverage, fleet_merge, merge_for_gpus, spans_gpus

HAS_CUPY = importlib.util.find_spec("cupy") is not None


@pytest.mark.parametrize(("count", "visible", "gpus"), [
    (1, 1, [0]),
    (4, 1, [0, 0, 0, 0]),  # a one-GPU host: K lanes on it
    (2, 2, [0, 1]),
    (4, 8, [0, 1, 2, 3]),  # fewer lanes than GPUs: the first ones
    (5, 2, [0, 1, 0, 1, 0]),  # round robin: every GPU one lane before any gets two
    (8, 8, list(range(8))),
])
def test_lane_i_goes_to_gpu_i_mod_visible(count: int, visible: int, gpus: list[int]) -> None:
    assert lane_gpus(count, visible) == gpus


@pytest.mark.parametrize(("count", "visible", "says"), [
    (0, 2, "at least one device"), (-1, 2, "at least one device"), (2.0, 2, "at least one device"),
    (2, 0, "sees no CUDA device"), (2, True, "sees no CUDA device"),
])
def test_impossible_lane_layouts_are_refused_in_one_line(count: object, visible: object, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        lane_gpus(count, visible)  # type: ignore[arg-type]


def test_host_lanes_are_not_gpus_and_need_nothing_made_current() -> None:
    devices = make_devices("host", 3)
    assert [device_gpu(d) for d in devices] == [None, None, None]
    replica = ByteLM(ByteLMConfig(hidden=8, batch=2))
    with devices[1].active():  # what the hop runner puts around a lane's training: nothing on the host
        replica.load(devices[1].array_module)
    assert isinstance(replica.parameter_views()[0], np.ndarray)


@pytest.mark.parametrize(("policy", "gpus", "engine"), [
    ("average", [None, None], InProcessAverage),  # host lanes
    ("average", [0, 0, 0], InProcessAverage),  # K lanes on one GPU: NCCL would refuse them ("Duplicate GPU")
    ("average", [0], InProcessAverage),  # one lane: nothing to merge over
    ("average", [0, 1], NcclAverage),
    ("average", [0, 1, 0, 1], NcclAverage),  # lanes share GPUs, replicas still span two
    ("lockstep", [0, 1], NcclLockstepAverage),
    ("lockstep", [0, 0], LockstepAverage),
    ("sum", [0, 0], DeltaMerge),
    ("delta:0.5", [None, None], DeltaMerge),
])
def test_the_merge_engine_follows_where_the_replicas_are(policy: str, gpus: list[int | None], engine: type) -> None:
    merge = merge_for_gpus(policy, gpus)
    assert type(merge) is engine and merge.name == policy
    assert spans_gpus(gpus) == engine.__name__.startswith("Nccl")
    if engine is NcclLockstepAverage:
        assert isinstance(merge.gradients, NcclGradientReduce)
    if spans_gpus(gpus):  # the communicators it makes at the run's start: one per GPU
        assert isinstance(merge, NcclAverage) and merge.gpus == tuple(sorted(set(gpus)))


@pytest.mark.parametrize("policy", ["sum", "delta:0.5"])
def test_anchor_merges_over_several_gpus_are_refused_not_left_to_peer_access(policy: str) -> None:
    with pytest.raises(ConfigError, match="cannot merge lanes on GPUs \\[0, 1\\]; use --merge average"):
        merge_for_gpus(policy, [0, 1])


def test_unknown_policies_are_refused_as_merge_policy_refuses_them() -> None:
    with pytest.raises(ConfigError, match="--merge 'mean'"):
        merge_for_gpus("mean", [0, 1])


def test_a_host_fleet_merges_in_process() -> None:
    assert type(fleet_merge("average", make_devices("host", 2))) is InProcessAverage
    assert type(fleet_merge("lockstep", [HostDevice(), HostDevice()])) is LockstepAverage


@pytest.mark.skipif(HAS_CUPY, reason="cupy is installed here: the GPU tests run the NCCL path")
def test_without_cupy_an_nccl_merge_is_refused_in_one_line() -> None:
    replicas = [ByteLM(ByteLMConfig(hidden=8, batch=2)) for _ in range(2)]
    for r in replicas:
        r.load(np)
    for attempt in (lambda: all_reduce_mean([np.zeros(4, np.float32)] * 2), lambda: communicators([0, 1]),
                    lambda: NcclAverage().average(replicas), lambda: NcclGradientReduce().reduce([r.parameter_views() for r in replicas])):
        with pytest.raises(DeviceError, match="needs cupy") as err:
            attempt()
        assert "\n" not in str(err.value)
