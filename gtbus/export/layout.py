"""How a trainer's parameters are laid out in an export, and the trainer an export builds again.

Rules:

* Tensor names are what people's tools expect. GPT-2 takes the Hugging Face
  GPT-2 names and layout (``wte.weight``, ``h.{i}.attn.c_attn.weight`` ...;
  its ``Conv1D`` weights are ``(in, out)``, so our ``nn.Linear`` weights,
  ``(out, in)``, are stored transposed; the output head is tied to ``wte``
  and not stored). ByteLM keeps its own names (``embed``, ``w1``, ``b1`` ...,
  :meth:`~gtbus.training.bytelm.ByteLMConfig.shapes`).
* Only parameters (and module buffers) go into an export, never optimizer moments.
* The export says how to rebuild, from its tensors alone, the arrays that
  ``trainer.parameter_views()`` returns (the *measured views*: ByteLM's one
  array per parameter, the GPT-2 trainer's one flat buffer with every
  parameter at an aligned offset and zeros between). Offsets are read from
  where each parameter's memory lies inside a view, never assumed: the export
  follows whatever layout the trainer has.
* The trainer an export builds again (:func:`trainer_for`) is the same code
  that trained (``ByteLM``; ``TorchTrainer`` over ``gtbus.training.gpt.GPT``),
  loaded on the host (numpy / torch on the CPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import numpy

from gtbus.errors import ConfigError
from gtbus.training.trainer import Trainer

#: The workloads an export knows (the names of :data:`gtbus.training.trainer.TRAINER_NAMES`).
EXPORTABLE: Final = ("bytelm", "gpt2")

# Our GPT module names -> Hugging Face GPT-2 names, and whether the weight is an
# nn.Linear that HF keeps as a transposed Conv1D.
_GPT2_NAMES: Final = (
    (re.compile(r"blocks\.(\d+)\.ln1\.(weight|bias)"), r"h.\1.ln_1.\2", False),
    (re.compile(r"blocks\.(\d+)\.ln2\.(weight|bias)"), r"h.\1.ln_2.\2", False),
    (re.compile(r"blocks\.(\d+)\.attn\.qkv\.weight"), r"h.\1.attn.c_attn.weight", True),
    (re.compile(r"blocks\.(\d+)\.attn\.qkv\.bias"), r"h.\1.attn.c_attn.bias", False),
    (re.compile(r"blocks\.(\d+)\.attn\.proj\.weight"), r"h.\1.attn.c_proj.weight", True),
    (re.compile(r"blocks\.(\d+)\.attn\.proj\.bias"), r"h.\1.attn.c_proj.bias", False),
    (re.compile(r"blocks\.(\d+)\.mlp\.fc\.weight"), r"h.\1.mlp.c_fc.weight", True),
    (re.compile(r"blocks\.(\d+)\.mlp\.fc\.bias"), r"h.\1.mlp.c_fc.bias", False),
    (re.compile(r"blocks\.(\d+)\.mlp\.proj\.weight"), r"h.\1.mlp.c_proj.weight", True),
    (re.compile(r"blocks\.(\d+)\.mlp\.proj\.bias"), r"h.\1.mlp.c_proj.bias", False),
    (re.compile(r"(wte|wpe|ln_f)\.(weight|bias)"), r"\1.\2", False),
)


@dataclass(frozen=True)
class Placement:
    """Where one exported tensor lies in a measured view (element offset; stored transposed or not)."""

    name: str
    shape: tuple[int, ...]  # as stored in the export
    offset: int
    transpose: bool


@dataclass(frozen=True)
class MeasuredView:
    """One array of ``parameter_views()``: its dtype and shape, and the tensors laid into it (zeros elsewhere)."""

    dtype: str  # numpy dtype.str, e.g. "<f4"
    shape: tuple[int, ...]
    placements: tuple[Placement, ...]

    def as_json(self) -> dict[str, Any]:
        """The view as config.json holds it."""
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "tensors": [{"name": p.name, "shape": list(p.shape), "offset": p.offset, "transpose": p.transpose} for p in self.placements],
        }


@dataclass(frozen=True)
class TrainerLayout:
    """A loaded trainer's parameters as an export has them: named tensors (host copies), shape, measured views."""

    trainer: str
    tensors: dict[str, numpy.ndarray]
    shape: dict[str, int]
    views: tuple[MeasuredView, ...]


def gpt2_name(ours: str) -> tuple[str, bool]:
    """The Hugging Face GPT-2 name of our GPT parameter ``ours``, and whether it is stored transposed."""
    for pattern, replacement, transpose in _GPT2_NAMES:
        if pattern.fullmatch(ours):
            return pattern.sub(replacement, ours), transpose
    raise ConfigError(f"GPT parameter {ours!r} has no GPT-2 name (is the model gtbus.training.gpt.GPT?)")


def layout_of(trainer_name: str, trainer: Trainer) -> TrainerLayout:
    """The export layout of ``trainer`` (loaded on the host), whose workload is ``trainer_name``."""
    if trainer_name == "bytelm":
        from gtbus.training.bytelm import ByteLM

        if not isinstance(trainer, ByteLM):
            raise ConfigError(f"trainer {trainer_name!r} is a {type(trainer).__name__}, not a ByteLM")
        cfg = trainer.config
        named = {name: (view, False) for (name, _), view in zip(cfg.shapes(), trainer.parameter_views())}
        shape = {"context": cfg.context, "embed": cfg.embed, "hidden": cfg.hidden, "layers": cfg.layers, "vocab": trainer.vocab}
    elif trainer_name == "gpt2":
        model = getattr(trainer, "model", None)
        gpt_config = getattr(model, "config", None)
        if model is None or not all(hasattr(gpt_config, k) for k in ("vocab", "context", "layers", "heads", "dim")):
            raise ConfigError(f"trainer {trainer_name!r}: its model is not gtbus.training.gpt.GPT")
        named = {}
        for ours, tensor in [*model.named_parameters(), *model.named_buffers()]:
            name, transpose = gpt2_name(ours)
            named[name] = (tensor.detach().numpy(), transpose)
        shape = {k: int(getattr(gpt_config, k)) for k in ("vocab", "context", "layers", "heads", "dim")}
    else:
        raise ConfigError(f"cannot export trainer {trainer_name!r} (exportable: {', '.join(EXPORTABLE)})")
    views = [numpy.asarray(v) for v in trainer.parameter_views()]
    placed = _place(named, views)
    tensors = {name: numpy.ascontiguousarray(array.T if transpose else array).copy() for name, (array, transpose) in named.items()}
    return TrainerLayout(trainer_name, tensors, shape, placed)


def _place(named: dict[str, tuple[numpy.ndarray, bool]], views: list[numpy.ndarray]) -> tuple[MeasuredView, ...]:
    """Find each named tensor's memory inside exactly one view: its element offset there."""
    spans: list[tuple[int, int, numpy.ndarray, list[Placement]]] = []
    for view in views:
        if not (isinstance(view, numpy.ndarray) and view.flags.c_contiguous):
            raise ConfigError("the trainer's parameter views are not contiguous host arrays (load it on numpy to export)")
        start = view.__array_interface__["data"][0]
        spans.append((start, start + view.nbytes, view, []))
    for name, (array, transpose) in named.items():
        if not array.flags.c_contiguous:
            raise ConfigError(f"parameter {name} is not contiguous memory")
        at = array.__array_interface__["data"][0]
        homes = [s for s in spans if s[0] <= at and at + array.nbytes <= s[1] and array.dtype == s[2].dtype]
        if len(homes) != 1:
            raise ConfigError(f"parameter {name} is not inside exactly one of the trainer's measured views")
        start, _, view, placements = homes[0]
        stored = tuple(reversed(array.shape)) if transpose else tuple(array.shape)
        placements.append(Placement(name, stored, (at - start) // view.itemsize, transpose))
    return tuple(MeasuredView(view.dtype.str, tuple(view.shape), tuple(sorted(p, key=lambda q: q.offset))) for _, _, view, p in spans)


def trainer_for(config: dict[str, Any], parameters: int) -> Trainer:
    """The trainer an export's ``config`` describes, loaded on the host with its seed-0 initial weights.

    ``parameters`` is how many the export's tensors hold: a shape that makes
    another number is refused before anything of its size is allocated.
    """
    trainer_name, shape = config.get("trainer"), config.get("shape")
    if not isinstance(shape, dict):
        raise ConfigError("config.json: no shape")
    try:
        if trainer_name == "bytelm":
            from gtbus.training.bytelm import ByteLM, ByteLMConfig

            byte_config = ByteLMConfig(context=_int(shape, "context"), embed=_int(shape, "embed"), hidden=_int(shape, "hidden"), layers=_int(shape, "layers"))
            count = byte_config.parameter_count()
            trainer: Any = ByteLM(byte_config)
        elif trainer_name == "gpt2":
            from gtbus.training.pytorch import TorchTrainer, TorchTrainerConfig

            try:
                from gtbus.training.gpt import GPT, GPTConfig
            except ImportError:
                raise ConfigError("config.json: a gpt2 model needs torch to load: pip install torch") from None

            gpt = GPTConfig(**{k: _int(shape, k) for k in ("vocab", "context", "layers", "heads", "dim")})
            c = gpt.dim
            count = (gpt.vocab + gpt.context) * c + gpt.layers * (12 * c * c + 13 * c) + 2 * c
            trainer = TorchTrainer(lambda: GPT(gpt), vocab=gpt.vocab, config=TorchTrainerConfig(context=gpt.context))
        else:
            raise ConfigError(f"config.json: unknown trainer {printable_name(trainer_name)} (exportable: {', '.join(EXPORTABLE)})")
    except ValueError as exc:
        raise ConfigError(f"config.json: shape does not make a model: {exc}") from None
    if count != parameters:
        raise ConfigError(f"config.json: its shape makes {count} parameters, model.safetensors holds {parameters}")
    trainer.load(numpy)
    return trainer


#: Largest size config.json may give any dimension: bounds what a crafted config makes us allocate.
MAX_DIMENSION: Final = 1 << 20


def _int(shape: dict[str, Any], key: str) -> int:
    value = shape.get(key)
    if type(value) is not int or not 1 <= value <= MAX_DIMENSION:
        raise ConfigError(f"config.json: shape.{key} must be an integer 1..{MAX_DIMENSION}, got {printable_name(value)}")
    return value


def printable_name(value: object) -> str:
    """A value from a file, quoted and cut short for a one-line error."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
