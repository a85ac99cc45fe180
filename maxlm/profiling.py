"""A jax.profiler trace of a few training steps (`profile.start_step`, `profile.steps`),
viewable in TensorBoard's profile tab or, as perfetto_trace.json.gz, in ui.perfetto.dev."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
from etils import epath

from maxlm import paths
from maxlm.config import ProfileConfig


class StepProfiler:
    """Starts the trace before step `start_step` and stops it once step
    `start_step + steps - 1` has finished on the device; every process traces its own devices."""

    def __init__(self, cfg: ProfileConfig, run_dir: epath.Path, log: Callable[[str], None]) -> None:
        self.first = cfg.start_step
        self.last = cfg.start_step + cfg.steps - 1
        self.enabled = cfg.steps > 0
        # jax writes gs:// itself (its own file system layer, not epath)
        self.dir = paths.resolve(cfg.dir) if cfg.dir else run_dir / "profile"
        self._perfetto = cfg.perfetto
        self._log = log
        self._active = False

    def before(self, step: int) -> None:
        if self.enabled and step == self.first and not self._active:
            jax.profiler.start_trace(str(self.dir), create_perfetto_trace=self._perfetto)
            self._active = True

    def after(self, step: int, state: Any) -> float:
        """Stops the trace after the last profiled step; the seconds spent writing it."""
        if not (self._active and step >= self.last):
            return 0.0
        jax.block_until_ready(state)  # the traced steps' device work, not just their dispatch
        start = time.perf_counter()
        self.stop()
        self._log(f"profile of steps {self.first}-{step} written to {self.dir}")
        return time.perf_counter() - start

    def stop(self) -> None:
        """End an open trace (the run ended, or went back, inside the profiled steps)."""
        if self._active:
            jax.profiler.stop_trace()
            self._active = False
