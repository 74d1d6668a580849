"""Merging a fleet's trainer replicas: model averaging and delta merging ("local SGD").

Rules:

* A merge runs only at a point where no replica is training (the fleet
  pauses its lanes between hops); it computes one model from the replicas and
  writes it back into every replica, in place, through
  :meth:`~gtbus.training.trainer.Trainer.parameter_views` (the model's own
  memory). Each replica keeps its own optimizer state.
* Replicas start identical (the same seed), so after a merge they are
  identical again.
* Policies (``--merge``, :func:`merge_policy`):

  - ``average``: the replicas' mean (:class:`InProcessAverage`);
  - ``sum``: the last merged model plus the *sum* of every replica's update
    since it (:class:`DeltaMerge` with an outer learning rate of the number of
    replicas merged: FedAvg with a server learning rate, DiLoCo's outer step
    without its momentum). Each hop a lane trained moves the merged model as
    far as it moved its replica, as one model training them in turn would, to
    first order (measured below: it overshoots); averaging instead shrinks K
    lanes' updates to one K-th;
  - ``delta:LR``: the last merged model plus LR times the mean update
    (``delta:1`` is ``average``; below one it damps the merge).

  Measured (``gtbus bench fleet --compare-merge``, ByteLM with Adam, K = 4,
  bench/notes-perf.md "Fleet merge policies"): outer learning rates above
  one lose. ``sum`` diverged (held-out loss 10.0 from 5.5 untrained) and
  ``delta:1.5`` ended 15.8 % above one GPU against ``average``'s 13.7 %, at
  the same windows; so ``average`` is the default (most loss dropped per
  wall-clock second). Replicas that start an interval from one model on
  similar data make updates that mostly agree, and an Adam step is about the
  learning rate per parameter whatever the gradient: adding K agreeing
  updates steps K times as far as one model would have, with no gradient
  taken in between to correct it. Closing the gap to one GPU needs more than
  the outer step (an outer momentum, a tuned inner rate for K, or the
  lockstep all-reduce below).

  A delta policy keeps one copy of the parameters (the last merged model, the
  *anchor*) on the replicas' device; it has no other state, so a checkpoint
  (written at merges, the anchor then equal to every replica) resumes it
  exactly: :meth:`ModelMerge.start` takes the anchor again.
* Synchronous gradient all-reduce each step is not a policy here: it needs K
  lanes training in lockstep, step by step, on chunks of K holders staged at
  the same moment, and a trainer that hands out its gradient before its
  optimizer step. Lanes here train different hops at different times (each
  hop has its own grant, transfer, lease and failure), and one lane's slow
  holder would stall every lane each step. It is for the GPU fleet, one
  worker process per GPU, with NCCL in ``torch.distributed`` (issue 7 of 7).
* :class:`ModelMerge` is the interface a distributed engine plugs into (NCCL
  through ``torch.distributed`` or ``cupy.cuda.nccl``, one worker per GPU);
  the classes here are the in-process implementations the host backend (and
  K lanes on one GPU) use.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

from gtbus.errors import ConfigError, GtbusError
from gtbus.training.trainer import Trainer

#: What ``--merge`` accepts, for help texts.
MERGE_POLICIES = "average, sum, or delta:LR (the last merged model plus LR times the replicas' mean update)"
#: The policy the orchestrator merges with unless told otherwise: the most held-out loss dropped per wall-clock
#: second of the policies measured (bench/results/fleet-host-vm.md, bench/notes-perf.md).
DEFAULT_MERGE = "average"


class ModelMerge(Protocol):
    """Merges several replicas of one model into one, written into every replica."""

    name: str  # the policy as ``--merge`` names it

    def start(self, model: Trainer) -> None:
        """Every replica equals ``model`` now (the run's start, or its resume): what later updates are measured from."""
        ...

    def average(self, replicas: Sequence[Trainer]) -> None:
        """Write the merge of ``replicas``' parameters into each of them (nothing when there is one)."""
        ...


def _checked_views(replicas: Sequence[Trainer]) -> list[list[Any]]:
    # Everything is checked before anything is written: no replica is left half merged.
    views = [r.parameter_views() for r in replicas]
    if len({len(v) for v in views}) != 1:
        raise GtbusError("replicas to merge have different numbers of parameters")
    if any(len({(p.shape, p.dtype) for p in group}) != 1 for group in zip(*views)):
        raise GtbusError("replicas to merge have parameters of different shapes or types")
    return views


def _mean(group: Sequence[Any]) -> Any:
    # The sum in the parameters' own dtype, as a collective all-reduce sums.
    mean = group[0].copy()
    for p in group[1:]:
        mean += p
    mean /= len(group)
    return mean


class InProcessAverage:
    """``average``: :class:`ModelMerge` by the replicas' mean, over arrays of one process (numpy, or cupy on one GPU)."""

    name = "average"

    def start(self, model: Trainer) -> None:
        """Nothing to keep: the mean needs no earlier model."""

    def average(self, replicas: Sequence[Trainer]) -> None:
        """Write the mean of ``replicas``' parameters into each of them (nothing when there is one)."""
        if len(replicas) < 2:
            return
        for group in zip(*_checked_views(replicas)):
            mean = _mean(group)
            for p in group:
                p[...] = mean


class DeltaMerge:
    """``sum`` / ``delta:LR``: the anchor (last merged model) plus an outer learning rate times the replicas' mean update."""

    def __init__(self, outer_lr: float | None = None) -> None:
        """``outer_lr``: the step on the mean update; None: the number of replicas merged (the updates' sum)."""
        if outer_lr is not None and not (math.isfinite(outer_lr) and outer_lr > 0):
            raise ConfigError(f"the outer learning rate of a delta merge must be a positive number, not {outer_lr!r}")
        self.outer_lr = outer_lr
        self.name = "sum" if outer_lr is None else f"delta:{outer_lr:g}"
        self.anchor: list[Any] | None = None

    def start(self, model: Trainer) -> None:
        """Copy ``model``'s parameters as the anchor (one copy of the model, on its device)."""
        self.anchor = [p.copy() for p in model.parameter_views()]

    def average(self, replicas: Sequence[Trainer]) -> None:
        """Write anchor + lr x (mean - anchor) into each replica and into the anchor (nothing when there is one replica)."""
        if len(replicas) < 2:
            return
        if self.anchor is None:
            raise GtbusError("a delta merge was asked before start(): it has no model to measure the updates from")
        views = _checked_views(replicas)
        if len(views[0]) != len(self.anchor) or any(
                (p.shape, p.dtype) != (a.shape, a.dtype) for p, a in zip(views[0], self.anchor)):
            raise GtbusError("replicas to merge are not of the model the delta merge started from")
        lr = float(len(replicas)) if self.outer_lr is None else self.outer_lr
        for group, anchor in zip(zip(*views), self.anchor):
            merged = _mean(group)
            merged -= anchor
            merged *= lr
            merged += anchor
            anchor[...] = merged
            for p in group:
                p[...] = merged


def merge_policy(text: str) -> ModelMerge:
    """The merge ``--merge`` names (ConfigError, one line, for anything else)."""
    name, _, arg = text.strip().partition(":")
    if name == "average" and not arg:
        return InProcessAverage()
    if name == "sum" and not arg:
        return DeltaMerge()
    if name == "delta" and arg:
        try:
            lr = float(arg)
        except ValueError:
            lr = math.nan
        if math.isfinite(lr) and lr > 0:
            return DeltaMerge(lr)
    raise ConfigError(f"--merge {text!r}: give {MERGE_POLICIES}, LR a positive number")
