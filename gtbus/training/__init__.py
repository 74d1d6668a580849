"""Training workloads and their data.

Layering, bottom up:

- :mod:`~gtbus.training.trainer`: the :class:`Trainer` contract the
  orchestrator drives (load, train on a hop buffer, measure, checkpoint).
- :mod:`~gtbus.training.adam` and :mod:`~gtbus.training.bytelm`: the built-in
  byte-level language model, written against an array module (numpy or cupy).
- :mod:`~gtbus.training.pytorch` (and :mod:`~gtbus.training.gpt`): users' own
  torch models and GPT-2 for the GPU table; torch is imported only when used.
- :mod:`~gtbus.training.shards` and :mod:`~gtbus.training.corpus`: llm.c token
  shards, raw files, a holder's chunked :class:`Dataset`, and the demo corpus.
"""

from gtbus.training.bytelm import VOCAB, ByteLM, ByteLMConfig
from gtbus.training.corpus import build_demo_corpus, split_round_robin, stdlib_sources
from gtbus.training.pytorch import TorchTrainer, TorchTrainerConfig, gpt2_small
from gtbus.training.shards import (
    SHARD_MAGIC,
    SHARD_VERSION,
    Dataset,
    ShardError,
    ShardHeader,
    read_raw,
    read_shard,
    read_shard_header,
    write_shard,
)
from gtbus.training.trainer import ONE_PASS, TRAINER_NAMES, StepBudget, Trainer, TrainReport, WorkloadError

__all__ = [
    "ONE_PASS",
    "SHARD_MAGIC",
    "SHARD_VERSION",
    "TRAINER_NAMES",
    "VOCAB",
    "ByteLM",
    "ByteLMConfig",
    "Dataset",
    "ShardError",
    "ShardHeader",
    "StepBudget",
    "TorchTrainer",
    "TorchTrainerConfig",
    "TrainReport",
    "Trainer",
    "WorkloadError",
    "build_demo_corpus",
    "gpt2_small",
    "read_raw",
    "read_shard",
    "read_shard_header",
    "split_round_robin",
    "stdlib_sources",
    "write_shard",
]
