"""Per-device memory of a training step in closed form: parameters, gradients, optimizer state and
activations, from the model shape, dtypes, optimizer kind, remat policy and mesh.

Activations are what the backward pass keeps, read off the model (the residuals JAX saves;
tests/test_estimate.py checks these formulas against them byte for byte, and the totals against
XLA). Bytes per token and layer, with D = d_model, Q = N*H (query heads x head size), KV = K*H,
F = mlp_dim, S = seq_len, c = compute-dtype bytes:

  remat none           c (2 Q + 2 KV + 2 F + 2 D)
      each RMSNorm's input is kept (c D: the layer input, and the input plus attention's
      output), not its output: the backward pass recomputes the normed activations, their
      inverse rms and the SwiGLU product from them (maxlm.model.recomputed);
      attention keeps q, k (after RoPE), v and its output (xla attention is itself rematerialized,
      so no (B,N,T,S) probabilities are kept); SwiGLU keeps gate and up (2 F);
      MKL's attention (maxlm.mkl.attention) also keeps its float32 log-sum-exp (4 N more)
      and its output, which o_proj's MKL product keeps anyway (one copy)
  remat full           c D                        the layer input; all else is recomputed
  remat minimal        c (2 D + Q + 2 KV + 2 F)   the weight matmuls' outputs (c D on CPU: its
                                                  custom-VJP matmuls are no dots to the policy)
  remat dots_saveable  minimal + 4 N S + c Q      also xla attention's float32 QK^T and its PV

Remat none also keeps a weight copy per layer, o_proj's (the other products run inside the
recomputed regions): its compute-dtype cast where that differs from the parameter dtype, or on
XLA:CPU's route its kernel reshaped to 2-D; MKL's products keep the weights as they are (none).
Outside the layers:
the final norm (c D + 4), the fused head's d(hidden) (c D) and RoPE tables (4 H; 8 H without
remat); with train.loss_chunk=0 the plain head also keeps its float32 (B,T,V) logits (4 V).
Heads, kv heads, mlp and vocab divide by their tensor-parallel split, tokens by the data-parallel
split (mesh.rules act_*). XLA:CPU computes bf16 in float32 and converts the kept activations
before the backward loop, so on CPU they count 4 bytes whatever c.

The peak adds the larger working set: the fused head loss (one chunk's float32 logits and
probabilities, 8 V per row and position of the chunk, and the float32 d(head) accumulator) or
one layer's backward: what the policy recomputes (none minus kept), the float32 intermediates
the norms' and SwiGLU's own backward passes rebuild (24 D + 8 + 3 c F), xla attention's (B,N,T,S)
logits, probabilities and their gradients in float32 (16 N S per token; XLA:TPU fuses some of
them, so there it is an upper bound), and with FSDP two layers' gathered weights. Dropout masks,
collective buffers and heap fragmentation are not counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from maxlm import matmul, sharding
from maxlm.config import Config, ConfigError, ModelConfig

Rules = Mapping[str, str | Sequence[str] | None]
MeshShape = Mapping[str, int]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter array of `maxlm.model.Llama` (stacked layers first) and its logical axes."""

    path: str
    shape: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def parameters(m: ModelConfig) -> list[Param]:
    """Every parameter of the model, as `maxlm.state.split_params` names and shapes them."""
    L, D, N, K, H, F, V = (
        m.num_layers, m.d_model, m.num_heads, m.kv_heads, m.head_size, m.mlp_dim, m.vocab_size,
    )  # fmt: skip
    layer = [
        ("input_layernorm.scale", (D,), ("norm",)),
        ("self_attn.q_proj.kernel", (D, N, H), ("embed", "q_heads", "head_dim")),
        ("self_attn.k_proj.kernel", (D, K, H), ("embed", "kv_heads", "head_dim")),
        ("self_attn.v_proj.kernel", (D, K, H), ("embed", "kv_heads", "head_dim")),
        ("self_attn.o_proj.kernel", (N, H, D), ("q_heads", "head_dim", "embed")),
        ("post_attention_layernorm.scale", (D,), ("norm",)),
        ("mlp.gate_proj.kernel", (D, F), ("embed", "mlp")),
        ("mlp.up_proj.kernel", (D, F), ("embed", "mlp")),
        ("mlp.down_proj.kernel", (F, D), ("mlp", "embed")),
    ]
    params = [Param("embed_tokens.embedding", (V, D), ("vocab", "embed"))]
    params += [Param(f"layers.{p}", (L, *s), ("layers", *n)) for p, s, n in layer]
    params.append(Param("norm.scale", (D,), ("norm",)))
    if not m.tie_embeddings:
        params.append(Param("lm_head.kernel", (D, V), ("embed", "vocab")))
    return params


def _axes_size(entry: str | Sequence[str] | None, mesh: MeshShape) -> int:
    axes = [entry] if isinstance(entry, str) else list(entry or [])
    return math.prod(mesh[axis] for axis in axes)


def shards(param: Param, rules: Rules, mesh: MeshShape) -> int:
    """How many pieces the mesh splits a parameter into; like training, a dimension that does
    not divide evenly is a ConfigError naming the rule."""
    ways = 1
    spec = sharding.partition_spec(param.names, rules)
    for dim, name, entry in zip(param.shape, param.names, spec, strict=True):
        size = _axes_size(entry, mesh)
        if dim % size:
            raise ConfigError(
                f"mesh.rules.{name}: parameter {param.path} dimension {dim} is not divisible by "
                f"mesh axes {entry} (size {size})"
            )
        ways *= size
    return ways


def _split(rules: Rules, mesh: MeshShape, name: str, dim: int) -> int:
    """An activation dimension's split; one that does not divide stays whole (as in training)."""
    size = _axes_size(rules.get(name), mesh)
    return size if dim % size == 0 else 1


# --------------------------------------------------------------------------- optimizer state

Slot = tuple[int, int, bool]  # (elements, bytes each, sharded like its parameter)
SlotRule = Callable[[Any, Param, int], list[Slot]]  # (optimizer config, parameter, param bytes)


def _moments(count: int, itemsize: int | None = None) -> SlotRule:
    """`count` arrays shaped like each parameter, in the parameter's dtype (optax keeps mu and
    nu so) unless `itemsize` fixes it."""
    return lambda opt, param, param_bytes: [(param.size, itemsize or param_bytes, True)] * count


def _adafactor(opt: Any, param: Param, itemsize: int) -> list[Slot]:
    """optax.adafactor: second moments factored into a row and a column vector (over the two
    largest dims, when both reach min_dim_size_to_factor; replicated, as their shapes match no
    parameter), else a full one; optional momentum in float32."""
    big, bigger = sorted(param.shape)[-2:] if len(param.shape) >= 2 else (0, 0)
    if big >= opt.min_dim_size_to_factor:
        slots = [(param.size // bigger + param.size // big, itemsize, False)]
    else:
        slots = [(param.size, itemsize, True)]
    if opt.momentum is not None:
        slots.append((param.size, 4, True))
    return slots


# Keyed by `optim.optimizer.kind`; a new optimizer needs its line here.
OPTIMIZER_STATE: dict[str, SlotRule] = {
    "adamw": _moments(2),
    "lion": _moments(1),
    "sophia": _moments(2, 4),  # float32 momentum and diagonal-Hessian EMA (maxlm.sophia)
    "adafactor": _adafactor,
}


def optimizer_rule(kind: str) -> SlotRule:
    rule = OPTIMIZER_STATE.get(kind)
    if rule is None:
        raise ConfigError(
            f"optim.optimizer.kind: no memory rule for optimizer {kind!r} (known: "
            f"{', '.join(OPTIMIZER_STATE)}); add one to OPTIMIZER_STATE in maxlm/memory.py"
        )
    return rule


# --------------------------------------------------------------------------- activations


@dataclasses.dataclass(frozen=True)
class Widths:
    """One token's activation widths on one device (tensor parallelism splits heads, mlp, vocab)."""

    d: int
    q: float  # N*H
    kv: float  # K*H
    f: float
    heads: float
    vocab: float
    head_dim: int
    seq: int


def widths(cfg: Config, mesh: MeshShape) -> Widths:
    m, rules = cfg.model, cfg.mesh.rules
    heads = m.num_heads / _split(rules, mesh, "act_heads", m.num_heads)
    kv_heads = m.kv_heads / _split(rules, mesh, "act_kv_heads", m.kv_heads)
    return Widths(
        d=m.d_model,
        q=heads * m.head_size,
        kv=kv_heads * m.head_size,
        f=m.mlp_dim / _split(rules, mesh, "act_mlp", m.mlp_dim),
        heads=heads,
        vocab=m.vocab_size / _split(rules, mesh, "act_vocab", m.vocab_size),
        head_dim=m.head_size,
        seq=cfg.train.seq_len,
    )


def layer_bytes(w: Widths, remat: str, c: int, cpu_layouts: bool, attention: str) -> float:
    """Bytes per token one decoder layer keeps for the backward pass (module docstring)."""
    if remat == "none":
        # MKL's attention also keeps each row's float32 log-sum-exp, and its output: the same
        # tensor o_proj's MKL product keeps as its input, saved once
        fused = 4 * w.heads if attention == "mkl" else 0
        return c * (2 * w.q + 2 * w.kv + 2 * w.f + 2 * w.d) + fused
    if remat == "full":
        return c * w.d
    minimal = c * w.d if cpu_layouts else c * (2 * w.d + w.q + 2 * w.kv + 2 * w.f)
    if remat == "minimal":
        return minimal
    if remat == "dots_saveable":
        # attention's QK^T and PV are dots too (batched: only this policy keeps them)
        return minimal + (4 * w.heads * w.seq + c * w.q if attention == "xla" else 0)
    raise ConfigError(f"model.remat: no activation rule for {remat!r}")


def outside_layers_bytes(w: Widths, remat: str, c: int, loss_chunk: int) -> float:
    """Bytes per token kept outside the layers: final norm, head input or d(hidden), RoPE tables
    (float32 sin and cos; without remat their per-head broadcasts for q and k, hoisted out of the
    layer scan); a plain head (no loss_chunk) also keeps its float32 (B,T,V) logits."""
    head = c * w.d + (0 if loss_chunk else 4 * w.vocab)
    rope = (8 if remat == "none" else 4) * w.head_dim
    return c * w.d + 4 + head + rope


def weight_copies(
    cfg: Config, params: list[Param], ways: list[int], c: int, route: matmul.Gemm
) -> float:
    """Bytes per device of the weight copies kept for the backward pass (module docstring);
    `route` is `matmul_route`'s."""
    m = cfg.model
    p = DTYPE_BYTES[m.param_dtype]
    if m.remat != "none" or route == "mkl":
        return 0.0
    total = 0.0
    for param, split in zip(params, ways, strict=True):
        if not (param.path.startswith("layers.") and param.path.endswith(".o_proj.kernel")):
            continue
        if route == "cpu":
            total += param.size * p / split  # maxlm.matmul keeps the weight reshaped to 2-D
        elif route == "dot" and p != c:
            total += param.size * c / split  # the einsum keeps the weight cast to compute dtype
    return total


def matmul_route(cfg: Config, platform: str, devices: int) -> matmul.Gemm:
    """How the layers' products run (`maxlm.matmul.Gemm`): "mkl" only where MKL takes the
    compute dtype (float16 runs the "cpu" route)."""
    m = cfg.model
    route = matmul.choose_gemm(platform, devices, m.cpu_matmul)
    dtype = "float32" if m.dtype == "auto" and platform == "cpu" else m.dtype
    if route == "mkl" and not matmul.by_mkl(route, dtype):
        return "cpu"
    return route


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device of one training step at its peak."""

    params: float
    gradients: float  # in param dtype, plus the float32 accumulator with grad_accum_steps > 1
    optimizer: float
    saved: float  # activations kept for the backward pass
    working: float  # the peak working set on top: the head loss or one layer's backward
    rows: float  # sequences per device per micro-batch

    @property
    def activations(self) -> float:
        return self.saved + self.working

    @property
    def total(self) -> float:
        return self.params + self.gradients + self.optimizer + self.activations


def attention_path(cfg: Config, route: matmul.Gemm) -> str:
    """`model.attention` as the step runs it: "mkl" where `maxlm.mkl.attention` takes the xla
    path's place (MKL's route, `matmul_route`: float32 or bfloat16 compute)."""
    m = cfg.model
    if m.attention == "xla" and route == "mkl":
        return "mkl"
    return m.attention


def compute_bytes(dtype: str, platform: str) -> int:
    """Bytes of the compute dtype; auto is float32 on CPU and bfloat16 on TPU/GPU (as the model)."""
    if dtype == "auto":
        return 4 if platform == "cpu" else 2
    return DTYPE_BYTES[dtype]


def per_device(cfg: Config, mesh: MeshShape, platform: str) -> Memory:
    """The memory of `cfg`'s train step on one device of `mesh` (axis sizes) on `platform`."""
    m, train, rules = cfg.model, cfg.train, cfg.mesh.rules
    c, p = compute_bytes(m.dtype, platform), DTYPE_BYTES[m.param_dtype]
    cpu = platform == "cpu"  # maxlm.matmul's XLA:CPU layouts change what the matmuls keep
    # XLA:CPU has no bfloat16 arithmetic: it converts kept bf16 activations to float32 whole
    kept = 4 if cpu else c
    params = parameters(m)
    ways = [shards(param, rules, mesh) for param in params]
    elements = sum(param.size / split for param, split in zip(params, ways, strict=True))
    rule = optimizer_rule(cfg.optim.optimizer.kind)
    optimizer = sum(
        n * size / (split if sharded else 1)
        for param, split in zip(params, ways, strict=True)
        for n, size, sharded in rule(cfg.optim.optimizer, param, p)
    )
    rows = train.micro_batch_size / _axes_size(rules.get("act_batch"), mesh)
    tokens = rows * train.seq_len
    w = widths(cfg, mesh)
    route = matmul_route(cfg, platform, math.prod(mesh.values()))
    attention = attention_path(cfg, route)
    per_token = m.num_layers * layer_bytes(w, m.remat, kept, cpu, attention)
    per_token += outside_layers_bytes(w, m.remat, kept, train.loss_chunk_size)
    gathered = _gathered_layer_weights(cfg, params, ways, mesh, c)
    layer = _layer_working(cfg, w, tokens, kept, cpu, attention) + 2 * gathered
    return Memory(
        params=elements * p,
        gradients=elements * (p + (4 if train.grad_accum_steps > 1 else 0)),
        optimizer=optimizer,
        saved=tokens * per_token + weight_copies(cfg, params, ways, c, route),
        working=max(_head_working(cfg, w, rows, c, route), layer),
        rows=rows,
    )


def _head_working(cfg: Config, w: Widths, rows: float, c: int, route: matmul.Gemm) -> float:
    """The fused head loss's peak: one chunk's float32 logits and probabilities (on MKL's route
    one buffer: `maxlm.mkl.cross_entropy_grad` writes the gradient over the logits), their
    compute-dtype gradient below float32, plus the float32 d(head) accumulator."""
    chunk = cfg.train.loss_chunk_size
    if not chunk:
        return rows * cfg.train.seq_len * 4 * w.vocab  # the (B,T,V) logits' gradient
    per_position = (4 if route == "mkl" else 8) + (c if c < 4 else 0)
    return rows * chunk * w.vocab * per_position + 4 * w.d * w.vocab


def _layer_working(
    cfg: Config, w: Widths, tokens: float, kept: int, cpu: bool, attention: str
) -> float:
    """One layer's backward: what the policy recomputes, the float32 intermediates the norms' and
    SwiGLU's own backward passes rebuild (each norm's x, x/rms and gradient: 3 x 4 D, and SwiGLU's
    sigmoid, silu and product: 3 F), and xla attention's (B,N,T,S) arrays."""
    m = cfg.model
    recomputed = layer_bytes(w, "none", kept, cpu, attention)
    recomputed -= layer_bytes(w, m.remat, kept, cpu, attention)
    rebuilt = 24 * w.d + 8 + 3 * kept * w.f
    probabilities = 16 * w.heads * w.seq if attention == "xla" else 0
    return tokens * (recomputed + rebuilt + probabilities)


def _gathered_layer_weights(
    cfg: Config, params: list[Param], ways: list[int], mesh: MeshShape, c: int
) -> float:
    """Bytes of one layer's weights gathered over the embed (FSDP) split, in compute dtype;
    XLA gathers the next layer's while this one computes, so two are live."""
    embed_split = _axes_size(cfg.mesh.rules.get("embed"), mesh)
    if embed_split == 1:
        return 0.0
    return sum(
        param.size / cfg.model.num_layers / split * embed_split * c
        for param, split in zip(params, ways, strict=True)
        if param.path.startswith("layers.") and param.path.endswith("kernel")
    )
