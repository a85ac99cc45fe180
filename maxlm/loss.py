"""Masked next-token cross-entropy with optional z-loss, and exact token accounting."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class LossSums(NamedTuple):
    """Sums over a batch; divide by `tokens` for means (so micro-batches add up exactly)."""

    cross_entropy: jax.Array
    z_loss: jax.Array
    tokens: jax.Array


def loss_sums(
    logits: jax.Array,
    targets: jax.Array,
    segment_ids: jax.Array,
    loss_mask: jax.Array | None = None,
) -> LossSums:
    """Cross-entropy and (log Z)^2 summed over real target tokens (segment id 0 is padding)
    that `loss_mask` selects (all when None; prefix-LM objectives leave out the prefix)."""
    real = segment_ids != 0
    if loss_mask is not None:
        real &= loss_mask != 0
    # select rather than multiply: padding must not leak NaN/inf into the sums or the gradients
    logits = jnp.where(real[..., None], logits.astype(jnp.float32), 0.0)
    targets = jnp.where(real, targets, 0)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return LossSums(
        cross_entropy=jnp.sum(jnp.where(real, cross_entropy, 0.0)),
        z_loss=jnp.sum(jnp.where(real, jnp.square(log_z), 0.0)),
        tokens=jnp.sum(real.astype(jnp.float32)),
    )


def objective(sums: LossSums, z_loss_weight: float) -> jax.Array:
    """What the optimizer minimizes: mean cross-entropy plus weighted mean z-loss."""
    tokens = jnp.maximum(sums.tokens, 1.0)
    return (sums.cross_entropy + z_loss_weight * sums.z_loss) / tokens
