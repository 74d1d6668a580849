"""Measurement of the code that touches a hop's data: what holders pin, and what is checked every hop.

What the device runs on a hop's data, and so what is measured:

1. the **trainer**: the sources its ``code_bytes()`` names (its module, the
   optimizer, the trainer contract, a user's model module);
2. the **device backend**: the module of the device's class (host or cupy);
3. the **kernels** and the channel opener: :data:`DEVICE_MODULES` (the CUDA
   kernels that decrypt, measure and scrub on the GPU; the segment opener
   that decrypts on the host backend);
4. the **hop**: :data:`HOP_MODULES`, the hop machine that decides a hop's
   actions and the orchestrator shell that performs them (opens the segments
   into the buffer, trains, scrubs).

Modules are named, not imported here: the hop machine and its shell live in
layers above this one, and a name keeps this module below them.

Two views of the same list:

* :func:`code_measurement` hashes the **source files** (what a holder reviews
  and pins with ``--pin-code``; ``gtbus measure`` prints it);
* :func:`loaded_code` takes the **code objects loaded in this process** (what
  runs). They are compared before and after every hop (:func:`first_change`):
  code swapped in memory, not on disk, is what that detects.
"""

from __future__ import annotations

import importlib
import inspect
import types
from typing import TYPE_CHECKING, Any, Final

from gtbus.gpu.device import Device
from gtbus.gpu.measure import measure_code

if TYPE_CHECKING:  # a sibling layer: only its type is named here
    from gtbus.training.trainer import Trainer

#: The device-side code every backend may run on a hop's data.
DEVICE_MODULES: Final = (
    "gtbus.gpu.channel",
    "gtbus.gpu.kernels._cuda",
    "gtbus.gpu.kernels._gf128",
    "gtbus.gpu.kernels._aes_gcm_cuda",
    "gtbus.gpu.kernels.aes_gcm",
    "gtbus.gpu.kernels.blake3",
    "gtbus.gpu.kernels.scrub",
)

#: The hop: the machine that decides its actions, and the shell that performs them on the device.
HOP_MODULES: Final = ("gtbus.protocol.hop", "gtbus.nodes.orchestrator", "gtbus.nodes.hop_runner")


def measured_modules(trainer: Trainer, device: Device) -> list[types.ModuleType]:
    """The Python modules of the list above, for this trainer and device: trainer, backend, device code, the hop."""
    out: list[types.ModuleType] = []
    for mod in (inspect.getmodule(type(trainer)), inspect.getmodule(type(device))):
        if mod is not None and mod not in out:
            out.append(mod)
    for name in (*DEVICE_MODULES, *HOP_MODULES):
        mod = importlib.import_module(name)
        if mod not in out:
            out.append(mod)
    return out


def code_measurement(trainer: Trainer, device: Device) -> bytes:
    """BLAKE3 of the sources of the code that touches the data (the value holders pin)."""
    backend = inspect.getmodule(type(device))
    sources = {
        "trainer": trainer.code_bytes(),
        "device": inspect.getsource(backend).encode() if backend else b"",
    }
    for name in (*DEVICE_MODULES, *HOP_MODULES):
        sources[name] = inspect.getsource(importlib.import_module(name)).encode()
    return measure_code(sources)


def pin_value(trainer: Trainer, device: Device) -> bytes:
    """The code measurement a holder pins, taken as the orchestrator takes it: the trainer loaded on ``device`` first.

    A trainer's code can depend on what loading builds (the PyTorch trainer
    measures the module of the model it built), so measuring an unloaded trainer
    failed or differed.
    """
    trainer.load(device.array_module)
    return code_measurement(trainer, device)


def loaded_code(trainer: Trainer, device: Device) -> dict[str, bytes]:
    """The code objects actually loaded in this process, by qualified name (see the module's docstring)."""
    out: dict[str, bytes] = {}
    for mod in measured_modules(trainer, device):
        for name, code in _code_objects(mod):
            out[f"{mod.__name__}.{name}"] = code
    return out


def first_change(before: dict[str, bytes], now: dict[str, bytes]) -> str | None:
    """The first name (in order) whose code differs between two :func:`loaded_code` results, or None."""
    for name in sorted(set(before) | set(now)):
        if before.get(name) != now.get(name):
            return name
    return None


# Code objects are immutable, so the bytes of one object never change: the
# check after every hop only encodes code it has not seen (a swapped
# ``__code__`` is a new object). Keyed by id, holding the object so the id
# cannot be reused while it is in the table.
_encoded: dict[int, tuple[types.CodeType, bytes]] = {}


def _code_bytes_of(code: types.CodeType) -> bytes:
    hit = _encoded.get(id(code))
    if hit is not None and hit[0] is code:
        return hit[1]
    encoded = _code_bytes(code)
    _encoded[id(code)] = (code, encoded)
    return encoded


def _code_bytes(code: types.CodeType) -> bytes:
    # Not marshal: its output depends on reference counts, so a function that is
    # running (the hop itself) would marshal differently from the same code idle.
    parts = [code.co_code, repr((code.co_names, code.co_varnames, code.co_flags, code.co_argcount, code.co_kwonlyargcount)).encode()]
    for c in code.co_consts:
        parts.append(_code_bytes(c) if isinstance(c, types.CodeType) else repr(c).encode())
    return b"\0".join(parts)


def _code_objects(module: Any) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for name, obj in sorted(vars(module).items()):
        if inspect.isfunction(obj) and obj.__module__ == module.__name__:
            out.append((name, _code_bytes_of(obj.__code__)))
        elif inspect.isclass(obj) and obj.__module__ == module.__name__:
            for attr, member in sorted(vars(obj).items()):
                fn = getattr(member, "__func__", None) or getattr(member, "fget", None) or member
                if inspect.isfunction(fn):
                    out.append((f"{name}.{attr}", _code_bytes_of(fn.__code__)))
    return out
