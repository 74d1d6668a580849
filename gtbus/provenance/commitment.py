"""A holder's commitment to a chunk of its data: keyed BLAKE3 over the chunk's plaintext tokens.

Rules:

* The commitment is *hiding*: its key is derived from the holder's own secret
  identity seed and the run id (``blake3 derive_key`` with a context string
  of its own), so nobody who reads a manifest can test a guess of a holder's
  data against it, and two runs' commitments to the same chunk differ.
* It is *binding* for the holder: the holder signs it in its ``token.return``
  for exactly the bytes it sealed into the hop's AEAD segments. The
  orchestrator cannot recompute it (it has no key); what it proves is that the
  manifest lists what the holders signed, and a holder can recompute each one
  from its own data.
* The input is the chunk's token bytes as the holder sends them (uint16
  little-endian, the hop's plaintext).
"""

from __future__ import annotations

from typing import Callable

import blake3
import numpy

from gtbus.messages.types import CHUNK_COMMITMENT_SIZE
from gtbus.training.shards import Dataset

#: A holder's view of its chunks: the commitment to chunk ``index``, or None for a chunk it does not have.
CommitmentOf = Callable[[int], "bytes | None"]

#: The BLAKE3 derive_key context of the commitment key (changing it changes every commitment).
CONTEXT = "gtbus chunk commitment v1"


def commitment_key(seed: bytes, run_id: str) -> bytes:
    """The 32-byte key a holder commits to its chunks of run ``run_id`` with (``seed``: its Ed25519 seed)."""
    if len(seed) != 32:
        raise ValueError("the commitment key is derived from a 32-byte secret seed")
    rid = run_id.encode()
    # length-prefixed: the boundary between seed and run id is unambiguous
    return blake3.blake3(seed + len(rid).to_bytes(4, "big") + rid, derive_key_context=CONTEXT).digest()


def chunk_commitment(key: bytes, plaintext: bytes | memoryview) -> bytes:
    """The commitment (32 bytes) to one chunk's plaintext token bytes under ``key``."""
    return blake3.blake3(plaintext, key=key).digest(length=CHUNK_COMMITMENT_SIZE)


def dataset_commitments(dataset: Dataset, chunk_tokens: int, seed: bytes, run_id: str) -> CommitmentOf:
    """The holder's commitments to its own chunks of run ``run_id``, computed from its data on demand."""
    key = commitment_key(seed, run_id)
    count = dataset.chunk_count(chunk_tokens)

    def of(index: int) -> bytes | None:
        if not 0 <= index < count:
            return None
        tokens = numpy.ascontiguousarray(dataset.chunk(index, chunk_tokens), dtype="<u2")
        return chunk_commitment(key, tokens.view(numpy.uint8).data)

    return of
