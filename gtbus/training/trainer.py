"""The contract between the orchestrator and a training workload.

The orchestrator owns the model but knows nothing about it. It drives any
object that satisfies :class:`Trainer`:

1. ``load(xp)`` once, with the array module of the device (``numpy`` on the
   host backend, ``cupy`` on a GPU). The model's memory is allocated there and
   stays there for the whole run.
2. ``parameter_views()`` and ``code_bytes()`` before and after every hop, to
   measure that neither the model nor the code changed while a holder held
   the device.
3. ``train_on(tokens, steps)`` on the hop buffer, a 1-D ``uint8`` or
   ``uint16`` array of the same array module. The trainer reads the buffer and
   never keeps a reference to it: the buffer is scrubbed right after. With
   ``grad_sync`` (a fleet training in lockstep, :mod:`gtbus.training.lockstep`)
   it calls ``grad_sync(grads)`` after every backward pass, before its
   optimizer step, with the arrays its optimizer reads the gradient from (in
   a fixed order, the same on every replica); the hook may rewrite them in
   place, and an exception out of it ends the training there.
4. ``state_dict()`` / ``load_state_dict()`` at checkpoints, so a restarted
   orchestrator resumes exactly where it stopped.

Rules every trainer keeps:

- Deterministic given its seed: the same buffers in the same order give
  bit-identical parameters on the same backend, and a checkpoint restored
  mid-run continues bit-identically (a backend whose kernels sum with
  atomics, like torch on CUDA, says so in its docstring).
- No I/O, no threads, no network. Host memory is touched only for tiny
  control values (minibatch offsets, scalars) and for checkpoints.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Final, Literal, Protocol, Sequence, runtime_checkable

from gtbus.errors import GtbusError

#: ``steps`` value asking :meth:`Trainer.train_on` for one pass over the buffer:
#: as many minibatches as it takes for the number of predicted tokens to reach
#: the number of tokens in the buffer.
ONE_PASS: Final = "pass"


@dataclass(frozen=True)
class StepsPer:
    """A step budget in proportion to the buffer: one optimizer step per ``tokens`` tokens of it.

    A run that gives every hop ``StepsPer(T / S)`` trains ``S`` steps in all,
    split over its hops in proportion to their bytes, whatever the hop sizes
    (``--steps per:N`` on the command line). A hop trains
    ``max(1, round(len(buffer) / tokens))`` steps: exact when ``tokens`` divides
    every chunk, and never zero on a short last chunk.
    """

    tokens: int

    def __post_init__(self) -> None:
        if type(self.tokens) is not int or self.tokens < 1:
            raise ValueError(f"StepsPer needs a positive int of tokens, got {self.tokens!r}")


StepBudget = int | Literal["pass"] | StepsPer

#: The workloads ``gtbus orchestrator --trainer`` and runbooks know by name.
TRAINER_NAMES: Final = ("bytelm", "gpt2")


class WorkloadError(GtbusError):
    """A hop buffer or checkpoint does not fit the workload (too short, tokens out of vocabulary, wrong shapes)."""


@dataclass(frozen=True)
class TrainReport:
    """What one ``train_on`` call did.

    ``loss_first`` and ``loss_last`` are the mean cross-entropy (nats per
    token) of the first and of the last minibatch; they are noisy, and
    :meth:`Trainer.evaluate` is the number to compare across hops.
    ``tokens_seen`` counts predicted (target) tokens.
    """

    loss_first: float
    loss_last: float
    steps: int
    tokens_seen: int
    seconds: float


@runtime_checkable
class Trainer(Protocol):
    """A training workload the orchestrator can drive, measure and checkpoint."""

    vocab: int
    """Token ids this workload accepts are ``0 .. vocab-1`` (registration refuses data beyond it)."""

    def load(self, xp: ModuleType) -> None:
        """Allocate the model and optimizer state on array module ``xp`` (numpy or cupy)."""
        ...

    def train_on(self, tokens: Any, steps: StepBudget = ONE_PASS, grad_sync: Callable[[Sequence[Any]], None] | None = None) -> TrainReport:
        """Train on a 1-D uint8/uint16 token buffer for ``steps`` minibatches (:data:`ONE_PASS`, :class:`StepsPer`: :func:`resolve_steps`).

        ``grad_sync``: called with the gradient arrays between each backward pass and optimizer step (see the module's rules).
        """
        ...

    def evaluate(self, tokens: Any) -> float:
        """Mean cross-entropy in nats per token on ``tokens``; changes no state."""
        ...

    def parameter_views(self) -> list[Any]:
        """The model's memory as C-contiguous arrays, in a fixed order, without copying."""
        ...

    def code_bytes(self) -> bytes:
        """The source of the code that trains, for the measurement report."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Host copies of parameters, optimizer moments and step count (numpy arrays and ints)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; shapes must match the loaded model."""
        ...


def module_sources(*modules: ModuleType) -> bytes:
    """Concatenate the source of ``modules``, each after a line naming it, as UTF-8.

    The name lines keep two different module lists from hashing alike when
    their concatenated text happens to coincide.
    """
    parts = []
    for module in modules:
        parts.append(f"# --- module {module.__name__}\n")
        parts.append(inspect.getsource(module))
    return "".join(parts).encode("utf-8")


def parse_steps(text: str) -> StepBudget:
    """``--steps``: a positive int per hop, ``pass``, or ``per:N`` (one step per N tokens of the hop's chunk)."""
    text = text.strip()
    if text == ONE_PASS:
        return ONE_PASS
    head, sep, tail = text.partition(":")
    try:
        value = int(tail if sep else text)
    except ValueError:
        value = 0
    if (sep and head != "per") or value < 1:
        raise WorkloadError(f"--steps {text!r}: use a positive number of steps per hop, 'pass', or 'per:N' (one step per N tokens of a hop)")
    return StepsPer(value) if sep else value


def resolve_steps(steps: StepBudget, n_tokens: int, one_pass: int) -> int:
    """The number of minibatches a budget means for a buffer of ``n_tokens`` whose one pass is ``one_pass`` steps."""
    if isinstance(steps, StepsPer):
        return max(1, round(n_tokens / steps.tokens))
    if steps == ONE_PASS:
        return one_pass
    if type(steps) is not int or steps < 1:
        raise ValueError(f"steps must be a positive int, ONE_PASS or StepsPer, got {steps!r}")
    return steps


def check_token_buffer(tokens: Any, *, vocab: int, min_len: int) -> None:
    """Raise :class:`WorkloadError` unless ``tokens`` is a 1-D uint8/uint16 buffer of usable length and range."""
    dtype = getattr(tokens, "dtype", None)
    if dtype is None or getattr(tokens, "ndim", None) != 1:
        raise WorkloadError("token buffer must be a 1-D array")
    if dtype.kind != "u" or dtype.itemsize not in (1, 2):
        raise WorkloadError(f"token buffer must be uint8 or uint16, got {dtype}")
    if tokens.shape[0] < min_len:
        raise WorkloadError(
            f"token buffer holds {tokens.shape[0]} tokens, need at least {min_len}"
        )
    # One reduction over the buffer; a token past the vocabulary would
    # otherwise index out of bounds on the device (silently, on a GPU). The
    # message names the class of problem, never the value: it is the holder's
    # plaintext, and this text travels in hop records and revokes.
    if int(tokens.max()) >= vocab:
        raise WorkloadError(f"a token outside the vocabulary of {vocab} (ids 0..{vocab - 1})")
