"""`python -m maxlm.train --config=FILE [key=value ...]`: the training loop, top to bottom."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from maxlm import (
    config as config_lib,
    estimate,
    mesh as mesh_lib,
    state as state_lib,
    train_step,
)
from maxlm.checkpoint import Checkpointer
from maxlm.config import Config, ConfigError
from maxlm.data import global_batch, mixture, pipeline
from maxlm.metrics import MetricsWriter, Throughput, format_duration, format_progress
from maxlm.model import compute_dtype

# fixed, not run.seed: held-out batches stay comparable across runs with different seeds
HELD_OUT_SAMPLE_SEED = 0


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


def evaluate(
    eval_step: Any, params: Any, batches: dict[str, list[dict[str, jax.Array]]]
) -> dict[str, float]:
    """Held-out loss (nats per token) and perplexity over fixed batches of every source, and
    per source (`eval_loss/<name>`) when there are several."""
    result: dict[str, float] = {}
    loss_total, tokens_total = 0.0, 0.0
    for name, source_batches in batches.items():
        loss_sum, tokens = 0.0, 0.0
        for batch in source_batches:
            sums = jax.device_get(eval_step(params, batch))
            loss_sum += float(sums.cross_entropy)
            tokens += float(sums.tokens)
        if len(batches) > 1:
            result[f"eval_loss/{name}"] = loss_sum / max(tokens, 1.0)
        loss_total += loss_sum
        tokens_total += tokens
    loss = loss_total / max(tokens_total, 1.0)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 50.0)),
        "eval_tokens": tokens_total,
        **result,
    }


def train(cfg: Config) -> dict[str, Any]:
    """Run training as configured; returns the final summary (also written to the run dir)."""
    wall_start = time.perf_counter()
    mesh_lib.initialize_distributed(cfg.distributed)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    log(f"# resolved config (saved to {run_dir / 'config.yaml'})\n{cfg.to_yaml()}")

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

    layout = pipeline.Layout(
        tokenizer=tokenizer,
        seq_len=cfg.train.seq_len,
        add_bos=cfg.data.add_bos,
        add_eos=cfg.data.add_eos,
        shuffle_window=cfg.data.shuffle_window,
        packing=cfg.data.packing,
        prefix_fields=cfg.data.needs_prefix,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
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
    eval_batches = {
        source.name: [
            global_batch.to_global(batch, batch_sharding)
            for batch in pipeline.eval_batches(
                source,
                layout,
                batch_size=local_batch,
                num_batches=cfg.eval.batches,
                seed=HELD_OUT_SAMPLE_SEED,
            )
        ]
        for source in data.held_out
    }

    checkpointer = Checkpointer(cfg.checkpoint, run_dir)
    start = checkpointer.latest_step() or 0
    data_layout = {
        "data.sources": data.names,
        "data.num_workers": cfg.data.num_workers,
        "processes": jax.process_count(),
    }
    if start:
        checkpointer.check_layout(start, data_layout)
        state, saved = checkpointer.restore(start, blue, train_iter)
        if saved["tokenizer_fingerprint"] != tokenizer.fingerprint:
            raise ConfigError(
                f"data.tokenizer: the checkpoint of step {start} in {checkpointer.directory} was "
                f"trained with tokenizer {saved['tokenizer_fingerprint'][:12]}, but this run's "
                f"tokenizer is {tokenizer.fingerprint[:12]}"
            )
        tokens_seen = float(saved["tokens_seen"])
        source_tokens = dict(saved.get("source_tokens", {}))
        log(f"resumed from the checkpoint of step {start} in {checkpointer.directory}")
    else:
        state, tokens_seen = state_lib.init(cfg, steps.optimizer, blue), 0.0
        source_tokens = {}

    peak, peak_source = estimate.peak_flops(jax.devices(), compute_dtype(cfg.model.dtype).name)
    flops_per_token = estimate.flops_per_token(cfg.model, cfg.train.seq_len)
    log(f"MFU is against the {peak_source}; {flops_per_token / 1e6:.1f} MFLOP per token")
    writer = MetricsWriter(run_dir, cfg.metrics.tensorboard, resume_step=start)
    progress = Progress(
        cfg, writer, Throughput(flops_per_token, peak), start, tokens_seen, source_tokens
    )
    eval_result: dict[str, float] = {}

    pending = None
    for step in range(start + 1, cfg.train.steps + 1):
        batch = global_batch.to_global(next(train_iter), batch_sharding)
        state, metrics = steps.train(state, batch)
        if pending is not None:
            progress.log(*pending)  # the previous step's, while this one runs
        pending = (step, metrics)
        last = step == cfg.train.steps
        eval_due = last or bool(cfg.eval.every_steps and step % cfg.eval.every_steps == 0)
        save_due = checkpointer.due(step, cfg.train.steps)
        if not (eval_due or save_due):
            continue
        record = progress.collect(step, metrics) or {}
        pending = None
        if eval_due:
            eval_start = time.perf_counter()
            eval_result = evaluate(steps.eval, state.params, eval_batches)
            progress.throughput.exclude(time.perf_counter() - eval_start)
            log(
                f"eval at step {step}: loss {eval_result['eval_loss']:.4f}  "
                f"perplexity {eval_result['eval_perplexity']:.2f}"
            )
            record.update(eval_result)
        if record:
            writer.write(step, record)
        if save_due:
            checkpointer.save(
                step,
                state,
                train_iter,
                {
                    "tokens_seen": progress.tokens_seen,
                    "source_tokens": progress.source_tokens,
                    "tokenizer_fingerprint": tokenizer.fingerprint,
                    "layout": data_layout,
                },
            )
    checkpointer.close()
    writer.close()
    if not eval_result:  # a finished run restarted: nothing left to train, report where it is
        eval_result = evaluate(steps.eval, state.params, eval_batches)

    summary = {
        "steps": cfg.train.steps,
        "parameters": n_params,
        "tokens_seen": progress.tokens_seen,
        **({"source_tokens": progress.source_tokens} if len(data.names) > 1 else {}),
        "final_train_loss": progress.last_loss,
        **eval_result,
        "unigram_entropy": pipeline.unigram_entropy(data.held_out[0].docs, tokenizer),
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


class Progress:
    """Turns each step's device metrics into logs: NaN check, token count, window averages."""

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

    def log(self, step: int, metrics: Any) -> None:
        record = self.collect(step, metrics)
        if record is not None:
            self.writer.write(step, record)

    def collect(self, step: int, metrics: Any) -> dict[str, float] | None:
        """Account for one step; at logging steps print a progress line and return the record."""
        values = jax.device_get(metrics)
        by_source = values.pop("source_tokens", None)
        values = {key: float(value) for key, value in values.items()}
        if by_source is not None:
            for name, count in zip(self.source_tokens, by_source, strict=True):
                self.source_tokens[name] += float(count)
        for key in ("loss", "grad_norm"):
            if not math.isfinite(values[key]):
                raise FloatingPointError(f"{key} is {values[key]} at step {step}")
        self.tokens_seen += values["tokens"]
        self.last_loss = values["loss"]
        self._window_losses.append(values["loss"])
        self._window_tokens += values["tokens"]
        self.throughput.add(self.cfg.train.tokens_per_step)
        if step % self.cfg.metrics.log_every_steps and step != self.cfg.train.steps:
            return None
        window_capacity = len(self._window_losses) * self.cfg.train.tokens_per_step
        record = {
            **values,
            "loss_avg": sum(self._window_losses) / len(self._window_losses),
            "packing_efficiency": self._window_tokens / window_capacity,
            "tokens_seen": self.tokens_seen,
            **self.throughput.report(),
        }
        if by_source is not None:
            record.update({f"tokens_seen/{n}": t for n, t in self.source_tokens.items()})
        self._window_losses = []
        self._window_tokens = 0.0
        eta = self.elapsed() / (step - self.start_step) * (self.cfg.train.steps - step)
        log(format_progress(step, self.cfg.train.steps, record, eta))
        return record


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cfg = config_lib.parse_argv(sys.argv[1:] if argv is None else argv)
        train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
