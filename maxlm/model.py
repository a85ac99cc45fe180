"""LLaMA decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU, stacked layers.

Einsum letters: B batch, T query length, S key length, D embed, N query heads, K key/value heads,
G query heads per kv head, H head dim, F mlp hidden, V vocab, L layers.

Parameter paths mirror Hugging Face's LlamaForCausalLM (`layers.self_attn.q_proj.kernel`, ...),
with the decoder layers stacked on a leading "layers" axis whether or not they run under scan, so
the checkpoint format does not depend on `scan_layers`. Weights carry logical axis names
(`vocab, embed, q_heads, kv_heads, head_dim, mlp, norm, layers`); activations go through a
caller-supplied `constrain(x, names)` with separate `act_*` names.

`Llama.decode` is the inference path of the same modules: it runs new tokens against a `KVCache`
(keys and values of all layers, stacked like the parameters) and writes theirs into it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from maxlm import attention, matmul
from maxlm.config import ModelConfig
from maxlm.sharding import target_devices, target_platform

Constrain = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]

HIDDEN = ("act_batch", "act_seq", "act_embed")
Q_HEADS = ("act_batch", "act_seq", "act_heads", "act_head_dim")
KV_HEADS = ("act_batch", "act_seq", "act_kv_heads", "act_head_dim")
MLP_HIDDEN = ("act_batch", "act_seq", "act_mlp")
LOGITS = ("act_batch", "act_seq", "act_vocab")
KV_CACHE = (None, "act_batch", "act_seq", "act_kv_heads", "act_head_dim")  # (L,B,S,K,H)
EMBED_TABLE = ("vocab", "act_embed")  # the table at lookup time: embed axis gathered

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    # weight matmuls have no dot_general batch dims; attention's QK^T and PV do, so they rerun
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def compute_dtype(name: str) -> jnp.dtype:
    """The activation dtype: "auto" is bfloat16 on TPU/GPU and float32 on CPU."""
    if name == "auto":
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("tpu", "gpu") else jnp.float32)
    return jnp.dtype(name)


def _unconstrained(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    return x


def _param(value: jax.Array, names: tuple[str, ...]) -> nnx.Param:
    # eager_sharding=False: shardings are applied later from the abstract state, not at creation
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


# --------------------------------------------------------------------------- layers


class Linear(nnx.Module):
    """A bias-free projection whose kernel may have several input/output axes."""

    def __init__(
        self,
        shape: tuple[int, ...],
        names: tuple[str, ...],
        *,
        init_std: float,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        gemm: matmul.Gemm,
        rngs: nnx.Rngs,
    ):
        init = jax.nn.initializers.normal(init_std)
        self.kernel = _param(init(rngs.params(), shape, param_dtype), names)
        self.dtype = dtype
        self.gemm = gemm

    def __call__(self, spec: str, x: jax.Array, out_dtype: DTypeLike | None = None) -> jax.Array:
        """`spec` contracts x's trailing axes with the kernel's leading ones (see
        `maxlm.matmul.einsum`); the result is in `out_dtype`, default the compute dtype."""
        return matmul.einsum(
            spec, x.astype(self.dtype), self.kernel[...], out_dtype or self.dtype,
            gemm=self.gemm,
        )  # fmt: skip


def project_together(x: jax.Array, *layers: Linear) -> list[jax.Array]:
    """x (..., D) through several Linears that read it, each kernel (D, *out): on CPU as one
    matmul (`maxlm.matmul.project`); in the layers' compute dtype."""
    first = layers[0]
    return matmul.project(
        x.astype(first.dtype), [layer.kernel[...] for layer in layers], first.dtype,
        gemm=first.gemm,
    )  # fmt: skip


def recomputed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn under jax.checkpoint keeping nothing: the backward pass reruns fn's elementwise work
    from fn's inputs instead of keeping what it computed, and skips fn's products, whose
    results no gradient needs. For the RMSNorms before projections and SwiGLU before down_proj:
    keeping their outputs costs a write, the layer scan's stacking and a copy back out each,
    recomputing one pass (benchmarks/NOTES.md, change 23). Remat policies around it are
    unaffected: they still keep or drop fn's outputs (the products) as before."""
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)


# makes a Linear from its kernel shape and logical names (initializer and dtypes already bound)
Dense = Callable[[tuple[int, ...], tuple[str, ...]], Linear]


class Embed(nnx.Module):
    """Token embedding table; `attend` is the tied output head."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        init_std: float,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        constrain: Constrain,
        rngs: nnx.Rngs,
    ):
        init = jax.nn.initializers.normal(init_std)
        table = init(rngs.params(), (vocab_size, d_model), param_dtype)
        self.embedding = _param(table, ("vocab", "embed"))
        self.dtype = dtype
        self.constrain = constrain

    def __call__(self, tokens: jax.Array) -> jax.Array:
        # Gather the fsdp-sharded embed axis before the lookup (as FSDP does for every weight);
        # otherwise the looked-up rows come out sharded on D and XLA rematerializes them whole.
        table = self.constrain(self.embedding[...], EMBED_TABLE)
        # gather first, then cast: only B*T rows change dtype, not the whole table
        return jnp.take(table, tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        table = self.embedding[...].astype(self.dtype)
        return jnp.einsum("BTD,VD->BTV", x, table, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 whatever the activation dtype."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, dtype: jnp.dtype):
        self.scale = _param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps, self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: DTypeLike) -> jax.Array:
    """x / rms(x) * scale over the last axis, in float32, cast to `dtype`. Its backward pass
    keeps x and the inverse rms (B,T,1); autodiff would keep float32 x, x^2 and x/rms as well
    (benchmarks/NOTES.md, change 13)."""
    return _rms_norm_fwd(x, scale, eps, dtype)[0]


def _inverse_rms(x: jax.Array, eps: float) -> jax.Array:
    return jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def _rms_norm_fwd(
    x: jax.Array, scale: jax.Array, eps: float, dtype: DTypeLike
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    inverse = _inverse_rms(x.astype(jnp.float32), eps)
    out = (x.astype(jnp.float32) * inverse * scale.astype(jnp.float32)).astype(dtype)
    return out, (x, scale, inverse)


def _rms_norm_bwd(
    eps: float,
    dtype: DTypeLike,
    residuals: tuple[jax.Array, jax.Array, jax.Array],
    grad: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    x, scale, inverse = residuals
    normed = x.astype(jnp.float32) * inverse
    grad = grad.astype(jnp.float32)
    grad_scale = jnp.sum(grad * normed, axis=tuple(range(x.ndim - 1)))
    grad_normed = grad * scale.astype(jnp.float32)
    # d(x r)/dx with r = rsqrt(mean(x^2) + eps): r (g - x r mean(g x r))
    grad_x = inverse * (
        grad_normed - normed * jnp.mean(grad_normed * normed, axis=-1, keepdims=True)
    )
    return grad_x.astype(x.dtype), grad_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rope_frequencies(
    head_dim: int,
    theta: float,
    kind: str = "none",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position: int = 8192,
) -> np.ndarray:
    """RoPE inverse frequencies (H/2,) with optional scaling; arguments match RopeScalingConfig."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "llama3":
        # HF transformers' _compute_llama3_parameters: short wavelengths are kept, long ones are
        # divided by `factor`, and those in between are interpolated smoothly.
        wavelen = 2 * np.pi / inv_freq
        smooth = (original_max_position / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen > original_max_position / low_freq_factor,
            inv_freq / factor,
            np.where(wavelen < original_max_position / high_freq_factor, inv_freq, smoothed),
        )
    elif kind != "none":
        raise ValueError(f"unknown RoPE scaling kind {kind!r}")
    return inv_freq.astype(np.float32)


def rope_sin_cos(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin and cos (B,T,H/2) of the rotation angles, in float32."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate (B,T,heads,H) in HF's rotate_half layout: dims i and i + H/2 form a pair."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        implementation: attention.Implementation,
        constrain: Constrain,
        dense: Dense,
    ):
        self.q_proj = dense((d_model, num_heads, head_dim), ("embed", "q_heads", "head_dim"))
        self.k_proj = dense((d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.v_proj = dense((d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.o_proj = dense((num_heads, head_dim, d_model), ("q_heads", "head_dim", "embed"))
        self.implementation = implementation
        self.constrain = constrain

    def __call__(
        self,
        x: jax.Array,
        sin: jax.Array,
        cos: jax.Array,
        segment_ids: jax.Array,
        prefix: jax.Array | None,
        *,
        norm: RMSNorm,
    ) -> jax.Array:
        """Attention over norm(x), which the backward pass recomputes from x (`recomputed`)."""
        project = recomputed(
            lambda x: project_together(norm(x), self.q_proj, self.k_proj, self.v_proj)
        )
        q, k, v = self._rotate(project(x), sin, cos)
        out = attention.attend(
            q, k, v, segment_ids, prefix=prefix, implementation=self.implementation,
            constrain=self.constrain, names=(Q_HEADS, KV_HEADS),
            mkl=matmul.by_mkl(self.o_proj.gemm, q.dtype),
        )  # fmt: skip
        return self.o_proj("BTNH,NHD->BTD", out)

    def decode(
        self,
        x: jax.Array,
        sin: jax.Array,
        cos: jax.Array,
        mask: jax.Array,
        cache: tuple[jax.Array, jax.Array],
        layer: jax.Array,
        index: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Write x's keys/values at slot `index` of layer `layer` of the stacked (L,B,S,K,H)
        `cache`, then attend from x (B,T,D) to that layer's slots under `mask` (B,1,T,S)."""
        q, k, v = self._rotate(project_together(x, self.q_proj, self.k_proj, self.v_proj), sin, cos)
        start = (layer, 0, index, 0, 0)
        cache_k = jax.lax.dynamic_update_slice(cache[0], k[None], start)
        cache_v = jax.lax.dynamic_update_slice(cache[1], v[None], start)
        keys = self.constrain(cache_k[layer], KV_HEADS)
        values = self.constrain(cache_v[layer], KV_HEADS)
        # Always XLA's attention: it takes any mask and cache length, and a decode step's one
        # query per row is bound by reading the cache, where a fused kernel gains little.
        out = jax.nn.dot_product_attention(q, keys, values, mask=mask, implementation="xla")
        return self.o_proj("BTNH,NHD->BTD", out), (cache_k, cache_v)

    def _rotate(
        self, qkv: list[jax.Array], sin: jax.Array, cos: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The projections' queries (B,T,N,H) and keys (B,T,K,H) rotated by RoPE, and values
        (B,T,K,H)."""
        q, k, v = qkv
        q = self.constrain(apply_rope(q, sin, cos), Q_HEADS)
        k = self.constrain(apply_rope(k, sin, cos), KV_HEADS)
        return q, k, self.constrain(v, KV_HEADS)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, mlp_dim: int, *, constrain: Constrain, dense: Dense):
        self.gate_proj = dense((d_model, mlp_dim), ("embed", "mlp"))
        self.up_proj = dense((d_model, mlp_dim), ("embed", "mlp"))
        self.down_proj = dense((mlp_dim, d_model), ("mlp", "embed"))
        self.constrain = constrain

    def __call__(self, x: jax.Array, *, norm: RMSNorm) -> jax.Array:
        """The MLP of norm(x); the backward pass recomputes norm(x) and the SwiGLU product
        (`recomputed`)."""
        gate, up = recomputed(lambda x: project_together(norm(x), self.gate_proj, self.up_proj))(x)
        return recomputed(self._down)(gate, up)

    def _down(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        return self.down_proj("BTF,FD->BTD", self.constrain(swiglu(gate, up), MLP_HIDDEN))


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up. Its backward pass keeps only gate and up and recomputes the sigmoid;
    autodiff would keep four tensors of this size per layer (benchmarks/NOTES.md, change 11)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(
    residuals: tuple[jax.Array, jax.Array], grad: jax.Array
) -> tuple[jax.Array, jax.Array]:
    gate, up = residuals
    sigmoid = jax.nn.sigmoid(gate)
    grad_up = grad * gate * sigmoid
    # d silu(g)/dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    grad_gate = grad * up * sigmoid * (1 + gate * (1 - sigmoid))
    return grad_gate.astype(gate.dtype), grad_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        mlp_dim: int,
        *,
        norm_eps: float,
        dropout: float,
        attention: attention.Implementation,
        constrain: Constrain,
        init_std: float,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        gemm: matmul.Gemm,
        rngs: nnx.Rngs,
    ):
        dense = functools.partial(
            Linear, init_std=init_std, param_dtype=param_dtype, dtype=dtype, gemm=gemm, rngs=rngs
        )
        norm = functools.partial(
            RMSNorm, d_model, eps=norm_eps, param_dtype=param_dtype, dtype=dtype
        )
        self.input_layernorm = norm()
        self.self_attn = Attention(
            d_model, num_heads, num_kv_heads, head_dim,
            implementation=attention, constrain=constrain, dense=dense,
        )  # fmt: skip
        self.post_attention_layernorm = norm()
        self.mlp = MLP(d_model, mlp_dim, constrain=constrain, dense=dense)
        self.dropout = dropout
        self.constrain = constrain

    def __call__(
        self,
        x: jax.Array,
        sin: jax.Array,
        cos: jax.Array,
        segment_ids: jax.Array,
        prefix: jax.Array | None,
        key: jax.Array | None,
    ) -> jax.Array:
        """`key` is this layer's dropout key, or None for no dropout."""
        attn_key, mlp_key = (None, None) if key is None else jax.random.split(key)
        h = self.self_attn(x, sin, cos, segment_ids, prefix, norm=self.input_layernorm)
        x = self.constrain(x + _dropout(h, self.dropout, attn_key), HIDDEN)
        h = self.mlp(x, norm=self.post_attention_layernorm)
        return self.constrain(x + _dropout(h, self.dropout, mlp_key), HIDDEN)

    def decode(
        self,
        x: jax.Array,
        sin: jax.Array,
        cos: jax.Array,
        mask: jax.Array,
        cache: tuple[jax.Array, jax.Array],
        layer: jax.Array,
        index: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The block without dropout, attending through the cache (see `Attention.decode`)."""
        h, cache = self.self_attn.decode(
            self.input_layernorm(x), sin, cos, mask, cache, layer, index
        )
        x = self.constrain(x + h, HIDDEN)
        x = self.constrain(x + self.mlp(x, norm=self.post_attention_layernorm), HIDDEN)
        return x, cache


# --------------------------------------------------------------------------- model


class KVCache(flax.struct.PyTreeNode):
    """What decoding keeps between calls. `k`, `v` (L,B,S,K,H): every layer's keys (after RoPE)
    and values in the compute dtype; `valid` (B,S) bool: the slot holds a real token (not left
    padding, not yet written); `index` () int32: the slot the next tokens go to, shared by all
    rows (prompts of different lengths are left-padded, so every row fills the same slots)."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def length(self) -> int:
        """S, the most tokens (prompt and padding included) a row can hold."""
        return self.valid.shape[1]


class Llama(nnx.Module):
    """LLaMA causal LM: tokens, segment ids, positions (int32 [B,T]) -> float32 logits [B,T,V].

    Packed documents are separated by `segment_ids` (0 = padding) and `positions` restart at 0 in
    each, so no token attends across a document boundary. The model holds only nnx.Params; dropout
    draws from the `dropout_rng` key passed to each call, so a jitted step stays a pure function.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, constrain: Constrain | None = None):
        self.constrain = constrain or _unconstrained
        dtype = compute_dtype(cfg.dtype)
        param_dtype = jnp.dtype(cfg.param_dtype)
        init_std = cfg.init_std
        # XLA:CPU wants explicit transposes in the backward pass, or MKL (see maxlm.matmul)
        self.gemm = matmul.choose_gemm(
            target_platform(self.constrain), target_devices(self.constrain), cfg.cpu_matmul
        )
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.d_model, init_std=init_std, param_dtype=param_dtype, dtype=dtype,
            constrain=self.constrain, rngs=rngs,
        )  # fmt: skip

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(
                cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.mlp_dim,
                norm_eps=cfg.norm_eps, dropout=cfg.dropout, attention=cfg.attention,
                constrain=self.constrain, init_std=init_std, param_dtype=param_dtype,
                dtype=dtype, gemm=self.gemm, rngs=rngs,
            )  # fmt: skip

        self.layers = stacked_layers(rngs)
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype, dtype=dtype)
        head = functools.partial(
            Linear, init_std=init_std, param_dtype=param_dtype, dtype=dtype, gemm=self.gemm,
            rngs=rngs,
        )  # fmt: skip
        self.lm_head = (
            None if cfg.tie_embeddings else head((cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
        )
        # a tuple of floats is static and hashable, so equal configs give equal graphdefs
        inv_freq = rope_frequencies(cfg.head_size, cfg.rope_theta, **cfg.rope_scaling.model_dump())
        self.inv_freq = tuple(float(f) for f in inv_freq)
        self.num_layers = cfg.num_layers
        self.dropout = cfg.dropout
        self.scan_layers = cfg.scan_layers
        self.remat = cfg.remat

    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array,
        positions: jax.Array,
        *,
        prefix: jax.Array | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Logits; dropout (rate > 0, not deterministic) needs `dropout_rng`. `prefix` (nonzero
        [B,T]) marks tokens of a bidirectional prefix (prefix LM): they see each other."""
        hidden = self.hidden(
            tokens, segment_ids, positions,
            prefix=prefix, deterministic=deterministic, dropout_rng=dropout_rng,
        )  # fmt: skip
        return self._head(hidden)

    def hidden(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array,
        positions: jax.Array,
        *,
        prefix: jax.Array | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """The final-normed activations (B,T,D) that the output head turns into logits
        (arguments as for `__call__`); training feeds them to a fused head and loss."""
        x = self.constrain(self.embed_tokens(tokens), HIDDEN)
        sin, cos = rope_sin_cos(positions, jnp.asarray(self.inv_freq, jnp.float32))
        keys = None  # one dropout key per layer; None compiles to no dropout at all
        if self.dropout > 0 and not deterministic:
            if dropout_rng is None:
                raise ValueError("dropout > 0 with deterministic=False needs a dropout_rng key")
            keys = jax.random.split(dropout_rng, self.num_layers)
        return self.norm(self._decoder_layers(x, sin, cos, segment_ids, prefix, keys))

    def output_head(self) -> tuple[jax.Array, int]:
        """The output matrix as stored, (D,V) or the tied embedding (V,D), and its vocab axis."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...], 0
        return self.lm_head.kernel[...], 1

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty cache for `batch` rows of at most `length` tokens each."""
        num_layers, _, kv_heads, head_dim = self.layers.self_attn.k_proj.kernel.shape
        zeros = jnp.zeros((num_layers, batch, length, kv_heads, head_dim), self.embed_tokens.dtype)
        return KVCache(
            k=self.constrain(zeros, KV_CACHE),
            v=self.constrain(zeros, KV_CACHE),
            valid=jnp.zeros((batch, length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        token_mask: jax.Array | None = None,
        *,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        """Run tokens (B,T) at RoPE `positions` (B,T) after the cached ones: their keys/values go
        to slots index..index+T-1 (which must fit in the cache: nothing checks it under jit), each
        attending to the valid slots up to its own. `token_mask` (B,T) is False for left padding.
        Returns float32 logits (B,T,V), or (B,1,V) of the last column with `last_only`, and the
        updated cache. Prefill and each decode step are both one call."""
        if token_mask is None:
            token_mask = jnp.ones(tokens.shape, bool)
        valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache.index))
        query_slot = cache.index + jnp.arange(tokens.shape[1])[:, None]  # (T,1)
        key_slot = jnp.arange(cache.length)[None, :]  # (1,S)
        # Padding still sees itself, so no softmax row is empty (as in __call__).
        sees = (valid[:, None, :] | (key_slot == query_slot)) & (key_slot <= query_slot)
        mask = sees[:, None]  # (B,1,T,S): the same for every head
        x = self.constrain(self.embed_tokens(tokens), HIDDEN)
        sin, cos = rope_sin_cos(positions, jnp.asarray(self.inv_freq, jnp.float32))
        graphdef = nnx.graphdef(self.layers)

        def layer(
            carry: tuple[jax.Array, tuple[jax.Array, jax.Array]],
            layer_state: nnx.State,
            i: jax.Array,
        ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            x, kv = carry
            return nnx.merge(graphdef, layer_state).decode(x, sin, cos, mask, kv, i, cache.index)

        # The whole cache is the carry, so each layer updates its T new slots in place.
        x, (k, v) = self._each_layer(layer, (x, (cache.k, cache.v)), jnp.arange(self.num_layers))
        logits = self._logits(x[:, -1:] if last_only else x)
        return logits, KVCache(k=k, v=v, valid=valid, index=cache.index + tokens.shape[1])

    def _logits(self, x: jax.Array) -> jax.Array:
        """Final norm and output head: float32 logits (B,T,V)."""
        return self._head(self.norm(x))

    def _head(self, x: jax.Array) -> jax.Array:
        """Float32 logits (B,T,V) of final-normed activations."""
        if self.lm_head is None:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head("BTD,DV->BTV", x, out_dtype=jnp.float32)
        return self.constrain(logits, LOGITS)

    def _decoder_layers(
        self,
        x: jax.Array,
        sin: jax.Array,
        cos: jax.Array,
        segment_ids: jax.Array,
        prefix: jax.Array | None,
        keys: jax.Array | None,
    ) -> jax.Array:
        """The training forward through the stacked layers, with remat if configured."""
        graphdef = nnx.graphdef(self.layers)

        def layer(x: jax.Array, layer_state: nnx.State, key: jax.Array | None) -> jax.Array:
            return nnx.merge(graphdef, layer_state)(x, sin, cos, segment_ids, prefix, key)

        if self.remat != "none":
            # CSE prevention is only needed outside scan; inside it just blocks optimizations
            layer = jax.checkpoint(
                layer, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers
            )
        return self._each_layer(layer, x, keys)

    def _each_layer(self, layer: Callable[[Any, nnx.State, Any], Any], carry: Any, xs: Any) -> Any:
        """carry = layer(carry, state of layer i, xs[i]) for each layer, under lax.scan or
        unrolled (`scan_layers`); the parameters are the same either way."""
        state = nnx.state(self.layers)
        if self.scan_layers:
            carry, _ = jax.lax.scan(lambda c, xs_i: (layer(c, *xs_i), None), carry, (state, xs))
            return carry
        for i in range(self.num_layers):
            carry = layer(carry, *jax.tree.map(lambda a, i=i: a[i], (state, xs)))
        return carry
