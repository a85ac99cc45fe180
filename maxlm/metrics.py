"""Metric writers (JSON lines always; TensorBoard and Weights & Biases optional), throughput
accounting and the progress display."""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import jax
from etils import epath
from tqdm import tqdm

from maxlm import paths
from maxlm.config import ConfigError, WandbConfig

WANDB_ID_FILE = "wandb_id"  # a restarted run logs on to the same W&B run


class MetricsWriter:
    """Writes `<run_dir>/metrics.jsonl`, TensorBoard events and W&B history; only process 0.
    A remote run dir's metrics and events are written locally (objects cannot be appended to)
    and uploaded by `sync`: at checkpoints and at the end."""

    def __init__(
        self,
        run_dir: epath.Path,
        tensorboard: bool,
        resume_step: int = 0,
        wandb: WandbConfig | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        """`resume_step` > 0 keeps the records up to that step (a resumed run rewrites the
        steps after its checkpoint); 0 starts a fresh file. `run_config` goes to W&B."""
        self.enabled = jax.process_index() == 0
        self._run_dir = run_dir
        self._staging = paths.Staging(run_dir) if self.enabled else None
        self._path = run_dir / "metrics.jsonl"  # a resume reads it, then its local copy
        self._jsonl: TextIO | None = None
        if self.enabled:
            self._reopen(resume_step)
        self._tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self._local / "tensorboard"))
        self._wandb = None
        if self.enabled and wandb is not None and wandb.enabled:
            self._wandb = _start_wandb(wandb, run_dir, self._local, run_config or {})

    @property
    def _local(self) -> Path:
        assert self._staging is not None  # process 0 only
        return self._staging.local

    def _reopen(self, keep_until: int) -> None:
        kept = []
        if keep_until and self._path.exists():
            kept = _records_until(self._path, keep_until)
        if self._jsonl is not None:
            self._jsonl.close()
        self._path = self._local / "metrics.jsonl"  # the run dir's own file when it is local
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
        if self._wandb is not None:
            # "step" is the x axis (define_metric): after a rewind W&B's own counter goes on
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, int | float)})

    def sync(self) -> None:
        """Make a remote run dir's metrics.jsonl and TensorBoard events current."""
        if self._staging is not None:
            if self._jsonl is not None:
                self._jsonl.flush()
            self._staging.sync("metrics.jsonl", "tensorboard")

    def summarize(self, summary: dict[str, Any]) -> None:
        """The run's final numbers, as the W&B run summary."""
        if self._wandb is not None:
            plain = {key: _plain(value) for key, value in summary.items()}
            self._wandb.summary.update(
                {k: v for k, v in plain.items() if isinstance(v, int | float | dict)}
            )

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.sync()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(
    cfg: WandbConfig, run_dir: epath.Path, local_dir: Path, run_config: dict[str, Any]
) -> Any:
    """A W&B run for this run directory: the same W&B run again after a restart. W&B writes
    its files to `local_dir` (the run dir itself unless that is remote: W&B needs a disk)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            'metrics.wandb.enabled: needs the wandb package: pip install "maxlm[wandb]"'
        ) from None
    id_file = run_dir / WANDB_ID_FILE
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12] + "\n")
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name or run_dir.name,
        group=cfg.group,
        tags=cfg.tags or None,
        mode=cfg.mode,
        dir=str(local_dir),
        id=id_file.read_text().strip(),
        resume="allow",
        config=run_config,
        settings=wandb.Settings(quiet=True),
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _records_until(path: epath.Path | Path, step: int) -> list[str]:
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


class ProgressDisplay:
    """On a terminal, a live bar with ETA advanced every step; elsewhere (logs, CI, pods) the
    progress line every metrics.log_every_steps. Only process 0 shows anything."""

    def __init__(self, mode: str, total: int, start: int, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        shown = jax.process_index() == 0
        terminal = self.stream.isatty()
        self.bar = None
        if shown and (mode == "bar" or (mode == "auto" and terminal)):
            self.bar = tqdm(
                total=total, initial=start, unit="step", file=self.stream, dynamic_ncols=True,
                smoothing=0.1, mininterval=0.5 if terminal else 0,
            )  # fmt: skip
        self._lines = shown and self.bar is None

    def advance(self, step: int) -> None:
        if self.bar is not None and step != self.bar.n:
            self.bar.update(step - self.bar.n)

    def show(self, step: int, total: int, record: dict[str, Any], eta_s: float) -> None:
        """A logging step's record: the bar's postfix, or a progress line."""
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"loss {record['loss_avg']:.4f} lr {record['lr']:.2e} "
                f"tok/s {record['tokens_per_s']:,.0f} MFU {100 * record['mfu']:.1f}%"
            )
        elif self._lines:
            print(format_progress(step, total, record, eta_s), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
