"""The jitted, sharded train and eval steps: loss, gradient accumulation, update, metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from maxlm import optim, sharding, state as state_lib
from maxlm.config import Config, SophiaConfig
from maxlm.loss import LossSums, head_logits, head_loss, loss_sums
from maxlm.sophia import sample_targets
from maxlm.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions")
PREFIX_KEYS = ("loss_mask", "prefix")  # prefix-LM objectives: loss mask, bidirectional prefix
SOURCE_KEY = "source"  # mixtures: each row's source index, for tokens seen per source


def batch_keys(cfg: Config) -> tuple[str, ...]:
    """The fields of a training batch under `cfg` (eval batches have no source field)."""
    keys = BATCH_KEYS + (PREFIX_KEYS if cfg.data.needs_prefix else ())
    return keys + ((SOURCE_KEY,) if len(cfg.data.sources) > 1 else ())


def _forward(
    graphdef: nnx.GraphDef,
    params: Any,
    batch: Batch,
    dropout_rng: jax.Array | None,
    *,
    z_loss_weight: float = 0.0,
    loss_chunk: int = 0,
) -> tuple[jax.Array, LossSums]:
    """The summed objective (cross-entropy + weighted z-loss) and the loss sums; with
    `loss_chunk`, through the fused chunked head (`maxlm.loss.head_loss`)."""
    model = nnx.merge(graphdef, params)
    inputs = (batch["tokens"], batch["segment_ids"], batch["positions"])
    options: dict[str, Any] = {
        "prefix": batch.get("prefix"),
        "deterministic": dropout_rng is None,
        "dropout_rng": dropout_rng,
    }
    targets, segment_ids, loss_mask = batch["targets"], batch["segment_ids"], batch.get("loss_mask")
    if loss_chunk:
        head, vocab_axis = model.output_head()
        return head_loss(
            model.hidden(*inputs, **options), head, targets, segment_ids, loss_mask,
            vocab_axis=vocab_axis, z_loss_weight=z_loss_weight, chunk=loss_chunk,
            gemm=model.gemm,
        )  # fmt: skip
    sums = loss_sums(model(*inputs, **options), targets, segment_ids, loss_mask)
    return sums.cross_entropy + z_loss_weight * sums.z_loss, sums


def _micro_batches(batch: Batch, count: int) -> Batch:
    """[B, T] -> [count, B/count, T], taking rows with stride `count` so every micro-batch
    keeps rows on every data-parallel device."""
    return {
        key: jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
        for key, x in batch.items()
    }


class Accumulated(NamedTuple):
    """Sums over the micro-batches of one step (gradients not yet divided by the tokens)."""

    grads: Any
    sums: LossSums
    tokens: jax.Array  # real (non-padding) tokens read
    source_tokens: jax.Array  # [num_sources] tokens read per source ([0] without a mixture)
    micro_sq: jax.Array  # noise scale: sum of |per-token-mean micro-batch gradient|^2
    micro_tokens: jax.Array  # noise scale: loss tokens of the measured micro-batches
    micro_count: jax.Array  # noise scale: micro-batches measured


GradFn = Callable[[Any, Batch, jax.Array | None], tuple[Any, LossSums]]


def _one_micro_batch(
    grad_fn: GradFn,
    params: Any,
    batch: Batch,
    rng: jax.Array | None,
    measure: jax.Array | bool,
    num_sources: int,
) -> Accumulated:
    """Gradient sums of one micro-batch and what it read; with `measure`, its squared
    per-token gradient norm for the noise scale (skipped by lax.cond otherwise)."""
    grads, sums = grad_fn(params, batch, rng)
    grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)
    real = (batch["segment_ids"] != 0).astype(jnp.float32)
    if SOURCE_KEY in batch:
        source_tokens = jax.ops.segment_sum(
            real.ravel(), batch[SOURCE_KEY].ravel(), num_segments=num_sources
        )
    else:
        source_tokens = jnp.zeros((0,), jnp.float32)
    squared = jax.lax.cond(
        measure,
        lambda: jnp.square(optax.tree.norm(grads)) / jnp.square(jnp.maximum(sums.tokens, 1.0)),
        lambda: jnp.float32(0),
    )
    measured = jnp.asarray(measure, jnp.float32)
    return Accumulated(
        grads, sums, jnp.sum(real), source_tokens, squared, measured * sums.tokens, measured
    )


def _add(a: Accumulated, b: Accumulated) -> Accumulated:
    return jax.tree_util.tree_map(jnp.add, a, b)


def _accumulate(
    grad_fn: GradFn,
    params: Any,
    batch: Batch,
    rng: jax.Array | None,
    count: int,
    measure: jax.Array | bool,
    num_sources: int,
) -> Accumulated:
    """Sum over `count` micro-batches of `batch` with a scan (one compiled body)."""
    if count == 1:
        return _one_micro_batch(grad_fn, params, batch, rng, False, num_sources)

    def body(total: Accumulated, inputs: tuple[Batch, jax.Array]) -> tuple[Accumulated, None]:
        micro, index = inputs
        micro_rng = None if rng is None else jax.random.fold_in(rng, index)
        return _add(total, _one_micro_batch(grad_fn, params, micro, micro_rng, measure,
                                            num_sources)), None  # fmt: skip

    micro_batches = _micro_batches(batch, count)
    first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
    shapes = jax.eval_shape(
        lambda: _one_micro_batch(grad_fn, params, first, rng, measure, num_sources)
    )
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, (micro_batches, jnp.arange(count)))
    return total


def _update(
    state: TrainState,
    total: Accumulated,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    batch_tokens: jax.typing.ArrayLike,
    measure_noise: bool,
    extra: dict[str, Any] | None = None,
) -> tuple[TrainState, Metrics]:
    """Divide the summed gradients once by the step's loss tokens, update (with the update
    rule's `extra` arguments: Sophia's Hessian estimate), and report."""
    tokens = jnp.maximum(total.sums.tokens, 1.0)
    loss, grad_norm = total.sums.cross_entropy / tokens, optax.tree.norm(total.grads) / tokens
    # a non-finite step changes nothing (the step count moves on: the batch was consumed)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply() -> tuple[Any, Any]:
        # divided inside the branch, XLA fuses the division into the update's own passes; the
        # divided gradients are never written out whole (benchmarks/NOTES.md, change 21)
        grads = jax.tree_util.tree_map(lambda g: g / tokens, total.grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **(extra or {}))
        return optax.apply_updates(state.params, updates), opt_state

    # a branch, not a select of new and old: with the select XLA copied the whole optimizer
    # state every step, its donated buffers being read again after the update overwrote them
    # (benchmarks/NOTES.md, change 14)
    params, opt_state = jax.lax.cond(finite, apply, lambda: (state.params, state.opt_state))
    metrics = {
        "loss": loss,
        "z_loss": total.sums.z_loss / tokens,
        "grad_norm": grad_norm,
        "update_applied": finite.astype(jnp.float32),
        "param_norm": optax.tree.norm(params),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "tokens": total.tokens,
        "loss_tokens": total.sums.tokens,
        "batch_tokens": jnp.asarray(batch_tokens, jnp.float32),
    }
    if total.source_tokens.shape[0]:
        metrics["source_tokens"] = total.source_tokens
    if measure_noise:
        metrics |= {
            "noise_micro_sq": total.micro_sq,
            "noise_micro_tokens": total.micro_tokens,
            "noise_micro_count": total.micro_count,
        }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _grad_fn(graphdef: nnx.GraphDef, z_loss_weight: float, loss_chunk: int) -> GradFn:
    def sum_objective(
        params: Any, batch: Batch, rng: jax.Array | None
    ) -> tuple[jax.Array, LossSums]:
        return _forward(
            graphdef, params, batch, rng, z_loss_weight=z_loss_weight, loss_chunk=loss_chunk
        )

    return jax.grad(sum_objective, has_aux=True)


def _step_rng(dropout_seed: int | None, step: jax.Array) -> jax.Array | None:
    return None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), step)


def _measure_due(step: jax.Array, noise_scale_every: int) -> jax.Array | bool:
    return bool(noise_scale_every) and (step % max(noise_scale_every, 1) == 0)


def _sampled_targets(
    graphdef: nnx.GraphDef, params: Any, batch: Batch, rng: jax.Array, chunk: int
) -> jax.Array:
    """Targets drawn from the model's own next-token distribution (Sophia's GNB estimator),
    `chunk` positions at a time so the (B,T,V) logits never exist at once."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden(
        batch["tokens"], batch["segment_ids"], batch["positions"], prefix=batch.get("prefix")
    )
    head, vocab_axis = model.output_head()
    rows, length = hidden.shape[:2]
    chunks = jnp.moveaxis(hidden.reshape(rows, length // chunk, chunk, -1), 1, 0)

    def draw(inputs: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, key = inputs
        return sample_targets(head_logits(x, head, vocab_axis), key)

    keys = jax.random.split(rng, length // chunk)
    return jnp.moveaxis(jax.lax.map(draw, (chunks, keys)), 0, 1).reshape(rows, length)


def _gnb_hessian(
    graphdef: nnx.GraphDef, grad_fn: GradFn, params: Any, batch: Batch, rng: jax.Array, chunk: int
) -> Any:
    """Gauss-Newton-Bartlett estimate N * g_hat^2, g_hat the mean-loss gradient at the
    model's own sampled targets over N scored tokens (Liu et al. 2023, Algorithm 2)."""
    targets = jax.lax.stop_gradient(_sampled_targets(graphdef, params, batch, rng, chunk))
    grads, sums = grad_fn(params, {**batch, "targets": targets}, None)
    tokens = jnp.maximum(sums.tokens, 1.0)
    return jax.tree_util.tree_map(lambda g: jnp.square(g.astype(jnp.float32)) / tokens, grads)


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    state_shardings: TrainState,
    batch_sharding: NamedSharding,
    keys: tuple[str, ...] = BATCH_KEYS,
    num_sources: int = 1,
    grad_accum_steps: int = 1,
    z_loss_weight: float = 0.0,
    loss_chunk: int = 0,
    dropout_seed: int | None = None,
    noise_scale_every: int = 0,
    hessian_every: int = 0,
    hessian_seed: int = 0,
) -> jax.stages.Wrapped:
    """jit(step) with pinned in/out shardings and the state donated.

    Gradients are of the summed loss, divided once by the batch's real-token count, so
    accumulation over micro-batches equals one big batch up to float summation order.
    Metrics count `tokens` read (non-padding) and `loss_tokens` scored; with a `source`
    field, `source_tokens` [num_sources] splits the tokens read by source.
    """
    grad_fn = _grad_fn(graphdef, z_loss_weight, loss_chunk)
    hessian_grad_fn = _grad_fn(graphdef, 0.0, loss_chunk)  # the cross-entropy's curvature

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = _step_rng(dropout_seed, state.step)
        measure = _measure_due(state.step, noise_scale_every)
        total = _accumulate(
            grad_fn, state.params, batch, rng, grad_accum_steps, measure, num_sources
        )
        batch_tokens = batch["tokens"].size
        extra = {}
        if hessian_every:  # Sophia: a GNB estimate on the first micro-batch every k steps
            first = jax.tree_util.tree_map(lambda x: x[0], _micro_batches(batch, grad_accum_steps))
            due = state.step % hessian_every == 0
            key = jax.random.fold_in(jax.random.key(hessian_seed), state.step)
            extra["hessian"] = jax.lax.cond(
                due,
                lambda: _gnb_hessian(graphdef, hessian_grad_fn, state.params, first, key,
                                     loss_chunk or batch["tokens"].shape[1]),
                lambda: jax.tree_util.tree_map(
                    lambda p: jnp.zeros(p.shape, jnp.float32), state.params
                ),
            )  # fmt: skip
            extra["hessian_due"] = due
        return _update(
            state, total, optimizer, schedule, batch_tokens, bool(noise_scale_every), extra
        )

    batch_shardings = dict.fromkeys(keys, batch_sharding)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


class MicroSteps(NamedTuple):
    """A step of a varying number of fixed-shape micro-batches (the batch ramp): `start`
    makes empty sums, `accumulate` adds one micro-batch, `update` applies them."""

    start: Any  # jax.stages.Wrapped, and Compiled once build() compiled it
    accumulate: Any
    update: Any

    def __call__(
        self, state: TrainState, micro_batches: list[Batch], measure: bool
    ) -> tuple[TrainState, Metrics]:
        total = self.start()
        for index, micro in enumerate(micro_batches):
            total = self.accumulate(state.params, total, micro, state.step, index, measure)
        return self.update(state, total, micro_batches[0]["tokens"].size * len(micro_batches))


def make_micro_steps(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    abstract_params: Any,
    state_shardings: TrainState,
    batch_sharding: NamedSharding,
    micro_batch: jax.ShapeDtypeStruct,
    mesh: Mesh,
    keys: tuple[str, ...] = BATCH_KEYS,
    num_sources: int = 1,
    z_loss_weight: float = 0.0,
    loss_chunk: int = 0,
    dropout_seed: int | None = None,
    noise_scale_every: int = 0,
) -> MicroSteps:
    """The batch-ramp step: three jitted pieces, none recompiled when the count changes."""
    grad_fn = _grad_fn(graphdef, z_loss_weight, loss_chunk)
    batch_shardings = dict.fromkeys(keys, batch_sharding)
    micro = dict.fromkeys(keys, micro_batch)

    def one(params: Any, batch: Batch, step: jax.Array, index: jax.Array, measure: Any) -> Any:
        rng = _step_rng(dropout_seed, step)
        rng = None if rng is None else jax.random.fold_in(rng, index)
        return _one_micro_batch(grad_fn, params, batch, rng, measure, num_sources)

    abstract = jax.eval_shape(one, abstract_params, micro, jnp.int32(0), jnp.int32(0), True)
    replicated = sharding.replicated(mesh)
    total_shardings = jax.tree_util.tree_map(lambda _: replicated, abstract)._replace(
        grads=state_shardings.params
    )

    def start() -> Accumulated:
        return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)

    def accumulate(
        params: Any, total: Accumulated, batch: Batch, step: Any, index: Any, measure: Any
    ) -> Accumulated:
        return _add(total, one(params, batch, step, index, measure))

    def update(state: TrainState, total: Accumulated, batch_tokens: Any) -> Any:
        return _update(state, total, optimizer, schedule, batch_tokens, bool(noise_scale_every))

    return MicroSteps(
        jax.jit(start, out_shardings=total_shardings),
        jax.jit(
            accumulate,
            in_shardings=(state_shardings.params, total_shardings, batch_shardings)
            + (replicated,) * 3,
            out_shardings=total_shardings,
            donate_argnums=(1,),
        ),
        jax.jit(
            update,
            in_shardings=(state_shardings, total_shardings, replicated),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,),
        ),
    )


def make_eval_step(
    graphdef: nnx.GraphDef,
    *,
    params_shardings: Any,
    batch_sharding: NamedSharding,
    keys: tuple[str, ...] = BATCH_KEYS,
    loss_chunk: int = 0,
) -> jax.stages.Wrapped:
    """jit(params, batch) -> summed held-out loss and token count."""

    def evaluate(params: Any, batch: Batch) -> LossSums:
        return _forward(graphdef, params, batch, None, loss_chunk=loss_chunk)[1]

    batch_shardings = dict.fromkeys(keys, batch_sharding)
    return jax.jit(evaluate, in_shardings=(params_shardings, batch_shardings))


class Steps(NamedTuple):
    """A run's compiled train step (or, under a batch ramp, its micro-batch pieces) and jitted
    eval step, with what they were built from."""

    blueprint: state_lib.Blueprint
    optimizer: optax.GradientTransformation
    batch_sharding: NamedSharding
    train: jax.stages.Compiled  # the whole step; under a batch ramp, one micro-batch's part
    eval: jax.stages.Wrapped
    compile_s: float
    micro: MicroSteps | None = None

    def run(
        self, state: TrainState, batches: list[Batch], measure_noise: bool = False
    ) -> tuple[TrainState, Metrics]:
        """One optimizer step over `batches` (one batch; under a ramp, its micro-batches)."""
        if self.micro is None:
            return self.train(state, batches[0])
        return self.micro(state, batches, measure_noise)


def build(cfg: Config, mesh: Mesh, compiler_options: dict[str, Any] | None = None) -> Steps:
    """Blueprint the state and compile the train step ahead of the loop (fail before any data);
    `compiler_options` are XLA debug options for this compile (maxlm.aot dumps its buffers)."""
    optimizer, schedule = optim.build(cfg)
    blue = state_lib.blueprint(cfg, optimizer, mesh)
    batch_sharding = sharding.batch_sharding(mesh, cfg.mesh.rules)
    keys = batch_keys(cfg)
    common: dict[str, Any] = {
        "keys": keys,
        "num_sources": len(cfg.data.sources),
        "z_loss_weight": cfg.train.z_loss,
        "loss_chunk": cfg.train.loss_chunk_size,
        "dropout_seed": cfg.run.seed + 1 if cfg.model.dropout > 0 else None,
        "noise_scale_every": cfg.train.noise_scale.every_steps,
    }
    rule = cfg.optim.optimizer
    ramp = cfg.train.batch_ramp.enabled
    rows = cfg.train.micro_batch_size if ramp else cfg.train.global_batch_size
    batch = jax.ShapeDtypeStruct((rows, cfg.train.seq_len), np.int32, sharding=batch_sharding)
    batches = dict.fromkeys(keys, batch)
    start = time.perf_counter()
    micro = None
    if ramp:
        micro = _compile_micro_steps(
            make_micro_steps(
                blue.graphdef, optimizer, schedule, abstract_params=blue.abstract.params,
                state_shardings=blue.shardings, batch_sharding=batch_sharding,
                micro_batch=batch, mesh=mesh, **common,
            ),
            blue.abstract,
            batches,
            compiler_options,
        )  # fmt: skip
        compiled = micro.accumulate
    else:
        train = make_train_step(
            blue.graphdef, optimizer, schedule, state_shardings=blue.shardings,
            batch_sharding=batch_sharding, grad_accum_steps=cfg.train.grad_accum_steps,
            hessian_every=rule.update_hessian_every if isinstance(rule, SophiaConfig) else 0,
            hessian_seed=cfg.run.seed + 2, **common,
        )  # fmt: skip
        compiled = train.lower(blue.abstract, batches).compile(compiler_options)
    compile_s = time.perf_counter() - start
    evaluate = make_eval_step(
        blue.graphdef,
        params_shardings=blue.shardings.params,
        batch_sharding=batch_sharding,
        keys=tuple(k for k in keys if k != SOURCE_KEY),
        loss_chunk=cfg.train.loss_chunk_size,
    )
    return Steps(blue, optimizer, batch_sharding, compiled, evaluate, compile_s, micro)


def _compile_micro_steps(
    micro: MicroSteps,
    abstract: TrainState,
    batch: dict[str, jax.ShapeDtypeStruct],
    compiler_options: dict[str, Any] | None,
) -> MicroSteps:
    """Compile the three pieces before the loop, like the whole step."""
    start = micro.start.lower().compile(compiler_options)
    total = jax.eval_shape(micro.start)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    accumulate = micro.accumulate.lower(
        abstract.params, total, batch, scalar, scalar, jax.ShapeDtypeStruct((), jnp.bool_)
    ).compile(compiler_options)
    update = micro.update.lower(abstract, total, scalar).compile(compiler_options)
    return MicroSteps(start, accumulate, update)
