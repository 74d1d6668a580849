"""GPT-2 checkpoints in llm.c's format (``gpt2_124M.bin``), written and read back.

The format is what karpathy/llm.c's ``train_gpt2.py`` writes and
``gpt2_build_from_checkpoint`` in ``train_gpt2.c`` reads:

* a header of 256 little-endian int32: magic 20240326, version 3 (every
  tensor float32, vocabulary padded), max sequence length ``maxT``, vocabulary
  ``V``, layers ``L``, heads ``NH``, channels ``C``, padded vocabulary ``Vp``
  (a multiple of 128; the padding rows of ``wte`` are zero); the rest zero;
* then the parameters as float32, each stacked over layers, in this order:
  wte (Vp, C), wpe (maxT, C), ln1w, ln1b (L, C), qkvw (L, 3C, C), qkvb (L, 3C),
  attprojw (L, C, C), attprojb (L, C), ln2w, ln2b (L, C), fcw (L, 4C, C),
  fcb (L, 4C), fcprojw (L, C, 4C), fcprojb (L, C), lnfw, lnfb (C).

Linear weights are ``(out, in)`` as in ``torch.nn.Linear``, so the Hugging
Face ``Conv1D`` weights of an export (``(in, out)``) are transposed back here.
The reader checks the header against the file's size before it reads a
tensor: a crafted header cannot make it allocate more than the file holds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy

from gtbus.errors import ConfigError
from gtbus.private_files import replace_privately

LLMC_MAGIC: Final = 20240326
LLMC_VERSION_FP32: Final = 3
HEADER_INTS: Final = 256
VOCAB_MULTIPLE: Final = 128

# (llm.c's name, the export's tensor name (per layer: with {i}), transposed, stacked over layers)
_TENSORS: Final = (
    ("wte", "wte.weight", False, False),
    ("wpe", "wpe.weight", False, False),
    ("ln1w", "h.{i}.ln_1.weight", False, True),
    ("ln1b", "h.{i}.ln_1.bias", False, True),
    ("qkvw", "h.{i}.attn.c_attn.weight", True, True),
    ("qkvb", "h.{i}.attn.c_attn.bias", False, True),
    ("attprojw", "h.{i}.attn.c_proj.weight", True, True),
    ("attprojb", "h.{i}.attn.c_proj.bias", False, True),
    ("ln2w", "h.{i}.ln_2.weight", False, True),
    ("ln2b", "h.{i}.ln_2.bias", False, True),
    ("fcw", "h.{i}.mlp.c_fc.weight", True, True),
    ("fcb", "h.{i}.mlp.c_fc.bias", False, True),
    ("fcprojw", "h.{i}.mlp.c_proj.weight", True, True),
    ("fcprojb", "h.{i}.mlp.c_proj.bias", False, True),
    ("lnfw", "ln_f.weight", False, False),
    ("lnfb", "ln_f.bias", False, False),
)
#: llm.c's parameter tensors, in file order.
LLMC_NAMES: Final = tuple(t[0] for t in _TENSORS)


@dataclass(frozen=True)
class LlmcHeader:
    """The sizes an llm.c GPT-2 checkpoint declares."""

    max_seq_len: int
    vocab: int
    layers: int
    heads: int
    channels: int
    padded_vocab: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each of :data:`LLMC_NAMES` with its shape."""
        v, t, l, c = self.padded_vocab, self.max_seq_len, self.layers, self.channels
        return {
            "wte": (v, c), "wpe": (t, c), "ln1w": (l, c), "ln1b": (l, c), "qkvw": (l, 3 * c, c), "qkvb": (l, 3 * c),
            "attprojw": (l, c, c), "attprojb": (l, c), "ln2w": (l, c), "ln2b": (l, c), "fcw": (l, 4 * c, c),
            "fcb": (l, 4 * c), "fcprojw": (l, c, 4 * c), "fcprojb": (l, c), "lnfw": (c,), "lnfb": (c,),
        }

    def ints(self) -> numpy.ndarray:
        """The 256-int32 header."""
        header = numpy.zeros(HEADER_INTS, dtype="<i4")
        header[:8] = [LLMC_MAGIC, LLMC_VERSION_FP32, self.max_seq_len, self.vocab, self.layers, self.heads, self.channels, self.padded_vocab]
        return header


def padded_vocab(vocab: int) -> int:
    """llm.c's padded vocabulary: ``vocab`` rounded up to a multiple of 128 (50257 -> 50304)."""
    return -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def llmc_tensors(tensors: dict[str, numpy.ndarray], header: LlmcHeader) -> dict[str, numpy.ndarray]:
    """The export's GPT-2 tensors (Hugging Face names and layout) as llm.c's stacked float32 tensors."""
    out = {}
    for name, source, transpose, per_layer in _TENSORS:
        try:
            parts = [tensors[source.format(i=i)] for i in range(header.layers)] if per_layer else [tensors[source]]
        except KeyError as missing:
            raise ConfigError(f"no tensor {missing.args[0]} for llm.c's {name}") from None
        parts = [p.T if transpose else p for p in parts]
        array = numpy.stack(parts) if per_layer else parts[0]
        if name == "wte":
            array = numpy.concatenate([array, numpy.zeros((header.padded_vocab - array.shape[0], array.shape[1]), array.dtype)])
        array = numpy.ascontiguousarray(array, dtype="<f4")
        if array.shape != header.shapes()[name]:
            raise ConfigError(f"llm.c's {name}: shape {array.shape}, the header makes {header.shapes()[name]}")
        out[name] = array
    return out


def write_llmc(path: Path, tensors: dict[str, numpy.ndarray], header: LlmcHeader) -> None:
    """Write an llm.c version-3 (float32) GPT-2 checkpoint of the export's tensors at ``path`` (0600, atomically)."""
    stacked = llmc_tensors(tensors, header)
    with replace_privately(path) as fh:
        fh.write(header.ints().tobytes())
        for name in LLMC_NAMES:
            fh.write(memoryview(stacked[name]).cast("B"))


def read_llmc(path: Path) -> tuple[LlmcHeader, dict[str, numpy.ndarray]]:
    """The header and tensors of an llm.c float32 GPT-2 checkpoint; ConfigError naming the file's problem."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            ints = numpy.frombuffer(fh.read(HEADER_INTS * 4), dtype="<i4")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if ints.size != HEADER_INTS:
        raise ConfigError(f"{path}: shorter than llm.c's {HEADER_INTS * 4}-byte header")
    if int(ints[0]) != LLMC_MAGIC:
        raise ConfigError(f"{path}: not an llm.c model file (magic {int(ints[0])}, expected {LLMC_MAGIC})")
    if int(ints[1]) != LLMC_VERSION_FP32:
        raise ConfigError(f"{path}: llm.c model version {int(ints[1])}; only {LLMC_VERSION_FP32} (float32, padded vocabulary) is read")
    sizes = [int(x) for x in ints[2:8]]
    if min(sizes) < 1 or max(sizes) > 1 << 24:
        raise ConfigError(f"{path}: header sizes out of range: {sizes}")
    header = LlmcHeader(*sizes)
    if header.padded_vocab < header.vocab:
        raise ConfigError(f"{path}: padded vocabulary {header.padded_vocab} is below the vocabulary {header.vocab}")
    shapes = header.shapes()
    count = sum(math.prod(s) for s in shapes.values())
    if size != HEADER_INTS * 4 + 4 * count:
        raise ConfigError(f"{path}: {size} bytes, its header makes {HEADER_INTS * 4 + 4 * count} (truncated or not this model)")
    flat = numpy.fromfile(path, dtype="<f4", offset=HEADER_INTS * 4)
    tensors = {}
    at = 0
    for name in LLMC_NAMES:
        n = math.prod(shapes[name])
        tensors[name] = flat[at : at + n].reshape(shapes[name])
        at += n
    return header, tensors
