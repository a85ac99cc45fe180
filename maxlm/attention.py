"""Causal self-attention over packed documents, by implementation.

q (B,T,N,H), k and v (B,S,K,H) with N a multiple of K (grouped-query attention), and the
batch's `segment_ids` (B,T): 0 is padding, tokens attend only within their own document and
causally. An optional `prefix` (B,T, nonzero = in the bidirectional prefix of a prefix-LM
objective) lets prefix tokens see each other.

Implementations (`model.attention`, docs/attention.md): "xla" (any backend), "cudnn" (cuDNN
flash attention on NVIDIA GPUs, through jax.nn.dot_product_attention), "splash" (the Pallas
splash-attention kernel for TPU; on CPU it runs in Pallas interpret mode, for tests).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal, cast

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
    splash_attention_mask as splash_mask,
)
from jax.sharding import Mesh, PartitionSpec

from maxlm import mkl as mkl_kernels
from maxlm.config import ConfigError
from maxlm.sharding import ActivationSharding, Rules, partition_spec, target_platform

Implementation = Literal["xla", "cudnn", "splash"]
Constrain = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]

# Splash tiles: the largest of these dividing the sequence (MaxText's default is 512).
SPLASH_BLOCKS = (512, 256, 128)
# The xla path's causal query blocks (`causal_block`): benchmarks/NOTES.md, change 7.
CAUSAL_BLOCK_MIN = 256
CAUSAL_BLOCKS = 8


def document_mask(segment_ids: jax.Array, prefix: jax.Array | None = None) -> jax.Array:
    """(B,1,T,S) bool: same document, and inside a shared prefix if `prefix` is given (the
    causal part is added by the attention call). Padding still sees itself, so no softmax row
    is empty."""
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    if prefix is not None:
        seq = jnp.arange(segment_ids.shape[1])
        in_prefix = prefix != 0
        causal = seq[:, None] >= seq[None, :]
        mask &= causal | (in_prefix[:, :, None] & in_prefix[:, None, :])
    return mask[:, None]


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    prefix: jax.Array | None = None,
    implementation: Implementation = "xla",
    constrain: Constrain | None = None,
    names: tuple[Sequence[str | None], Sequence[str | None]] | None = None,
    mkl: bool = False,
) -> jax.Array:
    """Attention output (B,T,N,H) in q's dtype. `constrain` (the model's activation sharding)
    and the logical `names` of q and k let splash run per shard of the mesh. `mkl` (the layers'
    products run in MKL): the xla path's causal self-attention runs as `maxlm.mkl.attention`
    (one-device CPU, float32 compute)."""
    if implementation == "splash":
        return _splash(q, k, v, segment_ids, prefix, constrain, names)
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ConfigError(
            f"model.attention: cudnn needs bfloat16 or float16 activations, got {q.dtype} "
            "(set model.dtype=bfloat16, or model.attention=xla)"
        )
    if implementation == "cudnn":
        return _fused(q, k, v, segment_ids, prefix, implementation)
    if mkl and prefix is None and q.shape[1] == k.shape[1]:
        return mkl_kernels.attention(q, k, v, segment_ids)
    # Recomputed in the backward pass, as fused kernels do: the (B,N,T,S) float32 probabilities
    # of every layer are then never stored (268 MB per step on `small`, GiBs at 4K tokens).
    block = causal_block(q.shape[1])
    if prefix is None and q.shape[1] == k.shape[1] and block < q.shape[1]:
        return jax.checkpoint(_causal_blocks, static_argnums=(4,))(q, k, v, segment_ids, block)
    return jax.checkpoint(_fused, static_argnums=(5,))(q, k, v, segment_ids, prefix, "xla")


def causal_block(length: int) -> int:
    """Query block of the xla path: at least CAUSAL_BLOCK_MIN (smaller dots run slower than the
    skipped work saves, measured) and at most CAUSAL_BLOCKS blocks (each is its own code in the
    compiled layer); the whole sequence when no such block divides it."""
    block = max(CAUSAL_BLOCK_MIN, -(-length // CAUSAL_BLOCKS))
    while block < length and length % block:
        block += 1
    return block


def _causal_blocks(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int
) -> jax.Array:
    """Causal attention `block` queries at a time, each against only the keys up to its own
    last position: the masked upper triangle of QK^T, its softmax and PV are never computed."""
    outputs = []
    for start in range(0, q.shape[1], block):
        end = start + block
        rows = jnp.arange(start, end)[:, None]
        cols = jnp.arange(end)[None, :]
        mask = (segment_ids[:, start:end, None] == segment_ids[:, None, :end]) & (rows >= cols)
        outputs.append(
            jax.nn.dot_product_attention(
                q[:, start:end], k[:, :end], v[:, :end], mask=mask[:, None], implementation="xla"
            )
        )
    return jnp.concatenate(outputs, axis=1)


def _fused(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    prefix: jax.Array | None,
    implementation: Literal["xla", "cudnn"],
) -> jax.Array:
    # is_causal (not folded into the mask) lets cuDNN skip the upper triangle; prefix-LM
    # masks already hold causality outside the prefix.
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=document_mask(segment_ids, prefix),
        is_causal=prefix is None,
        implementation=implementation,
    )


def _splash(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    prefix: jax.Array | None,
    constrain: Constrain | None,
    names: tuple[Sequence[str | None], Sequence[str | None]] | None,
) -> jax.Array:
    """Splash attention, vmapped over the batch and, on a mesh, shard_mapped over it."""
    if prefix is not None:
        # The kernel's mask is static (built on the host for all rows); prefixes vary per row.
        raise ConfigError(
            "model.attention: splash cannot express per-row prefix-LM masks (objectives "
            "prefix_lm, span_corruption, ul2); use model.attention=xla"
        )
    seq_len = q.shape[1]
    if seq_len % SPLASH_BLOCKS[-1]:
        raise ConfigError(
            f"model.attention: splash needs a sequence length that is a multiple of "
            f"{SPLASH_BLOCKS[-1]}, got {seq_len} (change train.seq_len or use xla)"
        )
    sharding = constrain if isinstance(constrain, ActivationSharding) else None
    platform = target_platform(constrain)
    if platform not in ("tpu", "cpu"):
        raise ConfigError(
            f"model.attention: splash is a TPU kernel and cannot run on {platform} (use cudnn)"
        )
    local = functools.partial(_splash_local, interpret=platform == "cpu")
    if sharding is None or names is None:
        return local(q, k, v, segment_ids)
    mesh, rules = sharding.mesh, dict(sharding.rules)
    q_spec = _heads_spec(q.shape, names[0], rules, mesh)
    kv_spec = _heads_spec(k.shape, names[1], rules, mesh)
    if kv_spec[2] != q_spec[2]:
        # Kv heads that split unlike the q heads (e.g. fewer kv heads than tensor shards):
        # repeat them to one per q head, so each shard holds its q heads' own kv heads.
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        kv_spec = q_spec
    # check_vma=False: pallas_call has no replication rule for shard_map to check.
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0], None)),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, segment_ids)


def _heads_spec(
    shape: tuple[int, ...], names: Sequence[str | None], rules: Rules, mesh: Mesh
) -> PartitionSpec:
    """(B,T,heads,H) split by the rules over batch and heads only: each shard needs whole
    sequences. A dimension that does not split evenly stays whole (as in ActivationSharding)."""
    spec = partition_spec((names[0], None, names[2], None), rules)

    def even(dim: int, entry: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        axes = (entry,) if isinstance(entry, str) else entry or ()
        return entry if dim % math.prod(mesh.shape[a] for a in axes) == 0 else None

    return PartitionSpec(*(even(dim, entry) for dim, entry in zip(shape, spec, strict=True)))


def _splash_local(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, interpret: bool
) -> jax.Array:
    """Splash on unsharded (or per-shard) arrays: the kernel takes (heads, seq, head_dim) per
    example, so vmap over the batch. The kernel's MHA form handles GQA itself (q head n reads
    kv head n // G) without repeating kv heads."""
    kernel = _splash_kernel(q.shape[1], q.shape[2], interpret)

    def one(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
        out = kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(segments, segments))
        return cast(jax.Array, out)  # no residuals asked for: the output alone

    # The kernel does not scale the logits; scaling q instead is one rounding of (T,N,H).
    q = q * jnp.asarray(1 / math.sqrt(q.shape[-1]), q.dtype)
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    out = jax.vmap(one)(heads_first(q), heads_first(k), heads_first(v), segment_ids)
    return heads_first(out)


@functools.lru_cache(maxsize=16)
def _splash_kernel(
    seq_len: int, num_heads: int, interpret: bool
) -> splash_kernel.SplashAttentionKernel:
    """The causal kernel for one shape; its block-sparsity tables are built on the host, so
    they are built once and reused by every layer and retrace."""
    block = next(b for b in SPLASH_BLOCKS if seq_len % b == 0)
    sizes = splash_kernel.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq_len, seq_len))] * num_heads)
    # concrete tables even when first asked for inside a trace, so the cache holds no tracers
    with jax.ensure_compile_time_eval():
        return splash_kernel.make_splash_mha(
            mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )
