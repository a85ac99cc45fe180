"""Attention implementations against the XLA reference, forward and gradients: splash in Pallas
interpret mode on CPU and in an ahead-of-time TPU compile, cudnn on an NVIDIA GPU (when present)
and lowered for CUDA here.

Padding rows (segment 0) see the padding before them in every implementation, so outputs are
compared on all rows, padding included.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxlm import attention, mesh as mesh_lib, sharding, state as state_lib
from maxlm.config import ConfigError, MeshConfig, ModelConfig
from maxlm.model import Llama

on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="Pallas interpret on CPU")


def packed_segments(batch: int, seq: int) -> jax.Array:
    """Rows of several documents of uneven lengths, the first ending in padding (segment 0)."""
    rng = np.random.default_rng(0)
    rows = []
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=3, replace=False))
        ids = np.searchsorted(cuts, np.arange(seq), side="right") + 1
        if row == 0:
            ids[cuts[-1] :] = 0
        rows.append(ids)
    return jnp.asarray(np.stack(rows), jnp.int32)


def qkv(batch, seq, heads, kv_heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = [(batch, seq, heads, head_dim), *[(batch, seq, kv_heads, head_dim)] * 2]
    return [
        jax.random.normal(key, s, jnp.float32).astype(dtype)
        for key, s in zip(keys, shapes, strict=True)
    ]


def output_and_grads(q, k, v, segment_ids, **kwargs):
    """Attention output and the gradients of a random projection of it w.r.t. q, k, v."""
    cotangent = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)

    def loss(q, k, v):
        out = attention.attend(q, k, v, segment_ids, **kwargs)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def dense_xla(monkeypatch: pytest.MonkeyPatch, q, k, v, segment_ids):
    """The xla path without causal query blocks: one softmax over the whole (T,S) square."""
    with monkeypatch.context() as patch:
        patch.setattr(attention, "CAUSAL_BLOCK_MIN", q.shape[1])
        return output_and_grads(q, k, v, segment_ids)


@pytest.mark.parametrize("seq, blocks", [(512, 2), (1024, 4)])
def test_causal_blocks_match_dense_xla(monkeypatch, seq, blocks):
    """The xla path's causal query blocks compute what one dense masked softmax does (packed
    documents, padding, GQA), forward and gradients, with a quarter to three eighths less
    attention work."""
    assert seq // attention.causal_block(seq) == blocks
    q, k, v = qkv(2, seq, 4, 2, 32, jnp.float32)
    segment_ids = packed_segments(2, seq)
    out, grads = output_and_grads(q, k, v, segment_ids)
    ref_out, ref_grads = dense_xla(monkeypatch, q, k, v, segment_ids)
    np.testing.assert_allclose(out, ref_out, atol=2e-6)
    for grad, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(grad, ref, atol=1e-5)

    def flops(block_min: int) -> float:
        with monkeypatch.context() as patch:
            patch.setattr(attention, "CAUSAL_BLOCK_MIN", block_min)
            attend = jax.jit(lambda q, k, v: attention.attend(q, k, v, segment_ids))
            return attend.lower(q, k, v).compile().cost_analysis()["flops"]

    # forward only: blocks i = 1..n see i/n of the keys, (n + 1) / 2n of the square in all
    assert flops(attention.CAUSAL_BLOCK_MIN) / flops(seq) == pytest.approx(
        (blocks + 1) / (2 * blocks), rel=0.05
    )


def test_causal_block_sizes():
    """At least CAUSAL_BLOCK_MIN, at most CAUSAL_BLOCKS blocks, dividing the sequence; the
    whole sequence (no blocks) where nothing fits."""
    sizes = {seq: attention.causal_block(seq) for seq in (128, 256, 300, 512, 2048, 4096, 4097)}
    assert sizes == {128: 256, 256: 256, 300: 300, 512: 256, 2048: 256, 4096: 512, 4097: 4097}


@on_cpu
def test_splash_matches_xla_in_interpret_mode():
    """Packed documents with padding, GQA (4 q heads on 2 kv heads), float32."""
    q, k, v = qkv(2, 256, 4, 2, 64, jnp.float32)
    segment_ids = packed_segments(2, 256)
    ref_out, ref_grads = output_and_grads(q, k, v, segment_ids)
    out, grads = output_and_grads(q, k, v, segment_ids, implementation="splash")
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(grad, ref, atol=1e-5, rtol=1e-5)


def relative_error(actual: jax.Array, reference: jax.Array) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    reference = jnp.asarray(reference, jnp.float32)
    return float(jnp.max(jnp.abs(actual - reference)) / jnp.max(jnp.abs(reference)))


def tiny_model(attention_impl: str, **overrides) -> ModelConfig:
    fields = dict(
        vocab_size=64, d_model=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64,
        mlp_dim=64, init_std=0.1, dtype="float32", attention=attention_impl,
    )  # fmt: skip
    return ModelConfig(**{**fields, **overrides})


def logits_and_grads(cfg: ModelConfig, constrain, tokens, segment_ids, positions):
    model = Llama(cfg, rngs=nnx.Rngs(0), constrain=constrain)
    cotangent = jax.random.normal(jax.random.key(2), (*tokens.shape, cfg.vocab_size))

    @nnx.jit
    def run(model):
        def loss(model):
            logits = model(tokens, segment_ids, positions)
            return jnp.sum(logits * cotangent), logits

        return nnx.grad(loss, has_aux=True)(model)

    grads, logits = run(model)
    return logits, nnx.to_pure_dict(grads)


def model_batch(batch: int, seq: int):
    segment_ids = packed_segments(batch, seq)
    tokens = jax.random.randint(jax.random.key(3), (batch, seq), 0, 64, dtype=jnp.int32)
    # positions restart at 0 in each document, as the data pipeline makes them
    starts = jnp.concatenate(
        [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    index = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    positions = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return tokens, segment_ids, positions.astype(jnp.int32)


@on_cpu
def test_splash_model_on_mesh_matches_xla():
    """The whole Llama on a (data 2, fsdp 2, tensor 2) mesh: splash runs under shard_map, batch
    on data*fsdp, heads on tensor; its one kv head cannot split, so it is repeated per q head."""
    mesh = mesh_lib.make(MeshConfig(data=2, fsdp=2, tensor=2))
    constrain = sharding.ActivationSharding.create(mesh, MeshConfig().rules)
    inputs = model_batch(4, 256)
    ref_logits, ref_grads = logits_and_grads(tiny_model("xla"), constrain, *inputs)
    logits, grads = logits_and_grads(tiny_model("splash"), constrain, *inputs)
    assert relative_error(logits, ref_logits) < 1e-5
    # float32 sums over 1024 tokens in another order: compared against each tensor's scale
    errors = jax.tree.map(relative_error, grads, ref_grads)
    assert max(jax.tree.leaves(errors)) < 1e-5, errors


def test_refusals_name_the_key():
    q, k, v = qkv(1, 256, 2, 2, 64, jnp.float32)
    segment_ids = jnp.ones((1, 256), jnp.int32)
    with pytest.raises(ConfigError, match=r"model.attention: splash cannot express per-row"):
        attention.attend(q, k, v, segment_ids, prefix=segment_ids, implementation="splash")
    short = [x[:, :200] for x in (q, k, v)]
    with pytest.raises(ConfigError, match=r"model.attention: splash needs .* multiple of 128"):
        attention.attend(*short, segment_ids[:, :200], implementation="splash")
    with pytest.raises(ConfigError, match=r"model.attention: cudnn needs bfloat16 or float16"):
        attention.attend(q, k, v, segment_ids, implementation="cudnn")
    with pytest.raises(ValueError, match=r"attention: cudnn needs model.dtype"):
        tiny_model("cudnn")
    with pytest.raises(ValueError, match=r"attention: cudnn needs a head size .* got 12"):
        tiny_model("cudnn", dtype="bfloat16", head_dim=12)


def test_splash_compiles_for_tpu(monkeypatch):
    """Forward and backward of the Llama with splash compile ahead of time for a v5e 2x2 slice
    (libtpu, no TPU needed) into the Mosaic kernels: the TPU path that CPU interpret mode cannot
    check (block sizes, layouts, shard_map over a real TPU mesh)."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    # other processes of the test run may hold libtpu's lock file; compiling needs no TPU
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = mesh_lib.make(MeshConfig(data=2, fsdp=1, tensor=2), devices)
    rules = MeshConfig().rules
    constrain = sharding.ActivationSharding.create(mesh, rules)
    cfg = tiny_model("splash", num_heads=4, num_kv_heads=2, head_dim=128, dtype="bfloat16")
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), constrain=constrain))
    params = state_lib.split_params(abstract)[1]
    shardings = sharding.param_shardings(state_lib.logical_names(abstract), params, mesh, rules)
    params = jax.tree.map(
        lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, shardings
    )
    batch = jax.ShapeDtypeStruct(
        (4, 1024), jnp.int32, sharding=sharding.batch_sharding(mesh, rules)
    )

    def loss(params, tokens, segment_ids, positions):
        model = state_lib.model_from_params(cfg, params, constrain)
        return jnp.mean(model(tokens, segment_ids, positions))

    compiled = jax.jit(jax.grad(loss)).lower(params, batch, batch, batch).compile()
    hlo = compiled.as_text()
    assert 'custom_call_target="tpu_custom_call"' in hlo
    for phase in ("fwd", "dq", "dkv"):
        assert f"splash_mha_{phase}_segmented" in hlo
    assert compiled.memory_analysis() is not None


CUDNN_FORWARD = "__cudnn$fmhaScaleBiasSoftmax"
CUDNN_BACKWARD = "__cudnn$fmhaScaleBiasSoftmaxBackward"


def lowered_for_cuda(monkeypatch, function, *args) -> tuple[dict[str, str], str]:
    """`function(*args)` exported for CUDA by jax.export on this CPU machine (no GPU): its custom
    calls (target: operand types) and the module text with its backend configs readable."""
    from jax import export
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    # jax asks the CUDA plugin for cuDNN's version before lowering; a release jax[cuda12] ships
    monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
    exported = export.export(
        jax.jit(function),
        platforms=["cuda"],
        disabled_checks=[
            export.DisabledSafetyCheck.custom_call(t) for t in (CUDNN_FORWARD, CUDNN_BACKWARD)
        ],
    )(*args)
    module = exported.mlir_module()
    calls = re.findall(r"custom_call @([\w$]+)\([^)]*\).*? : \(([^)]*)\)", module)
    targets = [target for target, _ in calls]
    assert len(targets) == len(set(targets)), targets
    return dict(calls), module.replace("\\22", '"')


def test_cudnn_model_lowers_for_cuda(monkeypatch):
    """Forward and backward of the bf16 Llama with cudnn lower for CUDA on this CPU machine: every
    layer's attention is one cuDNN flash call each way, causal, with the document mask as a
    (B,1,T,S) bias and the grouped kv heads not repeated; nothing else is a custom call. What
    compiling on a GPU then adds is cuDNN's own support check."""
    cfg = tiny_model("cudnn", num_heads=4, num_kv_heads=2, dtype="bfloat16", cpu_matmul="xla")
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    params = state_lib.split_params(abstract)[1]
    batch = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def loss(params, tokens, segment_ids, positions):
        model = state_lib.model_from_params(cfg, params)
        return jnp.mean(model(tokens, segment_ids, positions))

    calls, config = lowered_for_cuda(monkeypatch, jax.grad(loss), params, batch, batch, batch)
    # the layers are scanned: one call of each in the loop body
    assert sorted(calls) == [CUDNN_FORWARD, CUDNN_BACKWARD]
    q, k, v, bias = calls[CUDNN_FORWARD].split(", ")
    assert (q, k, v) == ("tensor<2x256x4x64xbf16>", *["tensor<2x256x2x64xbf16>"] * 2)
    assert bias == "tensor<2x1x256x256xbf16>"
    assert config.count('"mask_type": "CAUSAL"') == 2
    assert config.count('"is_flash_attention": true') == 2


def test_cudnn_prefix_lm_lowers_for_cuda(monkeypatch):
    """A prefix-LM mask holds causality itself: cuDNN gets it as the bias, with no causal mask."""
    q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    k = v = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
    segment_ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def loss(q, k, v, segment_ids):
        prefix = (jnp.arange(256) < 100)[None].repeat(2, 0)
        out = attention.attend(q, k, v, segment_ids, prefix=prefix, implementation="cudnn")
        return jnp.sum(out.astype(jnp.float32))

    grads = jax.grad(loss, argnums=(0, 1, 2))
    calls, config = lowered_for_cuda(monkeypatch, grads, q, k, v, segment_ids)
    assert sorted(calls) == [CUDNN_FORWARD, CUDNN_BACKWARD]
    assert calls[CUDNN_FORWARD].split(", ")[3] == "tensor<2x1x256x256xbf16>"
    assert config.count('"mask_type": "NO_MASK"') == 2
    assert config.count('"is_flash_attention": true') == 2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("prefix_lm", [False, True])
def test_cudnn_matches_xla_on_gpu(prefix_lm):
    """bf16 cudnn and bf16 xla, each against xla in float32 on the same bf16 inputs: cudnn's
    error must stay within twice xla's own bf16 error (`pytest -s` prints both)."""
    q, k, v = qkv(4, 1024, 8, 2, 128, jnp.bfloat16)
    segment_ids = packed_segments(4, 1024)
    prefix = (jnp.arange(1024) < 300)[None].repeat(4, 0) if prefix_lm else None
    ref = output_and_grads(*(x.astype(jnp.float32) for x in (q, k, v)), segment_ids, prefix=prefix)

    def errors(implementation):
        ours = output_and_grads(q, k, v, segment_ids, prefix=prefix, implementation=implementation)
        return jax.tree.leaves(jax.tree.map(relative_error, ours, ref))

    xla, cudnn = errors("xla"), errors("cudnn")
    print(f"prefix_lm={prefix_lm} relative error (out, dq, dk, dv): xla {xla} cudnn {cudnn}")
    for ours, theirs in zip(cudnn, xla, strict=True):
        assert ours <= 2 * theirs + 1e-3


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_model_matches_xla_on_gpu():
    """The whole bf16 Llama, logits and every parameter gradient, against the float32 model:
    cudnn's error within twice xla's bf16 error."""
    inputs = model_batch(4, 512)
    shape = dict(num_heads=4, num_kv_heads=2)
    ref = logits_and_grads(tiny_model("xla", **shape), None, *inputs)

    def errors(implementation):
        ours = logits_and_grads(
            tiny_model(implementation, dtype="bfloat16", **shape), None, *inputs
        )
        return jax.tree.map(relative_error, ours, ref)

    xla, cudnn = errors("xla"), errors("cudnn")
    print(f"relative errors (logits, grads): xla {xla} cudnn {cudnn}")
    for ours, theirs in zip(jax.tree.leaves(cudnn), jax.tree.leaves(xla), strict=True):
        assert ours <= 2 * theirs + 1e-3
