"""Loss: masked cross-entropy and z-loss against numpy, padding, the objective, additivity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.loss import LossSums, head_loss, loss_sums, objective

B, T, V = 3, 5, 7


@jax.jit
def sums_of(logits, targets, segment_ids) -> LossSums:
    """loss_sums as the train step runs it: jitted (one compile per shape, not per op)."""
    return loss_sums(logits, targets, segment_ids)


@pytest.fixture
def batch():
    """Random logits and targets; row 0 full, row 1 half padding, row 2 all real but one."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    segment_ids = np.array([[1, 1, 1, 1, 1], [1, 1, 2, 0, 0], [1, 2, 2, 3, 0]], np.int32)
    return logits, targets, segment_ids


def numpy_log_z(logits):
    top = logits.max(-1, keepdims=True)
    return (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]


def numpy_cross_entropy(logits, targets):
    """-log softmax(logits)[target] per position, in float64."""
    logits = logits.astype(np.float64)
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return numpy_log_z(logits) - picked


def test_cross_entropy_matches_numpy(batch):
    logits, targets, segment_ids = batch
    sums = sums_of(logits, targets, segment_ids)
    real = segment_ids != 0
    expected = numpy_cross_entropy(logits, targets)[real].sum()
    np.testing.assert_allclose(float(sums.cross_entropy), expected, rtol=1e-5)
    assert float(sums.tokens) == real.sum() == 12


def test_hand_computed_two_token_example():
    # uniform logits over 4 classes: ln 4 each; logits (0, ln 3): p(target 1) = 3/4
    logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [0.0, np.log(3.0), -np.inf, -np.inf]]])
    sums = sums_of(logits, np.array([[2, 1]]), np.array([[1, 1]]))
    np.testing.assert_allclose(float(sums.cross_entropy), np.log(4.0) - np.log(0.75), rtol=1e-6)
    np.testing.assert_allclose(float(sums.z_loss), np.log(4.0) ** 2 + np.log(4.0) ** 2, rtol=1e-6)
    assert float(sums.tokens) == 2


def test_padding_contributes_nothing(batch):
    logits, targets, segment_ids = batch
    base = sums_of(logits, targets, segment_ids)
    pad = segment_ids == 0
    # Wild (but finite) logits and other targets where segment_id is 0 change nothing.
    logits2 = np.where(pad[..., None], 1e4 * np.sign(logits), logits).astype(np.float32)
    targets2 = np.where(pad, (targets + 3) % V, targets)
    changed = sums_of(logits2, targets2, segment_ids)
    for a, b in zip(base, changed, strict=True):
        assert float(a) == float(b)
    # ...while the same change on a real token does change the loss (the test can fail).
    logits3 = logits.copy()
    logits3[0, 0] *= 5
    moved = sums_of(logits3, targets, segment_ids)
    assert float(moved.cross_entropy) != float(base.cross_entropy)


def test_all_padding_gives_zero_sums_and_zero_objective(batch):
    logits, targets, _ = batch
    sums = sums_of(logits, targets, np.zeros((B, T), np.int32))
    assert [float(x) for x in sums] == [0.0, 0.0, 0.0]
    assert float(objective(sums, 1e-4)) == 0.0  # no 0/0


def test_z_loss_is_sum_of_squared_log_z_over_real_tokens(batch):
    logits, targets, segment_ids = batch
    sums = sums_of(logits, targets, segment_ids)
    log_z = numpy_log_z(logits.astype(np.float64))
    expected = (log_z**2)[segment_ids != 0].sum()
    np.testing.assert_allclose(float(sums.z_loss), expected, rtol=1e-5)


def test_bfloat16_logits_are_summed_in_float32(batch):
    logits, targets, segment_ids = batch
    sums = sums_of(jnp.asarray(logits, jnp.bfloat16), targets, segment_ids)
    assert all(x.dtype == jnp.float32 for x in sums)
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    expected = numpy_cross_entropy(rounded, targets)[segment_ids != 0].sum()
    np.testing.assert_allclose(float(sums.cross_entropy), expected, rtol=1e-5)


def test_objective_is_mean_cross_entropy_plus_weighted_mean_z_loss():
    sums = LossSums(jnp.float32(30.0), jnp.float32(500.0), jnp.float32(12.0))
    np.testing.assert_allclose(float(objective(sums, 0.0)), 30.0 / 12.0, rtol=1e-6)
    np.testing.assert_allclose(float(objective(sums, 1e-2)), (30.0 + 5.0) / 12.0, rtol=1e-6)


def test_halves_add_up_to_the_whole_batch(batch):
    logits, targets, segment_ids = batch
    whole = sums_of(logits, targets, segment_ids)
    halves = [
        sums_of(logits[rows], targets[rows], seg)
        for rows, seg in ((slice(0, 1), segment_ids[:1]), (slice(1, 3), segment_ids[1:]))
    ]
    added = LossSums(*(a + b for a, b in zip(*halves, strict=True)))
    for a, b in zip(whole, added, strict=True):
        np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    np.testing.assert_allclose(
        float(objective(added, 1e-3)), float(objective(whole, 1e-3)), rtol=1e-6
    )
    # The halves hold 5 and 7 tokens: averaging their means would weight tokens unequally.
    mean_of_means = (float(objective(halves[0], 0.0)) + float(objective(halves[1], 0.0))) / 2
    assert abs(mean_of_means - float(objective(whole, 0.0))) > 1e-3


def test_loss_mask_selects_exactly_its_tokens(batch):
    """Prefix-LM objectives score only the suffix: masked positions add nothing, not even to
    the token count, and padding stays out whatever the mask says."""
    logits, targets, segment_ids = batch
    loss_mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 0, 1, 0, 1]], np.int32)
    sums = jax.jit(loss_sums)(logits, targets, segment_ids, loss_mask)
    scored = (segment_ids != 0) & (loss_mask != 0)
    expected = numpy_cross_entropy(logits, targets)[scored].sum()
    np.testing.assert_allclose(float(sums.cross_entropy), expected, rtol=1e-5)
    assert float(sums.tokens) == scored.sum() == 7


@pytest.mark.parametrize("vocab_axis", [1, 0])
@pytest.mark.parametrize("gemm", ["dot", "cpu", "mkl"])
@pytest.mark.parametrize("z_loss_weight", [0.0, 0.1])
def test_fused_head_loss_equals_head_then_loss(vocab_axis, gemm, z_loss_weight):
    """head_loss (chunked, its own backward pass) equals logits = hidden @ head then
    loss_sums, in value and in the gradients of hidden and head, for both head layouts."""
    rng = np.random.default_rng(1)
    D, T_long = 6, 8
    hidden = jnp.asarray(rng.normal(0, 1, (B, T_long, D)), jnp.float32)
    head = jnp.asarray(rng.normal(0, 1, (D, V) if vocab_axis else (V, D)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T_long)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[1], [2], [0]], T_long, 1)).at[1, 5:].set(0)
    loss_mask = jnp.ones((B, T_long), jnp.int32).at[0, :3].set(0)

    def reference(hidden, head):
        w = head if vocab_axis else head.T
        sums = loss_sums(hidden @ w, targets, segment_ids, loss_mask)
        return sums.cross_entropy + z_loss_weight * sums.z_loss, sums

    def fused(hidden, head):
        return head_loss(
            hidden, head, targets, segment_ids, loss_mask, vocab_axis=vocab_axis,
            z_loss_weight=z_loss_weight, chunk=4, gemm=gemm,
        )  # fmt: skip

    grad = jax.jit(jax.value_and_grad(reference, argnums=(0, 1), has_aux=True))
    (want, want_sums), want_grads = grad(hidden, head)
    grad = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))
    (got, got_sums), got_grads = grad(hidden, head)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for got_sum, want_sum in zip(got_sums, want_sums, strict=True):
        np.testing.assert_allclose(got_sum, want_sum, rtol=1e-6)
    assert float(got_sums.tokens) == 8 + 5 - 3  # row 0 minus its masked prefix, row 1's first 5
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    assert not np.any(got_grads[0][2])  # padding rows get no gradient


def test_fused_head_loss_is_nan_free_on_padding():
    """Non-finite activations on padding positions leak into neither the loss nor the grads."""
    hidden = jnp.ones((1, 4, 3)).at[0, 2:].set(jnp.inf)
    segment_ids = jnp.asarray([[1, 1, 0, 0]])
    targets = jnp.zeros((1, 4), jnp.int32)

    def loss(hidden, head):
        return head_loss(
            hidden, head, targets, segment_ids, vocab_axis=1, z_loss_weight=0.0, chunk=2
        )

    (value, _), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        hidden, jnp.ones((3, 5))
    )
    assert np.isfinite(value)
    assert np.isfinite(grads[1]).all() and np.isfinite(grads[0][0, :2]).all()


def test_head_loss_chunk_must_divide_the_sequence():
    with pytest.raises(ValueError, match="not a multiple of the loss chunk 3"):
        head_loss(
            jnp.ones((1, 4, 2)), jnp.ones((2, 3)), jnp.zeros((1, 4), jnp.int32),
            jnp.ones((1, 4), jnp.int32), vocab_axis=1, z_loss_weight=0.0, chunk=3,
        )  # fmt: skip
