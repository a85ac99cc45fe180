"""Loss-spike and non-finite-step detection, and the restore-and-skip policy (host side).

Like PaLM, OPT and BLOOM: a non-finite step's update is never applied, and a loss spike restores
the last good checkpoint and skips the next batches; too many recoveries end the run.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Literal

import numpy as np

from maxlm.config import StabilityConfig

Action = Literal["skip_update", "restore_and_skip"]


class StabilityError(RuntimeError):
    """The run gave up: more recoveries than `stability.max_recoveries` in the window."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What to do about a bad step, and why (the reason is logged as is)."""

    reason: str
    action: Action


class SpikeMonitor:
    """Judges each step's host-side metrics against the mean and population std of the last
    `window` good losses. Early in training loss falls fast, which only lowers new losses below
    the mean (both tests are one-sided); `min_history` keeps the first noisy steps unjudged."""

    def __init__(self, cfg: StabilityConfig) -> None:
        self.cfg = cfg
        self._history: collections.deque[tuple[int, float]] = collections.deque(maxlen=cfg.window)
        # every recovery is kept: a restore moves the step back, so an old one can re-enter the
        # window, and the list grows by at most max_recoveries per window
        self._recoveries: list[int] = []

    def check(self, step: int, loss: float, grad_norm: float) -> Verdict | None:
        """None for a good step (its loss joins the history); otherwise a Verdict, or
        StabilityError once the recovery budget is spent."""
        loss, grad_norm = float(loss), float(grad_norm)
        verdict = self._judge(loss, grad_norm)
        if verdict is None:
            self._history.append((step, loss))
            return None
        self._recoveries.append(step)
        self._enforce_budget(step, verdict)
        return verdict

    def _judge(self, loss: float, grad_norm: float) -> Verdict | None:
        if not math.isfinite(loss):
            return Verdict(f"non-finite loss ({loss})", "skip_update")
        if not math.isfinite(grad_norm):
            return Verdict(f"non-finite grad_norm ({grad_norm})", "skip_update")
        if len(self._history) < self.cfg.min_history:
            return None
        # float64 two-pass mean/std over ~100 values: exact enough, no running-sum drift
        losses = np.fromiter((l for _, l in self._history), np.float64, len(self._history))
        mean, std = float(losses.mean()), float(losses.std())
        factor, zscore = self.cfg.spike_factor, self.cfg.spike_zscore
        # the multiplicative test needs a positive mean (cross-entropy always has one)
        if factor > 0 and mean > 0 and loss > factor * mean:
            return Verdict(
                f"loss spike: {loss:.2f} > {factor} x running mean {mean:.2f}", "restore_and_skip"
            )
        if zscore > 0 and std > 0 and (loss - mean) / std > zscore:
            return Verdict(
                f"loss spike: {loss:.2f} is {(loss - mean) / std:.1f} sigma above the running "
                f"mean {mean:.2f} (std {std:.2f})",
                "restore_and_skip",
            )
        return None

    def _enforce_budget(self, step: int, verdict: Verdict) -> None:
        # recoveries at later steps than this one came before a restore: they still count
        recent = [s for s in self._recoveries if s > step - self.cfg.recovery_window_steps]
        if len(recent) > self.cfg.max_recoveries:
            raise StabilityError(
                f"giving up at step {step}: {len(recent)} recoveries in steps {recent} exceed "
                f"stability.max_recoveries={self.cfg.max_recoveries} within "
                f"stability.recovery_window_steps={self.cfg.recovery_window_steps} "
                f"(last: {verdict.reason})"
            )

    def after_restore(self, step: int) -> None:
        """The checkpoint of `step` was restored: forget losses from the abandoned trajectory
        (steps after it); the recovery record stays, to keep enforcing the budget."""
        kept = [(s, l) for s, l in self._history if s <= step]
        self._history = collections.deque(kept, maxlen=self.cfg.window)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, for the checkpoint to hold."""
        return {
            "history": [[s, l] for s, l in self._history],
            "recoveries": list(self._recoveries),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output (the last `window` losses if it shrank)."""
        history = [(int(s), float(l)) for s, l in d["history"]]
        self._history = collections.deque(history, maxlen=self.cfg.window)
        self._recoveries = [int(s) for s in d["recoveries"]]
