"""LLaMA model: shapes, parameter tree, packing masks, RoPE, scan/remat equivalence, GQA, dtypes."""

import contextlib
import io

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxlm.config import ModelConfig, RopeScalingConfig
from maxlm.model import (
    EMBED_TABLE,
    HIDDEN,
    KV_HEADS,
    LOGITS,
    MLP_HIDDEN,
    Q_HEADS,
    Llama,
    apply_rope,
    compute_dtype,
    rms_norm,
    rope_frequencies,
    rope_sin_cos,
    swiglu,
)

V, D, L, N, K, H, F = 64, 32, 2, 4, 2, 8, 48


def tiny(**overrides) -> ModelConfig:
    # init_std 0.1 (not 0.02) so that a leak across documents is far above the tolerances
    fields = dict(vocab_size=V, d_model=D, num_layers=L, num_heads=N, num_kv_heads=K, mlp_dim=F)
    return ModelConfig(**{**fields, "init_std": 0.1, "dtype": "float32", **overrides})


def make(seed: int = 0, **overrides) -> Llama:
    return Llama(tiny(**overrides), rngs=nnx.Rngs(seed))


@nnx.jit(static_argnames="deterministic")
def forward(model, tokens, segment_ids, positions, deterministic=True, dropout_rng=None):
    return model(
        tokens, segment_ids, positions, deterministic=deterministic, dropout_rng=dropout_rng
    )


def batch(b: int = 2, t: int = 16, seed: int = 0):
    tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, V, dtype=jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return tokens, jnp.ones((b, t), jnp.int32), positions


def params(model: Llama) -> dict:
    return nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])


def flat(tree: dict) -> dict[str, object]:
    return {
        ".".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


# --------------------------------------------------------------------------- shapes and parameters


@pytest.mark.parametrize("tie", [False, True])
def test_logits_shape_and_dtype(tie):
    logits = forward(make(tie_embeddings=tie), *batch(b=2, t=8))
    assert logits.shape == (2, 8, V)
    assert logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("tie", [False, True])
def test_param_tree_mirrors_hugging_face(tie):
    model = nnx.eval_shape(lambda: make(tie_embeddings=tie))
    Q, KV = ("q_heads", "head_dim"), ("kv_heads", "head_dim")
    expected = {
        "embed_tokens.embedding": ((V, D), ("vocab", "embed")),
        "layers.self_attn.q_proj.kernel": ((L, D, N, H), ("layers", "embed", *Q)),
        "layers.self_attn.k_proj.kernel": ((L, D, K, H), ("layers", "embed", *KV)),
        "layers.self_attn.v_proj.kernel": ((L, D, K, H), ("layers", "embed", *KV)),
        "layers.self_attn.o_proj.kernel": ((L, N, H, D), ("layers", *Q, "embed")),
        "layers.mlp.gate_proj.kernel": ((L, D, F), ("layers", "embed", "mlp")),
        "layers.mlp.up_proj.kernel": ((L, D, F), ("layers", "embed", "mlp")),
        "layers.mlp.down_proj.kernel": ((L, F, D), ("layers", "mlp", "embed")),
        "layers.input_layernorm.scale": ((L, D), ("layers", "norm")),
        "layers.post_attention_layernorm.scale": ((L, D), ("layers", "norm")),
        "norm.scale": ((D,), ("norm",)),
    }
    if not tie:
        expected["lm_head.kernel"] = ((D, V), ("embed", "vocab"))
    shapes = {path: leaf.shape for path, leaf in flat(params(model)).items()}
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model)))
    names = {path: tuple(spec) for path, spec in flat(specs).items()}
    assert shapes == {path: shape for path, (shape, _) in expected.items()}
    assert names == {path: axes for path, (_, axes) in expected.items()}


def test_initialization():
    p = flat(params(make(init_std=0.02)))
    assert bool((p["norm.scale"] == 1).all())
    assert bool((p["layers.input_layernorm.scale"] == 1).all())
    for path in ["embed_tokens.embedding", "layers.mlp.up_proj.kernel", "lm_head.kernel"]:
        assert float(jnp.std(p[path])) == pytest.approx(0.02, rel=0.1)
    # each stacked layer gets its own initialization
    q = p["layers.self_attn.q_proj.kernel"]
    assert not bool((q[0] == q[1]).all())


def test_param_dtype():
    abstract = flat(params(nnx.eval_shape(lambda: make(param_dtype="bfloat16"))))
    assert {leaf.dtype for leaf in abstract.values()} == {jnp.dtype(jnp.bfloat16)}


def test_compute_dtype():
    assert compute_dtype("auto") == jnp.float32  # tests run on CPU
    assert compute_dtype("bfloat16") == jnp.bfloat16
    assert compute_dtype("float16") == jnp.float16


def test_constrain_sees_every_activation_kind():
    seen = set()

    def record(x, names):
        assert x.ndim == len(names)
        seen.add(names)
        return x

    model = nnx.eval_shape(lambda: Llama(tiny(), rngs=nnx.Rngs(0), constrain=record))
    nnx.eval_shape(lambda model: model(*batch(b=1, t=4)), model)  # tracing is enough
    assert seen == {EMBED_TABLE, HIDDEN, Q_HEADS, KV_HEADS, MLP_HIDDEN, LOGITS}


# --------------------------------------------------------------------------- forward and masking


def packed_batch(doc1, doc2, pad: int):
    tokens = jnp.array([[*doc1, *doc2, *[0] * pad]], jnp.int32)
    segments = jnp.array([[1] * len(doc1) + [2] * len(doc2) + [0] * pad], jnp.int32)
    positions = jnp.array([[*range(len(doc1)), *range(len(doc2)), *range(pad)]], jnp.int32)
    return tokens, segments, positions


def numpy_reference(p: dict, cfg: ModelConfig, tokens, segment_ids, positions) -> np.ndarray:
    """Hugging Face's LlamaForCausalLM forward written out in float64 numpy: rotate_half RoPE,
    repeat_kv for GQA, causal mask within each segment."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    tokens, segment_ids, positions = map(np.asarray, (tokens, segment_ids, positions))

    def rms_norm(x, scale):
        return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + cfg.norm_eps) * scale

    def rotate_half(x):
        return np.concatenate([-x[..., H // 2 :], x[..., : H // 2]], axis=-1)

    freqs = positions[..., None] * (1.0 / cfg.rope_theta ** (np.arange(0, H, 2) / H))
    angles = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # B T 1 H
    t = tokens.shape[1]
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = (np.tril(np.ones((t, t), bool)) & same_doc)[:, None]  # B 1 T S
    x = p["embed_tokens"]["embedding"][tokens]
    for i in range(cfg.num_layers):
        layer = jax.tree.map(lambda a, i=i: a[i], p["layers"])
        attn, mlp = layer["self_attn"], layer["mlp"]
        h = rms_norm(x, layer["input_layernorm"]["scale"])
        q, k, v = (np.einsum("btd,dnh->btnh", h, attn[f"{n}_proj"]["kernel"]) for n in "qkv")
        q, k = (y * np.cos(angles) + rotate_half(y) * np.sin(angles) for y in (q, k))
        k, v = (np.repeat(y, N // K, axis=2) for y in (k, v))
        scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
        weights = np.exp(np.where(allowed, scores, -np.inf) - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + np.einsum("bnts,bsnh,nhd->btd", weights, v, attn["o_proj"]["kernel"])
        h = rms_norm(x, layer["post_attention_layernorm"]["scale"])
        gate, up = h @ mlp["gate_proj"]["kernel"], h @ mlp["up_proj"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ mlp["down_proj"]["kernel"]
    return rms_norm(x, p["norm"]["scale"]) @ p["lm_head"]["kernel"]


def test_matches_numpy_reference():
    model = make()
    inputs = packed_batch([5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16], pad=4)
    expected = numpy_reference(params(model), tiny(), *inputs)
    np.testing.assert_allclose(forward(model, *inputs), expected, rtol=1e-4, atol=1e-5)


def test_packed_documents_are_isolated():
    model = make()
    doc1, doc2 = [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]
    packed = forward(model, *packed_batch(doc1, doc2, pad=4))
    alone = forward(model, *packed_batch(doc2, [], pad=0))
    second = slice(len(doc1), len(doc1) + len(doc2))
    np.testing.assert_allclose(packed[0, second], alone[0], rtol=0, atol=1e-6)
    assert bool(jnp.isfinite(packed).all())  # padding rows included

    other = forward(model, *packed_batch([1, 2, 3, 4, 60], doc2, pad=4))
    np.testing.assert_allclose(other[0, second], packed[0, second], rtol=0, atol=1e-6)
    # the check above can see a leak: with one shared segment, document 1 does change document 2
    tokens, _, positions = packed_batch([1, 2, 3, 4, 60], doc2, pad=4)
    leaky = forward(model, tokens, jnp.ones_like(tokens), positions)
    assert float(jnp.abs(leaky[0, second] - packed[0, second]).max()) > 1e-3


def test_causal():
    model = make()
    tokens, segments, positions = batch(b=2, t=16)
    logits = forward(model, tokens, segments, positions)
    changed = forward(model, tokens.at[:, 10].set((tokens[:, 10] + 1) % V), segments, positions)
    np.testing.assert_allclose(changed[:, :10], logits[:, :10], rtol=0, atol=1e-6)
    assert float(jnp.abs(changed[:, 10:] - logits[:, 10:]).max()) > 1e-3


# --------------------------------------------------------------------------- RoPE


def llama3_reference(inv_freq, factor, low, high, old_context):
    """Meta's reference `apply_scaling`, one frequency at a time."""
    out = []
    for freq in inv_freq:
        wavelen = 2 * np.pi / freq
        if wavelen < old_context / high:
            out.append(freq)
        elif wavelen > old_context / low:
            out.append(freq / factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


@pytest.mark.parametrize("kind", ["none", "linear", "llama3"])
def test_rope_frequencies(kind):
    head_dim, theta = 128, 500000.0
    scaling = RopeScalingConfig(kind=kind, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    base = np.array([1.0 / theta ** (2 * i / head_dim) for i in range(head_dim // 2)])
    expected = {
        "none": base,
        "linear": base / 8.0,
        "llama3": llama3_reference(base, 8.0, 1.0, 4.0, 8192),
    }[kind]
    got = rope_frequencies(head_dim, theta, **scaling.model_dump())
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    if kind == "llama3":  # all three regions are exercised: kept, divided, interpolated
        ratio = expected / base
        assert ratio[0] == 1 and ratio[-1] == pytest.approx(1 / 8)
        assert ((ratio > 1 / 8 + 1e-6) & (ratio < 1 - 1e-6)).any()


def test_rope_preserves_norm_and_depends_on_relative_position():
    inv_freq = jnp.asarray(rope_frequencies(16, 10000.0))
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 16))

    def rotate(x, position):
        sin, cos = rope_sin_cos(jnp.array([[position]], jnp.int32), inv_freq)
        return apply_rope(x, sin, cos)

    np.testing.assert_allclose(jnp.linalg.norm(rotate(q, 37)), jnp.linalg.norm(q), rtol=1e-6)
    dot = lambda m, n: float(jnp.sum(rotate(q, m) * rotate(k, n)))  # noqa: E731
    # float32 angles lose ~1e-7 * position radians, hence rel=1e-5 at position 1000
    assert dot(3, 1) == pytest.approx(dot(103, 101), rel=1e-5)
    assert dot(9, 0) == pytest.approx(dot(1009, 1000), rel=1e-5)
    assert abs(dot(3, 1) - dot(3, 2)) > 1e-3


# --------------------------------------------------------------------------- layer execution


def test_scan_matches_unrolled():
    scanned, unrolled = make(scan_layers=True), make(scan_layers=False)
    jax.tree.map(np.testing.assert_array_equal, params(scanned), params(unrolled))
    inputs = batch()
    np.testing.assert_allclose(forward(scanned, *inputs), forward(unrolled, *inputs), atol=1e-6)


def loss_and_grads(model: Llama, inputs):
    graphdef, state = nnx.split(model, nnx.Param)

    def loss(state):
        logits = nnx.merge(graphdef, state)(*inputs)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    return jax.jit(jax.value_and_grad(loss))(state)


def test_remat_policies_agree():
    inputs = batch()
    reference = loss_and_grads(make(remat="none", scan_layers=False), inputs)
    # unrolled layers use jax.checkpoint's prevent_cse=True, scanned ones False: cover both
    for remat, scan in [("full", True), ("dots_saveable", True), ("minimal", False)]:
        model = make(remat=remat, scan_layers=scan)
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(*inputs))(state)  # noqa: B023
        assert "remat" in str(jaxpr)
        loss, grads = loss_and_grads(model, inputs)
        np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            nnx.to_pure_dict(grads),
            nnx.to_pure_dict(reference[1]),
        )


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_query_attention_matches_repeated_heads(kv_heads):
    """GQA/MQA equals full multi-head attention with each kv head repeated for its query group
    (q head n reads kv head n // G, as in Hugging Face's repeat_kv)."""
    gqa = make(num_kv_heads=kv_heads)
    weights = params(gqa)
    for name in ["k_proj", "v_proj"]:
        proj = weights["layers"]["self_attn"][name]
        proj["kernel"] = jnp.repeat(proj["kernel"], N // kv_heads, axis=2)  # (L,D,K,H) -> (L,D,N,H)
    graphdef, state = nnx.split(make(num_kv_heads=N))
    nnx.replace_by_pure_dict(state, weights)
    mha = nnx.merge(graphdef, state)
    inputs = batch()
    # the two groupings sum in different orders: float32 rounding (~1e-6 of logits ~1), nothing more
    np.testing.assert_allclose(forward(gqa, *inputs), forward(mha, *inputs), rtol=1e-5, atol=2e-6)


def test_bfloat16_compute_is_close_to_float32():
    inputs = batch()
    f32 = forward(make(dtype="float32"), *inputs)
    bf16 = forward(make(dtype="bfloat16"), *inputs)
    assert bf16.dtype == jnp.float32
    assert bool(jnp.isfinite(bf16).all())
    assert float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32)) < 3e-2


def test_dropout():
    inputs = batch()
    model = make(dropout=0.3)
    plain = forward(make(dropout=0.0), *inputs)
    np.testing.assert_array_equal(forward(model, *inputs), plain)  # deterministic: no dropout
    key = jax.random.key(1)
    first = forward(model, *inputs, deterministic=False, dropout_rng=key)
    assert float(jnp.abs(first - plain).max()) > 1e-3
    again = forward(model, *inputs, deterministic=False, dropout_rng=key)
    np.testing.assert_array_equal(again, first)  # the key alone decides the mask
    other = forward(model, *inputs, deterministic=False, dropout_rng=jax.random.key(2))
    assert float(jnp.abs(other - first).max()) > 1e-3
    with pytest.raises(ValueError, match="dropout_rng"):
        model(*inputs, deterministic=False)

    def jaxpr(model):
        graphdef, state = nnx.split(model)

        def call(state):
            return nnx.merge(graphdef, state)(*inputs, deterministic=False, dropout_rng=key)

        return str(jax.make_jaxpr(call)(state))

    assert "random_bits" in jaxpr(model)
    assert "random_bits" not in jaxpr(make(dropout=0.0))


@nnx.jit
def forward_prefix(model, tokens, segment_ids, positions, prefix):
    return model(tokens, segment_ids, positions, prefix=prefix)


def test_prefix_is_bidirectional_and_the_rest_causal():
    """A prefix-LM row: tokens of the prefix see the whole prefix (a later prefix token changes
    earlier logits), never the suffix; an all-zero prefix is the causal model exactly."""
    model = make()
    tokens, segment_ids, positions = batch(b=1)
    segment_ids = segment_ids.at[0, 10:].set(2)  # a second document from position 10
    positions = positions.at[0, 10:].add(-10)
    prefix = jnp.zeros_like(tokens).at[0, :4].set(1).at[0, 10:12].set(1)
    base = forward_prefix(model, tokens, segment_ids, positions, prefix)
    causal = forward(model, tokens, segment_ids, positions)
    np.testing.assert_allclose(
        forward_prefix(model, tokens, segment_ids, positions, jnp.zeros_like(prefix)),
        causal, rtol=1e-5, atol=1e-6,
    )  # fmt: skip

    def changed(at):
        other = tokens.at[0, at].set((tokens[0, at] + 1) % V)
        out = forward_prefix(model, other, segment_ids, positions, prefix)
        return np.abs(np.asarray(out - base)).max(axis=-1)[0] > 1e-6

    assert changed(3)[:3].all(), "the last prefix token is seen by the first ones"
    assert not changed(5)[:5].any(), "the suffix is not seen by the prefix or before it"
    assert changed(11)[10] and not changed(11)[:10].any(), "a prefix stays in its document"


def assert_close_to_autodiff(got, want, tolerance: float) -> None:
    """Values and gradients, dtypes equal, within `tolerance` of the reference's largest value."""
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == e.dtype
        e = np.asarray(e, np.float32)
        np.testing.assert_allclose(
            np.asarray(g, np.float32), e, rtol=tolerance, atol=tolerance * np.abs(e).max()
        )


def saved_residuals(fn, *args) -> list[str]:
    """Types (e.g. "f32[3,5,1]") of what autodiff keeps for fn's backward pass, constants aside."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    lines = [line for line in out.getvalue().splitlines() if "constant" not in line]
    return sorted(line.split(" ")[0] for line in lines)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_backward_equals_autodiff_and_keeps_two_tensors(dtype):
    keys = jax.random.split(jax.random.key(3), 3)
    gate, up = (3 * jax.random.normal(k, (4, 5, 6)).astype(dtype) for k in keys[:2])
    weights = jax.random.normal(keys[2], (4, 5, 6))

    def loss(activation, gate, up):
        return jnp.sum(activation(gate, up).astype(jnp.float32) * weights)

    def plain(g, u):
        return jax.nn.silu(g) * u

    want = jax.value_and_grad(loss, argnums=(1, 2))(plain, gate, up)
    got = jax.value_and_grad(loss, argnums=(1, 2))(swiglu, gate, up)
    assert_close_to_autodiff(got, want, 1e-6 if dtype == jnp.float32 else 2e-2)

    def kept(activation):
        kept = saved_residuals(lambda g, u: loss(activation, g, u), gate, up)
        return len([shape for shape in kept if shape.endswith("[4,5,6]")])

    assert kept(swiglu) == 2 < kept(plain)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_backward_equals_autodiff_and_keeps_input_and_statistic(dtype):
    keys = jax.random.split(jax.random.key(4), 3)
    x = (2 * jax.random.normal(keys[0], (3, 5, 16))).astype(dtype)
    scale = 1 + 0.1 * jax.random.normal(keys[1], (16,))
    weights = jax.random.normal(keys[2], (3, 5, 16))

    def plain(x, scale, eps, dtype):
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
        return (x * scale.astype(jnp.float32)).astype(dtype)

    def loss(norm, x, scale):
        return jnp.sum(norm(x, scale, 1e-5, dtype).astype(jnp.float32) * weights)

    want = jax.value_and_grad(loss, argnums=(1, 2))(plain, x, scale)
    got = jax.value_and_grad(loss, argnums=(1, 2))(rms_norm, x, scale)
    assert_close_to_autodiff(got, want, 1e-5 if dtype == jnp.float32 else 2e-2)

    def kept(norm):
        """(B,T,...) residuals: x and what derives from it."""
        kept = saved_residuals(lambda x: loss(norm, x, scale), x)
        return [shape for shape in kept if shape.split("[")[1].startswith("3,5,")]

    x_type = "f32" if dtype == jnp.float32 else "bf16"
    assert kept(rms_norm) == sorted([f"{x_type}[3,5,16]", "f32[3,5,1]"])
    assert len(kept(plain)) > 2
