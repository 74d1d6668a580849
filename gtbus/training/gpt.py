"""A minimal GPT-2 in PyTorch, the workload of the GPU table.

The architecture of GPT-2 (Radford et al. 2019) as llm.c trains it: learned
token and position embeddings, pre-LayerNorm blocks of causal self-attention
and a 4x GELU(tanh) MLP, a final LayerNorm, and an output head tied to the
token embedding. Residual projections start with std 0.02 / sqrt(2 * layers).
``gpt2_small()`` (12 layers, 12 heads, 768 wide, context 1024) has 124 M
parameters at vocabulary 50257.

This module imports torch at the top; import it only where torch is present
(:mod:`gtbus.training.pytorch` does so lazily).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a :class:`GPT`."""

    vocab: int = 50257
    context: int = 1024
    layers: int = 12
    heads: int = 12
    dim: int = 768

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not a multiple of heads {self.heads}")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and earlier ones."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` of shape (batch, time, dim)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        # The fused kernel (flash attention on a GPU) with the causal mask built in.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, d))


class MLP(nn.Module):
    """The position-wise feed-forward layer: dim -> 4 dim -> GELU(tanh) -> dim."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.dim, 4 * config.dim)
        self.proj = nn.Linear(4 * config.dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to ``x`` of shape (batch, time, dim)."""
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """One pre-LayerNorm transformer block with residual connections."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.dim)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape (batch, time, dim)."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-2: maps token ids of shape (batch, time) to next-token logits of shape (batch, time, vocab)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab, config.dim)
        self.wpe = nn.Embedding(config.context, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab, bias=False)
        # Weight tying as in GPT-2: one matrix embeds and un-embeds tokens.
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits for every position of ``idx`` (int64, shape (batch, time), time <= context)."""
        t = idx.shape[1]
        if t > self.config.context:
            raise ValueError(f"sequence of {t} tokens exceeds the context of {self.config.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt2_small(vocab: int = 50257, context: int = 1024) -> GPT:
    """GPT-2 124M: 12 layers, 12 heads, width 768."""
    return GPT(GPTConfig(vocab=vocab, context=context, layers=12, heads=12, dim=768))


def gpt_tiny(vocab: int = 256, context: int = 64) -> GPT:
    """A 2-layer, 64-wide GPT for tests and CPU demos (~0.1 M parameters plus embeddings)."""
    return GPT(GPTConfig(vocab=vocab, context=context, layers=2, heads=4, dim=64))
