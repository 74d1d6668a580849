"""Merging a fleet's trainer replicas: model averaging ("local SGD").

Rules:

* A merge runs only at a point where no replica is training (the fleet
  pauses its lanes between hops); it averages the replicas' parameters and
  writes the mean back into every replica, in place, through
  :meth:`~gtbus.training.trainer.Trainer.parameter_views` (the model's own
  memory, no copy of the model kept anywhere else). Each replica keeps its
  own optimizer state.
* Replicas start identical (the same seed), so after a merge they are
  identical again.
* :class:`ModelMerge` is the interface a distributed engine plugs into (NCCL
  through ``torch.distributed`` or ``cupy.cuda.nccl``, one worker per GPU);
  :class:`InProcessAverage` is the in-process implementation the host
  backend (and K lanes on one GPU) use.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from gtbus.errors import GtbusError
from gtbus.training.trainer import Trainer


class ModelMerge(Protocol):
    """Averages the parameters of several replicas of one model into every replica."""

    def average(self, replicas: Sequence[Trainer]) -> None:
        """Write the mean of ``replicas``' parameters into each of them (nothing when there is one)."""
        ...


class InProcessAverage:
    """:class:`ModelMerge` over arrays of one process (numpy, or cupy on one GPU)."""

    def average(self, replicas: Sequence[Trainer]) -> None:
        """Write the mean of ``replicas``' parameters into each of them (nothing when there is one)."""
        if len(replicas) < 2:
            return
        views = [r.parameter_views() for r in replicas]
        if len({len(v) for v in views}) != 1:
            raise GtbusError("replicas to merge have different numbers of parameters")
        # Everything is checked before anything is written: no replica is left half merged.
        if any(len({(p.shape, p.dtype) for p in group}) != 1 for group in zip(*views)):
            raise GtbusError("replicas to merge have parameters of different shapes or types")
        for group in zip(*views):
            # The sum in the parameters' own dtype, as a collective all-reduce sums;
            # then the one mean is copied into every replica.
            mean = group[0].copy()
            for p in group[1:]:
                mean += p
            mean /= len(group)
            for p in group:
                p[...] = mean
