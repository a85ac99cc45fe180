"""`python -m maxlm.train --config=FILE [key=value ...]`: the training loop, top to bottom."""

from __future__ import annotations

from maxlm import host_memory

if __name__ == "__main__":  # `python -m maxlm.train`: restart now, before jax and the rest load
    host_memory.restart_with_huge_pages()

import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from maxlm import (
    config as config_lib,
    estimate,
    generate,
    goodput as goodput_lib,
    mesh as mesh_lib,
    paths,
    stages as stages_lib,
    state as state_lib,
    train_step,
    vocab,
)
from maxlm.batch_size import BatchRamp
from maxlm.checkpoint import (
    CONFIG_FILE,
    Checkpointer,
    CheckpointError,
    PreemptionWatch,
    state_hash,
    tokenizer_filename,
)
from maxlm.config import CheckpointConfig, Config, ConfigError
from maxlm.data import global_batch, mixture, pipeline
from maxlm.evaluate import evaluate, load_held_out, token_bytes
from maxlm.faults import Faults
from maxlm.metrics import MetricsWriter, ProgressDisplay, Throughput, format_duration
from maxlm.model import compute_dtype
from maxlm.noise_scale import NoiseScale
from maxlm.profiling import StepProfiler
from maxlm.stability import SpikeMonitor, StabilityError
from maxlm.state import TrainState


def log(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stdout)  # above a live progress bar, if one is shown
        sys.stdout.flush()


def check_batch(cfg: Config, data_parallel: int) -> None:
    """The global batch must split evenly over processes, devices and micro-batches."""
    rows = cfg.train.global_batch_size
    accum = cfg.train.grad_accum_steps
    if rows % (data_parallel * accum):
        raise ConfigError(
            f"train.global_batch_size: {rows} is not divisible by the data-parallel size "
            f"(mesh data*fsdp = {data_parallel}) times train.grad_accum_steps ({accum})"
        )
    if rows % jax.process_count():
        raise ConfigError(
            f"train.global_batch_size: {rows} is not divisible by the "
            f"{jax.process_count()} processes"
        )


def train(cfg: Config) -> dict[str, Any]:
    """Run training as configured; returns the final summary (also written to the run dir)."""
    wall_start, session_start = time.perf_counter(), time.time()
    mesh_lib.initialize_distributed(cfg.distributed)
    run_dir = paths.resolve(cfg.run.dir)  # local, or gs://: every file goes through epath
    run_dir.mkdir(parents=True, exist_ok=True)
    goodput = goodput_lib.Goodput(run_dir, jax.process_index() == 0, session_start)
    if jax.process_index() == 0:
        (run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
    log(f"# resolved config (saved to {run_dir / CONFIG_FILE})\n{cfg.to_yaml()}")

    mesh = mesh_lib.make(cfg.mesh)
    check_batch(cfg, mesh_lib.data_parallel_size(mesh))
    log(
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es)"
    )

    data = mixture.load(cfg)
    tokenizer = data.tokenizer
    for train_source, held_out in zip(data.train, data.held_out, strict=True):
        log(
            f"data: source {train_source.name!r}: {len(train_source.docs)} train / "
            f"{len(held_out.docs)} held-out documents"
        )
    log(f"tokenizer: {tokenizer.vocab_size} tokens ({tokenizer.fingerprint[:12]})")
    if jax.process_index() == 0:  # beside the checkpoints, so generate and eval need no config
        tokenizer.save(run_dir / tokenizer_filename(tokenizer))

    ramp = BatchRamp(cfg.train)
    checkpointer = Checkpointer(cfg.checkpoint, run_dir)
    runtime = StageRuntime(cfg, mesh, data, ramp, goodput)
    latest = checkpointer.latest_step() or 0
    steps = runtime.steps(stages_lib.stage_of(runtime.plan, latest + 1))
    blue, batch_sharding = steps.blueprint, steps.batch_sharding
    n_params = state_lib.count_params(blue.abstract.params)
    params_bytes = state_lib.bytes_per_device(blue.abstract.params, blue.shardings.params)
    opt_bytes = state_lib.bytes_per_device(blue.abstract.opt_state, blue.shardings.opt_state)
    log(
        f"model: {n_params:,} parameters; per device: params {params_bytes / 2**20:.1f} MiB, "
        f"optimizer state {opt_bytes / 2**20:.1f} MiB"
    )
    if steps.micro:
        log(f"batch ramp: {ramp.start} to {ramp.end} micro-batches of {ramp.micro_tokens:,} "
            f"tokens per step, in increments of {ramp.increment}")  # fmt: skip

    def resumable(step: int, saved: dict[str, Any]) -> None:
        """A checkpoint of another tokenizer or data layout must not be resumed."""
        if saved["tokenizer_fingerprint"] != tokenizer.fingerprint:
            raise ConfigError(
                f"data.tokenizer: the checkpoint of step {step} in {checkpointer.directory} was "
                f"trained with tokenizer {saved['tokenizer_fingerprint'][:12]}, but this run's "
                f"tokenizer is {tokenizer.fingerprint[:12]}"
            )
        for key, value in runtime.data_layout(step).items():
            if saved["layout"].get(key, value) != value:
                raise ConfigError(
                    f"{key}: the checkpoint of step {step} in {checkpointer.directory} was written "
                    f"with {saved['layout'][key]!r}, this run has {value!r}; resume with the same "
                    "value (or start a new run.dir)"
                )

    events = Events(run_dir)
    monitor = SpikeMonitor(cfg.stability)
    noise = NoiseScale(cfg.train.noise_scale.ema_decay)
    noise_every = cfg.train.noise_scale.every_steps
    restored = checkpointer.restore_latest(blue, runtime.open_data, resumable, log)
    if restored is None and cfg.checkpoint.branch_from:
        restored = branch(cfg.checkpoint, blue, runtime.open_data, resumable)
    stage, train_iter = runtime.opened
    if restored is not None:
        start, state, saved = restored
        monitor.load_state_dict(saved["stability"])
        ramp.load_state_dict(saved.get("batch_ramp", {}))
        noise.load_state_dict(saved.get("noise_scale", {}))
        log(f"resumed from the checkpoint of step {start} in {checkpointer.directory}")
    else:
        start, saved = 0, {}
        state = state_lib.init(cfg, steps.optimizer, blue)
        if cfg.checkpoint.init_from:
            params = vocab.init_from(
                cfg.checkpoint.init_from, blue.abstract.params, blue.shardings.params,
                tokenizer=tokenizer, new_token_init=cfg.checkpoint.new_token_init, log=log,
            )  # fmt: skip
            state = state.replace(params=params)
            log(f"parameters from {cfg.checkpoint.init_from}; fresh optimizer and schedule")
    batches_consumed = int(saved.get("batches_consumed", start))

    steps = runtime.steps(stage)
    eval_data = runtime.held_out(stage)
    peak, peak_source = estimate.peak_flops(jax.devices(), compute_dtype(cfg.model.dtype).name)
    flops_per_token = estimate.flops_per_token(cfg.model, stage.cfg.train.seq_len)
    log(f"MFU is against the {peak_source}; {flops_per_token / 1e6:.1f} MFLOP per token")
    writer = MetricsWriter(
        run_dir, cfg.metrics.tensorboard, start, cfg.metrics.wandb, cfg.model_dump(mode="json")
    )
    display = ProgressDisplay(cfg.metrics.progress, cfg.train.steps, start)
    progress = Progress(
        cfg,
        writer,
        display,
        goodput,
        Throughput(flops_per_token, peak),
        start,
        float(saved.get("tokens_seen", 0.0)),
        dict(saved.get("source_tokens", {})),
        noise if noise_every else None,
        ramp if steps.micro else None,
    )
    eval_result: dict[str, float] = {}
    faults = Faults()
    preemption = PreemptionWatch()
    profiler = StepProfiler(cfg.profile, run_dir, log)

    def progress_json(step: int) -> dict[str, Any]:
        return {
            "tokens_seen": progress.tokens_seen,
            "source_tokens": progress.source_tokens,
            "batches_consumed": batches_consumed,
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "layout": runtime.data_layout(step),
            "stability": monitor.state_dict(),
            "batch_ramp": ramp.state_dict(),
            "noise_scale": noise.state_dict(),
            "config": cfg.model_dump(mode="json"),
        }

    def judge(step: int, values: dict[str, float]) -> bool:
        """Whether step `step` went wrong in a way that needs the last good checkpoint."""
        faults.record(step, values["loss"])
        verdict = monitor.check(step, values["loss"], values["grad_norm"])
        if verdict is None:
            return False
        log(f"step {step}: {verdict.reason}: {verdict.action.replace('_', ' ')}")
        events.write(step, verdict.action, reason=verdict.reason)
        return verdict.action == "restore_and_skip"

    def restore_and_skip(bad_step: int) -> tuple[int, TrainState]:
        """Back to the newest good checkpoint, then past the next stability.skip_batches."""
        nonlocal batches_consumed, stage, train_iter, steps, eval_data
        profiler.stop()
        with goodput.timed("lost"):
            checkpointer.wait()
            back = checkpointer.restore_latest(blue, runtime.open_data, resumable, log)
        if back is None:
            raise StabilityError(
                f"step {bad_step}: a loss spike, but no checkpoint to go back to "
                "(checkpoint.every_steps is 0 or no step was saved yet)"
            )
        good_step, good_state, good = back
        goodput.rewound(good_step)
        stage, train_iter = runtime.opened
        steps, eval_data = runtime.steps(stage), runtime.held_out(stage)
        monitor.after_restore(good_step)
        ramp.load_state_dict(good.get("batch_ramp", {}))
        noise.load_state_dict(good.get("noise_scale", {}))
        progress.rewind(good_step, good["tokens_seen"], good["source_tokens"])
        batches_consumed = int(good["batches_consumed"])
        skipped = []
        with goodput.timed("lost"):
            for _ in range(cfg.stability.skip_batches):
                skipped.append(describe_batch(next(train_iter), batches_consumed, data.names))
                batches_consumed += 1
        log(f"restored step {good_step}; skipped batches {skipped[0]['index'] if skipped else '-'}"
            f"..{skipped[-1]['index'] if skipped else '-'}")  # fmt: skip
        events.write(bad_step, "restored", restored_step=good_step, skipped_batches=skipped)
        return good_step, good_state

    pending: tuple[int, Any] | None = None
    step = start
    goodput.started(start)
    while step < cfg.train.steps:
        step += 1
        if step > stage.last:  # the next stage: its compiled step, its data stream
            stage = stages_lib.stage_of(runtime.plan, step)
            with goodput.timed("data"):
                train_iter = runtime.open_data(step)
            steps, eval_data = runtime.steps(stage), runtime.held_out(stage)
            progress.enter(stage)
            events.write(step, "stage", name=stage.name, index=stage.index)
        count = ramp.micro_batches(step) if steps.micro else 1
        with goodput.timed("data"):
            host_batches = [next(train_iter) for _ in range(count)]
        batches_consumed += count
        profiler.before(step)
        faults.batch(step, host_batches[0], cfg.model.vocab_size)
        faults.note_batch(step, host_batches[0])
        measure = bool(noise_every) and count > 1 and (step - 1) % noise_every == 0
        state, metrics = steps.run(
            state, [global_batch.to_global(b, batch_sharding) for b in host_batches], measure
        )
        faults.after_dispatch(step)
        goodput.add("profile", profiler.after(step, state))
        goodput.stepped(step)
        checkpointer.check_for_errors(step)
        # the previous step's metrics, while this one runs
        if pending is not None and judge(pending[0], progress.log(*pending)):
            step, state = restore_and_skip(pending[0])
            pending = None
            continue
        pending = (step, metrics)
        last = step == cfg.train.steps
        preempted = preemption.reached(step)
        eval_due = last or bool(cfg.eval.every_steps and step % cfg.eval.every_steps == 0)
        save_due = checkpointer.due(step, cfg.train.steps) or preempted
        if not (eval_due or save_due):
            continue
        values = progress.collect(step, metrics)
        pending = None
        if judge(step, values):
            step, state = restore_and_skip(step)
            continue
        record = progress.record(step, values) or {}
        if eval_due and not preempted:
            eval_start = time.perf_counter()
            with goodput.timed("eval"):
                eval_result = evaluate(steps.eval, state.params, eval_data)
            progress.throughput.exclude(time.perf_counter() - eval_start)
            log(
                f"eval at step {step}: loss {eval_result['eval_loss']:.4f}  "
                f"perplexity {eval_result['eval_perplexity']:.2f}  "
                f"bits/byte {eval_result['eval_bpb']:.4f}"
                + "".join(  # several sources: upstream vs downstream side by side
                    f"  {name} {eval_result[f'eval_loss/{name}']:.4f}"
                    for name in data.names
                    if f"eval_loss/{name}" in eval_result
                )
            )
            record.update(eval_result)
        if record:
            writer.write(step, record)
        if save_due:
            with goodput.timed("checkpoint"):
                checkpointer.save(step, state, train_iter, progress_json(step))
            goodput.saved(step)
            goodput.write()
            writer.sync()
            faults.after_save(step)
        if preempted:
            log(f"preempted: saved step {step}; waiting for it to commit")
            with goodput.timed("checkpoint"):
                checkpointer.close(timeout_s=cfg.checkpoint.preemption_grace_s)
            events.write(step, "preempted")
            goodput.write()
            display.close()
            writer.close()
            preemption.close()
            return {"steps": step, "preempted": True, "tokens_seen": progress.tokens_seen}
    profiler.stop()
    display.close()
    preemption.close()
    with goodput.timed("checkpoint"):
        checkpointer.close()
    if not eval_result:  # a finished run restarted: nothing left to train, report where it is
        with goodput.timed("eval"):
            eval_result = evaluate(steps.eval, state.params, eval_data)
    with goodput.timed("eval"):
        samples = write_samples(stage.cfg, state.params, tokenizer)

    summary = {
        "steps": cfg.train.steps,
        "parameters": n_params,
        "tokens_seen": progress.tokens_seen,
        **({"source_tokens": progress.source_tokens} if len(data.names) > 1 else {}),
        "final_train_loss": progress.last_loss,
        **eval_result,
        **({"samples": samples} if samples else {}),
        "unigram_entropy": pipeline.unigram_entropy(data.held_out[0].docs, tokenizer),
        "state_hash": state_hash(state),
        "compile_s": steps.compile_s,
        "train_s": progress.elapsed(),
        "wall_s": time.perf_counter() - wall_start,
    }
    goodput.write(finished=True)
    time_split = goodput.totals()
    summary["goodput"] = time_split
    writer.summarize(summary)
    writer.close()
    if jax.process_index() == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(goodput_lib.summary_line(time_split))
    log(
        f"done: {cfg.train.steps} steps, {progress.tokens_seen:,.0f} tokens in "
        f"{format_duration(progress.elapsed())}; held-out loss "
        f"{eval_result['eval_loss']:.4f} nats/token vs the held-out unigram entropy "
        f"{summary['unigram_entropy']:.4f}"
    )
    return summary


def branch(
    cfg: CheckpointConfig, blue: state_lib.Blueprint, iterator_for: Any, check: Any
) -> tuple[int, TrainState, dict[str, Any]]:
    """The whole state of another run's checkpoint `checkpoint.branch_from`, to go on from
    under this run's config (its own schedule and stages from that step on)."""
    path = paths.resolve(cfg.branch_from or "")
    if not (path.name.isdigit() and path.parent.name == "checkpoints" and path.is_dir()):
        raise ConfigError(
            f"checkpoint.branch_from: {path} is not a checkpoint step directory "
            "(<run.dir>/checkpoints/<step>)"
        )
    step = int(path.name)
    source = Checkpointer(cfg, path.parent.parent)
    check(step, source.progress(step))
    state, progress = source.restore(step, blue, iterator_for(step))
    log(f"branched from step {step} of {path.parent.parent}: parameters, optimizer and data "
        "position; this run's schedule from here on")  # fmt: skip
    return step, state, progress


def write_samples(cfg: Config, params: Any, tokenizer: Any) -> list[dict[str, str]]:
    """Greedy continuations of `eval.sample_prompts`, printed: what the model writes."""
    if not cfg.eval.sample_prompts:
        return []
    if jax.process_count() > 1:  # decoding reads tokens back from arrays no process holds whole
        log("eval.sample_prompts: not sampled with several processes; use python -m "
            "maxlm.generate --checkpoint=<run.dir> afterwards")  # fmt: skip
        return []
    model = state_lib.model_from_params(cfg.model, params)
    continuations = generate.continue_texts(
        model, tokenizer, cfg.eval.sample_prompts, max_new_tokens=cfg.eval.sample_tokens,
        add_bos=cfg.data.add_bos,
    )  # fmt: skip
    for prompt, continuation in zip(cfg.eval.sample_prompts, continuations, strict=True):
        log(f"sample (greedy, {cfg.eval.sample_tokens} tokens): {prompt}\u2502{continuation}")
    return [
        {"prompt": p, "continuation": c}
        for p, c in zip(cfg.eval.sample_prompts, continuations, strict=True)
    ]


class StageRuntime:
    """What each stage trains with: its compiled step (built once, on first use), its data
    stream and its held-out batches. A run without `stages:` is one stage."""

    def __init__(
        self,
        cfg: Config,
        mesh: Any,
        data: mixture.RunData,
        ramp: BatchRamp,
        goodput: goodput_lib.Goodput,
    ) -> None:
        self.cfg = cfg
        self.goodput = goodput
        self.mesh = mesh
        self.data = data
        self.ramp = ramp
        self.plan = stages_lib.plan(cfg)
        for stage in self.plan:
            check_batch(stage.cfg, mesh_lib.data_parallel_size(mesh))
        self._steps: dict[tuple[int, int, float], train_step.Steps] = {}
        self._held_out: dict[int, Any] = {}
        self._opened: tuple[stages_lib.Stage, Any] | None = None

    def steps(self, stage: stages_lib.Stage) -> train_step.Steps:
        """The stage's compiled step; stages of the same shapes and RoPE base share one."""
        key = (stage.cfg.train.seq_len, stage.cfg.train.global_batch_size,
               stage.cfg.model.rope_theta)  # fmt: skip
        if key not in self._steps:
            steps = train_step.build(stage.cfg, self.mesh)
            self.goodput.add("compile", steps.compile_s)
            memory = steps.train.memory_analysis()
            detail = (
                ""
                if memory is None
                else f"; per device: arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB, "
                f"temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB"
            )
            name = f" for stage {stage.name!r}" if self.cfg.stages else ""
            log(f"compiled train step{name} in {steps.compile_s:.1f} s{detail}")
            self._steps[key] = steps
        return self._steps[key]

    def rows(self, stage: stages_lib.Stage) -> int:
        """Rows of this process per data batch (a micro-batch under a batch ramp)."""
        train = stage.cfg.train
        rows = train.micro_batch_size if train.batch_ramp.enabled else train.global_batch_size
        return rows // jax.process_count()

    def open_data(self, step: int) -> Any:
        """A fresh data iterator of the stage of 1-based `step` (checkpoint restore fills in
        its position); `opened` holds it with its stage."""
        stage = stages_lib.stage_of(self.plan, max(step, 1))
        rows = self.rows(stage)
        if self.cfg.stages:
            weights = [(0, stage.weights)]
        else:
            before = (lambda s: self.ramp.micro_batches_before(s) * rows) if (
                stage.cfg.train.batch_ramp.enabled) else None  # fmt: skip
            weights = mixture.stages(self.cfg.data, rows, before)
        dataset = pipeline.train_dataset(
            self.data.train,
            pipeline.Layout.of_run(stage.cfg, self.data.tokenizer),
            batch_size=rows,
            seed=stage.seed,
            stages=weights,
            num_workers=self.cfg.data.num_workers,
        )
        self._opened = (stage, iter(dataset))
        return self._opened[1]

    @property
    def opened(self) -> tuple[stages_lib.Stage, Any]:
        """The stage and iterator last opened (the first stage's when none was)."""
        if self._opened is None:
            self.open_data(1)
        assert self._opened is not None
        return self._opened

    def held_out(self, stage: stages_lib.Stage) -> Any:
        """Held-out batches laid out for this stage (its sequence length and batch)."""
        if stage.index not in self._held_out:
            steps = self.steps(stage)
            self._held_out[stage.index] = load_held_out(
                self.data.held_out,
                pipeline.Layout.of_run(stage.cfg, self.data.tokenizer),
                batch_size=stage.cfg.train.global_batch_size // jax.process_count(),
                num_batches=self.cfg.eval.batches,
                sharding=steps.batch_sharding,
                byte_table=token_bytes(self.data.tokenizer, self.cfg.model.vocab_size),
            )
        return self._held_out[stage.index]

    def data_layout(self, step: int) -> dict[str, Any]:
        """What a checkpoint's data position depends on, checked on resume."""
        return {
            "data.sources": self.data.names,
            "data.num_workers": self.cfg.data.num_workers,
            "processes": jax.process_count(),
            "rows per data batch": self.rows(stages_lib.stage_of(self.plan, max(step, 1))),
        }


class Progress:
    """Turns each step's device metrics into logs: token counts, window averages, records."""

    def __init__(
        self,
        cfg: Config,
        writer: MetricsWriter,
        display: ProgressDisplay,
        goodput: goodput_lib.Goodput,
        throughput: Throughput,
        start_step: int = 0,
        tokens_seen: float = 0.0,
        source_tokens: dict[str, float] | None = None,
        noise: NoiseScale | None = None,
        ramp: BatchRamp | None = None,
    ) -> None:
        self.cfg = cfg
        self.noise = noise
        self.ramp = ramp
        self.plan = stages_lib.plan(cfg)
        self.writer = writer
        self.display = display
        self.goodput = goodput
        self.throughput = throughput
        self.start_step = start_step
        self.tokens_seen = tokens_seen
        self.source_tokens = {name: 0.0 for name in cfg.data.sources} | (source_tokens or {})
        self.last_loss: float | None = None
        self._window_losses: list[float] = []
        self._window_tokens = 0.0
        self._window_slots = 0.0
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def enter(self, stage: stages_lib.Stage) -> None:
        """A new stage: its sequence length sets the FLOPs per token behind MFU."""
        train = stage.cfg.train
        self.throughput.flops_per_token = estimate.flops_per_token(stage.cfg.model, train.seq_len)
        log(f"stage {stage.index} {stage.name!r}: steps {stage.first}-{stage.last}, seq_len "
            f"{train.seq_len}, batch {train.global_batch_size}, rope_theta "
            f"{stage.cfg.model.rope_theta:g}")  # fmt: skip

    def log(self, step: int, metrics: Any) -> dict[str, float]:
        """Account for a step and write its record at logging steps; its values."""
        values = self.collect(step, metrics)
        record = self.record(step, values)
        if record is not None:
            self.writer.write(step, record)
        return values

    def collect(self, step: int, metrics: Any) -> dict[str, float]:
        """Account for one step (tokens seen, loss window); its metric values."""
        values = jax.device_get(metrics)
        by_source = values.pop("source_tokens", None)
        values = {key: float(value) for key, value in values.items()}
        if by_source is not None:
            for name, count in zip(self.source_tokens, by_source, strict=True):
                self.source_tokens[name] += float(count)
        self.tokens_seen += values["tokens"]
        if math.isfinite(values["loss"]):
            self.last_loss = values["loss"]
            self._window_losses.append(values["loss"])
        self._window_tokens += values["tokens"]
        self._window_slots += values["batch_tokens"]
        self.throughput.add(int(values["batch_tokens"]))
        self._measure_noise(step, values)
        self.display.advance(step)
        return values

    def _measure_noise(self, step: int, values: dict[str, float]) -> None:
        """Fold a step's micro-batch gradient norms into the noise scale (McCandlish et al.):
        the small batch is the mean micro-batch, the big one the whole step."""
        count = values.pop("noise_micro_count", 0.0)
        micro_sq, micro_tokens = (
            values.pop("noise_micro_sq", 0.0),
            values.pop("noise_micro_tokens", 0.0),
        )
        if self.noise is None or count < 2 or not math.isfinite(values["grad_norm"]):
            return
        self.noise.update(
            micro_sq / count, values["grad_norm"] ** 2, micro_tokens / count, values["loss_tokens"]
        )
        if self.ramp is not None and math.isfinite(self.noise.value):
            self.ramp.observe_noise_scale(step, self.noise.value)

    def record(self, step: int, values: dict[str, float]) -> dict[str, float] | None:
        """At logging steps: print a progress line and return the record of the window."""
        if step % self.cfg.metrics.log_every_steps and step != self.cfg.train.steps:
            return None
        window_steps = max(len(self._window_losses), 1)
        record = {
            **values,
            "loss_avg": sum(self._window_losses) / window_steps,
            "packing_efficiency": self._window_tokens / max(self._window_slots, 1.0),
            "tokens_seen": self.tokens_seen,
            **self.throughput.report(),
        }
        if self.noise is not None and self.noise.count:
            record.update(self.noise.metrics())
        if self.cfg.stages:
            record["stage"] = stages_lib.stage_of(self.plan, step).index
        if len(self.source_tokens) > 1:
            record.update({f"tokens_seen/{n}": t for n, t in self.source_tokens.items()})
        record["goodput"] = self.goodput.totals()["goodput"]
        self.goodput.write_if_local()
        self._window_losses = []
        self._window_tokens = 0.0
        self._window_slots = 0.0
        eta = self.elapsed() / max(step - self.start_step, 1) * (self.cfg.train.steps - step)
        self.display.show(step, self.cfg.train.steps, record, eta)
        return record

    def rewind(self, step: int, tokens_seen: float, source_tokens: dict[str, float]) -> None:
        """Training went back to the checkpoint of `step`: its counts, its records."""
        self.tokens_seen = float(tokens_seen)
        self.source_tokens = {name: 0.0 for name in self.cfg.data.sources} | source_tokens
        self._window_losses = []
        self._window_tokens = 0.0
        self._window_slots = 0.0
        self.writer.rewind(step)
        self.display.advance(step)


class Events:
    """`<run.dir>/events.jsonl`: what the run did besides training (skipped updates, restores
    and the batches skipped, preemption), one JSON object per line; process 0 writes."""

    def __init__(self, run_dir: epath.Path) -> None:
        self.path = run_dir / "events.jsonl"

    def write(self, step: int, event: str, **details: Any) -> None:
        if jax.process_index() == 0:
            line = json.dumps({"step": step, "event": event, **details})
            paths.append_text(self.path, line + "\n")


def describe_batch(batch: dict[str, Any], index: int, names: list[str]) -> dict[str, Any]:
    """A skipped batch: its index in the data stream and this process's rows per source."""
    if "source" in batch:
        rows = np.bincount(batch["source"][:, 0], minlength=len(names))
        return {"index": index, "rows": {n: int(r) for n, r in zip(names, rows, strict=True)}}
    return {"index": index, "rows": {names[0]: int(batch["tokens"].shape[0])}}


def main(argv: Sequence[str] | None = None) -> None:
    if argv is None:  # the command line, not a caller in this process
        host_memory.restart_with_huge_pages()
    try:
        cfg = config_lib.parse_argv(sys.argv[1:] if argv is None else argv)
        train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except StabilityError as err:
        print(f"error: {err}", file=sys.stderr)
        exit_without_peers(1)
        raise SystemExit(1) from None
    except CheckpointError as err:
        # now: orbax's exit handlers would re-raise the failed background write as a traceback
        exit_with_last_word(f"error: {err}", 1)
    except Exception:
        if jax.distributed.is_initialized():  # else Python prints it on the way out
            traceback.print_exc()
        exit_without_peers(1)
        raise


def exit_with_last_word(message: str, code: int) -> None:
    """Exit now with `message` as the last line of stderr. orbax's background threads may still
    be printing the failed write's traceback: stderr goes to /dev/null first, the message to a
    copy of the original descriptor, so no such line can come after it."""
    sys.stdout.flush()
    sys.stderr.flush()
    original = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.write(original, f"{message}\n".encode())
    os._exit(code)


def exit_without_peers(code: int) -> None:
    """In a multi-process job, exit now: JAX's exit-time shutdown barrier would wait for a dead
    (or still running) peer until the heartbeat timeout, 100 s, before the gang can restart."""
    if jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
