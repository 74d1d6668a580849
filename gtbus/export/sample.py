"""Bytes generated from a model, so that a person sees what it learned.

Rules:

* The model runs through the trainer's own forward code (ByteLM's
  :meth:`~gtbus.training.bytelm.ByteLM.next_byte_logits`, the GPT module's
  ``forward``), never a second copy of the model.
* Tokens are bytes: a GPT with a larger vocabulary (GPT-2's 50257) trained on
  byte tokens is sampled over its first 256 logits only.
* Deterministic: the same model, prompt, temperature and seed give the same
  bytes. Temperature 0 takes the most likely byte every step.
* A ByteLM sees a fixed window: a prompt shorter than it is padded on the
  left with spaces; a GPT sees up to its context, the last tokens kept.
* What is shown is printable: bytes outside printable ASCII are escaped
  (:func:`render`), so generated text cannot drive a terminal.
"""

from __future__ import annotations

from typing import Any, Final

import numpy

from gtbus.errors import ConfigError
from gtbus.training.bytelm import ByteLM
from gtbus.training.trainer import Trainer

#: Most bytes one call generates.
MAX_SAMPLE_BYTES: Final = 1 << 16
#: Most prompt bytes taken (a model sees at most its context of them anyway).
MAX_PROMPT_BYTES: Final = 1 << 16
#: Highest temperature accepted (above a few, samples are noise anyway).
MAX_TEMPERATURE: Final = 100.0
#: A little below 1: fewer of the unlikely bytes a small model gives too much weight.
DEFAULT_TEMPERATURE: Final = 0.8
BYTES: Final = 256
_PAD: Final = 0x20  # a space: what text most often has before a line's first byte


def generate(trainer: Trainer, prompt: bytes, n: int, *, temperature: float = DEFAULT_TEMPERATURE, seed: int = 0) -> bytes:
    """``n`` bytes that ``trainer``'s model (on the host) writes after ``prompt``."""
    if type(n) is not int or not 1 <= n <= MAX_SAMPLE_BYTES:
        raise ConfigError(f"bytes to generate must be 1..{MAX_SAMPLE_BYTES}, got {n!r}")
    if not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise ConfigError(f"temperature must be 0..{MAX_TEMPERATURE:g}, got {temperature!r}")
    rng = numpy.random.default_rng(seed)
    history = bytearray(prompt[-MAX_PROMPT_BYTES:])
    out = bytearray()
    for _ in range(n):
        logits = next_byte_logits(trainer, bytes(history)).astype(numpy.float64)
        if temperature == 0.0:
            byte = int(numpy.argmax(logits))
        else:
            scaled = logits / temperature
            probs = numpy.exp(scaled - scaled.max())
            byte = int(rng.choice(BYTES, p=probs / probs.sum()))
        history.append(byte)
        out.append(byte)
    return bytes(out)


def next_byte_logits(trainer: Trainer, history: bytes) -> numpy.ndarray:
    """The model's 256 next-byte logits after ``history`` (host numpy)."""
    if isinstance(trainer, ByteLM):
        context = trainer.config.context
        window = bytes([_PAD]) * max(0, context - len(history)) + history[-context:]
        windows = numpy.frombuffer(window, dtype=numpy.uint8)[None, :]
        return numpy.asarray(trainer.next_byte_logits(windows))[0]
    model: Any = getattr(trainer, "model", None)
    span: Any = getattr(getattr(model, "config", None), "context", None)
    if model is None or type(span) is not int:
        raise ConfigError(f"cannot sample from a {type(trainer).__name__}")
    import torch

    tokens = torch.tensor(list(history[-span:] or b"\n"), dtype=torch.long)[None, :]
    model.eval()
    with torch.no_grad():
        logits = model(tokens)[0, -1, :BYTES]
    return logits.float().numpy()


def render(data: bytes, *, one_line: bool = False) -> str:
    """``data`` as text safe to print: printable ASCII as is, newlines and tabs as is (escaped when ``one_line``), others as ``\\xNN``."""
    kept = {0x0A, 0x09} if not one_line else set()
    return "".join(
        chr(b) if 0x20 <= b < 0x7F or b in kept else {0x0A: "\\n", 0x09: "\\t"}.get(b, f"\\x{b:02x}") for b in data
    )
