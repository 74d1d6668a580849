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
* ``lockstep`` (:class:`LockstepAverage`): synchronous gradient all-reduce
  each step while the lanes of a *wave* train. The fleet then starts hops in
  waves (:attr:`gtbus.protocol.fleet.FleetSchedule.waves`: a wave's hops are
  granted at once, none while one is in flight), the hops of a wave train
  side by side and, every step, each replica's gradient is replaced by the
  members' mean before its optimizer step (:mod:`gtbus.training.lockstep`,
  :class:`GradientReduce`); the wave's end is a merge that averages only the
  replicas that trained in it (equal after equal step counts: nothing to
  average) and copies them into the lanes that sat the wave out. What it
  costs, and why it was not the first policy built: a wave waits for its
  slowest holder (each member waits, at every step, for the members still
  provisioning; a holder that never returns holds its wave mates for one
  lease), and lanes idle between a wave's first hop to end and its last.
  Measured (bench/notes-perf.md "Lockstep gradient all-reduce", same bench
  as above): a lower held-out loss than ``average`` (K = 2: +4.2 % vs one
  GPU against +5.7 %; K = 4: +13.2 % against +13.9 %), 1.08x ``average``'s
  loss dropped per second at K = 2 but 0.98x at K = 4: ``average`` stays
  the default. Lanes in lockstep train on threads of their own (GPU lanes
  with their GPU current there), so GPU lanes run it too.
  Each replica keeps its own optimizer state: replicas that start a wave
  with equal parameters and optimizer states stay bit-identical through it;
  a lane that sat a wave out has older moments, and the wave-end merge
  re-syncs its parameters only.
* :class:`ModelMerge` is the interface a distributed engine plugs into (NCCL
  through ``torch.distributed`` or ``cupy.cuda.nccl``, one worker per GPU),
  and :class:`GradientReduce` the one a gradient all-reduce plugs into; the
  classes here are the in-process implementations the host backend (and K
  lanes on one GPU) use.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Protocol, Sequence

from gtbus.errors import ConfigError, GtbusError
from gtbus.training.trainer import Trainer

#: What ``--merge`` accepts, for help texts.
MERGE_POLICIES = ("average, sum, or delta:LR (the last merged model plus LR times the replicas' mean update); "
                  "or lockstep (hops start in waves, the wave's gradients averaged every step, merged after every wave)")
#: The policy the orchestrator merges with unless told otherwise: the most held-out loss dropped per wall-clock
#: second of the policies measured at K = 4 (bench/results/fleet-host-vm.md, bench/notes-perf.md), and one every backend runs.
DEFAULT_MERGE = "average"


class GradientReduce(Protocol):
    """Replaces each member's gradient by the members' mean, in place: one all-reduce of a lockstep step."""

    def reduce(self, grads: Sequence[Sequence[Any]]) -> None:
        """``grads``: per member, its gradient arrays (the views its optimizer reads); write their mean into every one.

        Checks every shape and dtype before writing anything (GtbusError, one line).
        """
        ...


class ModelMerge(Protocol):
    """Merges several replicas of one model into one, written into every replica."""

    name: str  # the policy as ``--merge`` names it
    #: None: replicas train apart between merges; a GradientReduce: the lanes train in lockstep waves, their
    #: gradients reduced by it every step (the orchestrator then merges only the replicas that trained).
    gradients: GradientReduce | None

    def start(self, model: Trainer) -> None:
        """Every replica equals ``model`` now (the run's start, or its resume): what later updates are measured from."""
        ...

    def average(self, replicas: Sequence[Trainer], into: Sequence[Trainer] = ()) -> None:
        """Write the merge of ``replicas``' parameters into each of them, and into ``into`` (replicas that took no part:
        lanes that sat a lockstep wave out). Nothing when there is one replica and nothing ``into``."""
        ...


def _checked_views(replicas: Sequence[Trainer]) -> list[list[Any]]:
    views = [r.parameter_views() for r in replicas]
    check_alike(views, "replicas to merge", "parameters")
    return views


def check_alike(arrays: Sequence[Sequence[Any]], whose: str, what: str) -> None:
    """GtbusError (one line) unless every member of ``arrays`` has as many arrays, of the same shapes and dtypes.

    Everything is checked before anything is written: no replica is left half merged.
    """
    if len({len(a) for a in arrays}) != 1:
        raise GtbusError(f"{whose} have different numbers of {what}")
    if any(len({(p.shape, p.dtype) for p in group}) != 1 for group in zip(*arrays)):
        raise GtbusError(f"{whose} have {what} of different shapes or types")


def _mean(group: Sequence[Any]) -> Any:
    # The sum in the parameters' own dtype, as a collective all-reduce sums.
    mean = group[0].copy()
    for p in group[1:]:
        mean += p
    mean /= len(group)
    return mean


def write_mean(groups: Iterable[Sequence[Any]], count: int | None = None) -> None:
    """For each group (one array of every member, alike: :func:`check_alike`), write the mean of its first ``count``
    arrays (default all) into each of its arrays: the rest only receive it."""
    for group in groups:
        mean = _mean(group[:count])
        for p in group:
            p[...] = mean


class InProcessAverage:
    """``average``: :class:`ModelMerge` by the replicas' mean, over arrays of one process (numpy, or cupy on one GPU)."""

    name = "average"
    gradients: GradientReduce | None = None

    def start(self, model: Trainer) -> None:
        """Nothing to keep: the mean needs no earlier model."""

    def average(self, replicas: Sequence[Trainer], into: Sequence[Trainer] = ()) -> None:
        """Write the mean of ``replicas``' parameters into each of them and into ``into`` (nothing when there is one and no ``into``)."""
        if len(replicas) < 2 and not into:
            return
        write_mean(zip(*_checked_views([*replicas, *into])), len(replicas))


class InProcessGradientMean:
    """:class:`GradientReduce` over arrays of one process (numpy, or cupy on one GPU): the sum in the gradients' dtype, / count."""

    def reduce(self, grads: Sequence[Sequence[Any]]) -> None:
        """Write the members' mean gradient into each member's arrays (nothing when there is one member)."""
        if len(grads) < 2:
            return
        check_alike(grads, "lockstep members", "gradients")
        write_mean(zip(*grads))


class LockstepAverage(InProcessAverage):
    """``lockstep``: gradients all-reduced every step within a wave (:attr:`gradients`); the wave's end averages its replicas.

    The average at a wave's end leaves replicas that are already equal (every
    member took the same steps) as they are: the mean of K equal arrays
    summed in floating point is not always the array itself.
    """

    name = "lockstep"

    def __init__(self, gradients: GradientReduce | None = None) -> None:
        """``gradients``: how a step's gradients are reduced; default in-process (an NCCL one plugs in here)."""
        self.gradients = gradients or InProcessGradientMean()

    def average(self, replicas: Sequence[Trainer], into: Sequence[Trainer] = ()) -> None:
        """Write the mean of ``replicas``' parameters into each and into ``into``, leaving the parameters on which they
        already agree as they are (those are only copied into ``into``)."""
        if len(replicas) < 2 and not into:
            return
        n = len(replicas)
        for group in zip(*_checked_views([*replicas, *into])):
            # One comparison on the arrays' own device (numpy or cupy alike); NaN compares unequal and is averaged.
            if all(bool((group[0] == p).all()) for p in group[1:n]):
                for p in group[n:]:
                    p[...] = group[0]
            else:
                write_mean([group], n)


class DeltaMerge:
    """``sum`` / ``delta:LR``: the anchor (last merged model) plus an outer learning rate times the replicas' mean update."""

    gradients: GradientReduce | None = None

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

    def average(self, replicas: Sequence[Trainer], into: Sequence[Trainer] = ()) -> None:
        """Write anchor + lr x (mean - anchor) into each replica, into ``into`` and into the anchor (nothing when there is
        one replica and no ``into``)."""
        if len(replicas) < 2 and not into:
            return
        if self.anchor is None:
            raise GtbusError("a delta merge was asked before start(): it has no model to measure the updates from")
        views = _checked_views([*replicas, *into])
        if len(views[0]) != len(self.anchor) or any(
                (p.shape, p.dtype) != (a.shape, a.dtype) for p, a in zip(views[0], self.anchor)):
            raise GtbusError("replicas to merge are not of the model the delta merge started from")
        lr = float(len(replicas)) if self.outer_lr is None else self.outer_lr
        for group, anchor in zip(zip(*views), self.anchor):
            merged = _mean(group[: len(replicas)])
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
    if name == "lockstep" and not arg:
        return LockstepAverage()
    if name == "delta" and arg:
        try:
            lr = float(arg)
        except ValueError:
            lr = math.nan
        if math.isfinite(lr) and lr > 0:
            return DeltaMerge(lr)
    raise ConfigError(f"--merge {text!r}: give {MERGE_POLICIES}, LR a positive number")
