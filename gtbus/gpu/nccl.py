"""NCCL all-reduce over the GPUs of this process: how a fleet's replicas on distinct GPUs are merged.

Why NCCL in one process (``cupy.cuda.nccl``, ``ncclCommInitAll``, one rank per
GPU) and not ``torch.distributed`` with a worker process per GPU: the
orchestrator process owns every lane, and with it every lane's model replica
(a flat device buffer per replica, for ByteLM and for the GPT-2 torch trainer
alike: :meth:`~gtbus.training.trainer.Trainer.parameter_views`), its hop
buffers and its staging. A merge is then one collective over arrays this
process already holds; worker processes would need every replica exported to
them (an IPC handle of the model: exactly what the device layer never hands
out) or the lanes' training moved into them. NCCL's single-process mode is
made for this: one communicator per GPU, created together, and collectives
issued for every rank from one thread inside ``ncclGroupStart``/``ncclGroupEnd``
(outside a group, the first rank's call would wait for ranks not yet called).

Rules:

* One rank per GPU: NCCL refuses two ranks on one GPU ("Duplicate GPU"), so
  arrays of lanes sharing a GPU are summed on that GPU first
  (:mod:`gtbus.training.nccl_merge`), and here every array of a reduction is
  on its own GPU.
* Communicators are made once per set of GPUs and kept
  (:func:`communicators`): a fleet whose lane retired merges over the
  remaining GPUs with a communicator of its own, also made once.
* Everything is checked before the first collective (NCCL present, one
  array per GPU, the same GPUs in every group, alike shapes and float types,
  contiguous): a refusal is one :class:`~gtbus.errors.DeviceError` line and
  writes nothing. An NCCL failure during the collective may leave the
  arrays partly reduced; its error says so, and its communicators are
  dropped (the next reduction makes new ones).
* The sum runs in the arrays' own dtype (``ncclSum``, as the in-process
  merge sums), each rank on its GPU's current stream, so it is ordered after
  whatever was queued there (a trainer's last step); then each array is
  divided on its GPU, and every stream is synchronised before returning.

cupy is imported when a reduction is asked for, so this module imports (and
refuses clearly) where cupy is absent.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from types import ModuleType
from typing import Any, Final, Iterable, Sequence

from gtbus.errors import DeviceError

#: dtypes a merge reduces (model parameters and gradients), by name, with their NCCL type's name in cupy.cuda.nccl.
_NCCL_TYPES: Final = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}


def nccl_module() -> ModuleType:
    """``cupy.cuda.nccl``, or DeviceError naming what is missing."""
    try:
        import cupy  # noqa: F401 - its absence is the likelier miss, and gets its own line
    except ImportError:
        raise DeviceError("an NCCL merge needs cupy (pip install 'gtbus[gpu]'), which is not installed") from None
    try:
        nccl = importlib.import_module("cupy.cuda.nccl")
    except ImportError as exc:
        raise DeviceError(f"an NCCL merge needs NCCL, which this cupy cannot load: {exc}") from None
    # cupy built without NCCL gives a stand-in module that says so here.
    if not getattr(nccl, "available", True):
        raise DeviceError("an NCCL merge needs NCCL, which this cupy cannot load (cupy.cuda.nccl.available is False)")
    return nccl


class Communicators:
    """One NCCL communicator per GPU of a set, created together (``ncclCommInitAll``); collectives from one thread at a time."""

    def __init__(self, gpus: tuple[int, ...]) -> None:
        """Communicators over ``gpus`` (distinct ordinals of this process). DeviceError if NCCL refuses."""
        nccl = nccl_module()
        import cupy

        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise DeviceError(f"NCCL needs GPUs, and this process sees none: {exc}") from None
        if not gpus or len(set(gpus)) != len(gpus) or any(type(g) is not int or not 0 <= g < count for g in gpus):
            raise DeviceError(f"NCCL needs distinct GPUs of the {count} this process sees, one rank each; got {list(gpus)}")
        try:
            with cupy.cuda.Device():  # NCCL makes each GPU current in turn: the caller's is put back after
                comms = nccl.NcclCommunicator.initAll(list(gpus))
        except (nccl.NcclError, cupy.cuda.runtime.CUDARuntimeError) as exc:
            raise DeviceError(f"NCCL could not make communicators over GPUs {list(gpus)}: {exc}") from None
        self.gpus = gpus
        self.by_gpu: dict[int, Any] = dict(zip(gpus, comms))
        # Group calls of two threads on one set of communicators would interleave their ranks' collectives.
        self.lock = threading.Lock()

    def close(self) -> None:
        """Abort the communicators (after a failed collective they may be wedged); errors doing so are moot."""
        nccl = nccl_module()
        for comm in self.by_gpu.values():
            with contextlib.suppress(nccl.NcclError):
                comm.abort()
        self.by_gpu.clear()


_MADE: dict[tuple[int, ...], Communicators] = {}
_MADE_LOCK = threading.Lock()


def communicators(gpus: Iterable[int]) -> Communicators:
    """The communicators over this set of GPUs, made on first use and kept for the process."""
    key = tuple(sorted(gpus))
    with _MADE_LOCK:
        if key not in _MADE:
            _MADE[key] = Communicators(key)
        return _MADE[key]


def _forget(comms: Communicators) -> None:
    with _MADE_LOCK:
        if _MADE.get(comms.gpus) is comms:
            del _MADE[comms.gpus]
    comms.close()


def all_reduce_mean(arrays: Sequence[Any]) -> None:
    """Write the mean of ``arrays`` (one cupy array per GPU, alike) into each of them, through NCCL."""
    all_reduce_mean_each([arrays])


def all_reduce_mean_each(groups: Sequence[Sequence[Any]], divisor: int | None = None) -> None:
    """For each group (one array per GPU, the GPUs in the same order in every group), write the group's sum / ``divisor`` into each array.

    ``divisor`` defaults to the number of GPUs (the mean); a caller that
    summed several replicas per GPU first passes the number of replicas. All
    groups go in one NCCL group call; checked whole before anything is written.
    """
    nccl = nccl_module()
    import cupy

    gpus = _checked_gpus(cupy, groups)
    n = divisor if divisor is not None else len(gpus)
    if type(n) is not int or n < 1:
        raise DeviceError(f"an all-reduce mean divides by a positive count, not {n!r}")
    types = [getattr(nccl, _NCCL_TYPES[group[0].dtype.name]) for group in groups]
    comms = communicators(gpus)
    streams = {}
    for gpu in gpus:
        with cupy.cuda.Device(gpu):  # a fresh Device: one instance's restore stack is not thread-safe
            streams[gpu] = cupy.cuda.get_current_stream()
    with comms.lock, cupy.cuda.Device():  # the caller's current GPU is put back, whatever NCCL made current
        try:
            nccl.groupStart()
            try:
                for group, nccl_type in zip(groups, types):
                    for gpu, array in zip(gpus, group):
                        if array.size:
                            ptr = array.data.ptr  # in place: NCCL allows send == receive buffer
                            comms.by_gpu[gpu].allReduce(ptr, ptr, array.size, nccl_type, nccl.NCCL_SUM, streams[gpu].ptr)
            finally:
                nccl.groupEnd()  # closes the group even when a call in it failed
        except (nccl.NcclError, cupy.cuda.runtime.CUDARuntimeError) as exc:
            _forget(comms)
            raise DeviceError(f"NCCL all-reduce over GPUs {list(gpus)} failed, the arrays may be partly reduced: {exc}") from None
    for gpu_index, gpu in enumerate(gpus):
        with cupy.cuda.Device(gpu):
            for group in groups:
                array = group[gpu_index]
                array /= n  # on the same stream as its all-reduce, so after it
            streams[gpu].synchronize()


def _checked_gpus(cupy: ModuleType, groups: Sequence[Sequence[Any]]) -> tuple[int, ...]:
    """The GPU of each rank, after checking every group is one alike, contiguous float array per GPU (DeviceError, one line)."""
    if not groups or not all(len(group) for group in groups):
        raise DeviceError("an all-reduce needs at least one array on each GPU")
    if len({len(group) for group in groups}) != 1:
        raise DeviceError("groups to all-reduce have different numbers of arrays")
    for group in groups:
        if not all(isinstance(a, cupy.ndarray) for a in group):
            kinds = sorted({type(a).__name__ for a in group})
            raise DeviceError(f"NCCL reduces cupy arrays on GPUs, got {', '.join(kinds)}")
    gpus = tuple(a.device.id for a in groups[0])
    if len(set(gpus)) != len(gpus):
        raise DeviceError(f"arrays to all-reduce share a GPU (GPUs {list(gpus)}): NCCL takes one rank per GPU; sum each GPU's first")
    for group in groups:
        if tuple(a.device.id for a in group) != gpus:
            raise DeviceError(f"groups to all-reduce are not on the same GPUs in the same order ({list(gpus)})")
        if len({(a.shape, a.dtype) for a in group}) != 1:
            raise DeviceError("arrays to all-reduce have different shapes or types")
        if group[0].dtype.name not in _NCCL_TYPES:
            raise DeviceError(f"an all-reduce mean takes {', '.join(_NCCL_TYPES)} arrays, not {group[0].dtype.name}")
        if not all(a.flags.c_contiguous for a in group):
            raise DeviceError("arrays to all-reduce must be contiguous (NCCL reduces flat memory)")
    return gpus
