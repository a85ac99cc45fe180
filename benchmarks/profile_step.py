"""Where does maxlm's train step spend its time on this CPU? Per-HLO-op totals from a trace.

    python benchmarks/profile_step.py small [--steps 3] [--top 30] [overrides ...]

Traces `--steps` train steps with jax.profiler, sums the device-side events by HLO op name and
prints the top ones with their share of the traced time and the jax source op that produced
them (from the compiled HLO's metadata), so a speed change starts from a measured cost.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import itertools
import json
import re
import sys
import tempfile
from pathlib import Path

import jax

from maxlm import host_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import SHAPES, build_shape

CONTROL_FLOW = re.compile(r"^(while|call|conditional)(\.\d+)?$")
OP_NAME = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', re.MULTILINE)


def wall_time_shares(
    spans: list[tuple[float, float, str]],
) -> tuple[collections.Counter[str], float, float]:
    """Wall time per op name, time when several ops overlap (XLA:CPU runs independent ops
    concurrently) split evenly among them; also the idle time and the whole traced span."""
    edges = sorted({edge for start, end, _ in spans for edge in (start, end)})
    totals: collections.Counter[str] = collections.Counter()
    idle = 0.0
    by_start = sorted(spans)
    active: list[tuple[float, float, str]] = []
    next_span = 0
    for left, right in itertools.pairwise(edges):
        while next_span < len(by_start) and by_start[next_span][0] <= left:
            active.append(by_start[next_span])
            next_span += 1
        active = [span for span in active if span[1] > left]
        if not active:
            idle += right - left
        for _, _, name in active:
            totals[name] += (right - left) / len(active)
    return totals, idle, edges[-1] - edges[0]


def trace_events(trace_dir: Path) -> list[dict]:
    (trace_file,) = trace_dir.rglob("*.trace.json.gz")
    with gzip.open(trace_file) as stream:
        return json.load(stream)["traceEvents"]


def main() -> None:
    host_memory.restart_with_huge_pages()  # as `python -m maxlm.train` does
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()

    _, built, state, batch = build_shape(args.shape, args.overrides)
    for _ in range(3):
        state, metrics = built.train(state, batch)
    jax.block_until_ready(metrics)
    hlo_text = built.train.as_text()
    source_of = dict(OP_NAME.findall(hlo_text))

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=False):
            for _ in range(args.steps):
                state, metrics = built.train(state, batch)
            jax.block_until_ready(metrics)
        events = trace_events(Path(trace_dir))

    spans = [
        (event["ts"], event["ts"] + event["dur"], event["name"])
        for event in events
        if event.get("ph") == "X"
        and event.get("name") in source_of
        and not CONTROL_FLOW.match(event["name"])
    ]
    totals, idle, wall = wall_time_shares(spans)
    print(f"{'op':40} {'ms/step':>8} {'share':>6}  source")
    for name, micros in totals.most_common(args.top):
        source = source_of[name][-90:]
        print(f"{name[:40]:40} {micros / 1e3 / args.steps:8.2f} {micros / wall:6.1%}  {source}")
    print(
        f"traced: {wall / 1e3 / args.steps:.1f} ms/step, of which no op running "
        f"{idle / 1e3 / args.steps:.1f} ms/step ({idle / wall:.1%})"
    )


if __name__ == "__main__":
    main()
