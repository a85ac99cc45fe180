"""`python -m maxlm.train --config=FILE [key=value ...]`: the training loop, top to bottom."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from maxlm import (
    config as config_lib,
    estimate,
    generate,
    mesh as mesh_lib,
    state as state_lib,
    train_step,
)
from maxlm.checkpoint import (
    CONFIG_FILE,
    Checkpointer,
    CheckpointError,
    PreemptionWatch,
    load_params,
    state_hash,
    tokenizer_filename,
)
from maxlm.config import Config, ConfigError
from maxlm.data import global_batch, mixture, pipeline
from maxlm.evaluate import evaluate, load_held_out, token_bytes
from maxlm.faults import Faults
from maxlm.metrics import MetricsWriter, Throughput, format_duration, format_progress
from maxlm.model import compute_dtype
from maxlm.stability import SpikeMonitor, StabilityError
from maxlm.state import TrainState


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


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
    wall_start = time.perf_counter()
    mesh_lib.initialize_distributed(cfg.distributed)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
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

    steps = train_step.build(cfg, mesh)
    blue, batch_sharding = steps.blueprint, steps.batch_sharding
    n_params = state_lib.count_params(blue.abstract.params)
    params_bytes = state_lib.bytes_per_device(blue.abstract.params, blue.shardings.params)
    opt_bytes = state_lib.bytes_per_device(blue.abstract.opt_state, blue.shardings.opt_state)
    log(
        f"model: {n_params:,} parameters; per device: params {params_bytes / 2**20:.1f} MiB, "
        f"optimizer state {opt_bytes / 2**20:.1f} MiB"
    )
    memory = steps.train.memory_analysis()
    detail = (
        ""
        if memory is None
        else (
            f"; per device: arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB, "
            f"temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB"
        )
    )
    log(f"compiled train step in {steps.compile_s:.1f} s{detail}")

    layout = pipeline.Layout.of_run(cfg, tokenizer)
    local_batch = cfg.train.global_batch_size // jax.process_count()
    train_iter = iter(
        pipeline.train_dataset(
            data.train,
            layout,
            batch_size=local_batch,
            seed=cfg.run.seed,
            stages=mixture.stages(cfg.data, local_batch),
            num_workers=cfg.data.num_workers,
        )
    )
    eval_data = load_held_out(
        data.held_out,
        layout,
        batch_size=local_batch,
        num_batches=cfg.eval.batches,
        sharding=batch_sharding,
        byte_table=token_bytes(tokenizer, cfg.model.vocab_size),
    )

    checkpointer = Checkpointer(cfg.checkpoint, run_dir)
    data_layout = {
        "data.sources": data.names,
        "data.num_workers": cfg.data.num_workers,
        "processes": jax.process_count(),
    }

    def resumable(step: int, saved: dict[str, Any]) -> None:
        """A checkpoint of another tokenizer or data layout must not be resumed."""
        if saved["tokenizer_fingerprint"] != tokenizer.fingerprint:
            raise ConfigError(
                f"data.tokenizer: the checkpoint of step {step} in {checkpointer.directory} was "
                f"trained with tokenizer {saved['tokenizer_fingerprint'][:12]}, but this run's "
                f"tokenizer is {tokenizer.fingerprint[:12]}"
            )
        for key, value in data_layout.items():
            if saved["layout"][key] != value:
                raise ConfigError(
                    f"{key}: the checkpoint of step {step} in {checkpointer.directory} was written "
                    f"with {saved['layout'][key]!r}, this run has {value!r}; resume with the same "
                    "value (or start a new run.dir)"
                )

    events = Events(run_dir)
    monitor = SpikeMonitor(cfg.stability)
    restored = checkpointer.restore_latest(blue, train_iter, resumable, log)
    if restored is not None:
        start, state, saved = restored
        monitor.load_state_dict(saved["stability"])
        log(f"resumed from the checkpoint of step {start} in {checkpointer.directory}")
    else:
        start, saved = 0, {}
        state = state_lib.init(cfg, steps.optimizer, blue)
        if cfg.checkpoint.init_from:
            state = state.replace(
                params=load_params(
                    cfg.checkpoint.init_from, blue.abstract.params, blue.shardings.params
                )
            )
            log(f"parameters from {cfg.checkpoint.init_from}; fresh optimizer and schedule")
    batches_consumed = int(saved.get("batches_consumed", start))

    peak, peak_source = estimate.peak_flops(jax.devices(), compute_dtype(cfg.model.dtype).name)
    flops_per_token = estimate.flops_per_token(cfg.model, cfg.train.seq_len)
    log(f"MFU is against the {peak_source}; {flops_per_token / 1e6:.1f} MFLOP per token")
    writer = MetricsWriter(run_dir, cfg.metrics.tensorboard, resume_step=start)
    progress = Progress(
        cfg,
        writer,
        Throughput(flops_per_token, peak),
        start,
        float(saved.get("tokens_seen", 0.0)),
        dict(saved.get("source_tokens", {})),
    )
    eval_result: dict[str, float] = {}
    faults = Faults()
    preemption = PreemptionWatch()

    def progress_json() -> dict[str, Any]:
        return {
            "tokens_seen": progress.tokens_seen,
            "source_tokens": progress.source_tokens,
            "batches_consumed": batches_consumed,
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "layout": data_layout,
            "stability": monitor.state_dict(),
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
        nonlocal batches_consumed
        checkpointer.wait()
        back = checkpointer.restore_latest(blue, train_iter, resumable, log)
        if back is None:
            raise StabilityError(
                f"step {bad_step}: a loss spike, but no checkpoint to go back to "
                "(checkpoint.every_steps is 0 or no step was saved yet)"
            )
        good_step, good_state, good = back
        monitor.after_restore(good_step)
        progress.rewind(good_step, good["tokens_seen"], good["source_tokens"])
        batches_consumed = int(good["batches_consumed"])
        skipped = []
        for _ in range(cfg.stability.skip_batches):
            skipped.append(describe_batch(next(train_iter), batches_consumed, data.names))
            batches_consumed += 1
        log(f"restored step {good_step}; skipped batches {skipped[0]['index'] if skipped else '-'}"
            f"..{skipped[-1]['index'] if skipped else '-'}")  # fmt: skip
        events.write(bad_step, "restored", restored_step=good_step, skipped_batches=skipped)
        return good_step, good_state

    pending: tuple[int, Any] | None = None
    step = start
    while step < cfg.train.steps:
        step += 1
        host_batch = next(train_iter)
        batches_consumed += 1
        faults.batch(step, host_batch, cfg.model.vocab_size)
        faults.note_batch(step, host_batch)
        state, metrics = steps.train(state, global_batch.to_global(host_batch, batch_sharding))
        faults.after_dispatch(step)
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
            eval_result = evaluate(steps.eval, state.params, eval_data)
            progress.throughput.exclude(time.perf_counter() - eval_start)
            log(
                f"eval at step {step}: loss {eval_result['eval_loss']:.4f}  "
                f"perplexity {eval_result['eval_perplexity']:.2f}  "
                f"bits/byte {eval_result['eval_bpb']:.4f}"
            )
            record.update(eval_result)
        if record:
            writer.write(step, record)
        if save_due:
            checkpointer.save(step, state, train_iter, progress_json())
            faults.after_save(step)
        if preempted:
            log(f"preempted: saved step {step}; waiting for it to commit")
            checkpointer.close(timeout_s=cfg.checkpoint.preemption_grace_s)
            events.write(step, "preempted")
            writer.close()
            preemption.close()
            return {"steps": step, "preempted": True, "tokens_seen": progress.tokens_seen}
    preemption.close()
    checkpointer.close()
    writer.close()
    if not eval_result:  # a finished run restarted: nothing left to train, report where it is
        eval_result = evaluate(steps.eval, state.params, eval_data)
    samples = write_samples(cfg, state.params, tokenizer)

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
    if jax.process_index() == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(
        f"done: {cfg.train.steps} steps, {progress.tokens_seen:,.0f} tokens in "
        f"{format_duration(progress.elapsed())}; held-out loss "
        f"{eval_result['eval_loss']:.4f} nats/token vs the held-out unigram entropy "
        f"{summary['unigram_entropy']:.4f}"
    )
    return summary


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


class Progress:
    """Turns each step's device metrics into logs: token counts, window averages, records."""

    def __init__(
        self,
        cfg: Config,
        writer: MetricsWriter,
        throughput: Throughput,
        start_step: int = 0,
        tokens_seen: float = 0.0,
        source_tokens: dict[str, float] | None = None,
    ) -> None:
        self.cfg = cfg
        self.writer = writer
        self.throughput = throughput
        self.start_step = start_step
        self.tokens_seen = tokens_seen
        self.source_tokens = {name: 0.0 for name in cfg.data.sources} | (source_tokens or {})
        self.last_loss: float | None = None
        self._window_losses: list[float] = []
        self._window_tokens = 0.0
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

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
        self.throughput.add(self.cfg.train.tokens_per_step)
        return values

    def record(self, step: int, values: dict[str, float]) -> dict[str, float] | None:
        """At logging steps: print a progress line and return the record of the window."""
        if step % self.cfg.metrics.log_every_steps and step != self.cfg.train.steps:
            return None
        window_steps = max(len(self._window_losses), 1)
        record = {
            **values,
            "loss_avg": sum(self._window_losses) / window_steps,
            "packing_efficiency": self._window_tokens
            / (window_steps * self.cfg.train.tokens_per_step),
            "tokens_seen": self.tokens_seen,
            **self.throughput.report(),
        }
        if len(self.source_tokens) > 1:
            record.update({f"tokens_seen/{n}": t for n, t in self.source_tokens.items()})
        self._window_losses = []
        self._window_tokens = 0.0
        eta = self.elapsed() / max(step - self.start_step, 1) * (self.cfg.train.steps - step)
        log(format_progress(step, self.cfg.train.steps, record, eta))
        return record

    def rewind(self, step: int, tokens_seen: float, source_tokens: dict[str, float]) -> None:
        """Training went back to the checkpoint of `step`: its counts, its records."""
        self.tokens_seen = float(tokens_seen)
        self.source_tokens = {name: 0.0 for name in self.cfg.data.sources} | source_tokens
        self._window_losses = []
        self._window_tokens = 0.0
        self.writer.rewind(step)


class Events:
    """`<run.dir>/events.jsonl`: what the run did besides training (skipped updates, restores
    and the batches skipped, preemption), one JSON object per line; process 0 writes."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "events.jsonl"

    def write(self, step: int, event: str, **details: Any) -> None:
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "event": event, **details}) + "\n")


def describe_batch(batch: dict[str, Any], index: int, names: list[str]) -> dict[str, Any]:
    """A skipped batch: its index in the data stream and this process's rows per source."""
    if "source" in batch:
        rows = np.bincount(batch["source"][:, 0], minlength=len(names))
        return {"index": index, "rows": {n: int(r) for n, r in zip(names, rows, strict=True)}}
    return {"index": index, "rows": {names[0]: int(batch["tokens"].shape[0])}}


def main(argv: Sequence[str] | None = None) -> None:
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
        print(f"error: {err}", file=sys.stderr)
        # now: orbax's exit handlers would re-raise the failed background write as a traceback
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except Exception:
        if jax.distributed.is_initialized():  # else Python prints it on the way out
            traceback.print_exc()
        exit_without_peers(1)
        raise


def exit_without_peers(code: int) -> None:
    """In a multi-process job, exit now: JAX's exit-time shutdown barrier would wait for a dead
    (or still running) peer until the heartbeat timeout, 100 s, before the gang can restart."""
    if jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
