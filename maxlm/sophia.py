"""Sophia-G (Liu et al. 2023, arXiv:2305.14342): clipped, diagonal-Hessian-preconditioned momentum.

`sophia` is the optax rule; `gnb_hessian` is the Gauss-Newton-Bartlett estimate it is fed with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any


class ScaleBySophiaState(NamedTuple):
    """Updates applied so far, the gradient EMA m and the diagonal-Hessian EMA h (f32)."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax's states
    mu: optax.Updates
    hessian: optax.Updates


def scale_by_sophia(
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    eps: float = 1e-12,
    update_hessian_every: int = 10,
) -> optax.GradientTransformationExtraArgs:
    """Algorithm 3's direction clip(m / max(rho * h, eps), -1, 1), before lr and weight decay.

    `update(grads, state, params, *, hessian=None, hessian_due=None)`:
      - hessian: a fresh estimate h_hat shaped like params (e.g. `gnb_hessian`), or None.
      - hessian_due: whether to fold `hessian` into the EMA, h = b2 * h + (1 - b2) * h_hat; a
        Python or traced bool, so a jitted step can pass an estimate every step (zeros from the
        untaken branch of a lax.cond) and say whether it is real. None: due when this
        transform's own count % update_hessian_every == 0 (the paper's t mod k = 1, 1-based).
    Without a hessian, h is kept: the first steps (h = 0) take lr * sign(m) steps.
    """
    if update_hessian_every < 1:
        raise ValueError(f"update_hessian_every must be >= 1, got {update_hessian_every}")

    def init(params: Params) -> ScaleBySophiaState:
        def zeros(p: jax.Array) -> jax.Array:
            return jnp.zeros(jnp.shape(p), jnp.float32)

        return ScaleBySophiaState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            hessian=jax.tree.map(zeros, params),
        )

    def update(
        updates: optax.Updates,
        state: ScaleBySophiaState,
        params: Params | None = None,
        *,
        hessian: Params | None = None,
        hessian_due: jax.typing.ArrayLike | None = None,
        **extra: Any,
    ) -> tuple[optax.Updates, ScaleBySophiaState]:
        del params, extra  # other transforms' extra args pass through the chain to everyone
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
        h = state.hessian
        if hessian is not None:
            due = state.count % update_hessian_every == 0 if hessian_due is None else hessian_due
            # where, not cond: the EMA is elementwise and cheap, and `due` may be traced.
            h = jax.tree.map(
                lambda old, new: jnp.where(due, b2 * old + (1 - b2) * new.astype(jnp.float32), old),
                h,
                hessian,
            )

        def direction(m: jax.Array, hh: jax.Array, g: jax.Array) -> jax.Array:
            # max(., eps) guards h = 0 (before the first estimate, or dead coordinates) and
            # h < 0 (a Hutchinson estimate): the ratio is huge and the clip leaves sign(m).
            return jnp.clip(m / jnp.maximum(rho * hh, eps), -1.0, 1.0).astype(g.dtype)

        out = jax.tree.map(direction, mu, h, updates)
        count = optax.safe_int32_increment(state.count)
        return out, ScaleBySophiaState(count=count, mu=mu, hessian=h)

    return optax.GradientTransformationExtraArgs(init, update)


def sophia(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    eps: float = 1e-12,
    weight_decay: float = 0.0,
    mask: Any | Callable[[Params], Any] | None = None,
    update_hessian_every: int = 10,
) -> optax.GradientTransformationExtraArgs:
    """Sophia-G with decoupled weight decay: -lr * (clip(...) + weight_decay * params).

    Same layout as optax.adamw; `hessian=` / `hessian_due=` reach scale_by_sophia through
    optax.chain, which drops them for transforms that take no extra args.
    """
    return optax.chain(
        scale_by_sophia(b1, b2, rho, eps, update_hessian_every),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def sample_targets(logits: jax.Array, rng: jax.Array) -> jax.Array:
    """y_hat ~ Categorical(softmax(logits)) over the last axis, as constant int targets."""
    # f32: bf16 Gumbel noise would visibly distort the sampled distribution over a large vocab.
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    return jax.random.categorical(rng, logits, axis=-1)


def gnb_hessian(
    loss_of_targets: Callable[[Params, jax.Array], jax.Array],
    params: Params,
    logits: jax.Array,
    rng: jax.Array,
    num_tokens: jax.typing.ArrayLike,
) -> Params:
    """Gauss-Newton-Bartlett diagonal-Hessian estimate B * g_hat * g_hat (f32, like params).

    loss_of_targets(params, targets) must be the MEAN cross-entropy over the scored tokens of the
    batch whose model outputs are `logits` (masked tokens may get any target); g_hat is its
    gradient with targets sampled from the model itself. num_tokens is B, the count the mean
    divides by: the paper's B is the batch size in examples because its loss is a mean over
    examples; a token-level LM loss is a mean over tokens, and each token's sampled target is an
    independent draw, so E[B g_hat^2] is the Gauss-Newton diagonal when B counts tokens.
    """
    targets = jax.lax.stop_gradient(sample_targets(logits, rng))
    g_hat = jax.grad(loss_of_targets)(params, targets)
    scale = jnp.asarray(num_tokens, jnp.float32)
    return jax.tree.map(lambda g: scale * jnp.square(g.astype(jnp.float32)), g_hat)
