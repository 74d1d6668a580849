"""BLAKE3 measurements of model parameters and code.

A measurement is BLAKE3 over a domain tag followed by length-prefixed parts,
so that no two different inputs (other part boundaries, another kind of
measurement) encode to the same byte string. Model parameters are measured
with their dtype and shape, because the same bytes reinterpreted are a
different model. Large inputs are hashed with BLAKE3's own multithreading.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import blake3
import numpy as np

from gtbus.errors import DeviceError

MODEL_DOMAIN: Final = b"gtbus/model/v1"
#: The cupy backend's model measurement: the same parts, each array's BLAKE3 (computed on the GPU) in place of its bytes.
PART_DIGESTS_MODEL_DOMAIN: Final = b"gtbus/model/cupy/v1"
CODE_DOMAIN: Final = b"gtbus/code/v1"
DIGEST_SIZE: Final = 32

# BLAKE3 only splits work across threads for inputs this large anyway; below
# it the thread pool start-up is pure overhead.
_THREADED_MIN_BYTES: Final = 1 << 20


def tagged_hash(domain: bytes, parts: Iterable[Any]) -> bytes:
    """BLAKE3(len(domain) || domain || len(p0) || p0 || len(p1) || p1 ...), 32 bytes.

    ``parts`` are bytes-like objects over C-contiguous memory.
    """
    views = [_contiguous_bytes(p) for p in parts]
    total = sum(len(v) for v in views)
    hasher = blake3.blake3(
        max_threads=blake3.blake3.AUTO if total >= _THREADED_MIN_BYTES else 1
    )
    hasher.update(struct.pack(">H", len(domain)) + domain)
    for view in views:
        hasher.update(struct.pack(">Q", len(view)))
        hasher.update(view)
    return hasher.digest()


def measure_model(params: Sequence[Any]) -> bytes:
    """Measurement of model parameters, in order: each as (dtype and shape, raw bytes).

    Arrays (numpy, or anything ``np.asarray`` accepts without copying from a
    device) are described by dtype and shape; plain byte buffers as ``bytes``.
    """
    parts: list[Any] = []
    for param in params:
        if isinstance(param, np.ndarray):
            arr = param if param.flags.c_contiguous else np.ascontiguousarray(param)
            parts.append(f"{arr.dtype.str}{list(arr.shape)}".encode())
            parts.append(arr.reshape(-1).view(np.uint8) if arr.size else b"")
        else:
            parts.append(b"bytes")
            parts.append(param)
    return tagged_hash(MODEL_DOMAIN, parts)


def measure_code(sources: Mapping[str, bytes]) -> bytes:
    """Measurement of code: (name, source bytes) pairs in name order."""
    parts: list[bytes] = []
    for name in sorted(sources):
        parts.append(name.encode("utf-8"))
        parts.append(sources[name])
    return tagged_hash(CODE_DOMAIN, parts)


def _contiguous_bytes(part: Any) -> memoryview:
    try:
        view = memoryview(part)
    except TypeError:
        raise DeviceError(f"cannot measure a {type(part).__name__}: no buffer") from None
    if not view.c_contiguous:
        raise DeviceError("cannot measure non-contiguous memory")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")
