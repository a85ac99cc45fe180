"""Estimates: closed-form parameter count vs the model, FLOPs per token, device peak FLOP/s."""

from types import SimpleNamespace

import jax
import pytest
from flax import nnx

from maxlm import estimate
from maxlm.config import ModelConfig, load
from maxlm.model import Llama


def counted(m: ModelConfig) -> int:
    """Parameters of the real model, from shapes only (nnx.eval_shape allocates nothing)."""
    abstract = nnx.eval_shape(lambda: Llama(m, rngs=nnx.Rngs(0)))
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


TINY = dict(vocab_size=96, d_model=32, num_layers=3, num_heads=4, mlp_dim=80)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(TINY, id="tiny"),
        pytest.param({**TINY, "tie_embeddings": True}, id="tied"),
        pytest.param({**TINY, "num_kv_heads": 2}, id="gqa"),
        pytest.param({**TINY, "num_kv_heads": 1, "head_dim": 16}, id="mqa-wide-heads"),
    ],
)
def test_param_count_matches_the_model(fields):
    m = ModelConfig(**fields)
    assert estimate.param_count(m) == counted(m)


def test_param_count_of_tiny_preset():
    m = load(None, ["model.preset=tiny"]).model
    V, D, L, F = 8192, 256, 4, 688  # configs/models/tiny.yaml
    by_hand = 2 * V * D + L * (4 * D * D + 3 * D * F + 2 * D) + D
    assert estimate.param_count(m) == counted(m) == by_hand == 7_358_720


def test_small_preset_matmul_params_and_flops_by_hand():
    m = load(None, ["model.preset=small"]).model
    L, D, F, V = 8, 512, 1376, 32000
    assert (m.num_layers, m.d_model, m.mlp_dim, m.vocab_size) == (L, D, F, V)
    # per layer: q, k, v, o (D x D each) + gate, up, down (D x F each); plus the LM head
    matmul = L * (4 * D * D + 3 * D * F) + V * D
    assert matmul == 41_680_896
    assert estimate.matmul_params(m) == matmul
    # FACTS.md's MFU convention: 6 x matmul params (incl. LM head) + 12 x L x d x seq
    seq = 512
    assert estimate.flops_per_token(m, seq) == 6 * matmul + 12 * L * D * seq == 275_251_200
    assert estimate.flops_per_token(m, 2 * seq) - estimate.flops_per_token(m, seq) == (
        12 * L * D * seq
    )


def test_tied_head_still_counts_as_a_matmul():
    untied = load(None, ["model.preset=small"]).model
    tied = load(None, ["model.preset=small", "model.tie_embeddings=true"]).model
    assert estimate.param_count(untied) - estimate.param_count(tied) == 32000 * 512
    assert estimate.matmul_params(tied) == estimate.matmul_params(untied)


def test_gqa_shrinks_matmul_params_by_the_kv_projections():
    full = ModelConfig(**TINY)
    gqa = ModelConfig(**TINY, num_kv_heads=1)
    head = full.head_size
    saved = full.num_layers * 2 * full.d_model * (full.num_heads - 1) * head
    assert estimate.matmul_params(full) - estimate.matmul_params(gqa) == saved


def test_cpu_peak_is_measured():
    peak, source = estimate.peak_flops(jax.devices(), "float32")
    assert jax.devices()[0].platform == "cpu"
    assert 1e8 < peak < 1e14  # a real machine: more than 0.1 GFLOP/s, less than 100 TFLOP/s
    assert "measured" in source
    assert f"{peak / 1e9:.0f} GFLOP/s" in source


def fake_devices(kind: str, count: int, platform: str = "tpu") -> list[SimpleNamespace]:
    return [SimpleNamespace(platform=platform, device_kind=kind) for _ in range(count)]


@pytest.mark.parametrize(
    ("kind", "platform", "per_chip"),
    [
        ("TPU v4", "tpu", 275e12),
        ("TPU v5 lite", "tpu", 197e12),
        ("TPU v5p", "tpu", 459e12),
        ("TPU v6 lite", "tpu", 918e12),
        ("NVIDIA H100 80GB HBM3", "gpu", 989e12),
        ("NVIDIA A100-SXM4-40GB", "gpu", 312e12),
    ],
)
def test_published_peak_scales_with_device_count(kind, platform, per_chip):
    peak, source = estimate.peak_flops(fake_devices(kind, 4, platform), "bfloat16")
    assert peak == 4 * per_chip
    assert "published" in source and kind in source


def test_unknown_accelerator_raises():
    with pytest.raises(ValueError, match="TPU v99"):
        estimate.peak_flops(fake_devices("TPU v99", 8), "bfloat16")
    with pytest.raises(ValueError, match="PUBLISHED_PEAK_FLOPS"):
        estimate.peak_flops(fake_devices("Some Accelerator", 1, "gpu"), "bfloat16")
