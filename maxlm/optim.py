"""Learning-rate schedules and the optax update rule: clipping, masked weight decay, optimizer.

Everything is composed from optax pieces; `build(cfg)` is what the trainer calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maxlm import stages as stages_lib
from maxlm.batch_size import BatchRamp
from maxlm.config import (
    AdafactorConfig,
    AdamWConfig,
    Config,
    ConfigError,
    LionConfig,
    OptimConfig,
    ScheduleConfig,
    SophiaConfig,
)
from maxlm.sophia import sophia

# --------------------------------------------------------------------------- schedules


def _one_minus_sqrt(peak: float, floor: float, steps: int) -> optax.Schedule:
    """floor + (peak - floor) * (1 - sqrt(t / steps)); optax has no such shape."""

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        progress = jnp.clip(count / steps, 0.0, 1.0)
        return floor + (peak - floor) * (1.0 - jnp.sqrt(progress))

    return schedule


# Decay shapes from `peak` at t=0 to `floor` at t=steps, held at `floor` afterwards.
_DECAYS: dict[str, Callable[[float, float, int], optax.Schedule]] = {
    "linear": lambda peak, floor, steps: optax.linear_schedule(peak, floor, steps),
    "cosine": lambda peak, floor, steps: optax.cosine_decay_schedule(
        peak, steps, alpha=floor / peak
    ),
    "exponential": lambda peak, floor, steps: optax.exponential_decay(
        peak, steps, decay_rate=floor / peak, end_value=floor
    ),
    "1-sqrt": _one_minus_sqrt,
}


def _decay(shape: str, peak: float, floor: float, steps: int) -> optax.Schedule:
    # A zero-length decay (warmup == steps, or a tiny wsd decay) drops to the floor one step later.
    return _DECAYS[shape](peak, floor, max(steps, 1))


def _rsqrt(peak: float, floor: float, warmup_steps: int) -> optax.Schedule:
    """peak * sqrt(W / step) from step W on, never below floor; optax has no rsqrt schedule."""
    scale = max(warmup_steps, 1)

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.maximum(count + warmup_steps, scale)  # count starts at 0 when warmup ends
        return jnp.maximum(peak * jnp.sqrt(scale / step), floor)

    return schedule


def _wsd(
    cfg: ScheduleConfig, peak: float, floor: float, total_steps: int, warmup_steps: int
) -> optax.Schedule:
    """Warmup-stable-decay: hold `peak`, then decay to `floor` over the last decay_fraction."""
    decay_steps = round(cfg.decay_fraction * total_steps)
    decay_start = total_steps - decay_steps
    if decay_start < warmup_steps:
        raise ConfigError(
            f"optim.schedule.decay_fraction: decay would start at step {decay_start}, "
            f"before warmup ends at step {warmup_steps}"
        )
    if cfg.decay_shape == "exponential" and floor <= 0:
        raise ConfigError("optim.schedule.min_lr_ratio: must be > 0 for decay_shape 'exponential'")
    stable = optax.constant_schedule(peak)
    decay = _decay(cfg.decay_shape, peak, floor, decay_steps)
    return optax.join_schedules([stable, decay], [decay_start - warmup_steps])


def build_schedule(
    cfg: ScheduleConfig, peak_lr: float, total_steps: int, warmup_steps: int
) -> optax.Schedule:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then the shape named by cfg.kind."""
    floor = cfg.min_lr_ratio * peak_lr
    after_warmup = {
        "constant": lambda: optax.constant_schedule(peak_lr),
        "cosine": lambda: _decay("cosine", peak_lr, floor, total_steps - warmup_steps),
        "linear": lambda: _decay("linear", peak_lr, floor, total_steps - warmup_steps),
        "rsqrt": lambda: _rsqrt(peak_lr, floor, warmup_steps),
        "wsd": lambda: _wsd(cfg, peak_lr, floor, total_steps, warmup_steps),
    }[cfg.kind]()
    # With warmup_steps == 0 the boundary is 0 and the warmup piece is never used.
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.join_schedules([warmup, after_warmup], [warmup_steps])


# --------------------------------------------------------------------------- weight decay


def weight_decay_mask(params: Any, decay_embeddings: bool) -> Any:
    """Bools shaped like `params`: False for norm scales, and for embed_tokens unless asked."""

    def decayed(path: jax.tree_util.KeyPath, _: Any) -> bool:
        # Any key, not just the last: nnx.State leaves add a trailing `value` key.
        keys = jax.tree_util.keystr(path, simple=True, separator="/").split("/")
        if any(key.endswith("norm") or key == "scale" for key in keys):
            return False
        return decay_embeddings or "embed_tokens" not in keys

    return jax.tree_util.tree_map_with_path(decayed, params)


# --------------------------------------------------------------------------- update rules

Mask = Callable[[Any], Any]
UpdateRule = Callable[[Any, optax.Schedule, float, Mask], optax.GradientTransformation]


def _adamw(
    opt: AdamWConfig, schedule: optax.Schedule, weight_decay: float, mask: Mask
) -> optax.GradientTransformation:
    return optax.adamw(
        schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=weight_decay, mask=mask
    )


def _adafactor(
    opt: AdafactorConfig, schedule: optax.Schedule, weight_decay: float, mask: Mask
) -> optax.GradientTransformation:
    return optax.adafactor(
        learning_rate=schedule,
        min_dim_size_to_factor=opt.min_dim_size_to_factor,
        decay_rate=opt.decay_rate,
        momentum=opt.momentum,
        # Our chain's global-norm clip is the only clipping, and the step size is exactly the
        # schedule: no per-block RMS clipping, no scaling by the parameter's own RMS.
        clipping_threshold=None,
        multiply_by_parameter_scale=False,
        # optax adds adafactor's decay after the lr scaling; scaling the rate by the schedule
        # gives the same lr * wd * w shrink as adamw and lion (a bare 0.1 would be 10% a step).
        weight_decay_rate=(lambda count: weight_decay * schedule(count)) if weight_decay else None,
        weight_decay_mask=mask,
    )


def _lion(
    opt: LionConfig, schedule: optax.Schedule, weight_decay: float, mask: Mask
) -> optax.GradientTransformation:
    return optax.lion(schedule, b1=opt.b1, b2=opt.b2, weight_decay=weight_decay, mask=mask)


def _sophia(
    opt: SophiaConfig, schedule: optax.Schedule, weight_decay: float, mask: Mask
) -> optax.GradientTransformation:
    # The trainer feeds it `hessian=` (maxlm.sophia.gnb_hessian) every update_hessian_every steps.
    return sophia(
        schedule,
        b1=opt.b1,
        b2=opt.b2,
        rho=opt.rho,
        eps=opt.eps,
        weight_decay=weight_decay,
        mask=mask,
        update_hessian_every=opt.update_hessian_every,
    )


_UPDATE_RULES: dict[type, UpdateRule] = {
    AdamWConfig: _adamw,
    AdafactorConfig: _adafactor,
    LionConfig: _lion,
    SophiaConfig: _sophia,
}


def build_optimizer(
    cfg: OptimConfig, schedule: optax.Schedule
) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping (unless off), then the update rule chosen by cfg.optimizer's type.

    optax.chain forwards update's extra kwargs (sophia's `hessian=`) only to the transforms that
    take them, so every rule accepts them and the clip never sees (or clips) the Hessian.
    """

    def mask(params: Any) -> Any:
        return weight_decay_mask(params, cfg.decay_embeddings)

    rule = _UPDATE_RULES[type(cfg.optimizer)](cfg.optimizer, schedule, cfg.weight_decay, mask)
    clip = [] if cfg.clip_grad_norm is None else [optax.clip_by_global_norm(cfg.clip_grad_norm)]
    return optax.chain(*clip, rule)


def over_tokens(cfg: Config) -> optax.Schedule:
    """The schedule with its lengths in tokens, as a function of the step: the configured batch
    ramp fixes the tokens before each step (piecewise linear in the step, so interp is exact)."""
    steps, tokens = BatchRamp(cfg.train).tokens_before()
    total, warmup = tokens[-1], float(np.interp(cfg.warmup_steps, steps, tokens))
    in_tokens = build_schedule(cfg.optim.schedule, cfg.optim.lr, int(total), int(warmup))
    xs, ys = jnp.asarray(steps, jnp.float32), jnp.asarray(tokens, jnp.float32)
    return lambda count: in_tokens(jnp.interp(jnp.asarray(count, jnp.float32), xs, ys))


def staged_schedule(cfg: Config) -> optax.Schedule:
    """The stages' lr pieces joined at their boundaries: warmup 0 -> peak, stable at peak,
    decay peak -> floor (optim.schedule.decay_shape), as a function of the 0-based step."""
    peak = cfg.optim.lr
    floor = cfg.optim.schedule.min_lr_ratio * peak
    pieces = []
    for stage in stages_lib.plan(cfg):
        length = stage.last - stage.first + 1
        pieces.append({
            "warmup": lambda n: optax.linear_schedule(0.0, peak, n),
            "stable": lambda n: optax.constant_schedule(peak),
            "decay": lambda n: _decay(cfg.optim.schedule.decay_shape, peak, floor, n),
        }[cfg.stages[stage.index].lr](length))  # fmt: skip
    boundaries = [stage.first - 1 for stage in stages_lib.plan(cfg)[1:]]
    return optax.join_schedules(pieces, boundaries)


def build(cfg: Config) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
    """The optimizer and its schedule for a run (the schedule is also logged as the lr)."""
    if cfg.stages:
        schedule = staged_schedule(cfg)
    elif cfg.optim.schedule.unit == "tokens" and cfg.train.batch_ramp.enabled:
        schedule = over_tokens(cfg)
    else:  # a constant batch: tokens are proportional to steps
        schedule = build_schedule(
            cfg.optim.schedule, cfg.optim.lr, cfg.train.steps, cfg.warmup_steps
        )
    return build_optimizer(cfg.optim, schedule), schedule
