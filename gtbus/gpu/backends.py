"""Device backends by name: what ``--backend`` and runbooks choose.

``host`` (numpy and sealed memfd staging; runs everywhere) and ``cupy`` (a
real NVIDIA GPU). cupy is imported only when asked for, so choosing the host
backend never needs CUDA; an unknown or unavailable backend is a one-line
:class:`~gtbus.errors.ConfigError`.

A fleet (``--gpus K``) gets K devices (:func:`make_devices`): on ``host``, K
emulated devices (each its own buffers and staging broker); on ``cupy``, GPU
``k`` for lane ``k``, or, on a host with fewer GPUs than K, lanes dealt round
the GPUs there are (K lanes on one GPU for functional runs: each lane its own
buffers, model replica and staging, sharing the GPU's compute).
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

    gpus = cupy.cuda.runtime.getDeviceCount()
    if gpus < 1:
        raise ConfigError("backend cupy: no GPU visible")
    return [cls(k % gpus) for k in range(count)]
