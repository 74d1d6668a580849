"""Tools to forge message logs as an attacker with the file but without the node's key would.

The chain of a log has no key: whoever edits a log on purpose recomputes it.
These helpers do exactly that, so tests show that what still catches the edit
is the signed checkpoints (and the message signatures), not the chain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import blake3
import msgpack

from gtbus.recording import CHAIN, LOG_MAGIC, read_log


def rechain(path: Path, payloads: list[bytes]) -> None:
    """Rewrite ``path`` as a log of ``payloads`` (raw msgpack records) with valid chain digests."""
    out = bytearray(LOG_MAGIC)
    prev = bytes(CHAIN)
    for p in payloads:
        h = blake3.blake3(prev)
        h.update(p)
        prev = h.digest(CHAIN)
        out += len(p).to_bytes(4, "big") + p + prev
    path.write_bytes(bytes(out))


def edit(path: Path, change: Callable[[list[dict[str, Any]]], None]) -> None:
    """Decode every record, let ``change`` edit the list in place, write it back re-chained."""
    records = [dict(r.data) for r in read_log(path)]
    change(records)
    rechain(path, [msgpack.packb(r, use_bin_type=True) for r in records])
