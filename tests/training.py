"""The tiny training setup the end-to-end, checkpoint and fault-injection tests share: a
learnable corpus of code-like lines, the overrides of a tiny run, and its metrics records."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from maxlm import config

TOKENIZER_VOCAB = 300
MODEL_VOCAB = 320
NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
VERBS = ["reads", "writes", "counts", "sorts"]


def write_corpus(root: Path, cache: Path) -> dict:
    """4 files of 100 code-like lines (one document per line) with a learnable template."""
    rng = random.Random(0)
    for part in range(4):
        lines = []
        for _ in range(100):
            a, b, verb = rng.choice(NAMES), rng.choice(NAMES), rng.choice(VERBS)
            n = rng.randint(1, 9)
            lines.append(f"def {a}_{verb}(x): return {b}(x) + {n} # the {a} {verb} the {b}")
        (root / f"part{part}.txt").write_text("\n".join(lines) + "\n")
    return {"glob": str(root / "*.txt"), "cache": str(cache)}


def overrides(corpus, run_dir, *extra: str) -> list[str]:
    """A tiny model on the corpus; constant lr after 2 warmup steps, so that runs of different
    lengths follow the same trajectory."""
    return [
        f"run.dir={run_dir}",
        "data.sources.corpus.kind=text_files",
        f"data.sources.corpus.paths=[{corpus['glob']}]",
        "data.sources.corpus.document_per=line",
        f"data.tokenizer.vocab_size={TOKENIZER_VOCAB}",
        f"data.tokenizer.cache_dir={corpus['cache']}",
        "data.eval_fraction=0.1",
        f"model.vocab_size={MODEL_VOCAB}",
        "model.d_model=64",
        "model.num_layers=2",
        "model.num_heads=4",
        "model.mlp_dim=128",
        "optim.lr=3e-3",
        "optim.schedule.kind=constant",
        "optim.schedule.warmup_steps=2",
        "train.seq_len=64",
        "train.global_batch_size=8",
        "eval.batches=2",
        *extra,
    ]


class Run(NamedTuple):
    cfg: config.Config
    dir: Path
    summary: dict
    train: list[dict]  # metrics.jsonl records of training steps
    eval: list[dict]  # and of evaluations


def read_jsonl(run_dir) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def cli(
    args: list[str], cwd: Path, devices: int = 1, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m maxlm.train ARGS` on `devices` fake CPU devices, compiled at XLA's lowest
    optimization level: compiling dominates these small runs (about 2x faster this way)."""
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    return subprocess.run(
        [sys.executable, "-m", "maxlm.train", *args],
        cwd=cwd,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_config(path: Path, cfg: config.Config) -> Path:
    path.write_text(cfg.to_yaml())
    return path


def trace_of(path: Path) -> dict[int, tuple[int, str]]:
    """step -> (loss bits, process 0's batch hash) of a MAXLM_TRACE file; a rerun's lines win
    over the earlier run's (it repeats the steps after its checkpoint)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {line["step"]: (line["loss_bits"], line["batch"]) for line in lines}


def committed_steps(run_dir: Path) -> list[int]:
    """The checkpoint steps of a run that orbax committed (a torn save is never listed)."""
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
