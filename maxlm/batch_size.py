"""Batch-size ramp-up: how many fixed-shape micro-batches each optimizer step accumulates.

The compiled micro-batch never changes shape, so growing the batch (GPT-3 went from 32K to
3.2M tokens) costs no recompilation; only the number of micro-batches per step grows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maxlm.config import TrainConfig


class BatchRamp:
    """Micro-batches per step: a configured linear ramp in whole increments, optionally pushed
    ahead by the measured gradient noise scale (never back)."""

    def __init__(self, train: TrainConfig) -> None:
        ramp = train.batch_ramp
        self.micro_tokens = train.micro_batch_size * train.seq_len
        self.end = train.grad_accum_steps
        self.start = ramp.start_tokens // self.micro_tokens if ramp.enabled else self.end
        self.increment = max(ramp.increment_tokens // self.micro_tokens, 1)
        self.follow_noise_scale = ramp.follow_noise_scale
        self.adaptive = self.start
        self._scheduled = self._schedule(train)

    def _schedule(self, train: TrainConfig) -> np.ndarray:
        """Configured micro-batches of each step (index 0 = the first step)."""
        ramp = train.batch_ramp
        counts = np.full(train.steps, self.end, dtype=np.int64)
        if not ramp.enabled:
            return counts
        span = self.end - self.start
        if ramp.ramp_steps:
            progress = np.arange(train.steps) / ramp.ramp_steps
            counts = self._quantize(self.start + span * np.minimum(progress, 1.0))
        elif ramp.ramp_tokens:
            tokens = 0
            for i in range(train.steps):
                counts[i] = self._quantize(self.start + span * min(tokens / ramp.ramp_tokens, 1.0))
                if counts[i] == self.end:
                    break
                tokens += int(counts[i]) * self.micro_tokens
        else:  # noise-scale driven only: the scheduled batch stays at the start
            counts[:] = self.start
        return counts

    def _quantize(self, count: Any) -> Any:
        """Round down to whole increments above the start, never past the end."""
        steps = np.floor((np.asarray(count) - self.start) / self.increment + 1e-9)
        return np.minimum(self.start + steps.astype(np.int64) * self.increment, self.end)

    def micro_batches(self, step: int) -> int:
        """Micro-batches of 1-based step `step`."""
        index = min(step - 1, len(self._scheduled) - 1)
        return int(max(self._scheduled[index], self.adaptive))

    def micro_batches_before(self, step: int) -> int:
        """Micro-batches the configured ramp consumes before 1-based step `step`."""
        done = min(step - 1, len(self._scheduled))
        return int(self._scheduled[:done].sum()) + max(step - 1 - done, 0) * self.end

    def observe_noise_scale(self, step: int, noise_scale_tokens: float) -> None:
        """Grow by one increment when the noise scale exceeds the batch of `step`."""
        current = self.micro_batches(step)
        if self.follow_noise_scale and noise_scale_tokens > current * self.micro_tokens:
            self.adaptive = min(current + self.increment, self.end)

    def tokens_before(self) -> tuple[np.ndarray, np.ndarray]:
        """Breakpoints (step, tokens before it) of the configured ramp: tokens before step s
        is the linear interpolation between them (exact: the batch is constant in between)."""
        counts = self._scheduled
        changes = np.flatnonzero(np.diff(counts)) + 1
        steps = np.concatenate([[0], changes, [len(counts)]])
        tokens = np.concatenate([[0], np.cumsum(counts)]) * self.micro_tokens
        return steps.astype(np.float64), tokens[steps].astype(np.float64)

    def state_dict(self) -> dict[str, int]:
        return {"adaptive_micro_batches": self.adaptive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adaptive = int(state.get("adaptive_micro_batches", self.start))
