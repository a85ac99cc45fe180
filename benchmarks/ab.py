"""A/B (A B C ...) comparison of maxlm train-step variants, alternating so machine drift cancels.

    python benchmarks/ab.py small "model.dtype=float32" "model.dtype=bfloat16"
    python benchmarks/ab.py small "" "XLA_FLAGS=--xla_cpu_use_xnnpack=false |"
    python benchmarks/ab.py small "PYTHONPATH=/tmp/base |" ""      # another checkout as baseline

Each variant is `[ENV=value ... |] [override ...]`: environment for its worker process, then
config overrides. Every variant gets its own process (XLA flags are per process), built by the
trainer's code path (`train_throughput.build_shape`); workers then take turns running `--steps`
steps for `--rounds` rounds. Prints the median step time, speed relative to the first variant,
compile time and final loss (equal losses show the variants compute the same thing).
Workers start with huge-page malloc, as `python -m maxlm.train` restarts itself
(maxlm/host_memory.py); a variant `MAXLM_HUGE_PAGES=0 |` runs without.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from maxlm import host_memory


def worker(shape: str, overrides: list[str]) -> None:
    """Build the step, then run the number of steps read from each stdin line; reply with times."""
    sys.path.insert(0, str(Path(__file__).parent))
    import jax
    from train_throughput import build_shape

    _, built, state, batch = build_shape(shape, overrides)
    for _ in range(2):
        state, metrics = built.train(state, batch)
    jax.block_until_ready(metrics)
    print(json.dumps({"compile_s": built.compile_s}), flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            state, metrics = built.train(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        print(json.dumps({"times": times, "loss": float(metrics["loss"])}), flush=True)


def start(shape: str, variant: str) -> tuple[subprocess.Popen[str], dict[str, float]]:
    env_part, _, override_part = variant.rpartition("|")
    env = dict(os.environ)
    env.update(item.split("=", 1) for item in shlex.split(env_part))
    env = host_memory.environment(env)  # as `python -m maxlm.train` restarts itself
    process = subprocess.Popen(
        [sys.executable, __file__, "--worker", shape, *shlex.split(override_part)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", help="tiny or small (benchmarks/train_throughput.py SHAPES)")
    parser.add_argument("variants", nargs="*")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.shape, args.variants)
        return
    runs = [(variant, *start(args.shape, variant), []) for variant in args.variants]
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for variant, process, _, times in runs:
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(f"{args.steps}\n")
            process.stdin.flush()
            reply = json.loads(process.stdout.readline())
            times.extend(reply["times"])
            losses[variant] = reply["loss"]
    print("| variant | median step ms | speed vs first | compile s | loss |")
    print("|---|---|---|---|---|")
    first = statistics.median(runs[0][3])
    for variant, process, info, times in runs:
        median = statistics.median(times)
        print(
            f"| `{variant or '(default)'}` | {median * 1000:,.0f} | {first / median:.2f}x | "
            f"{info['compile_s']:.1f} | {losses[variant]:.5f} |"
        )
        assert process.stdin is not None
        process.stdin.close()
        process.wait()


if __name__ == "__main__":
    main()
