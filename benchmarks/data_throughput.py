"""Data pipeline throughput next to the demo model's consumption: is the input pipeline fast
enough that training never waits for it?

    python benchmarks/data_throughput.py [--seconds 20] [--workers 0,2]

Paths measured, on the demo's corpus (the Python standard library) and tokenizer (BPE 8192):
  text    read text files -> tokenize -> pack -> batch (what the demo does)
  tokens  read ArrayRecord shards from `python -m maxlm.data.prepare` -> pack -> batch
each with 0 and 2 grain worker processes, in the trainer's own pipeline (`train_dataset`), and
the demo model's train step (tiny, seq 256, batch 8, float32) for its consumption in tokens/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax

from maxlm import config
from maxlm.data import mixture, pipeline, prepare

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import measure

SEQ_LEN, BATCH = 256, 8  # the demo's shape


def pipeline_tokens_per_s(source: pipeline.Source, layout: pipeline.Layout, seconds: float,
                          workers: int) -> float:  # fmt: skip
    """Tokens (batch x seq_len slots) per second out of the trainer's pipeline, after warm-up."""
    batches = iter(
        pipeline.train_dataset([source], layout, batch_size=BATCH, seed=0, num_workers=workers)
    )
    for _ in range(5):
        next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(batches)
        count += 1
    rate = count * BATCH * SEQ_LEN / (time.perf_counter() - start)
    if workers:
        batches.close()  # type: ignore[attr-defined]
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per path")
    parser.add_argument("--workers", default="0,2", help="worker counts to measure")
    args = parser.parse_args()

    cfg = config.load("configs/demo.yaml", ["data.eval_fraction=0"])
    data = mixture.load(cfg)  # trains (or loads the cached) demo tokenizer
    layout = pipeline.Layout(data.tokenizer, seq_len=SEQ_LEN, add_bos=True, add_eos=True,
                             shuffle_window=cfg.data.shuffle_window)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_file = Path(tmp) / "tokenizer.json"
        data.tokenizer.save(tokenizer_file)
        prepared = config.load(
            None,
            [
                "data.tokenizer.kind=huggingface",
                f"data.tokenizer.path={tokenizer_file}",
                f"prepare.output_dir={tmp}/prepared",
            ],
        )
        start = time.perf_counter()
        manifest = prepare.prepare(prepared)["stdlib"]
        prepare_s = time.perf_counter() - start
        shards = config.load(
            None,
            [
                "data.sources.stdlib.kind=array_record",
                f"data.sources.stdlib.paths=[{tmp}/prepared/stdlib/*.array_record]",
                "data.tokenizer.kind=huggingface",
                f"data.tokenizer.path={tokenizer_file}",
                "data.eval_fraction=0",
            ],
        )
        token_source = mixture.load(shards).train[0]
        rows = []
        for workers in [int(w) for w in args.workers.split(",")]:
            for name, source in [("text", data.train[0]), ("tokens", token_source)]:
                rows.append((name, workers, pipeline_tokens_per_s(source, layout, args.seconds,
                                                                  workers)))  # fmt: skip
    demo = measure("tiny", steps=10, dtype="float32")["tokens_per_s"]

    print(
        f"jax {jax.__version__}; {manifest['counts']['documents_out']:,} stdlib documents, "
        f"{manifest['counts']['tokens']:,} tokens, prepared in {prepare_s:.1f} s; "
        f"seq {SEQ_LEN}, batch {BATCH}, {args.seconds:.0f} s per path"
    )
    print("| path | workers | tokens/s | x demo training (tokens/s) |")
    print("|---|---|---|---|")
    for name, workers, rate in rows:
        print(f"| {name} | {workers} | {rate:,.0f} | {rate / demo:,.1f} x ({demo:,.0f}) |")


if __name__ == "__main__":
    main()
