"""Device backends by name: what ``--backend`` and runbooks choose.

``host`` (numpy and sealed memfd staging; runs everywhere) and ``cupy`` (a
real NVIDIA GPU). cupy is imported only when asked for, so choosing the host
backend never needs CUDA; an unknown or unavailable backend is a one-line
:class:`~gtbus.errors.ConfigError`.

A fleet (``--gpus K``) gets K devices (:func:`make_devices`): on ``host``, K
emulated devices (each its own buffers and staging broker); on ``cupy``, lane
i on GPU ``i % n`` of the n GPUs this process sees (:func:`lane_gpus`), each
lane its own buffers, model replica and staging. With one GPU that is K lanes
sharing its compute (the functional fleet on a one-GPU host); with K GPUs,
one lane each, in this one process. cupy keeps the current device per thread,
so a :class:`~gtbus.gpu.cupy_backend.CupyDevice` makes its own GPU current
around everything it does, and work on a lane's replica outside the device
(loading, training, evaluating) runs inside ``device.active()``. Replicas on
distinct GPUs merge over NCCL (:mod:`gtbus.gpu.nccl`,
:func:`gtbus.training.nccl_merge.fleet_merge`); lanes sharing a GPU merge
in-process.
"""

from __future__ import annotations

from typing import Any, Final

from gtbus.errors import ConfigError

BACKEND_NAMES: Final = ("host", "cupy")


def device_class(backend: str) -> Any:
    """The device class by name: holders and agents only use its map/unmap side, and need no device of their own."""
    if backend == "host":
        from gtbus.gpu.host import HostDevice

        return HostDevice
    if backend == "cupy":
        try:
            from gtbus.gpu.cupy_backend import CupyDevice
        except ImportError as exc:
            raise ConfigError(f"backend cupy unavailable: {exc}") from None
        return CupyDevice
    raise ConfigError(f"unknown backend {backend!r} ({' or '.join(BACKEND_NAMES)})")


def make_device(backend: str) -> Any:
    """A device of the backend named ``backend``."""
    return device_class(backend)()


def lane_gpus(count: int, visible: int) -> list[int]:
    """The GPU ordinal of each of ``count`` lanes over ``visible`` GPUs: lane i on GPU ``i % visible``.

    Round robin: every GPU gets a lane before any gets a second, and lanes
    sharing a GPU differ in number by at most one.
    """
    if type(count) is not int or count < 1:
        raise ConfigError(f"a fleet needs at least one device, not {count!r}")
    if type(visible) is not int or visible < 1:
        raise ConfigError("backend cupy: this process sees no CUDA device (CUDA_VISIBLE_DEVICES?)")
    return [i % visible for i in range(count)]


def make_devices(backend: str, count: int) -> list[Any]:
    """``count`` devices of ``backend`` for the lanes of a fleet (see the module's docstring)."""
    if count < 1:
        raise ConfigError("a fleet needs at least one device")
    cls = device_class(backend)
    if backend != "cupy":
        return [cls() for _ in range(count)]
    import cupy  # device_class imported it

    try:
        visible = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise ConfigError(f"backend cupy: no CUDA device ({exc})") from None
    gpus = lane_gpus(count, visible)
    devices = [cls(gpu) for gpu in gpus]
    # What runs outside every lane's active() (the orchestrator's own reports) runs on lane 0's GPU.
    cupy.cuda.runtime.setDevice(gpus[0])
    return devices


def device_gpu(device: Any) -> int | None:
    """The GPU ordinal (in this process) a device is on; None for a device that is not a GPU (host)."""
    return device.ordinal if device.name == "cupy" else None
