"""What each row of ``gtbus bench travel`` runs: the caps, the data per holder, the hops, and the training budget's split.

Rules (the talk's table holds the training budget constant per row and the
dataset fixed; caps divide the dataset into hops):

* **Data.** Each holder brings ``total / holders`` bytes of uint16 tokens,
  rounded down to a whole number of the smallest cap, so that the last chunk
  of a holder in any row is never shorter than that cap. A cap that does not
  divide a holder's data leaves one shorter last chunk per holder (the 500M
  row of 600 MiB holders: 500 + 100 MiB), as in the talk.
* **Budget.** A run trains ``S`` optimizer steps in all (``--train-steps``),
  split over the hops in proportion to their bytes: each hop trains
  ``max(1, round(tokens / per))`` steps with ``per = all tokens // S`` (the
  orchestrator's ``--steps per:N``). When ``per`` divides every chunk the
  split is exact and every row trains exactly ``S`` steps; otherwise the plan
  says by how much a row's total differs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gtbus.errors import ConfigError
from gtbus.protocol.admission import TOKEN_BYTES

MIB = 1 << 20
MIN_CHUNK_TOKENS = 64  # RunConfig's floor

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": MIB, "K": 1 << 10, "M": MIB, "G": 1 << 30}


@dataclass(frozen=True)
class Cap:
    """One row of the table: a buffer cap in bytes (None = uncapped)."""

    label: str
    nbytes: int | None


def parse_size(text: str) -> int:
    """``32K``, ``1M``, ``1.5G`` or a bare number of MiB, to bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"not a size: {text!r} (use e.g. 32K, 4M, 1G, or a number of MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def size_label(nbytes: int) -> str:
    """Short human size: 32K, 1M, 1.5M, 2G."""
    for unit, size in (("G", 1 << 30), ("M", MIB), ("K", 1 << 10)):
        if nbytes >= size:
            v = nbytes / size
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.3g}{unit}"
    return f"{nbytes}B"


#: Default caps as fractions of one holder's data, standing for the talk's rows.
DEFAULT_CAP_FRACTIONS = ((1 / 64, 4), (1 / 16, 20), (1 / 4, 100), (1 / 2, 500))

#: The talk's caps, as ``--caps`` takes them.
TALK_CAPS = "4,20,100,500,uncapped"


def default_caps(total_mib: float, holders: int = 3) -> list[Cap]:
    """Caps relative to the data: 1/64, 1/16, 1/4 and 1/2 of a holder's bytes (the talk's 4M..500M rows), then uncapped.

    The talk's 4M row cut each holder's data into roughly 150 hops. Here every
    hop also costs the orchestrator a fixed tenth of a second or more (held-out
    evaluation, checkpoint, measurements) on a 2-core machine, so the default
    stops at 64 hops per holder to finish in minutes; ``--caps`` takes any list.
    """
    per_holder = int(total_mib * MIB) // holders // TOKEN_BYTES * TOKEN_BYTES
    caps: list[Cap] = []
    for frac, talk in DEFAULT_CAP_FRACTIONS:
        nbytes = max(MIN_CHUNK_TOKENS * TOKEN_BYTES, int(per_holder * frac) // TOKEN_BYTES * TOKEN_BYTES)
        caps.append(Cap(f"{size_label(nbytes)} (talk {talk}M)", nbytes))
    caps.append(Cap("uncapped", None))
    return caps


def parse_caps(spec: str | None, total_mib: float, holders: int = 3) -> list[Cap]:
    """The ``--caps`` option: comma-separated sizes and ``uncapped``; None gives :func:`default_caps`."""
    if spec is None:
        return default_caps(total_mib, holders)
    caps = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part.lower() == "uncapped":
            caps.append(Cap("uncapped", None))
        else:
            nbytes = parse_size(part)
            if nbytes < MIN_CHUNK_TOKENS * TOKEN_BYTES:
                raise ConfigError(f"cap {part} is below the smallest hop ({MIN_CHUNK_TOKENS} tokens = {MIN_CHUNK_TOKENS * TOKEN_BYTES} bytes)")
            caps.append(Cap(size_label(nbytes), nbytes))
    if not caps:
        raise ConfigError("--caps names no cap")
    return caps


@dataclass(frozen=True)
class Plan:
    """What each row runs: tokens per holder, each row's chunks and steps, and the budget's rule."""

    holders: int
    holder_tokens: int
    rows: list[dict[str, Any]]
    train_steps: int
    #: One optimizer step per this many tokens of a hop (the orchestrator's ``--steps per:N``).
    tokens_per_step_budget: int
    rounded_note: str

    @property
    def steps_option(self) -> str:
        """The orchestrator's ``--steps`` value for every run of the table."""
        return f"per:{self.tokens_per_step_budget}"


def hop_steps(chunk_tokens: int, per: int) -> int:
    """Steps one hop of ``chunk_tokens`` trains under ``--steps per:N`` (as :func:`gtbus.training.trainer.resolve_steps`)."""
    return max(1, round(chunk_tokens / per))


def plan(caps: Sequence[Cap], total_mib: float, holders: int, train_steps: int, *, min_chunk_tokens: int = MIN_CHUNK_TOKENS) -> Plan:
    """Fix the data per holder, each row's chunks and hops, and every hop's steps (see the module's rules).

    ``min_chunk_tokens``: the shortest buffer the trainer takes (its context
    plus one); a cap below it is refused rather than failing every hop.
    """
    tokens = int(total_mib * MIB) // TOKEN_BYTES // holders
    if tokens < max(MIN_CHUNK_TOKENS, min_chunk_tokens):
        raise ConfigError(f"--total-mib {total_mib} gives each holder {tokens} tokens; a hop needs at least {max(MIN_CHUNK_TOKENS, min_chunk_tokens)}")
    chunk_of = {c: tokens if c.nbytes is None else min(tokens, c.nbytes // TOKEN_BYTES) for c in caps}
    for c in caps:
        if chunk_of[c] < min_chunk_tokens:
            raise ConfigError(f"cap {c.label} holds {chunk_of[c]} tokens; this trainer needs at least {min_chunk_tokens} per hop")
    capped = [chunk_of[c] for c in caps if c.nbytes is not None]
    smallest = min(capped) if capped else tokens
    holder_tokens = tokens // smallest * smallest
    per = holder_tokens * holders // train_steps
    if per < 1:
        raise ConfigError(f"--train-steps {train_steps} is more than the {holder_tokens * holders} tokens of the data: at most one step per token")
    rows: list[dict[str, Any]] = []
    exact = True
    for c in caps:
        chunk = holder_tokens if c.nbytes is None else min(holder_tokens, chunk_of[c])
        full, rest = divmod(holder_tokens, chunk)
        chunks = [chunk] * full + ([rest] if rest else [])
        steps = [hop_steps(n, per) for n in chunks]
        total = sum(steps) * holders
        exact = exact and total == train_steps
        rows.append({
            "cap": c.label, "cap_bytes": chunk * TOKEN_BYTES, "chunk_tokens": chunk, "hops": len(chunks) * holders,
            "holder_chunks": chunks, "steps_per_hop": steps[0], "last_steps": steps[-1], "steps_total": total,
        })
    notes = []
    if holder_tokens != tokens:
        notes.append(f"data per holder rounded down from {tokens:,} to {holder_tokens:,} tokens, a whole number of the smallest cap")
    if any(len(set(r["holder_chunks"])) > 1 for r in rows):
        notes.append("where a cap does not divide a holder's data, its last chunk is shorter and trains fewer steps")
    if not exact:
        notes.append(f"one step per {per:,} tokens does not divide every chunk: a row's total steps differ from {train_steps} as the steps column says")
    return Plan(holders, holder_tokens, rows, train_steps, per, "; ".join(notes))
