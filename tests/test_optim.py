"""Schedules against hand-computed values, the weight-decay mask, the optax chain's effects."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from maxlm import optim
from maxlm.config import (
    AdafactorConfig,
    AdamWConfig,
    Config,
    LionConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)

PEAK, FLOOR, N, W = 1e-3, 1e-4, 100, 10  # min_lr_ratio 0.1


def lrs(kind: Any, warmup: int = W, **schedule: Any) -> np.ndarray:
    """The schedule's value at steps 0 .. 2N, evaluated jitted on int32 steps like optax does."""
    cfg = ScheduleConfig(kind=kind, min_lr_ratio=0.1, **schedule)
    fn = optim.build_schedule(cfg, PEAK, N, warmup)
    return np.asarray(jax.jit(fn)(jnp.arange(2 * N + 1, dtype=jnp.int32)))


def close(actual: Any, expected: Any) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "rsqrt", "wsd"])
def test_warmup_is_linear_from_zero(kind: str) -> None:
    values = lrs(kind)
    close(values[[0, 5, 10]], [0.0, 5e-4, PEAK])


def test_constant() -> None:
    close(lrs("constant")[[10, 50, 100, 200]], PEAK)


def test_cosine() -> None:
    values = lrs("cosine")
    close(values[55], FLOOR + (PEAK - FLOOR) / 2)  # midpoint of the decay
    close(values[[100, 150, 200]], FLOOR)
    assert np.all(np.diff(values[10:101]) < 0)


def test_linear() -> None:
    values = lrs("linear")
    close(values[55], FLOOR + (PEAK - FLOOR) / 2)
    close(values[32], PEAK - (PEAK - FLOOR) * 22 / 90)
    close(values[[100, 200]], FLOOR)


def test_rsqrt() -> None:
    values = lrs("rsqrt")
    close(values[[10, 40]], [PEAK, PEAK / 2])  # peak * sqrt(W / 4W)
    close(values[90], PEAK / 3)
    assert values[100] >= FLOOR
    cfg = ScheduleConfig(kind="rsqrt", min_lr_ratio=0.1)
    close(optim.build_schedule(cfg, PEAK, N, W)(10_000), FLOOR)  # 1e-3 * sqrt(1e-3) < floor


def test_rsqrt_without_warmup_uses_one_step_scale() -> None:
    close(lrs("rsqrt", warmup=0)[[0, 1, 4, 16]], [PEAK, PEAK, PEAK / 2, PEAK / 4])


@pytest.mark.parametrize(
    ("shape", "midpoint"),
    [
        ("linear", FLOOR + (PEAK - FLOOR) / 2),
        ("cosine", FLOOR + (PEAK - FLOOR) / 2),
        ("exponential", PEAK * (FLOOR / PEAK) ** 0.5),
        ("1-sqrt", FLOOR + (PEAK - FLOOR) * (1 - math.sqrt(0.5))),
    ],
)
def test_wsd(shape: str, midpoint: float) -> None:
    values = lrs("wsd", decay_fraction=0.2, decay_shape=shape)  # decay from D = 80 to N = 100
    close(values[[10, 50, 79, 80]], PEAK)
    assert values[81] < PEAK
    close(values[90], midpoint)
    close(values[[100, 150, 200]], FLOOR)
    assert np.all(np.diff(values[80:101]) < 0)


def test_no_warmup_starts_at_peak() -> None:
    close(lrs("constant", warmup=0)[[0, 1, 100]], PEAK)
    cosine = lrs("cosine", warmup=0)
    close(cosine[[0, 50, 100]], [PEAK, FLOOR + (PEAK - FLOOR) / 2, FLOOR])
    close(lrs("wsd", warmup=0, decay_fraction=1.0)[[0, 50, 100]], [PEAK, 5.5e-4, FLOOR])


def test_warmup_to_the_last_step_still_builds() -> None:
    kind: Any
    for kind in ["cosine", "linear", "wsd"]:
        cfg = ScheduleConfig(kind=kind, decay_fraction=0.004)  # wsd: rounds to 0 decay steps
        fn = optim.build_schedule(cfg, PEAK, N, N)
        close([fn(N - 1), fn(N)], [PEAK * (N - 1) / N, PEAK])


def test_wsd_decay_before_warmup_end_is_rejected() -> None:
    cfg = ScheduleConfig(kind="wsd", decay_fraction=0.95)  # decay would start at step 5 < W
    with pytest.raises(ValueError, match=r"optim\.schedule\.decay_fraction"):
        optim.build_schedule(cfg, PEAK, N, W)


def test_wsd_exponential_needs_a_positive_floor() -> None:
    cfg = ScheduleConfig(kind="wsd", decay_shape="exponential", min_lr_ratio=0.0)
    with pytest.raises(ValueError, match=r"optim\.schedule\.min_lr_ratio"):
        optim.build_schedule(cfg, PEAK, N, W)


# --------------------------------------------------------------------------- weight-decay mask


def llama_params(d: int = 4, vocab: int = 8, layers: int = 2) -> dict:
    """A realistic (scanned-layers) parameter tree with Hugging Face names."""
    proj = {"kernel": jnp.ones((layers, d, d))}
    return {
        "embed_tokens": {"embedding": jnp.ones((vocab, d))},
        "layers": {
            "self_attn": {"q_proj": proj, "k_proj": proj, "v_proj": proj, "o_proj": proj},
            "mlp": {"gate_proj": proj, "up_proj": proj, "down_proj": proj},
            "input_layernorm": {"scale": jnp.ones((layers, d))},
            "post_attention_layernorm": {"scale": jnp.ones((layers, d))},
        },
        "norm": {"scale": jnp.ones((d,))},
        "lm_head": {"kernel": jnp.ones((d, vocab))},
    }


def expected_mask(decay_embeddings: bool) -> dict:
    proj = {"kernel": True}
    return {
        "embed_tokens": {"embedding": decay_embeddings},
        "layers": {
            "self_attn": {"q_proj": proj, "k_proj": proj, "v_proj": proj, "o_proj": proj},
            "mlp": {"gate_proj": proj, "up_proj": proj, "down_proj": proj},
            "input_layernorm": {"scale": False},
            "post_attention_layernorm": {"scale": False},
        },
        "norm": {"scale": False},
        "lm_head": {"kernel": True},
    }


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_weight_decay_mask(decay_embeddings: bool) -> None:
    params = llama_params()
    assert optim.weight_decay_mask(params, decay_embeddings) == expected_mask(decay_embeddings)
    abstract = jax.eval_shape(lambda: params)  # ShapeDtypeStruct leaves
    assert optim.weight_decay_mask(abstract, decay_embeddings) == expected_mask(decay_embeddings)


def test_weight_decay_mask_on_nnx_state() -> None:
    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.q_proj = nnx.Linear(4, 4, use_bias=False, rngs=rngs)
            self.input_layernorm = nnx.RMSNorm(4, rngs=rngs)

    state = nnx.state(Block(nnx.Rngs(0)), nnx.Param)  # leaf paths end in .../kernel/value
    mask = nnx.to_pure_dict(optim.weight_decay_mask(state, decay_embeddings=False))
    assert mask == {"q_proj": {"kernel": True}, "input_layernorm": {"scale": False}}


# --------------------------------------------------------------------------- update rules


def optim_cfg(optimizer: Any = None, **fields: Any) -> OptimConfig:
    return OptimConfig(optimizer=optimizer or AdamWConfig(), **fields)


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_adamw_decays_masked_weights_only(decay_embeddings: bool) -> None:
    lr, wd = 1e-2, 0.1
    cfg = optim_cfg(weight_decay=wd, decay_embeddings=decay_embeddings)
    tx = optim.build_optimizer(cfg, optax.constant_schedule(lr))
    params = jax.tree.map(lambda x: 3.0 * x, llama_params())
    zeros = jax.tree.map(jnp.zeros_like, params)  # adam's own step is exactly 0 on zero grads
    updates, _ = tx.update(zeros, tx.init(params), params)
    decayed = optim.weight_decay_mask(params, decay_embeddings)
    jax.tree.map(lambda u, p, d: close(u, -lr * wd * p if d else 0.0), updates, params, decayed)
    assert decayed["embed_tokens"]["embedding"] is decay_embeddings


def test_clip_by_global_norm_is_applied_before_the_rule() -> None:
    """Adam ignores the scale of a single step, so clip step 1 (norm 10) and not step 2 (norm 0.5):
    the second update then depends on whether step 1 was clipped."""
    params = {"w": jnp.zeros(4)}
    big = {"w": jnp.array([6.0, 8.0, 0.0, 0.0])}  # norm 10
    small = {"w": jnp.array([0.0, 0.3, 0.4, 0.0])}  # norm 0.5
    schedule = optax.constant_schedule(1e-2)

    def second_update(tx: optax.GradientTransformation, first: dict) -> jax.Array:
        _, state = tx.update(first, tx.init(params), params)
        return tx.update(small, state, params)[0]["w"]

    plain = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.0)
    clipped = optim.build_optimizer(optim_cfg(weight_decay=0.0, clip_grad_norm=1.0), schedule)
    unclipped = optim.build_optimizer(optim_cfg(weight_decay=0.0, clip_grad_norm=None), schedule)
    by_hand = jax.tree.map(lambda g: g / 10.0, big)
    close(second_update(clipped, big), second_update(plain, by_hand))
    close(second_update(unclipped, big), second_update(plain, big))
    assert not np.allclose(second_update(clipped, big), second_update(unclipped, big))


@pytest.mark.parametrize(
    "optimizer", [AdafactorConfig(), AdafactorConfig(momentum=0.9), LionConfig()]
)
def test_toy_quadratic_loss_goes_down(optimizer: object) -> None:
    target = {
        "layers": {"kernel": jax.random.normal(jax.random.key(0), (8, 8))},
        "norm": {"scale": jax.random.normal(jax.random.key(1), (8,))},
    }
    params = jax.tree.map(jnp.zeros_like, target)

    def loss(p: dict) -> Any:
        return sum(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), p, target)))

    tx = optim.build_optimizer(optim_cfg(optimizer), optax.constant_schedule(0.05))
    state = tx.init(params)

    @jax.jit
    def step(p: dict, s: optax.OptState) -> tuple[dict, optax.OptState]:
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    start = float(loss(params))
    for _ in range(50):
        params, state = step(params, state)
    assert float(loss(params)) < 0.2 * start


def test_adafactor_factors_large_matrices_only() -> None:
    params = {"big": {"kernel": jnp.zeros((256, 128))}, "small": {"kernel": jnp.zeros((64, 8))}}
    tx = optim.build_optimizer(optim_cfg(AdafactorConfig()), optax.constant_schedule(1e-2))
    state = tx.init(params)
    v_row, v_col, v = (optax.tree.get(state, name) for name in ["v_row", "v_col", "v"])
    assert {v_row["big"]["kernel"].shape, v_col["big"]["kernel"].shape} == {(256,), (128,)}
    assert v["big"]["kernel"].shape == (1,)  # no full second moment for the factored matrix
    assert v["small"]["kernel"].shape == (64, 8)
    assert v_row["small"]["kernel"].shape == (1,)


def test_adafactor_uses_the_schedule_as_step_size_and_decays_like_adamw() -> None:
    """Without per-block clipping or parameter scaling, the first step on a constant gradient is
    lr * sign(g) (normalised by its own RMS), plus the lr * wd * w decoupled decay."""
    lr, wd = 1e-2, 0.1
    tx = optim.build_optimizer(
        optim_cfg(AdafactorConfig(), weight_decay=wd), optax.constant_schedule(lr)
    )
    params = {"w": {"kernel": jnp.full((4,), 2.0)}, "norm": {"scale": jnp.full((4,), 2.0)}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 5.0), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    close(updates["w"]["kernel"], -lr * 1.0 - lr * wd * 2.0)
    close(updates["norm"]["scale"], -lr * 1.0)


@pytest.mark.parametrize("optimizer", [AdamWConfig(), AdafactorConfig(), LionConfig()])
def test_build_from_config_initialises_abstract_params(optimizer: object) -> None:
    cfg = Config(
        optim=optim_cfg(optimizer, lr=1e-3, schedule=ScheduleConfig(warmup_steps=10)),
        train=TrainConfig(steps=100),
    )
    tx, schedule = optim.build(cfg)
    close([schedule(0), schedule(10)], [0.0, 1e-3])
    abstract = jax.eval_shape(llama_params)
    state = jax.eval_shape(tx.init, abstract)  # what state.py does: no memory allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
