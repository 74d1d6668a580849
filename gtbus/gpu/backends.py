"""Device backends by name: what ``--backend`` and runbooks choose.

``host`` (numpy and sealed memfd staging; runs everywhere) and ``cupy`` (a
real NVIDIA GPU). cupy is imported only when asked for, so choosing the host
backend never needs CUDA; an unknown or unavailable backend is a one-line
:class:`~gtbus.errors.ConfigError`.

A fleet (``--gpus K``) gets K devices (:func:`make_devices`): on ``host``, K
emulated devices (each its own buffers and staging broker); on ``cupy``, K
lanes on the process's current GPU (each lane its own buffers, model replica
and staging, sharing the GPU's compute): the functional fleet on a one-GPU
host. Lanes on *several* GPUs in one process are not offered: cupy keeps the
current device per thread, and a lane's allocations, kernels and the staging
pool's worker thread would all need its device made current around them. A
fleet over several GPUs is one worker process per GPU, merged over NCCL.
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


def make_devices(backend: str, count: int) -> list[Any]:
    """``count`` devices of ``backend`` for the lanes of a fleet (see the module's docstring)."""
    if count < 1:
        raise ConfigError("a fleet needs at least one device")
    cls = device_class(backend)
    if backend != "cupy":
        return [cls() for _ in range(count)]
    import cupy  # device_class imported it

    current = cupy.cuda.runtime.getDevice()
    return [cls(current) for _ in range(count)]
