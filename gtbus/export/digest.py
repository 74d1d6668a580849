"""The model digest of an export, from its files alone, on the host.

The digest is the one the run's orchestrator measured on its device over the
final weights, ``device.measure(*trainer.parameter_views())``:

* ``host`` backend: :func:`gtbus.gpu.measure.measure_model` over the views'
  bytes.
* ``cupy`` backend: a tagged hash of its own domain
  (:data:`~gtbus.gpu.measure.PART_DIGESTS_MODEL_DOMAIN`) whose parts are each
  view's dtype and shape and the 32-byte BLAKE3 of its bytes (what
  :meth:`gtbus.gpu.cupy_backend.CupyDevice.measure` computes on the GPU, one
  digest kernel per view); BLAKE3 on the host gives the same bytes.

Rules: the measured views are rebuilt only from the tensors and the layout
config.json states (:mod:`gtbus.export.layout`); every tensor of the file is
placed exactly once, at its stated shape and dtype, inside its view, with no
overlap; padding between tensors is bounded, so a crafted config cannot make
this allocate much more than the file holds. Any departure is one
:class:`~gtbus.errors.ConfigError` line naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

import blake3
import numpy

from gtbus.errors import ConfigError
from gtbus.gpu.measure import PART_DIGESTS_MODEL_DOMAIN, measure_model, tagged_hash

#: The device backends whose measurement an export can reproduce.
MEASURED_BACKENDS: Final = ("host", "cupy")
#: Element dtypes a measured view may have.
VIEW_DTYPES: Final = ("<f4", "<f8", "<f2")
#: Most zero elements a view may hold per tensor placed in it (the GPT-2 trainer aligns to 64).
MAX_PADDING_PER_TENSOR: Final = 4096


def digest_of_views(backend: str, views: Sequence[numpy.ndarray]) -> bytes:
    """The model digest ``backend``'s device gives for ``views`` (host arrays), computed on the host."""
    if backend == "host":
        return measure_model(list(views))
    if backend == "cupy":
        parts: list[Any] = []
        for view in views:
            flat = numpy.ascontiguousarray(view)
            parts.append(f"{flat.dtype.str}{list(flat.shape)}".encode())
            parts.append(blake3.blake3(flat.reshape(-1).view(numpy.uint8), max_threads=blake3.blake3.AUTO).digest())
        return tagged_hash(PART_DIGESTS_MODEL_DOMAIN, parts)
    raise ConfigError(f"config.json: measurement backend {backend!r} is not one of {', '.join(MEASURED_BACKENDS)}")


def rebuild_views(tensors: dict[str, numpy.ndarray], views: Any) -> list[numpy.ndarray]:
    """The measured views laid out as ``views`` (config.json's ``measurement.views``) from ``tensors``."""
    if not isinstance(views, list) or not views:
        raise ConfigError("config.json: measurement.views must be a non-empty list")
    unplaced = dict(tensors)
    rebuilt = []
    for index, view in enumerate(views):
        where = f"config.json: measurement view {index}"
        if not isinstance(view, dict) or not isinstance(view.get("tensors"), list) or not view["tensors"]:
            raise ConfigError(f"{where}: needs dtype, shape and a non-empty list of tensors")
        dtype = view.get("dtype")
        if dtype not in VIEW_DTYPES:
            raise ConfigError(f"{where}: dtype {dtype!r} is not one of {', '.join(VIEW_DTYPES)}")
        shape = _shape(view.get("shape"), where)
        placements = [_placement(p, where, unplaced, numpy.dtype(dtype)) for p in view["tensors"]]
        size = math.prod(shape)
        held = sum(a.size for _, a in placements)
        if size > held + MAX_PADDING_PER_TENSOR * len(placements):
            raise ConfigError(f"{where}: {size} elements for {held} of tensors (too much padding)")
        flat = numpy.zeros(size, dtype=numpy.dtype(dtype))
        end = 0
        for offset, array in sorted(placements, key=lambda p: p[0]):
            if offset < end or offset + array.size > size:
                raise ConfigError(f"{where}: tensors overlap or run past its {size} elements")
            flat[offset : offset + array.size] = array.reshape(-1)
            end = offset + array.size
        rebuilt.append(flat.reshape(shape))
    if unplaced:
        raise ConfigError(f"model.safetensors holds {', '.join(sorted(unplaced)[:3])} which config.json does not lay out")
    return rebuilt


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 8 or not all(type(d) is int and d >= 0 for d in value):
        raise ConfigError(f"{where}: shape must be a list of at most 8 non-negative integers")
    return tuple(value)


def _placement(entry: Any, where: str, unplaced: dict[str, numpy.ndarray], dtype: numpy.dtype) -> tuple[int, numpy.ndarray]:
    """(offset, the tensor in trainer layout) for one tensor entry; takes it out of ``unplaced``."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"{where}: a tensor entry without a name")
    name = entry["name"]
    if name not in unplaced:
        raise ConfigError(f"{where}: tensor {name[:60]!r} is not in model.safetensors (or laid out twice)")
    array = unplaced.pop(name)
    stated = _shape(entry.get("shape"), f"{where}, tensor {name}")
    if tuple(array.shape) != stated:
        raise ConfigError(f"model.safetensors: tensor {name} has shape {tuple(array.shape)}, config.json says {stated}")
    if array.dtype != dtype:
        raise ConfigError(f"model.safetensors: tensor {name} is {array.dtype}, config.json says {dtype}")
    offset, transpose = entry.get("offset"), entry.get("transpose")
    if type(offset) is not int or offset < 0 or type(transpose) is not bool:
        raise ConfigError(f"{where}, tensor {name}: offset must be a non-negative integer and transpose a boolean")
    if transpose and array.ndim != 2:
        raise ConfigError(f"{where}, tensor {name}: only a matrix can be stored transposed")
    return offset, (array.T if transpose else array)
