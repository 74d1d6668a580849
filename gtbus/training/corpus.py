"""The demo corpus: the Python standard library's own sources, split among holders.

Every machine that runs gtbus has these files, they are real text with real
structure, and nobody's private data is involved. Files are sorted by their
path relative to the stdlib root and dealt round-robin, one whole file at a
time, so the holders' data are disjoint by construction and the split is the
same on every run of the same Python build. Third-party code
(``site-packages``, ``dist-packages``) is left out: it differs between
machines.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy

from gtbus.training.shards import write_shard

#: Directories under the stdlib root that are not the standard library.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
DEFAULT_BYTES_PER_HOLDER = 1 << 20


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """Every ``.py`` file under ``root`` (default: the stdlib), sorted by relative POSIX path."""
    root = root or stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def split_round_robin(paths: Sequence[Path], holders: int) -> list[list[Path]]:
    """Deal ``paths`` to ``holders`` in turn: holder ``i`` gets paths ``i``, ``i + holders``, ..."""
    if holders < 1:
        raise ValueError(f"holders must be at least 1, got {holders}")
    return [list(paths[i::holders]) for i in range(holders)]


def holder_bytes(paths: Sequence[Path], limit: int) -> bytes:
    """The contents of ``paths`` in order, concatenated and cut at ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    for path in paths:
        if size >= limit:
            break
        data = path.read_bytes()[: limit - size]
        parts.append(data)
        size += len(data)
    return b"".join(parts)


def build_demo_corpus(
    out_dir: str | os.PathLike[str],
    holders: int = 3,
    bytes_per_holder: int = DEFAULT_BYTES_PER_HOLDER,
    *,
    root: Path | None = None,
) -> list[Path]:
    """Write one byte-token shard per holder (``holder00.bin``, ...) to ``out_dir``; returns their paths."""
    if bytes_per_holder < 1:
        raise ValueError(f"bytes_per_holder must be positive, got {bytes_per_holder}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, paths in enumerate(split_round_robin(stdlib_sources(root), holders)):
        data = holder_bytes(paths, bytes_per_holder)
        tokens = numpy.frombuffer(data, dtype=numpy.uint8)
        written.append(write_shard(out / f"holder{index:02d}.bin", tokens))
    return written
