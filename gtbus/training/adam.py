"""Adam with bias correction over one flat parameter buffer.

Kingma & Ba (2015), Algorithm 1, unchanged. Keeping every parameter in one
flat array makes an update a handful of whole-buffer operations (a handful of
kernel launches on a GPU, not a handful per tensor) and makes the moments easy
to checkpoint. Written against an array module so it runs on numpy and cupy.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any


class Adam:
    """Adam state (first and second moments, step count) for a flat parameter buffer of ``size`` elements."""

    def __init__(
        self,
        xp: ModuleType,
        size: int,
        dtype: Any,
        *,
        lr: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.m = xp.zeros(size, dtype=dtype)
        self.v = xp.zeros(size, dtype=dtype)
        #: Updates applied so far; the bias corrections depend on it.
        self.t = 0
        self._xp = xp
        self._scratch = xp.empty(size, dtype=dtype)

    def step(self, theta: Any, grad: Any) -> None:
        """Apply one update to ``theta`` in place from gradient ``grad`` (same shape)."""
        xp = self._xp
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        s = self._scratch
        # In place through one scratch buffer: the update is memory-bound, and
        # temporaries would double the traffic.
        xp.multiply(grad, 1.0 - b1, out=s)
        self.m *= b1
        self.m += s
        xp.multiply(grad, grad, out=s)
        s *= 1.0 - b2
        self.v *= b2
        self.v += s
        # theta -= lr * m_hat / (sqrt(v_hat) + eps), with the bias corrections
        # m_hat = m / (1 - b1^t) and v_hat = v / (1 - b2^t) of the paper (not
        # the folded "epsilon hat" variant).
        xp.divide(self.v, 1.0 - b2**self.t, out=s)
        xp.sqrt(s, out=s)
        s += self.eps
        xp.divide(self.m, s, out=s)
        s *= self.lr / (1.0 - b1**self.t)
        theta -= s
