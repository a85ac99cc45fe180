"""Checkpoint cost of maxlm: save and restore time per shape, and what asynchronous saving costs
a training loop.

    python benchmarks/checkpoint.py [--shapes tiny,small] [--reps 3] [--steps 200]

Uses the trainer's own code path: config -> mesh -> train_step.build -> state.init on one
device, and `maxlm.checkpoint.Checkpointer` (orbax, async_save on) with a grain iterator and a
small progress JSON, into a temporary directory.

Table 1, per shape, median of --reps after one warm-up: the step directory's size on disk; the
time `save()` blocks (the on-device checksums and the copy to host memory); the time until
`wait()` returns (the write committed); the time `restore()` takes (read back, placed with the
shardings, checksums verified; the files are in the page cache).

Table 2, the tiny shape (the demo's): mean train step time over --steps steps with no saving,
saving every 100 steps (the demo's interval: its 300 steps saved 3 times) and every 10 (the
slope), calling `check_for_errors()` every step as the trainer does. The configurations run in
segments of --segment steps that alternate (A B C A B C ...) to cancel machine drift; saves fall
at step numbers K/2 mod K, so a save's background write overlaps its own configuration's steps,
and each segment ends by waiting for its writes to commit. Noise on this shared 2-core VM is
about +-10 %, far above the cost of one save per 100 steps: read "extra s per save" (the
difference from no saving, per save) next to "save() blocks s" (the part the loop must wait
for) rather than the overhead % alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grain
import jax

from maxlm import state as state_lib
from maxlm.checkpoint import Checkpointer

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import build_shape

PROGRESS = {"tokens_seen": 0, "batches_consumed": 0, "note": "benchmarks/checkpoint.py"}


def new_iterator() -> Any:
    return iter(grain.MapDataset.range(1000).to_iter_dataset())


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_restore(name: str, reps: int) -> dict[str, float]:
    """Median save (blocking, total) and restore seconds and the checkpoint's bytes."""
    cfg, built, state, batch = build_shape(name, ["model.dtype=float32"])
    for _ in range(2):  # non-zero AdamW moments: zeros would compress to nothing
        state, metrics = built.train(state, batch)
    jax.block_until_ready(metrics)
    iterator = new_iterator()
    next(iterator)
    blocking, total, restore, sizes = [], [], [], []
    for rep in range(reps + 1):  # rep 0 warms up (compiles the checksums, opens orbax)
        with tempfile.TemporaryDirectory(prefix="maxlm-ckpt-bench-") as tmp:
            checkpointer = Checkpointer(cfg.checkpoint, Path(tmp))
            start = time.perf_counter()
            checkpointer.save(1, state, iterator, PROGRESS)
            returned = time.perf_counter()
            checkpointer.wait()
            done = time.perf_counter()
            size = dir_bytes(checkpointer.directory / "1")
            start_restore = time.perf_counter()
            restored, _ = checkpointer.restore(1, built.blueprint, new_iterator())
            jax.block_until_ready(restored)
            restored_s = time.perf_counter() - start_restore
            checkpointer.close()
            del restored
        if rep:
            blocking.append(returned - start)
            total.append(done - start)
            restore.append(restored_s)
            sizes.append(size)
    return {
        "params": state_lib.count_params(built.blueprint.abstract.params),
        "bytes": statistics.median(sizes),
        "blocking_s": statistics.median(blocking),
        "total_s": statistics.median(total),
        "restore_s": statistics.median(restore),
    }


def train_segment(built: Any, state: Any, batch: dict[str, jax.Array], steps: range, every: int,
                  checkpointer: Checkpointer | None, iterator: Any,
                  ) -> tuple[Any, float, list[float]]:  # fmt: skip
    """Run the train steps numbered `steps` like the trainer's loop: the previous step's metrics
    are read while the next runs, check_for_errors every step, a save when due (at step numbers
    every // 2 mod every, so a save's background write overlaps this segment's own steps).
    Returns the state, the wall time (including the wait for the last write to commit) and
    each save()'s blocking seconds."""
    blocking = []
    pending = None
    start = time.perf_counter()
    for step in steps:
        state, metrics = built.train(state, batch)
        if checkpointer is not None:
            checkpointer.check_for_errors(step)
        if pending is not None:
            jax.device_get(pending)
        pending = metrics
        if checkpointer is not None and step % every == every // 2:
            jax.device_get(metrics)  # the trainer collects the metrics before a save
            pending = None
            save_start = time.perf_counter()
            checkpointer.save(step, state, iterator, PROGRESS)
            blocking.append(time.perf_counter() - save_start)
    jax.device_get(pending)
    if checkpointer is not None:
        checkpointer.wait()
    return state, time.perf_counter() - start, blocking


def loop_overhead(
    steps: int, segment: int, intervals: list[int]
) -> tuple[list[dict[str, Any]], float]:
    """Mean step time with no saving and with saving every K steps: each configuration runs
    `steps` steps (its own step numbers 1..steps), in segments of `segment` steps that
    alternate between the configurations (A B C A B C ...) to cancel machine drift."""
    cfg, built, state, batch = build_shape("tiny", ["model.dtype=float32", "checkpoint.keep=2"])
    iterator = new_iterator()
    configs = [0, *intervals]
    seconds = dict.fromkeys(configs, 0.0)
    blocking: dict[int, list[float]] = {k: [] for k in configs}
    with tempfile.TemporaryDirectory(prefix="maxlm-ckpt-bench-") as tmp:
        checkpointers = {k: Checkpointer(cfg.checkpoint, Path(tmp) / f"every{k}") for k in configs}
        warmup = Checkpointer(cfg.checkpoint, Path(tmp) / "warmup")  # compiles, opens orbax
        state, _, _ = train_segment(built, state, batch, range(1, 4), 2, warmup, iterator)
        warmup.close()
        for first in range(1, steps + 1, segment):
            for k in configs:
                numbers = range(first, min(first + segment, steps + 1))
                state, wall, saves = train_segment(
                    built, state, batch, numbers, k or 1, checkpointers[k] if k else None, iterator
                )
                seconds[k] += wall
                blocking[k].extend(saves)
        for checkpointer in checkpointers.values():
            checkpointer.close()
    base = seconds[0] / steps
    rows = []
    for k in configs:
        saves = len(blocking[k])
        rows.append(
            {
                "every": k,
                "saves": saves,
                "mean_s": seconds[k] / steps,
                "overhead": (seconds[k] - seconds[0]) / seconds[0],
                "per_save_s": (seconds[k] - seconds[0]) / saves if saves else 0.0,
                "blocking_s": statistics.mean(blocking[k]) if saves else 0.0,
                "blocking_share": sum(blocking[k]) / seconds[k],
            }
        )
    return rows, cfg.train.tokens_per_step / base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,small")
    parser.add_argument("--reps", type=int, default=3, help="timed save/restore repetitions")
    parser.add_argument("--steps", type=int, default=200, help="train steps per configuration")
    parser.add_argument("--segment", type=int, default=20, help="steps per alternation")
    parser.add_argument("--intervals", default="100,10", help="save every K steps, K in these")
    args = parser.parse_args()
    began = time.perf_counter()
    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}; maxlm Checkpointer "
        f"(orbax, async_save), float32 state (params + AdamW moments), temporary directory"
    )
    print()
    print(f"Save and restore, median of {args.reps} after 1 warm-up:")
    print("| shape | params | checkpoint MB | save() blocks s | save total s | save MB/s | "
          "restore s | restore MB/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        r = save_restore(name, args.reps)
        mb = r["bytes"] / 1e6
        print(
            f"| {name} | {r['params'] / 1e6:.1f}M | {mb:,.1f} | {r['blocking_s']:.2f} | "
            f"{r['total_s']:.2f} | {mb / r['total_s']:,.0f} | {r['restore_s']:.2f} | "
            f"{mb / r['restore_s']:,.0f} |",
            flush=True,
        )
    rows, tokens_per_s = loop_overhead(
        args.steps, args.segment, [int(k) for k in args.intervals.split(",")]
    )
    print()
    print(
        f"Async saving in the train loop, tiny shape ({tokens_per_s:,.0f} tokens/s without "
        f"saving), {args.steps} steps per configuration, alternating every {args.segment} steps:"
    )
    print("| save every | saves | mean step s | overhead | extra s per save | "
          "save() blocks s | blocking share |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if not row["every"]:
            print(f"| never | 0 | {row['mean_s']:.3f} | - | - | - | - |")
            continue
        print(
            f"| {row['every']} steps | {row['saves']} | {row['mean_s']:.3f} | "
            f"{100 * row['overhead']:+.1f} % | {row['per_save_s']:+.2f} | "
            f"{row['blocking_s']:.2f} | {100 * row['blocking_share']:.1f} % |"
        )
    print()
    print(f"total benchmark time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
