"""Device backends by name: what ``--backend`` and runbooks choose.

``host`` (numpy and sealed memfd staging; runs everywhere) and ``cupy`` (a
real NVIDIA GPU). cupy is imported only when asked for, so choosing the host
backend never needs CUDA; an unknown or unavailable backend is a one-line
:class:`~gtbus.errors.ConfigError`.
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
