"""Metric writers (JSON lines always, TensorBoard optional) and throughput accounting."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

import jax


class MetricsWriter:
    """Writes `<run_dir>/metrics.jsonl` and TensorBoard events; only process 0 writes."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0) -> None:
        """`resume_step` > 0 keeps the records up to that step (a resumed run rewrites the
        steps after its checkpoint); 0 starts a fresh file."""
        self.enabled = jax.process_index() == 0
        self._path = run_dir / "metrics.jsonl"
        self._jsonl: TextIO | None = None
        if self.enabled:
            self._reopen(resume_step)
        self._tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def _reopen(self, keep_until: int) -> None:
        kept = []
        if keep_until and self._path.exists():
            kept = _records_until(self._path, keep_until)
        if self._jsonl is not None:
            self._jsonl.close()
        self._jsonl = open(self._path, "w")  # noqa: SIM115
        self._jsonl.writelines(kept)

    def rewind(self, step: int) -> None:
        """Drop the records after `step` (training went back to that step's checkpoint)."""
        if self.enabled:
            self._reopen(step)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if self._jsonl is None:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _records_until(path: Path, step: int) -> list[str]:
    lines = path.read_text().splitlines(keepends=True)
    return [line for line in lines if line.strip() and json.loads(line)["step"] <= step]


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Throughput:
    """Tokens/s and MFU over the window since the last report."""

    def __init__(self, flops_per_token: float, peak_flops: float) -> None:
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._start = time.perf_counter()
        self._tokens = 0
        self._steps = 0

    def restart(self) -> None:
        """Start a new window (after evaluation, so eval time is not counted as training)."""
        self._start, self._tokens, self._steps = time.perf_counter(), 0, 0

    def exclude(self, seconds: float) -> None:
        """Leave time spent on something else (evaluation) out of the window."""
        self._start += seconds

    def add(self, tokens: int) -> None:
        self._tokens += tokens
        self._steps += 1

    def report(self) -> dict[str, float]:
        """Window averages; resets the window."""
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        tokens_per_s = self._tokens / elapsed
        result = {
            "tokens_per_s": tokens_per_s,
            "step_time_s": elapsed / max(self._steps, 1),
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
        }
        self.restart()
        return result


def format_progress(step: int, total: int, metrics: dict[str, Any], eta_s: float) -> str:
    """One progress line; the loss shown is the mean since the previous line."""
    return (
        f"step {step:>6}/{total}  loss {metrics['loss_avg']:.4f}  lr {metrics['lr']:.2e}  "
        f"grad_norm {metrics['grad_norm']:.3f}  tok/s {metrics['tokens_per_s']:,.0f}  "
        f"MFU {100 * metrics['mfu']:.1f}%  ETA {format_duration(eta_s)}"
    )


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
