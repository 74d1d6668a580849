"""Training workloads by name: what ``--trainer`` and runbooks choose.

The names are :data:`~gtbus.training.trainer.TRAINER_NAMES` (what runbooks
validate against). Each workload's module is imported only when asked for, so
naming ``bytelm`` never imports torch; an unknown name is a one-line
:class:`~gtbus.errors.ConfigError`.
"""

from __future__ import annotations

from gtbus.errors import ConfigError
from gtbus.training.trainer import TRAINER_NAMES, Trainer


def make_trainer(name: str, seed: int = 0) -> Trainer:
    """The training workload named ``name``."""
    if name == "bytelm":
        from gtbus.training.bytelm import ByteLM, ByteLMConfig

        return ByteLM(ByteLMConfig(seed=seed))
    if name == "gpt2":
        # GPT-2 124M (llm.c's run), trained with PyTorch on the hop buffer through DLPack.
        from gtbus.training.pytorch import TorchTrainer, TorchTrainerConfig, gpt2_small

        return TorchTrainer(gpt2_small, vocab=50257, config=TorchTrainerConfig(seed=seed))
    raise ConfigError(f"unknown trainer {name!r} (built in: {', '.join(TRAINER_NAMES)})")
