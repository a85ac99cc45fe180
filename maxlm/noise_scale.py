"""The simple gradient noise scale B_simple = tr(Sigma) / |G|^2 and the critical batch size.

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", appendix A.1: from
squared gradient norms measured at a small and a big batch, unbiased estimates of |G|^2 and
tr(Sigma); each is smoothed with an exponential moving average before their ratio is taken,
because the ratio of noisy estimates is biased and can flip sign.
"""

from __future__ import annotations

import math
from typing import Any


def unbiased_estimates(
    small_sq: float, big_sq: float, small_batch: float, big_batch: float
) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from E|g_B|^2 = |G|^2 + tr(Sigma) / B at two batch sizes."""
    if big_batch <= small_batch:
        raise ValueError(f"the big batch ({big_batch}) must exceed the small one ({small_batch})")
    grad_sq = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
    trace = (small_sq - big_sq) / (1.0 / small_batch - 1.0 / big_batch)
    return grad_sq, trace


class NoiseScale:
    """Exponentially smoothed |G|^2 and tr(Sigma) (debiased like Adam's moments); batch sizes
    are in tokens, so B_simple is the critical batch size in tokens."""

    def __init__(self, ema_decay: float) -> None:
        self.decay = ema_decay
        self.grad_sq = 0.0
        self.trace = 0.0
        self.count = 0

    def update(self, small_sq: float, big_sq: float, small_batch: float, big_batch: float) -> None:
        grad_sq, trace = unbiased_estimates(small_sq, big_sq, small_batch, big_batch)
        self.grad_sq = self.decay * self.grad_sq + (1 - self.decay) * grad_sq
        self.trace = self.decay * self.trace + (1 - self.decay) * trace
        self.count += 1

    @property
    def value(self) -> float:
        """B_simple in tokens; nan before a measurement or while |G|^2 is not positive."""
        if not self.count or self.grad_sq <= 0:
            return math.nan
        return self.trace / self.grad_sq  # the (1 - decay^count) debiasing cancels in the ratio

    def metrics(self) -> dict[str, float]:
        debias = 1 - self.decay**self.count if self.count else 1.0
        return {
            "noise_scale/grad_sq": self.grad_sq / debias,
            "noise_scale/trace": self.trace / debias,
            "critical_batch_tokens": self.value,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"grad_sq": self.grad_sq, "trace": self.trace, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grad_sq = float(state.get("grad_sq", 0.0))
        self.trace = float(state.get("trace", 0.0))
        self.count = int(state.get("count", 0))
