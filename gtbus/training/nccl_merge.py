"""Merging replicas that live on several GPUs of this process, through NCCL (:mod:`gtbus.gpu.nccl`).

The in-process merges of :mod:`gtbus.training.merge` add arrays with cupy,
which works for replicas on one GPU; replicas on distinct GPUs would be read
across GPUs by peer access (off for confidential computing on Hopper, and
never the path a collective library takes). Here the mean is an NCCL
all-reduce, one rank per GPU:

* :class:`NcclAverage` (``--merge average``) and :class:`NcclGradientReduce`
  (the per-step gradient reduce of ``--merge lockstep``, with
  :class:`NcclLockstepAverage` at a wave's end) compute the same mean as
  :class:`~gtbus.training.merge.InProcessAverage` and
  :class:`~gtbus.training.merge.InProcessGradientMean`; the sums' order
  differs, so with more than two GPUs results may differ from theirs in the
  last bit, and are identical on every GPU.
* Lanes sharing a GPU (K lanes over fewer GPUs): each GPU's members are summed
  on that GPU first (into a scratch copy), the per-GPU sums all-reduced, and
  the total divided by K: still the mean over every member.
* :func:`fleet_merge` picks the engine for a fleet's devices: NCCL as soon as
  the lanes' replicas span two GPUs or more, the in-process merge when they
  share one GPU or are on the host. ``sum`` and ``delta:LR`` keep an anchor
  model on one device and have no NCCL form yet: over several GPUs they are
  refused (ConfigError) rather than left to peer access.
"""

from __future__ import annotations

from typing import Any, Sequence

from gtbus.errors import ConfigError, DeviceError
from gtbus.gpu.backends import device_gpu
from gtbus.gpu.nccl import all_reduce_mean_each, communicators, nccl_module
from gtbus.training.merge import GradientReduce, ModelMerge, check_alike, merge_policy, write_mean
from gtbus.training.trainer import Trainer


def mean_over_gpus(members: Sequence[Sequence[Any]], whose: str, what: str, count: int | None = None) -> None:
    """Write the mean of the first ``count`` members (default all) into every member's arrays: ``members[i]`` is member
    i's arrays, all on one GPU; the members after ``count`` only receive the mean (they add nothing to the sum), so
    a model reaches GPUs that took no part by the same collective, never by peer access.

    Checked whole (alike arrays, each member on one GPU) before anything is
    written; ``whose`` and ``what`` name them in the one-line error.
    """
    count = len(members) if count is None else count
    if len(members) < 2 or count < 1:
        return
    check_alike(members, whose, what)
    nccl_module()  # one line naming what is missing, where cupy or NCCL is
    import cupy

    by_gpu: dict[int, list[int]] = {}
    for index, arrays in enumerate(members):
        if not all(isinstance(a, cupy.ndarray) for a in arrays):
            raise DeviceError(f"{whose}: an NCCL merge takes cupy arrays, member {index} has others")
        gpus = {a.device.id for a in arrays}
        if len(gpus) != 1:
            raise DeviceError(f"{whose}: member {index} has {what} on several GPUs ({sorted(gpus)})")
        by_gpu.setdefault(gpus.pop(), []).append(index)
    order = sorted(by_gpu)
    if len(order) == 1:
        write_mean(zip(*members), count)  # one GPU: nothing to communicate
        return
    rows = []
    for position in range(len(members[0])):
        row = []
        for gpu in order:
            here = by_gpu[gpu]
            givers = [index for index in here if index < count]
            if here == givers and len(givers) == 1:
                row.append(members[givers[0]][position])  # its own GPU: reduced in place
                continue
            with cupy.cuda.Device(gpu):
                # A scratch sum of this GPU's contributors (zero where it has only receivers):
                # no member changes until the mean is known.
                total = cupy.zeros_like(members[here[0]][position])
                for index in givers:
                    total += members[index][position]
            row.append(total)
        rows.append(row)
    all_reduce_mean_each(rows, divisor=count)
    for position, row in enumerate(rows):
        for gpu, mean in zip(order, row):
            with cupy.cuda.Device(gpu):
                for index in by_gpu[gpu]:
                    target = members[index][position]
                    if target is not mean:
                        target[...] = mean


class NcclAverage:
    """``average`` (:class:`~gtbus.training.merge.ModelMerge`) over replicas on several GPUs: their mean, through NCCL."""

    name = "average"
    gradients: GradientReduce | None = None

    def __init__(self, gpus: Sequence[int] = ()) -> None:
        """``gpus``: the lanes' GPUs, whose communicators :meth:`start` makes (none given: made at the first merge)."""
        self.gpus = tuple(sorted(set(gpus)))

    def start(self, model: Trainer) -> None:
        """Make the communicators over the lanes' GPUs now (the mean keeps no earlier model).

        Creating them takes a while (every GPU joins): paid at the run's
        start, not inside its first merge.
        """
        if len(self.gpus) > 1:
            communicators(self.gpus)

    def average(self, replicas: Sequence[Trainer], into: Sequence[Trainer] = ()) -> None:
        """Write the mean of ``replicas``' parameters into each of them and into ``into`` (nothing when there is one and no ``into``)."""
        mean_over_gpus([r.parameter_views() for r in (*replicas, *into)], "replicas to merge", "parameters", len(replicas))


class NcclGradientReduce:
    """:class:`~gtbus.training.merge.GradientReduce` over lockstep members on several GPUs, through NCCL."""

    def reduce(self, grads: Sequence[Sequence[Any]]) -> None:
        """Write the members' mean gradient into each member's arrays (nothing when there is one member)."""
        mean_over_gpus(grads, "lockstep members", "gradients")


class NcclLockstepAverage(NcclAverage):
    """``lockstep`` over several GPUs: gradients all-reduced every step by NCCL; a wave's end averages its replicas by NCCL.

    Unlike :class:`~gtbus.training.merge.LockstepAverage`, the wave's end
    averages every parameter: telling which ones the replicas already agree
    on would take a collective of its own. Replicas that are equal stay equal
    (every GPU gets the same sum); with more than two, their common value may
    move by the last bit.
    """

    name = "lockstep"

    def __init__(self, gpus: Sequence[int] = ()) -> None:
        """Gradients reduced over NCCL; ``gpus`` as for :class:`NcclAverage`."""
        super().__init__(gpus)
        self.gradients: GradientReduce | None = NcclGradientReduce()


def spans_gpus(gpus: Sequence[int | None]) -> bool:
    """True if lanes on these GPUs (None: not a GPU) hold replicas on two GPUs or more: their merge needs NCCL."""
    return None not in gpus and len(set(gpus)) >= 2


def merge_for_gpus(policy_text: str, gpus: Sequence[int | None]) -> ModelMerge:
    """The merge ``--merge policy_text`` names, for lanes on ``gpus`` (one entry per lane; None: not a GPU).

    NCCL when the replicas span two GPUs or more, else the in-process merge
    of :func:`~gtbus.training.merge.merge_policy`. ConfigError (one line) for
    an unknown policy, or one with no NCCL form over several GPUs.
    """
    policy = merge_policy(policy_text)
    if not spans_gpus(gpus):
        return policy
    on = [g for g in gpus if g is not None]  # all of them: spans_gpus
    if policy.name == "average":
        return NcclAverage(on)
    if policy.name == "lockstep":
        return NcclLockstepAverage(on)
    raise ConfigError(f"--merge {policy.name} keeps its anchor model on one GPU and cannot merge lanes on GPUs "
                      f"{sorted(set(on))}; use --merge average or lockstep")


def fleet_merge(policy_text: str, devices: Sequence[Any]) -> ModelMerge:
    """The merge for a fleet whose lanes run on ``devices`` (see :func:`merge_for_gpus`)."""
    return merge_for_gpus(policy_text, [device_gpu(d) for d in devices])
