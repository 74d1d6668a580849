"""The built-in workload: a byte-level language model with a hand-written backward pass.

Model (Bengio et al. 2003, with bytes as the vocabulary): the previous
``context`` bytes are embedded with one shared 256 x ``embed`` table, the
embeddings are concatenated (so position is known), passed through one or two
tanh layers, and projected to 256 logits for the next byte. Loss is the mean
cross-entropy in nats per byte; a uniform guess scores ln 256 = 5.55, byte
frequencies alone (unigram) about 4.5-5 on English or Python text, so a loss
well below the unigram entropy means the model uses its context.

Everything numeric runs on the array module handed to :meth:`ByteLM.load`
(numpy or cupy); numpy is used only for the host-side seeded RNG that draws
initial weights and minibatch offsets, so both backends start from the same
weights and see the same minibatches.

Default sizes: context 16, embed 32, one hidden layer of 384, batch 128;
303,744 parameters (1.2 MB in float32). On an idle 2-core CPU (numpy with
OpenBLAS) that is about 450 steps per second, so a demo run of 3 hops x 3
holders x 150 steps trains in about 3 seconds, and the held-out loss on
stdlib Python falls from 5.53 to about 2.1 nats per byte (unigram: 3.1).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy

from gtbus.training import adam as adam_module
from gtbus.training import trainer as trainer_module
from gtbus.training.adam import Adam
from gtbus.training.trainer import (
    ONE_PASS,
    StepBudget,
    TrainReport,
    WorkloadError,
    check_token_buffer,
    module_sources,
    resolve_steps,
)

#: Bytes are the vocabulary.
VOCAB = 256


@dataclass(frozen=True)
class ByteLMConfig:
    """Sizes and optimiser settings of :class:`ByteLM`."""

    context: int = 16
    embed: int = 32
    hidden: int = 384
    #: Number of tanh hidden layers: 1 or 2.
    layers: int = 1
    batch: int = 128
    lr: float = 2e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = 0
    #: ``float32`` for training; ``float64`` for gradient checks.
    dtype: str = "float32"
    #: :meth:`ByteLM.evaluate` scores at most this many evenly spaced windows.
    eval_windows: int = 4096

    def __post_init__(self) -> None:
        if self.context < 1 or self.embed < 1 or self.hidden < 1 or self.batch < 1:
            raise ValueError("context, embed, hidden and batch must be positive")
        if self.layers not in (1, 2):
            raise ValueError(f"layers must be 1 or 2, got {self.layers}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Parameter names and shapes, in the fixed order of the flat buffer."""
        h = self.hidden
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("embed", (VOCAB, self.embed)),
            ("w1", (self.context * self.embed, h)),
            ("b1", (h,)),
        ]
        if self.layers == 2:
            shapes += [("w2", (h, h)), ("b2", (h,))]
        shapes += [("w_out", (h, VOCAB)), ("b_out", (VOCAB,))]
        return shapes

    def parameter_count(self) -> int:
        """Total number of scalar parameters."""
        return sum(math.prod(shape) for _, shape in self.shapes())


class ByteLM:
    """The built-in :class:`~gtbus.training.trainer.Trainer`: byte-level MLP language model with Adam."""

    vocab: int = VOCAB

    def __init__(self, config: ByteLMConfig | None = None, xp: ModuleType | None = None) -> None:
        self.config = config or ByteLMConfig()
        self._xp: ModuleType | None = None
        if xp is not None:
            self.load(xp)

    # -- setup -----------------------------------------------------------------

    def load(self, xp: ModuleType) -> None:
        """Allocate parameters, gradients and Adam moments on ``xp``, initialised from the seed."""
        cfg = self.config
        dtype = xp.dtype(cfg.dtype)
        size = cfg.parameter_count()
        host = numpy.empty(size, dtype=cfg.dtype)
        rng = numpy.random.default_rng(cfg.seed)
        for name, view in _split(host, cfg.shapes()).items():
            if name == "embed":
                view[...] = rng.standard_normal(view.shape)
            elif name.startswith("b"):
                view[...] = 0.0
            elif name == "w_out":
                # Small output weights start the loss at ~ln 256 instead of
                # somewhere far above it.
                view[...] = rng.standard_normal(view.shape) * (0.1 / math.sqrt(view.shape[0]))
            else:
                view[...] = rng.standard_normal(view.shape) / math.sqrt(view.shape[0])
        self._xp = xp
        self._theta = xp.asarray(host)
        self._grad = xp.zeros(size, dtype=dtype)
        self._params = _split(self._theta, cfg.shapes())
        self._grads = _split(self._grad, cfg.shapes())
        self._adam = Adam(xp, size, dtype, lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps)
        self._step = 0
        self._vocab_ids = xp.arange(VOCAB)
        self._window_ids = xp.arange(cfg.context + 1)

    @property
    def xp(self) -> ModuleType:
        """The array module the model lives on; raises :class:`WorkloadError` before :meth:`load`."""
        if self._xp is None:
            raise WorkloadError("ByteLM is not loaded: call load(xp) first")
        return self._xp

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self._step if self._xp is not None else 0

    # -- Trainer protocol --------------------------------------------------------

    def train_on(self, tokens: Any, steps: StepBudget = ONE_PASS, grad_sync: Callable[[Sequence[Any]], None] | None = None) -> TrainReport:
        """Train on random windows of ``tokens`` for ``steps`` minibatches (or one pass over the buffer).

        ``grad_sync`` is handed the one flat gradient buffer (Adam reads it whole) after each backward pass.
        """
        cfg = self.config
        check_token_buffer(tokens, vocab=VOCAB, min_len=cfg.context + 1)
        n_offsets = tokens.shape[0] - cfg.context
        steps = resolve_steps(steps, tokens.shape[0], -(-n_offsets // cfg.batch))
        started = time.perf_counter()
        first = last = None
        for i in range(steps):
            windows = self._sample_windows(tokens, n_offsets)
            loss = self.batch_loss(windows, backward=True)
            if grad_sync is not None:
                grad_sync([self._grad])
            self._adam.step(self._theta, self._grad)
            self._step += 1
            # Keep losses on the device; reading one back is a device sync.
            if i == 0:
                first = loss
            last = loss
        seconds = time.perf_counter() - started
        return TrainReport(
            loss_first=float(first),
            loss_last=float(last),
            steps=steps,
            tokens_seen=steps * cfg.batch,
            seconds=seconds,
        )

    def evaluate(self, tokens: Any) -> float:
        """Mean next-byte cross-entropy (nats) over up to ``eval_windows`` evenly spaced windows of ``tokens``."""
        xp = self.xp
        cfg = self.config
        check_token_buffer(tokens, vocab=VOCAB, min_len=cfg.context + 1)
        n_offsets = tokens.shape[0] - cfg.context
        count = min(n_offsets, cfg.eval_windows)
        # Evenly spaced and deterministic: the same buffer always scores the same.
        offsets = (xp.arange(count) * n_offsets) // count
        total = 0.0
        for start in range(0, count, 1024):
            part = offsets[start : start + 1024]
            windows = tokens[part[:, None] + self._window_ids[None, :]]
            total += float(self.batch_loss(windows, backward=False)) * part.shape[0]
        return total / count

    def parameter_views(self) -> list[Any]:
        """Each parameter as a contiguous view into the one flat parameter buffer, in :meth:`ByteLMConfig.shapes` order."""
        _ = self.xp
        return list(self._params.values())

    def code_bytes(self) -> bytes:
        """The source of this module, the optimizer and the trainer contract."""
        import sys

        return module_sources(trainer_module, adam_module, sys.modules[__name__])

    def state_dict(self) -> dict[str, Any]:
        """Host copies of parameters (``param/<name>``), Adam moments (``adam_m/``, ``adam_v/``) and counters."""
        xp = self.xp
        shapes = self.config.shapes()
        state: dict[str, Any] = {"step": self._step, "adam_t": self._adam.t}
        for prefix, flat in (("param", self._theta), ("adam_m", self._adam.m), ("adam_v", self._adam.v)):
            host = _to_host(xp, flat)
            for name, view in _split(host, shapes).items():
                state[f"{prefix}/{name}"] = view
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises :class:`WorkloadError` on a missing key or shape mismatch."""
        xp = self.xp
        shapes = self.config.shapes()
        targets = (("param", self._theta), ("adam_m", self._adam.m), ("adam_v", self._adam.v))
        # Check everything before writing anything: a bad checkpoint must not
        # leave a half-restored model behind.
        try:
            step, adam_t = int(state["step"]), int(state["adam_t"])
            values = {
                f"{prefix}/{name}": numpy.asarray(state[f"{prefix}/{name}"])
                for prefix, _ in targets
                for name, _ in shapes
            }
        except KeyError as missing:
            raise WorkloadError(f"checkpoint lacks {missing.args[0]!r}") from None
        for prefix, _ in targets:
            for name, shape in shapes:
                found = values[f"{prefix}/{name}"].shape
                if found != shape:
                    raise WorkloadError(f"checkpoint {prefix}/{name} has shape {found}, model needs {shape}")
        for prefix, flat in targets:
            for name, view in _split(flat, shapes).items():
                view[...] = xp.asarray(values[f"{prefix}/{name}"].astype(self.config.dtype, copy=False))
        self._step = step
        self._adam.t = adam_t

    # -- the math ----------------------------------------------------------------

    def batch_loss(self, windows: Any, *, backward: bool) -> Any:
        """Mean cross-entropy of a ``(B, context + 1)`` window batch; with ``backward`` also fills the gradients.

        Returns a 0-d array on the model's array module. Public so that tests
        can check the gradients against finite differences.
        """
        xp = self.xp
        cfg = self.config
        p, g = self._params, self._grads
        windows = windows.astype(xp.int64, copy=False)
        ctx, target = windows[:, : cfg.context], windows[:, cfg.context]
        batch = windows.shape[0]
        rows = xp.arange(batch)

        x, h1, h, logits = self._forward(ctx)
        # Stable log-softmax: subtract the row max before exponentiating.
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        loss = -log_probs[rows, target].mean()
        if not backward:
            return loss

        d_logits = xp.exp(log_probs)
        d_logits[rows, target] -= 1.0
        d_logits /= batch
        xp.matmul(h.T, d_logits, out=g["w_out"])
        d_logits.sum(axis=0, out=g["b_out"])
        d_h = d_logits @ p["w_out"].T
        if cfg.layers == 2:
            d_pre2 = d_h * (1.0 - h * h)
            xp.matmul(h1.T, d_pre2, out=g["w2"])
            d_pre2.sum(axis=0, out=g["b2"])
            d_h = d_pre2 @ p["w2"].T
        d_pre1 = d_h * (1.0 - h1 * h1)
        xp.matmul(x.T, d_pre1, out=g["w1"])
        d_pre1.sum(axis=0, out=g["b1"])
        d_x = (d_pre1 @ p["w1"].T).reshape(batch * cfg.context, cfg.embed)
        # Scatter-add of d_x into the embedding rows, done as a one-hot matmul:
        # portable across array modules and, unlike atomic scatter-add on a
        # GPU, deterministic in its summation order.
        one_hot = (ctx.reshape(-1)[:, None] == self._vocab_ids[None, :]).astype(d_x.dtype)
        xp.matmul(one_hot.T, d_x, out=g["embed"])
        return loss

    def next_byte_logits(self, contexts: Any) -> Any:
        """Logits of the next byte after each row of ``contexts`` (``(B, context)`` byte ids): ``(B, 256)``; changes no state."""
        return self._forward(contexts.astype(self.xp.int64, copy=False))[3]

    def _forward(self, ctx: Any) -> tuple[Any, Any, Any, Any]:
        # (input, first hidden layer, last hidden layer, logits): what the backward pass reuses.
        cfg = self.config
        p, xp = self._params, self.xp
        batch = ctx.shape[0]
        x = p["embed"][ctx].reshape(batch, cfg.context * cfg.embed)
        h1 = xp.tanh(x @ p["w1"] + p["b1"])
        h = h1
        if cfg.layers == 2:
            h = xp.tanh(h1 @ p["w2"] + p["b2"])
        return x, h1, h, h @ p["w_out"] + p["b_out"]

    def gradient_views(self) -> dict[str, Any]:
        """Named views of the gradient buffer filled by the last ``batch_loss(..., backward=True)``."""
        _ = self.xp
        return dict(self._grads)

    def _sample_windows(self, tokens: Any, n_offsets: int) -> Any:
        # Offsets come from a host RNG keyed by (seed, step): identical on
        # every backend, and a restored checkpoint draws the same next batch
        # without having to carry RNG state.
        rng = numpy.random.default_rng((self.config.seed, self._step))
        offsets = self.xp.asarray(rng.integers(0, n_offsets, size=self.config.batch))
        return tokens[offsets[:, None] + self._window_ids[None, :]]


def _split(flat: Any, shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, Any]:
    """Contiguous named views of consecutive pieces of a flat buffer."""
    views = {}
    start = 0
    for name, shape in shapes:
        size = math.prod(shape)
        views[name] = flat[start : start + size].reshape(shape)
        start += size
    return views


def _to_host(xp: ModuleType, array: Any) -> numpy.ndarray:
    """A numpy copy of ``array`` (cupy arrays are fetched with ``.get()``)."""
    if hasattr(array, "get") and xp is not numpy:
        return array.get()
    return numpy.array(array, copy=True)

