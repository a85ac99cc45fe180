"""Model presets: every configs/models/*.yaml loads and builds, with the published parameter count.

Counting uses nnx.eval_shape, so even the 70B presets allocate nothing.
"""

import jax
import pytest
from flax import nnx

from maxlm.config import ModelConfig, load, preset_names
from maxlm.model import Llama

# Parameter counts of the released checkpoints (Hugging Face configs). LLaMA-1 65B is often
# quoted as 65,286,512,640, but its shapes (and the HF checkpoint) give 65,285,660,672.
PUBLISHED = {
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-33b": 32_528_943_616,
    "llama-65b": 65_285_660_672,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
}


def closed_form(m: ModelConfig) -> int:
    """Parameters from the shapes alone: embeddings (+ head), per-layer weights, final norm."""
    V, D, L, F = m.vocab_size, m.d_model, m.num_layers, m.mlp_dim
    N, K, H = m.num_heads, m.kv_heads, m.head_size
    attention = D * N * H + 2 * D * K * H + N * H * D
    return V * D * (1 if m.tie_embeddings else 2) + L * (attention + 3 * D * F + 2 * D) + D


def count(m: ModelConfig) -> int:
    abstract = nnx.eval_shape(lambda: Llama(m, rngs=nnx.Rngs(0)))
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_published_presets_exist():
    assert {*PUBLISHED, "small", "tiny"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_parameter_count(name):
    model = load(None, [f"model.preset={name}"]).model
    total = count(model)
    assert total == closed_form(model)
    if name in PUBLISHED:
        assert total == PUBLISHED[name]


def test_tied_count_drops_the_head():
    model = load(None, ["model.preset=small", "model.tie_embeddings=true"]).model
    assert count(model) == closed_form(model) == 58_073_600 - 32000 * 512


def test_preset_shapes_and_overrides():
    model = load(None, ["model.preset=llama3-8b", "model.num_layers=2"]).model
    assert (model.d_model, model.num_layers, model.kv_heads, model.head_size) == (4096, 2, 8, 128)
    assert (model.rope_theta, model.norm_eps, model.vocab_size) == (500000.0, 1e-5, 128256)
    assert load(None, ["model.preset=llama-65b"]).model.norm_eps == 1e-6
