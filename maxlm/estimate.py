"""Back-of-envelope numbers for a run: parameters, FLOPs per token, device peak, MFU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from maxlm.config import ModelConfig

# Dense bf16 peak FLOP/s per chip, from the vendors' published specifications.
PUBLISHED_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}


def param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count (embedding, blocks, final norm, untied head)."""
    return embedding_params(cfg) + cfg.num_layers * block_params(cfg) + cfg.d_model


def embedding_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)


def block_params(cfg: ModelConfig) -> int:
    d, h = cfg.d_model, cfg.head_size
    attention = d * cfg.num_heads * h * 2 + d * cfg.kv_heads * h * 2
    return attention + 3 * d * cfg.mlp_dim + 2 * d


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in matmuls: every block weight plus the output head, not the lookup."""
    return cfg.num_layers * (block_params(cfg) - 2 * cfg.d_model) + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + 12 x L x (N*H) x seq for attention."""
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len
    return 6.0 * matmul_params(cfg) + attention


def measure_cpu_peak(dtype: str = "float32", size: int = 2048, repeats: int = 7) -> float:
    """Median FLOP/s of a square matmul on the first CPU device (the whole machine's cores)."""
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def peak_flops(devices: Sequence[jax.Device], dtype: str) -> tuple[float, str]:
    """Peak FLOP/s of the whole mesh and where the number comes from."""
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        # fake CPU devices share the same cores: the probe measures the machine, not a device
        peak = measure_cpu_peak(dtype)
        return peak, f"measured {dtype} matmul peak of this CPU: {peak / 1e9:.0f} GFLOP/s"
    for name, per_chip in PUBLISHED_PEAK_FLOPS.items():
        if kind.startswith(name):
            return per_chip * len(
                devices
            ), f"published peak of {kind}: {per_chip / 1e12:.0f} TFLOP/s"
    raise ValueError(f"no published peak for device kind {kind!r}; add it to PUBLISHED_PEAK_FLOPS")
