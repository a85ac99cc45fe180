"""Masked next-token cross-entropy with optional z-loss, and exact token accounting."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from maxlm import mkl
from maxlm.matmul import Gemm, by_mkl, transposed


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


def head_logits(x: jax.Array, head: jax.Array, vocab_axis: int) -> jax.Array:
    """float32 logits (B,C,V) of activations (B,C,D) under the output matrix as stored."""
    spec = "BCD,DV->BCV" if vocab_axis == 1 else "BCD,VD->BCV"
    return jnp.einsum(spec, x, head.astype(x.dtype), preferred_element_type=jnp.float32)


def head_loss(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    segment_ids: jax.Array,
    loss_mask: jax.Array | None = None,
    *,
    vocab_axis: int,
    z_loss_weight: float,
    chunk: int,
    gemm: Gemm = "dot",
) -> tuple[jax.Array, LossSums]:
    """The output head and the loss fused, `chunk` positions of the sequence at a time.

    `hidden` (B,T,D) are the final-normed activations, `head` the output matrix with its vocab
    axis at `vocab_axis` ((D,V): 1, a tied (V,D) embedding: 0). Returns the summed objective
    (cross-entropy + z_loss_weight * z-loss) and the `LossSums` of `loss_sums`. The (B,T,V)
    logits never exist at once: each chunk's logits feed the loss and, when differentiated,
    their gradient is turned at once into the chunk's share of d(hidden) and d(head), so the
    backward pass reads no logits at all. Only the objective carries gradients; the sums are
    metrics. `gemm` (`maxlm.matmul.Gemm`): "cpu" materializes the transposed activations of
    d(head), "mkl" runs the products by MKL.
    """
    batch, length = hidden.shape[:2]
    if length % chunk:
        raise ValueError(f"sequence length {length} is not a multiple of the loss chunk {chunk}")
    real = segment_ids != 0
    if loss_mask is not None:
        real &= loss_mask != 0
    targets = jnp.where(real, targets, 0)

    def chunked(x: jax.Array) -> jax.Array:
        """(B,T,...) -> (T/chunk, B, chunk, ...), the scan's leading axis first."""
        return jnp.moveaxis(x.reshape(batch, length // chunk, chunk, *x.shape[2:]), 1, 0)

    xs = (chunked(hidden), chunked(targets), chunked(real))

    def logits_of(x: jax.Array, w: jax.Array) -> jax.Array:
        if by_mkl(gemm, x.dtype):
            rows = mkl.gemm(
                x.reshape(-1, x.shape[-1]), w.astype(x.dtype), transpose_b=vocab_axis == 0
            )
            return rows.reshape(*x.shape[:-1], -1)
        return head_logits(x, w, vocab_axis)

    def hidden_grad(grad: jax.Array, w: jax.Array) -> jax.Array:
        """d(x) of one chunk, float32 (B,C,D): grad (B,C,V) back through the head."""
        if by_mkl(gemm, grad.dtype):
            flat = grad.reshape(-1, grad.shape[-1])
            rows = mkl.gemm(flat, w.astype(grad.dtype), transpose_b=vocab_axis == 1)
            return rows.reshape(*grad.shape[:-1], -1)
        spec = "BCV,DV->BCD" if vocab_axis == 1 else "BCV,VD->BCD"
        return jnp.einsum(spec, grad, w.astype(grad.dtype), preferred_element_type=jnp.float32)

    def add_head_grad(total: jax.Array, x: jax.Array, grad: jax.Array) -> jax.Array:
        """`total` plus d(head) of one chunk, (D,V) whatever the head's layout: x (M,D), grad
        (M,V). MKL adds into `total` in place."""
        if by_mkl(gemm, x.dtype):
            return mkl.gemm(x, grad, transpose_a=True, add=total)
        if gemm == "cpu":
            return total + jnp.matmul(transposed(x), grad, preferred_element_type=jnp.float32)
        return total + jnp.einsum("MD,MV->DV", x, grad, preferred_element_type=jnp.float32)

    def stats(logits: jax.Array, target: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        cross_entropy = jnp.sum(jnp.where(mask, log_z - target_logit, 0.0))
        z_loss = jnp.sum(jnp.where(mask, jnp.square(log_z), 0.0))
        return log_z, cross_entropy, z_loss

    def mkl_softmax_grad(logits: jax.Array, target: jax.Array, mask: jax.Array) -> Any:
        """`stats` and the logits' gradient below in one kernel (`maxlm.mkl.cross_entropy_grad`)."""
        vocab = logits.shape[-1]
        grad, log_z, target_logit = mkl.cross_entropy_grad(
            logits.reshape(-1, vocab), target.reshape(-1), mask.reshape(-1), z_loss_weight
        )
        real = mask.reshape(-1)
        cross_entropy = jnp.sum(jnp.where(real, log_z - target_logit, 0.0))
        z_loss = jnp.sum(jnp.where(real, jnp.square(log_z), 0.0))
        return grad.reshape(logits.shape), cross_entropy, z_loss

    def forward(hidden_chunks: Any, w: jax.Array, with_grads: bool) -> tuple[Any, ...]:
        def body(carry: tuple[jax.Array, ...], chunk_in: tuple[jax.Array, ...]) -> Any:
            grad_w, ce_sum, z_sum = carry
            x, target, mask = chunk_in
            # zeroed, not only masked: inf * 0 in d(head) would still be NaN
            x = jnp.where(mask[..., None], x, 0)
            logits = logits_of(x, w)
            if with_grads and by_mkl(gemm, x.dtype):
                grad, cross_entropy, z_loss = mkl_softmax_grad(logits, target, mask)
            else:
                log_z, cross_entropy, z_loss = stats(logits, target, mask)
                if not with_grads:
                    return (grad_w, ce_sum + cross_entropy, z_sum + z_loss), None
                # d(ce + w_z * log_z^2)/d logits = softmax * (1 + 2 w_z log_z) - onehot(target)
                probs = jnp.exp(logits - log_z[..., None])
                onehot = jnp.arange(logits.shape[-1]) == target[..., None]
                grad = probs * (1 + 2 * z_loss_weight * log_z)[..., None] - onehot
                grad = jnp.where(mask[..., None], grad, 0.0)
            grad = grad.astype(x.dtype)
            grad_x = hidden_grad(grad, w)
            rows = x.shape[0] * x.shape[1]
            grad_w = add_head_grad(grad_w, x.reshape(rows, -1), grad.reshape(rows, -1))
            return (grad_w, ce_sum + cross_entropy, z_sum + z_loss), grad_x.astype(x.dtype)

        zero = jnp.zeros((), jnp.float32)
        vocab, d_model = w.shape[vocab_axis], w.shape[1 - vocab_axis]
        init = (jnp.zeros((d_model, vocab), jnp.float32) if with_grads else zero, zero, zero)
        (grad_w, ce_sum, z_sum), grad_x = jax.lax.scan(body, init, (hidden_chunks, *xs[1:]))
        # accumulated as (D,V); a tied (V,D) head is transposed once, not per chunk
        return ce_sum, z_sum, grad_x, grad_w if vocab_axis == 1 else grad_w.T

    @jax.custom_vjp
    def objective(hidden_chunks: jax.Array, w: jax.Array) -> tuple[jax.Array, ...]:
        ce_sum, z_sum, _, _ = forward(hidden_chunks, w, with_grads=False)
        return ce_sum + z_loss_weight * z_sum, ce_sum, z_sum

    def objective_fwd(hidden_chunks: jax.Array, w: jax.Array) -> Any:
        ce_sum, z_sum, grad_x, grad_w = forward(hidden_chunks, w, with_grads=True)
        return (ce_sum + z_loss_weight * z_sum, ce_sum, z_sum), (grad_x, grad_w.astype(w.dtype))

    def objective_bwd(residuals: Any, cotangents: Any) -> tuple[jax.Array, jax.Array]:
        grad_x, grad_w = residuals
        scale = cotangents[0]  # the sums are metrics: their cotangents are ignored
        return (grad_x * scale.astype(grad_x.dtype), grad_w * scale.astype(grad_w.dtype))

    objective.defvjp(objective_fwd, objective_bwd)
    total, cross_entropy, z_loss = objective(xs[0], head)
    tokens = jnp.sum(real.astype(jnp.float32))
    return total, LossSums(cross_entropy=cross_entropy, z_loss=z_loss, tokens=tokens)
