"""Fault injection and tracing for the fault-injection tests, driven by environment variables so
that a test runs the real trainer in a subprocess. Unset variables cost nothing.

  MAXLM_FAULT_KILL_AT_STEP=7        SIGKILL this process right after dispatching step 7
  MAXLM_FAULT_KILL_AFTER_SAVE=8     SIGKILL right after starting step 8's (asynchronous) save
  MAXLM_FAULT_SIGTERM_AT_STEP=5     send this process SIGTERM after dispatching step 5
  MAXLM_FAULT_NAN_AT_STEPS=3,9      a target outside the vocabulary (corrupt data): NaN loss
  MAXLM_FAULT_SPIKE_AT_STEPS=12     the batch becomes uniform random tokens: a loss spike
  MAXLM_TRACE=path.jsonl            append {step, loss bits, batch hash} per step (process 0)
Each fault fires once per process, so a step re-run after a recovery is clean.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
from dataclasses import dataclass, field

import jax
import numpy as np


def _steps(name: str) -> set[int]:
    value = os.environ.get(name, "")
    return {int(s) for s in value.split(",") if s.strip()}


@dataclass
class Faults:
    kill_at: set[int] = field(default_factory=lambda: _steps("MAXLM_FAULT_KILL_AT_STEP"))
    kill_after_save: set[int] = field(default_factory=lambda: _steps("MAXLM_FAULT_KILL_AFTER_SAVE"))
    sigterm_at: set[int] = field(default_factory=lambda: _steps("MAXLM_FAULT_SIGTERM_AT_STEP"))
    nan_at: set[int] = field(default_factory=lambda: _steps("MAXLM_FAULT_NAN_AT_STEPS"))
    spike_at: set[int] = field(default_factory=lambda: _steps("MAXLM_FAULT_SPIKE_AT_STEPS"))
    trace: str | None = field(default_factory=lambda: os.environ.get("MAXLM_TRACE"))
    _batches: dict[int, str] = field(default_factory=dict)

    def batch(self, step: int, batch: dict[str, np.ndarray], vocab_size: int) -> None:
        """Corrupt this process's host batch in place when `step` has a data fault."""
        if step in self.nan_at:
            self.nan_at.discard(step)
            batch["targets"][0, 0] = vocab_size
            batch["segment_ids"][0, 0] = max(int(batch["segment_ids"][0, 0]), 1)
        if step in self.spike_at:
            self.spike_at.discard(step)
            rng = np.random.default_rng(step)
            real = batch["segment_ids"] > 0
            for key in ("tokens", "targets"):
                noise = rng.integers(0, vocab_size, batch[key].shape, dtype=batch[key].dtype)
                batch[key][real] = noise[real]

    def after_dispatch(self, step: int) -> None:
        if step in self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step in self.sigterm_at:
            self.sigterm_at.discard(step)
            os.kill(os.getpid(), signal.SIGTERM)

    def after_save(self, step: int) -> None:
        if step in self.kill_after_save:
            os.kill(os.getpid(), signal.SIGKILL)

    def note_batch(self, step: int, batch: dict[str, np.ndarray]) -> None:
        if self.trace:
            self._batches[step] = batch_hash(batch)

    def record(self, step: int, loss: float) -> None:
        """One trace line: the loss's float32 bits make "bit for bit" checkable as text."""
        if self.trace and jax.process_index() == 0:
            bits = struct.unpack("<I", struct.pack("<f", loss))[0]
            line = {"step": step, "loss_bits": bits, "batch": self._batches.pop(step, None)}
            with open(self.trace, "a") as f:
                f.write(json.dumps(line) + "\n")


def batch_hash(batch: dict[str, np.ndarray]) -> str:
    """A short hash of a host batch's arrays (which data a step trained on)."""
    digest = hashlib.sha256()
    for key in sorted(batch):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()[:16]
