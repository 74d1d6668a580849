"""Whether a holder's dataset manifest fits the run: checked once, at registration.

Rules:

* Every field a holder sends is checked for type and range before anything is
  sized by it; the admitted manifest keeps only the known fields, as plain
  values, so nothing of a peer's choosing (extra keys, huge strings) is kept.
* The chunk size is the run's. The orchestrator derives a holder's chunk count
  from its token count; a count over the run's ``max_chunks`` is refused, so no
  schedule, checkpoint or allocation grows with a holder's claim.
* A dataset the trainer cannot use is refused *now*, with one line naming the
  remedy, instead of registering and then losing every hop: token ids beyond
  the trainer's vocabulary, another token width, an empty dataset.
* A holder that registers again during a run (it reconnected, or the
  orchestrator restarted) must bring the same dataset: same token count and
  digest commitment.

The device still checks every buffer it trains on: admission only stops the
honest mistakes early.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Mapping

#: The token width every hop buffer carries (uint16 little-endian), and its bytes per token.
TOKEN_DTYPE: Final = "uint16"
TOKEN_BYTES: Final = 2
_DIGEST_RE: Final = re.compile(r"[0-9a-f]{64}")
_NAME_MAX: Final = 128
#: Vocabularies of the known workloads, to name the remedy for a misfit.
_WORKLOAD_FOR_VOCAB: Final = (("bytelm", 256), ("gpt2", 50257))


class ManifestRefused(ValueError):
    """The manifest does not fit the run; ``code`` for machines, the message for a person."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class RunShape:
    """What admission needs to know of the run."""

    chunk_tokens: int
    max_chunks: int
    vocab: int
    trainer: str = "bytelm"


@dataclass(frozen=True)
class AdmittedManifest:
    """A checked manifest: only known fields, every value in range."""

    name: str
    total_tokens: int
    max_token: int
    digest: str
    chunk_count: int
    via: str | None = None

    def chunk_tokens_of(self, index: int, chunk_tokens: int) -> int:
        """Tokens in chunk ``index`` (the last one may be shorter); 0 for an index past the end."""
        start = index * chunk_tokens
        return max(0, min(chunk_tokens, self.total_tokens - start))

    def to_json(self) -> dict[str, Any]:
        """Plain data (kept in snapshots and checkpoints)."""
        d = {"name": self.name, "total_tokens": self.total_tokens, "max_token": self.max_token,
             "digest": self.digest, "chunk_count": self.chunk_count}
        if self.via is not None:
            d["via"] = self.via
        return d


def _int(m: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = m.get(key)
    if type(value) is not int:
        raise ManifestRefused("bad-manifest", f"manifest field {key!r} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ManifestRefused("bad-manifest", f"manifest field {key!r} is {value}, outside {low}..{high}")
    return value


def admit(manifest: object, run: RunShape, *, previous: AdmittedManifest | None = None) -> AdmittedManifest:
    """Check a holder's manifest against the run; ManifestRefused (one line) if it does not fit."""
    if not isinstance(manifest, dict):
        raise ManifestRefused("bad-manifest", f"the manifest must be a map, got {type(manifest).__name__}")
    dtype = manifest.get("token_dtype")
    if dtype != TOKEN_DTYPE:
        shown = repr(dtype)[:40] if isinstance(dtype, str) else type(dtype).__name__
        raise ManifestRefused("misfit", f"tokens of type {shown}; this run trains on {TOKEN_DTYPE} tokens (rebuild the data with `gtbus data build`)")
    limit = run.max_chunks * run.chunk_tokens
    total = _int(manifest, "total_tokens", 0, limit)
    if total == 0:
        raise ManifestRefused("misfit", "the dataset holds no tokens")
    top = _int(manifest, "max_token", 0, (1 << 16) - 1)
    if top >= run.vocab:
        fits = [name for name, vocab in _WORKLOAD_FOR_VOCAB if top < vocab and name != run.trainer]
        remedy = f"; start the orchestrator with --trainer {fits[0]}" if fits else ""
        raise ManifestRefused(
            "misfit",
            f"the data holds token ids beyond the vocabulary of {run.vocab} of trainer {run.trainer}{remedy}",
        )
    digest = manifest.get("digest")
    if manifest.get("digest_alg") != "blake3" or not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ManifestRefused("bad-manifest", "the manifest must commit to the data with a 64-hex-digit blake3 digest")
    name = manifest.get("name", "")
    if not isinstance(name, str) or len(name) > _NAME_MAX:
        raise ManifestRefused("bad-manifest", f"manifest field 'name' must be a string of at most {_NAME_MAX} characters")
    via = manifest.get("via")
    if via is not None and not isinstance(via, str):
        raise ManifestRefused("bad-manifest", "manifest field 'via' must be a node name")
    admitted = AdmittedManifest(name, total, top, digest, -(-total // run.chunk_tokens), via)
    if previous is not None and (previous.total_tokens, previous.digest) != (admitted.total_tokens, admitted.digest):
        raise ManifestRefused("manifest-changed", "registered again with other data than this run was scheduled with; start a new run for new data")
    return admitted
