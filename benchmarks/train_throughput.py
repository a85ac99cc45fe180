"""Train-step throughput of maxlm on this machine: tokens/s, MFU, compile time.

    python benchmarks/train_throughput.py [--shapes tiny,small] [--steps 20] [--dtype float32]

Uses the trainer's own code path (config -> mesh -> train_step.build) on one device with
synthetic packed batches; MFU is against the CPU matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax

from maxlm import config, estimate, host_memory, mesh as mesh_lib, state as state_lib, train_step
from maxlm.data.synthetic import packed_batch

# The shapes the performance issue and ../shared/FACTS.md compare peers on.
SHAPES = {
    "tiny": ["model.preset=tiny", "train.seq_len=256", "train.global_batch_size=8"],
    "small": ["model.preset=small", "train.seq_len=512", "train.global_batch_size=4"],
}


def build_shape(
    name: str, overrides: Sequence[str] = ()
) -> tuple[config.Config, train_step.Steps, Any, dict[str, jax.Array]]:
    """(cfg, compiled steps, initial state, device batch) of a shape on one device, built by
    the trainer's own code path."""
    cfg = config.load(None, [*SHAPES[name], "mesh.data=1", *overrides])
    mesh = mesh_lib.make(cfg.mesh, jax.devices()[:1])
    built = train_step.build(cfg, mesh)
    state = state_lib.init(cfg, built.optimizer, built.blueprint)
    batch = {
        key: jax.device_put(value, built.batch_sharding)
        for key, value in packed_batch(
            cfg.train.global_batch_size, cfg.train.seq_len, cfg.model.vocab_size, seed=0
        ).items()
    }
    return cfg, built, state, batch


def measure(name: str, steps: int, dtype: str) -> dict[str, float]:
    cfg, built, state, batch = build_shape(name, [f"model.dtype={dtype}"])
    for _ in range(3):
        state, metrics = built.train(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = built.train(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    tokens_per_s = cfg.train.tokens_per_step / statistics.median(times)
    return {
        "params": state_lib.count_params(built.blueprint.abstract.params),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": estimate.flops_per_token(cfg.model, cfg.train.seq_len),
        "compile_s": built.compile_s,
    }


def main() -> None:
    host_memory.restart_with_huge_pages()  # as `python -m maxlm.train` does
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    peak = estimate.measure_cpu_peak(args.dtype)
    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}; measured {args.dtype} "
        f"matmul peak {peak / 1e9:.0f} GFLOP/s; median of {args.steps} steps after 3 warm-up"
    )
    print("| shape | params | tokens/s | MFU | compile s |")
    print("|---|---|---|---|---|")
    for name in args.shapes.split(","):
        result = measure(name, args.steps, args.dtype)
        mfu = result["tokens_per_s"] * result["flops_per_token"] / peak
        print(
            f"| {name} | {result['params'] / 1e6:.1f}M | {result['tokens_per_s']:,.0f} | "
            f"{100 * mfu:.1f} % | {result['compile_s']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
