"""How an orchestrator runs: schedule, hop sizes, leases, files, liveness settings (checked when built)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtbus.errors import ConfigError
from gtbus.gpu.channel import ChannelParams, staging_size
from gtbus.protocol.admission import TOKEN_BYTES, RunShape
from gtbus.training.merge import DEFAULT_MERGE, merge_policy
from gtbus.training.trainer import ONE_PASS, StepBudget

#: Most GPU tokens (lanes) one orchestrator runs: each is a device, a model replica and a task.
MAX_GPUS = 64


@dataclass
class RunConfig:
    """How the orchestrator runs: schedule, hop sizes, leases, files."""

    run_dir: Path
    holders: list[str]
    rounds: int = 1
    chunk_tokens: int = 1 << 17
    mode: str = "travel"
    lease: float = 10.0
    segment_size: int = 4 << 20  # fewer, larger segments: less per-call overhead on the holder's cores
    suite: str = "aes-256-gcm"
    # Send each next hop's staging and sealed params ahead to its holder while the hop before runs (gtbus.nodes.hop_prepare).
    prepare: bool = True
    steps_per_hop: StepBudget = ONE_PASS
    register_timeout: float = 60.0
    max_attempts: int = 2
    resume: bool = False
    run_id: str = ""
    trainer: str = "bytelm"  # the workload's name, to name the remedy when data does not fit it
    # Most chunks one holder may bring: bounds every schedule, checkpoint and
    # table that a holder's manifest would otherwise size.
    max_chunks: int = 1 << 16
    # A holder that cannot be reached is retried after a backoff doubling from
    # backoff_min to backoff_max; when no holder with work left has been heard
    # from for absent_timeout seconds, the run stops with a named reason.
    backoff_min: float = 0.25
    backoff_max: float = 8.0
    absent_timeout: float = 60.0
    # Write the checkpoint after every Nth hop (and after the last). A GPT-2
    # checkpoint (model and AdamW moments, 1.6 GB) takes seconds to write, more
    # than a small hop's transfer and training together. The price of N > 1: a
    # resume repeats up to N-1 hops, and a rollback (model or code changed during
    # a hop) restores the last checkpoint and trains the hops since again (the
    # checkpoint is also written at each round's end, so they are of its round).
    checkpoint_every: int = 1
    # The fleet: K GPU tokens (lanes) travel at once, each with its own device and
    # trainer replica; every merge_every trained hops across the fleet (0: K, one
    # hop per lane on average), at a point where no lane trains, the replicas'
    # parameters are averaged. With K > 1 the checkpoint is written at merges
    # (and at the end), when no hop is in flight: it then holds the fleet whole.
    # With merge = "lockstep" the fleet merges after every wave instead (merge_every
    # does not apply; gtbus.training.lockstep).
    gpus: int = 1
    merge_every: int = 0
    merge: str = DEFAULT_MERGE  # how replicas are merged (gtbus.training.merge.merge_policy)

    def __post_init__(self) -> None:
        if self.mode not in ("travel", "ship"):
            raise ConfigError(f"mode must be travel or ship, not {self.mode!r}")
        if self.chunk_tokens < 64:
            raise ConfigError("chunk_tokens must be at least 64")
        if self.lease <= 0:
            raise ConfigError("lease must be positive")
        if not 1 <= self.max_chunks <= 1 << 24:
            raise ConfigError("max_chunks must be between 1 and 16777216")
        if not 0 < self.backoff_min <= self.backoff_max:
            raise ConfigError("backoff_min must be positive and at most backoff_max")
        if self.absent_timeout <= 0:
            raise ConfigError("absent_timeout must be positive")
        if self.checkpoint_every < 1:
            raise ConfigError("checkpoint_every must be at least 1")
        if not 1 <= self.gpus <= MAX_GPUS:
            raise ConfigError(f"gpus must be between 1 and {MAX_GPUS}")
        if self.merge_every < 0:
            raise ConfigError("merge_every must be 0 (once per hop of every lane) or a positive number of hops")
        merge_policy(self.merge)  # a ConfigError naming the policy

    @property
    def merge_interval(self) -> int:
        """Trained hops across the fleet between two merges."""
        return self.merge_every or self.gpus

    @property
    def capacity(self) -> int:
        """Bytes of one hop buffer (a whole chunk of uint16 tokens)."""
        return self.chunk_tokens * TOKEN_BYTES

    @property
    def segment(self) -> int:
        """AEAD segment size of every hop."""
        return min(self.segment_size, max(self.capacity, 1 << 20))

    @property
    def staging_bytes(self) -> int:
        """Bytes of one hop's staging: the capacity sealed, a tag per segment."""
        return staging_size(self.capacity, self.segment)

    def hop_params(self, handle: object) -> ChannelParams:
        """Fresh channel params (a new key) for one hop writing the staging ``handle``."""
        return ChannelParams.generate(str(handle), self.capacity, suite=self.suite, segment_size=self.segment)

    def shape(self, vocab: int) -> RunShape:
        """What admission checks a holder's manifest against (``vocab``: the trainer's)."""
        return RunShape(self.chunk_tokens, self.max_chunks, vocab, self.trainer)

    def announcement(self) -> dict[str, Any]:
        """The run's settings every holder is told when it is welcomed (it takes the chunk size from here)."""
        return {
            "rounds": self.rounds,
            "chunk_tokens": self.chunk_tokens,
            "mode": self.mode,
            "suite": self.suite,
            "segment_size": self.segment_size,
        }
