"""The orchestrator's side of a lockstep wave, in process: real devices, ByteLM replicas on real threads, its merge.

A wave member that fails after its gradients went into its mate's replica
taints the wave: at the wave's end the orchestrator rolls back every replica
that trained in it (to the last merge) and reopens their hops, so no chunk is
in the model partly twice. The fault (a training that raises at its third
step) is injected through the trainer's own ``grad_sync`` hook.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy
import pytest

from gtbus.errors import ConfigError
from gtbus.gpu.attestation import PlatformSigner
from gtbus.gpu.host import HostDevice
from gtbus.nodes.orchestrator import Orchestrator, RunConfig
from gtbus.nodes.run_summary import HopResult
from gtbus.nodes.runtime import NodeRuntime
from gtbus.protocol.fleet import FleetSchedule
from gtbus.protocol.schedule import Schedule
from gtbus.testing import MemoryNetwork, make_deployment, run_async
from gtbus.training.bytelm import ByteLM, ByteLMConfig
from gtbus.training.trainer import WorkloadError


def orchestrator(tmp: Path, merge: str = "lockstep", trainer: type = ByteLM) -> Orchestrator:
    dep = make_deployment(tmp / "keys", holders=2)
    rt = NodeRuntime(dep.orchestrator, dep.roster, MemoryNetwork().server("orch"), run_dir=tmp, heartbeat_interval=0)
    cfg = RunConfig(run_dir=tmp, holders=["h1", "h2"], chunk_tokens=4096, steps_per_hop=4, gpus=2, merge=merge)
    return Orchestrator(rt, [HostDevice(), HostDevice()], [trainer(ByteLMConfig(hidden=16, batch=4)) for _ in range(2)],
                        PlatformSigner.generate(), cfg)


def test_a_member_that_fails_after_sharing_its_gradients_rolls_its_wave_back(tmp_path: Path) -> None:
    async def go() -> None:
        orch = orchestrator(tmp_path)
        assert orch.wave is not None
        for lane in orch.lanes:
            lane.trainer.load(numpy)
        start = [p.copy() for p in orch.lanes[0].trainer.parameter_views()]
        orch.schedule = Schedule({"h1": 1, "h2": 1}, 1)
        orch.fleet = FleetSchedule(orch.schedule, 2, waves=True)
        wave = [orch.fleet.next_for(k) for k in range(2)]
        orch.wave.open_wave([0, 1])
        chunk = numpy.random.default_rng(3).integers(0, 256, 4096).astype(numpy.uint16)
        out: list[Any] = [None, None]

        def member(k: int, fail_at: int | None) -> None:
            assert orch.wave is not None
            sync, calls = orch.wave.member(k), 0

            def hook(grads: Any) -> None:
                nonlocal calls
                calls += 1
                if calls == fail_at:
                    raise WorkloadError("injected: training failed mid-hop")
                sync(grads)
            try:
                out[k] = orch.lanes[k].trainer.train_on(chunk, 4, grad_sync=hook)
                orch.wave.leave(k, finished=True)
            except WorkloadError as exc:
                out[k] = exc
                orch.wave.leave(k, finished=False)

        threads = [threading.Thread(target=member, args=(0, None)), threading.Thread(target=member, args=(1, 3))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "the wave's barrier deadlocked"
        assert out[0].steps == 4 and isinstance(out[1], WorkloadError) and orch.wave.tainted == [1]

        # What the hops' shell does as they end: lane 0 trained (settled done), lane 1's training was refused.
        assert wave[0] is not None and wave[1] is not None
        trained = HopResult(1, 0, wave[0].holder, wave[0].chunk, "travel", "trained", lane=0)
        orch.fleet.release(0, "done")
        orch.trained_since_merge = orch.lanes[0].trained_since_merge = 1
        orch.lanes[0].unsaved.append(trained)
        orch.restore_model(orch.lanes[1])  # the hop machine's RestoreModel for the refused training
        orch.fleet.release(1, "failed")

        assert orch._merge_due()  # a tainted wave ends in a merge point
        orch._save_checkpoint()
        for lane in orch.lanes:  # both replicas back at the last merge (here the initial model)
            assert all(numpy.array_equal(a, b) for a, b in zip(start, lane.trainer.parameter_views()))
        assert trained.discarded and "training discarded" in trained.detail
        assert wave[0].holder in orch.fleet.pending_holders()  # its chunk is trained again, from the last merge
        assert orch.wave.tainted == [] and orch.trained_since_merge == 0 and orch.merges == 0

    run_async(go())


def test_a_wave_that_trained_apart_from_a_lane_that_sat_it_out_is_copied_into_that_lane(tmp_path: Path) -> None:
    orch = orchestrator(tmp_path)
    for lane in orch.lanes:
        lane.trainer.load(numpy)
    orch.lanes[0].trainer.train_on(numpy.arange(4096, dtype=numpy.uint16) % 256, 2)
    orch.trained_since_merge = orch.lanes[0].trained_since_merge = 1
    orch.provenance.initial_model = orch.lanes[0].device.measure(*orch.lanes[1].trainer.parameter_views())
    orch._merge()
    a, b = (lane.trainer.parameter_views() for lane in orch.lanes)
    assert all(numpy.array_equal(x, y) for x, y in zip(a, b)) and orch.merges == 1


class NoHookByteLM(ByteLM):
    """A trainer written before the lockstep hook (its train_on takes no grad_sync)."""

    def train_on(self, tokens: Any, steps: Any = "pass") -> Any:  # type: ignore[override]
        return super().train_on(tokens, steps)


def test_lockstep_needs_a_trainer_with_the_hook_and_says_so_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a trainer whose train_on takes grad_sync; NoHookByteLM's does not"):
        orchestrator(tmp_path, trainer=NoHookByteLM)
    assert orchestrator(tmp_path / "avg", merge="average").wave is None
