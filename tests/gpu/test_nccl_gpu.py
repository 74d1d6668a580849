"""NCCL merging of replicas on distinct GPUs (gtbus.gpu.nccl, gtbus.training.nccl_merge), and lanes spread over GPUs.

On any GPU: a one-rank communicator reduces for real (the mean of one array
is itself), and every refusal is one line that wrote nothing. With two GPUs
or more: the NCCL means equal numpy's and the in-process merges', and a
fleet of two lanes on two GPUs trains end to end. Skipped cleanly without
cupy or a GPU (as in CI); the two-GPU tests skip, saying so, on one GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cuda_guard import cupy_or_skip

from gtbus.errors import DeviceError, GtbusError
from gtbus.gpu.nccl import all_reduce_mean, all_reduce_mean_each, communicators, nccl_module

cupy = cupy_or_skip()
try:
    nccl_module()
except GtbusError as exc:  # pragma: no cover - a cupy built without NCCL
    pytest.skip(str(exc), allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "export"))

from export_kit import gtbus_here  # noqa: E402

from gtbus.gpu.backends import device_gpu, lane_gpus, make_devices  # noqa: E402
from gtbus.gpu.cupy_backend import CupyDevice  # noqa: E402
from gtbus.nodes.launcher import LocalDeployment, LocalRun  # noqa: E402
from gtbus.training.bytelm import ByteLM, ByteLMConfig  # noqa: E402
from gtbus.training.merge import InProcessAverage, InProcessGradientMean  # noqa: E402
from gtbus.training.nccl_merge import NcclAverage, NcclGradientReduce, fleet_merge, mean_over_gpus  # noqa: E402

pytestmark = pytest.mark.gpu
GPUS = cupy.cuda.runtime.getDeviceCount()
two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 GPUs, this host has {GPUS}: replicas on distinct GPUs are what NCCL merges")
SMALL = dict(context=8, embed=4, hidden=8, batch=4)


def on(gpu: int, host: np.ndarray) -> Any:
    """``host`` copied onto GPU ``gpu``."""
    with cupy.cuda.Device(gpu):
        return cupy.asarray(host)


def gpu_replicas(gpus: list[int], seed_tokens: int = 7) -> list[ByteLM]:
    """ByteLM replicas, one per entry of ``gpus`` and loaded there (what the hop runner's device.active() gives), trained apart."""
    out = []
    rng = np.random.default_rng(seed_tokens)
    for lane, gpu in enumerate(gpus):
        device = CupyDevice(gpu)
        r = ByteLM(ByteLMConfig(seed=0, **SMALL))
        with device.active():
            r.load(cupy)
            r.train_on(cupy.asarray(rng.integers(0, 256, 512 + 64 * lane).astype(np.uint16)), 2)
        out.append(r)
    return out


def host_copies(replicas: list[ByteLM]) -> list[ByteLM]:
    """The same replicas on the CPU (numpy), from their state: what the in-process merge is checked on."""
    out = []
    for r in replicas:
        h = ByteLM(ByteLMConfig(seed=0, **SMALL))
        h.load(np)
        h.load_state_dict(r.state_dict())
        out.append(h)
    return out


def host_views(r: ByteLM) -> list[np.ndarray]:
    return [cupy.asnumpy(p) for p in r.parameter_views()]


# -- on any GPU --------------------------------------------------------------------------------


def test_a_one_rank_communicator_reduces_for_real_and_is_made_once() -> None:
    a = on(0, np.arange(1 << 16, dtype=np.float32) / 7)
    before = a.copy()
    all_reduce_mean([a])  # the mean of one array: NCCL's sum of one rank, divided by one
    assert bool(cupy.array_equal(a, before))
    b = on(0, np.ones((3, 5), dtype=np.float64))
    all_reduce_mean_each([[a], [b]])  # several arrays in one group call
    assert bool(cupy.array_equal(a, before)) and bool((b == 1).all())
    assert communicators([0]) is communicators([0])


@pytest.mark.parametrize(("arrays", "says"), [
    (lambda: [on(0, np.zeros(4, np.float32)), on(0, np.zeros(4, np.float32))], "share a GPU"),
    (lambda: [np.zeros(4, np.float32)], "cupy arrays"),
    (lambda: [on(0, np.zeros(4, np.int32))], "not int32"),
    (lambda: [on(0, np.zeros((4, 4), np.float32))[:, 1]], "contiguous"),
    (lambda: [], "at least one array"),
])
def test_refusals_are_one_line_and_write_nothing(arrays: Any, says: str) -> None:
    given = arrays()
    before = [cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else a.copy() for a in given]
    with pytest.raises(DeviceError, match=says) as err:
        all_reduce_mean(given)
    assert "\n" not in str(err.value)
    assert all(np.array_equal(cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else a, b) for a, b in zip(given, before))


@pytest.mark.parametrize(("gpus", "says"), [([0, 0], "distinct GPUs"), ([GPUS], "distinct GPUs"), ([-1], "distinct GPUs")])
def test_communicators_over_impossible_gpu_sets_are_refused(gpus: list[int], says: str) -> None:
    with pytest.raises(DeviceError, match=says):
        communicators(gpus)


def test_lanes_go_round_robin_over_the_gpus_and_each_device_works_on_its_own() -> None:
    devices = make_devices("cupy", 3)
    assert [device_gpu(d) for d in devices] == lane_gpus(3, GPUS)
    assert cupy.cuda.runtime.getDevice() == 0  # outside every lane's active(): lane 0's GPU
    for d in devices:
        buf = d.alloc(4096)
        with d.active():
            assert cupy.cuda.runtime.getDevice() == d.ordinal
        assert buf._array.device.id == d.ordinal and d.verify_zero(buf)  # allocated on its GPU whatever is current
        staging, handle = d.alloc_hop_staging(4096)
        assert d.bus_id in handle and staging._array.device.id == d.ordinal
        d.release(staging)
        d.release(buf)
    with pytest.raises(DeviceError, match=f"no GPU {GPUS} in this process"):
        CupyDevice(GPUS)


def test_replicas_on_one_gpu_merge_in_process_and_agree_with_the_nccl_class_there() -> None:
    replicas = gpu_replicas([0, 0])
    expected = host_copies(replicas)
    InProcessAverage().average(expected)
    assert type(fleet_merge("average", [CupyDevice(0), CupyDevice(0)])) is InProcessAverage
    NcclAverage().average(replicas)  # every member on GPU 0: the in-process sum, no communicator
    for r in replicas:
        assert all(np.array_equal(a, b) for a, b in zip(host_views(r), expected[0].parameter_views()))


# -- replicas on distinct GPUs -----------------------------------------------------------------


@two_gpus
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_all_reduce_mean_over_gpus_is_numpys_mean(dtype: type) -> None:
    rng = np.random.default_rng(1)
    host = [rng.standard_normal(100_003).astype(dtype) for _ in range(GPUS)]
    arrays = [on(g, h) for g, h in enumerate(host)]
    all_reduce_mean(arrays)
    expected = np.mean(np.stack(host).astype(np.float64), axis=0)
    tol = 4e-3 if dtype is np.float16 else 1e-6  # float16 sums round at ~1e-3 of their size
    for gpu, a in enumerate(arrays):
        assert a.device.id == gpu  # reduced where it lives
        np.testing.assert_allclose(cupy.asnumpy(a).astype(np.float64), expected, rtol=tol, atol=tol)
    assert all(np.array_equal(cupy.asnumpy(a), cupy.asnumpy(arrays[0])) for a in arrays)  # every GPU got the same mean


@two_gpus
def test_mismatched_arrays_on_two_gpus_are_refused_before_any_collective() -> None:
    a, b = on(0, np.ones(8, np.float32)), on(1, np.full(8, 3, np.float32))
    for other in (on(1, np.ones(9, np.float32)), on(1, np.ones(8, np.float64))):
        with pytest.raises(DeviceError, match="different shapes or types"):
            all_reduce_mean([a, other])
    with pytest.raises(DeviceError, match="same GPUs in the same order"):
        all_reduce_mean_each([[a, b], [on(1, np.ones(8, np.float32)), on(0, np.ones(8, np.float32))]])
    assert bool((a == 1).all()) and bool((b == 3).all())
    all_reduce_mean([a, b])
    assert bool((a == 2).all()) and bool((b == 2).all())


@two_gpus
def test_nccl_average_equals_the_in_process_average_of_the_same_replicas() -> None:
    replicas = gpu_replicas([0, 1])
    expected = host_copies(replicas)
    InProcessAverage().average(expected)
    merge = fleet_merge("average", [CupyDevice(0), CupyDevice(1)])
    assert type(merge) is NcclAverage and merge.gpus == (0, 1)
    merge.start(replicas[0])  # the communicators are made here, at the run's start, once
    assert communicators([1, 0]) is communicators([0, 1])
    merge.average(replicas)
    for r in replicas:
        for got, want in zip(host_views(r), expected[0].parameter_views()):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert all(np.array_equal(a, b) for a, b in zip(host_views(replicas[0]), host_views(replicas[1])))  # one model again


@two_gpus
def test_a_replica_that_took_no_part_receives_the_mean_by_the_collective_and_adds_nothing() -> None:
    # Lanes on GPUs 0, 1, 0, 1: two trained (0 and 1), two sat a lockstep wave out (one on each GPU).
    replicas = gpu_replicas([0, 1, 0, 1])
    expected = host_copies(replicas)
    InProcessAverage().average(expected[:2], into=expected[2:])
    merge = fleet_merge("average", [CupyDevice(g) for g in (0, 1, 0, 1)])
    assert type(merge) is NcclAverage
    merge.average(replicas[:2], into=replicas[2:])
    for r in replicas:
        for got, want in zip(host_views(r), expected[0].parameter_views()):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@two_gpus
def test_members_sharing_gpus_are_summed_there_first_and_the_mean_is_over_every_member() -> None:
    rng = np.random.default_rng(2)
    host = [[rng.standard_normal(1000).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)] for _ in range(4)]
    members = [[on(i % 2, h) for h in arrays] for i, arrays in enumerate(host)]
    mean_over_gpus(members, "replicas to merge", "parameters")
    for position in range(2):
        want = np.mean(np.stack([m[position] for m in host]), axis=0)
        for m in members:
            np.testing.assert_allclose(cupy.asnumpy(m[position]), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(GtbusError, match="different shapes or types"):
        mean_over_gpus([members[0], [members[1][1], members[1][0]]], "replicas to merge", "parameters")


@two_gpus
def test_nccl_gradient_reduce_equals_the_in_process_one() -> None:
    rng = np.random.default_rng(3)
    host = [[rng.standard_normal(4097).astype(np.float32)] for _ in range(2)]
    grads = [[on(g, h) for h in member] for g, member in enumerate(host)]
    expected = [[h.copy() for h in member] for member in host]
    InProcessGradientMean().reduce(expected)
    NcclGradientReduce().reduce(grads)
    for member in grads:
        assert np.array_equal(cupy.asnumpy(member[0]), expected[0][0])  # two ranks: a + b, / 2, in float32 alike


@two_gpus
def test_a_fleet_of_two_lanes_on_two_gpus_trains_and_its_manifest_checks_against_the_logs(tmp_path: Path) -> None:
    run = LocalRun(run_dir=tmp_path / "run", holders=3, backend="cupy", chunk_tokens=32768, steps="40",
                   bytes_per_holder=128 * 1024, lease=60.0, gpus=2)
    summary = LocalDeployment(run).run_to_end(timeout=600)
    assert summary["gpus"] == 2 and all(n > 0 for n in summary["hops_per_gpu"])
    assert summary["outcomes"] == {"trained": summary["hops"]} and summary["merges"] >= 1
    assert summary["last_loss"] < summary["first_loss"]
    assert "Traceback" not in (run.run_dir / "orchestrator.err").read_text()
    out = tmp_path / "model"
    done = gtbus_here("export", run.run_dir, "--out", out)
    assert done.returncode == 0, done.stdout + done.stderr
    done = gtbus_here("export", "--check", out, "--logs", run.run_dir / "logs", "--keys", run.run_dir / "keys")
    assert done.returncode == 0 and "agrees with the logs" in done.stdout, done.stdout + done.stderr
