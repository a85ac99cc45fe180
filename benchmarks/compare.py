"""Does maxlm's train step beat its peers on this machine? One run, alternating, as ratios.

    python benchmarks/compare.py [--shapes tiny,small] [--steps 20] [--rounds 2]
        [--dtype float32|bfloat16] [--peers maxlm,torch-eager,torch-compile,maxtext]
        [--maxtext-python .venv-maxtext/bin/python]

Every implementation trains the same LLaMA (same shapes, untied head, no biases, RMSNorm eps,
RoPE base, random init) on the same synthetic rows (one document per row, no padding) with the
same update (global-norm clip 1.0, AdamW b1 0.9, b2 0.95, weight decay 0.1, none on norms):

- maxlm: the trainer's own code path (`build_shape` of benchmarks/train_throughput.py, then
  `built.train(state, batch)`), fp32; `--dtype bfloat16` computes in bf16 with fp32 parameters.
- torch-eager / torch-compile: Hugging Face transformers' `LlamaForCausalLM` (AdamW, forward,
  cross-entropy, backward, step, zero_grad), eager or with forward + loss under torch.compile;
  bf16 is torch.autocast with fp32 parameters.
- maxtext: MaxText's own trainer (`maxtext.trainers.pre_train.train`, hardware=cpu, synthetic
  data, remat `minimal_with_context`, the fastest policy it offers) in a Python >= 3.12 venv
  (`--maxtext-python`); skipped with a one-line reason where it is not installed. Setup:
  `PYENV_VERSION=3.12.1 python3.12 -m venv .venv-maxtext && .venv-maxtext/bin/pip install
  "maxtext[tpu]"` (maxtext 0.2.5 on jax 0.12, no torch). On CPU it needs
  `skip_jax_distributed_system=true`; its compile cache and HLO dumps go to the run's temp dir.

maxlm and torch run as persistent worker subprocesses (benchmarks/peers/worker.py): jax and torch
never share a process, and peak RSS is each worker's own. Each builds and warms up (3 steps), then
the driver runs them in turn, `--rounds` times, `steps / rounds` timed steps each, so machine
drift hits all alike; a worker idles on its pipe while another runs. MaxText cannot be driven
step by step, so each round starts it afresh (a compile cache per shape keeps later starts
short) for 3 warm-up + k steps, and the per-step times it logs (wall time between step
completions) after the warm-up steps count; its peak RSS comes from os.wait4, its compile time
from jax's compile log (tracing + lowering + XLA compile of `train_step`) in the first round.
torch-compile's RSS leaves out inductor's compile subprocesses. Run from the Python 3.12 venv to
compare maxlm and MaxText on the same jax. Workers' logs go to a temp dir, kept on failure.

tokens/s is the median over all timed steps; MFU is against the matmul peak of this CPU measured
by `maxlm.estimate.measure_cpu_peak` at the start of the run (the fastest square product by
XLA:CPU, MKL or OpenBLAS), with `maxlm.estimate.flops_per_token` for every implementation.
Compile time: maxlm's `compile_s`; torch.compile's first compiled step minus an eager step. The
last column is maxlm's tokens/s over the row's (above 1: maxlm faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax

from maxlm import config, estimate, host_memory

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from train_throughput import SHAPES as MAXLM_PRESET_SHAPES  # noqa: E402

PEERS = ("maxlm", "torch-eager", "torch-compile", "maxtext")
WORKER = BENCHMARKS / "peers" / "worker.py"
MAXTEXT_LAUNCH = BENCHMARKS / "peers" / "maxtext_launch.py"
MAXTEXT_WARMUP_STEPS = 3
MAXTEXT_REMAT = "minimal_with_context"  # saves every matmul output: the least recomputation

# name -> (maxlm base shape of train_throughput.py, overrides on top of it)
SHAPES: dict[str, tuple[str, list[str]]] = {
    "tiny": ("tiny", []),  # d 256, 4 layers, 4 heads, mlp 688, vocab 8192, seq 256, batch 8
    "small": ("small", []),  # d 512, 8 layers, 8 heads, mlp 1376, vocab 32000, seq 512, batch 4
    "medium": (
        "small",
        [
            "model.d_model=768",
            "model.num_layers=8",
            "model.num_heads=12",
            "model.mlp_dim=2048",
            "model.vocab_size=32000",
            "train.seq_len=1024",
            "train.global_batch_size=2",
        ],
    ),
}


class Skipped(Exception):
    """An implementation that cannot run here; the message says why, in one line."""


def shape_spec(name: str) -> dict[str, Any]:
    """Everything a peer needs to build the same model and update as maxlm, from maxlm's config."""
    base, overrides = SHAPES[name]
    cfg = config.load(None, [*MAXLM_PRESET_SHAPES[base], *overrides])
    model, optim = cfg.model, cfg.optim
    if model.rope_scaling.kind != "none" or model.dropout or model.tie_embeddings:
        raise ValueError(f"{name}: peers are built without RoPE scaling, dropout or tied head")
    if not isinstance(optim.optimizer, config.AdamWConfig):
        raise ValueError(f"{name}: peers are built with AdamW, not {optim.optimizer.kind}")
    return {
        "name": name,
        "maxlm_base": base,
        "maxlm_overrides": overrides,
        "vocab_size": model.vocab_size,
        "d_model": model.d_model,
        "num_layers": model.num_layers,
        "num_heads": model.num_heads,
        "num_kv_heads": model.kv_heads,
        "head_dim": model.head_size,
        "mlp_dim": model.mlp_dim,
        "norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "init_std": model.init_std,
        "tie_embeddings": model.tie_embeddings,
        "seq_len": cfg.train.seq_len,
        "batch_size": cfg.train.global_batch_size,
        "tokens_per_step": cfg.train.tokens_per_step,
        "optim": {
            "lr": optim.lr,
            "b1": optim.optimizer.b1,
            "b2": optim.optimizer.b2,
            "eps": optim.optimizer.eps,
            "weight_decay": optim.weight_decay,
            "clip_grad_norm": optim.clip_grad_norm,
        },
        "params": estimate.param_count(model),
        "flops_per_token": estimate.flops_per_token(model, cfg.train.seq_len),
    }


def _log_tail(path: Path, lines: int = 1) -> str:
    """The last lines of a log that say something (an exception, ideally)."""
    text = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in text if re.match(r"^\w*(Error|Exception)\b", line)]
    return " | ".join((errors or text)[-lines:]) or "(empty log)"


def peer_env(kind: str, huge_pages: str) -> dict[str, str]:
    """A peer's environment. maxlm's CLI restarts itself with huge-page malloc
    (maxlm/host_memory.py), so its worker starts with it; the peers run as their users run
    them, unless `--huge-pages=all` (or `none`: nobody)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if host_memory.TUNABLE in env.get("GLIBC_TUNABLES", ""):
        del env["GLIBC_TUNABLES"]
    chosen = huge_pages == "all" or (huge_pages == "maxlm" and kind == "maxlm")
    return host_memory.environment(env) if chosen else env


class Worker:
    """A persistent maxlm or torch worker subprocess (benchmarks/peers/worker.py)."""

    def __init__(
        self, kind: str, spec: dict[str, Any], dtype: str, workdir: Path, huge_pages: str
    ) -> None:
        self.kind = kind
        self.log_path = workdir / f"{spec['name']}-{kind}.log"
        env = peer_env(kind, huge_pages)
        env["TORCHINDUCTOR_CACHE_DIR"] = str(workdir / "inductor")  # a cold compile, every run
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), kind, json.dumps(spec), dtype],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )
        self.facts = self._receive()

    def _receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise Skipped(f"worker exited with code {code}: {_log_tail(self.log_path)}")
        return json.loads(line)

    def _send(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            code = self.proc.wait()
            raise Skipped(f"worker exited with code {code}: {_log_tail(self.log_path)}") from None
        return self._receive()

    def run(self, steps: int) -> list[float]:
        """Seconds of each of `steps` train steps."""
        return self._send({"run": steps})["times"]

    def close(self) -> float:
        """Stop the worker; its peak RSS in MiB."""
        rss = self._send({"exit": True})["max_rss_mib"]
        self.proc.wait()
        return rss

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class MaxText:
    """MaxText's own trainer, started afresh for each round (it has no step-by-step API)."""

    kind = "maxtext"

    def __init__(
        self, python: str, spec: dict[str, Any], dtype: str, workdir: Path, huge_pages: str
    ) -> None:
        self.env = {**peer_env(self.kind, huge_pages), "JAX_LOG_COMPILES": "1"}
        if not Path(python).exists():
            raise Skipped(f"no Python at {python} (a Python >= 3.12 venv with `maxtext[tpu]`)")
        probe = subprocess.run(
            [python, "-c", "import sys, jax, maxtext; print(sys.version_info >= (3, 12), "
             "maxtext.__file__, jax.__version__)"],
            capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )  # fmt: skip
        if probe.returncode:
            reason = probe.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise Skipped(f"`import maxtext` failed in {python}: {reason[0]}")
        new_enough, module, jax_version = probe.stdout.split()
        if new_enough != "True":
            raise Skipped(f"{python} is older than Python 3.12, which MaxText needs")
        self.python, self.spec, self.dtype, self.workdir = python, spec, dtype, workdir
        self.base_yml = Path(module).parent / "configs" / "base.yml"
        self.rounds = 0
        self.max_rss_mib = 0.0
        self.facts: dict[str, Any] = {"version": f"maxtext on jax {jax_version}"}

    def _command(self, steps: int) -> list[str]:
        s, out = self.spec, self.workdir / f"maxtext-{self.spec['name']}"
        return [
            self.python, str(MAXTEXT_LAUNCH), str(self.base_yml),
            f"run_name=compare-{s['name']}", f"base_output_directory={out}/output",
            "hardware=cpu", "skip_jax_distributed_system=true", "dataset_type=synthetic",
            f"steps={steps}", "enable_checkpointing=false", "enable_tensorboard=false",
            f"jax_cache_dir={out}/jax_cache", f"dump_hlo_local_dir={out}/hlo",
            "decoder_block=llama2", "attention=dot_product", f"remat_policy={MAXTEXT_REMAT}",
            f"base_emb_dim={s['d_model']}", f"base_num_decoder_layers={s['num_layers']}",
            f"base_num_query_heads={s['num_heads']}", f"base_num_kv_heads={s['num_kv_heads']}",
            f"head_dim={s['head_dim']}", f"base_mlp_dim={s['mlp_dim']}",
            f"vocab_size={s['vocab_size']}", "logits_via_embedding=false",
            f"normalization_layer_epsilon={s['norm_eps']}",
            f"rope_max_timescale={int(s['rope_theta'])}",
            f"max_target_length={s['seq_len']}", f"per_device_batch_size={s['batch_size']}",
            f"dtype={self.dtype}", "weight_dtype=float32", "dropout_rate=0.0",
            f"learning_rate={s['optim']['lr']}", f"adam_b1={s['optim']['b1']}",
            f"adam_b2={s['optim']['b2']}", f"adam_eps={s['optim']['eps']}",
            f"adam_weight_decay={s['optim']['weight_decay']}",
            f"gradient_clipping_threshold={s['optim']['clip_grad_norm']}",
        ]  # fmt: skip

    def run(self, steps: int) -> list[float]:
        """Seconds of each of `steps` train steps after the warm-up ones, from MaxText's log."""
        self.rounds += 1
        log_path = self.workdir / f"{self.spec['name']}-maxtext-{self.rounds}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                self._command(MAXTEXT_WARMUP_STEPS + steps),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
            )
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        self.max_rss_mib = max(self.max_rss_mib, usage.ru_maxrss / 1024)
        if proc.returncode:
            raise Skipped(f"exit code {proc.returncode}: {_log_tail(log_path)}")
        text = log_path.read_text(errors="replace")
        times = [float(t) for t in re.findall(r"completed step: \d+, seconds: ([\d.]+)", text)]
        if len(times) != MAXTEXT_WARMUP_STEPS + steps:
            raise Skipped(f"found {len(times)} step times in {log_path}")
        if self.rounds == 1:
            params = re.search(r"compare.py exact parameter count: (\d+)", text)
            self.facts["params"] = int(params.group(1)) if params else None
            phases = r"Finished (?:tracing|jaxpr to MLIR module conversion|XLA compilation)"
            compile_s = re.findall(rf"{phases}.*?(?:train_step).*? in ([\d.]+) sec", text)
            self.facts["compile_s"] = sum(map(float, compile_s)) if compile_s else None
        return times[MAXTEXT_WARMUP_STEPS:]

    def close(self) -> float:
        return self.max_rss_mib

    def kill(self) -> None:
        pass


Runner = Worker | MaxText


def start(kind: str, spec: dict[str, Any], args: argparse.Namespace, workdir: Path) -> Runner:
    if kind == "maxtext":
        return MaxText(args.maxtext_python, spec, args.dtype, workdir, args.huge_pages)
    return Worker(kind, spec, args.dtype, workdir, args.huge_pages)


def steps_per_round(steps: int, rounds: int) -> list[int]:
    """`steps` split over `rounds` as evenly as possible."""
    return [steps // rounds + (r < steps % rounds) for r in range(rounds)]


def compare_shape(
    name: str, args: argparse.Namespace, workdir: Path, peak: float
) -> list[dict[str, Any]]:
    """Start every peer on one shape, run the alternating rounds, and return one row each."""
    spec = shape_spec(name)
    print(
        f"\n{name}: d {spec['d_model']}, {spec['num_layers']} layers, {spec['num_heads']} heads "
        f"(head dim {spec['head_dim']}), mlp {spec['mlp_dim']}, vocab {spec['vocab_size']}, "
        f"seq {spec['seq_len']} x batch {spec['batch_size']}; maxlm's closed-form count "
        f"{spec['params']:,} parameters, {spec['flops_per_token'] / 1e6:.1f} MFLOP/token",
        flush=True,
    )
    runners: dict[str, Runner] = {}
    try:
        for kind in args.peers:
            started = time.perf_counter()
            try:
                runner = start(kind, spec, args, workdir)
            except Skipped as reason:
                print(f"{'MaxText' if kind == 'maxtext' else kind} skipped: {reason}", flush=True)
                continue
            runners[kind] = runner
            if "params" in runner.facts:
                check_params(name, kind, runner.facts["params"], spec["params"])
            print(f"  {kind}: ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        times: dict[str, list[float]] = {kind: [] for kind in runners}
        for round_index, steps in enumerate(steps_per_round(args.steps, args.rounds), 1):
            for kind, runner in list(runners.items()):
                try:
                    times[kind] += runner.run(steps)
                except Skipped as reason:
                    label = "MaxText" if kind == "maxtext" else kind
                    print(f"{label} skipped: {reason}", flush=True)
                    runner.kill()
                    del runners[kind], times[kind]
                    continue
                if kind == "maxtext" and round_index == 1:
                    check_params(name, kind, runner.facts.get("params"), spec["params"])
                median = statistics.median(times[kind][-steps:])
                print(
                    f"  round {round_index}/{args.rounds} {kind}: {steps} steps, "
                    f"median {median:.3f} s",
                    file=sys.stderr,
                )
        rows = []
        for kind, runner in runners.items():
            tokens_per_s = spec["tokens_per_step"] / statistics.median(times[kind])
            rows.append(
                {
                    "shape": name,
                    "kind": kind,
                    "tokens_per_s": tokens_per_s,
                    "mfu": tokens_per_s * spec["flops_per_token"] / peak,
                    "compile_s": runner.facts.get("compile_s"),
                    "rss_mib": runner.close(),
                    "facts": runner.facts,
                }
            )
        return rows
    finally:
        for runner in runners.values():
            runner.kill()


def check_params(shape: str, kind: str, count: int | None, expected: int) -> None:
    print(f"  {kind}: {count:,} parameters" if count else f"  {kind}: parameters not reported")
    if count is not None and count != expected:
        raise SystemExit(f"{shape}: {kind} has {count:,} parameters, maxlm {expected:,}")


def table(rows: list[dict[str, Any]]) -> str:
    """The results as one markdown table."""
    lines = [
        "| shape | implementation | tokens/s | MFU | compile s | peak RSS MiB | maxlm / this |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        maxlm = [r for r in rows if r["shape"] == row["shape"] and r["kind"] == "maxlm"]
        ratio = f"{maxlm[0]['tokens_per_s'] / row['tokens_per_s']:.2f}" if maxlm else "-"
        compile_s = "-" if row["compile_s"] is None else f"{row['compile_s']:.1f}"
        lines.append(
            f"| {row['shape']} | {row['kind']} | {row['tokens_per_s']:,.0f} | "
            f"{100 * row['mfu']:.1f} % | {compile_s} | {row['rss_mib']:,.0f} | {ratio} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """One line per shape: maxlm over torch.compile and the best peer."""
    lines = []
    for shape in dict.fromkeys(row["shape"] for row in rows):
        here = {row["kind"]: row["tokens_per_s"] for row in rows if row["shape"] == shape}
        peers = {kind: value for kind, value in here.items() if kind != "maxlm"}
        if "maxlm" not in here or not peers:
            continue
        best = max(peers, key=peers.__getitem__)
        ratios = ", ".join(f"/ {kind} {here['maxlm'] / v:.2f}" for kind, v in peers.items())
        outcome = "beats every peer" if here["maxlm"] > peers[best] else f"is behind {best}"
        lines.append(f"{shape}: maxlm {ratios} -> maxlm {outcome}")
    return lines


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,small", help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {PEERS}")
    parser.add_argument(
        "--huge-pages", default="maxlm", choices=["maxlm", "all", "none"],
        help="who runs with huge-page malloc (maxlm's CLI sets it for itself)",
    )  # fmt: skip
    parser.add_argument(
        "--maxtext-python",
        default=str(BENCHMARKS.parent / ".venv-maxtext" / "bin" / "python"),
        help="Python (>= 3.12) of a venv with maxtext[tpu] installed",
    )
    args = parser.parse_args(argv)
    args.shapes = args.shapes.split(",")
    args.peers = args.peers.split(",")
    # absolute (MaxText runs in its own directory), but not resolved: a venv's python is a link
    args.maxtext_python = os.path.abspath(args.maxtext_python)
    for value, known, flag in ((args.shapes, SHAPES, "--shapes"), (args.peers, PEERS, "--peers")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {list(known)}")
    if not 1 <= args.rounds <= args.steps:
        parser.error("need 1 <= --rounds <= --steps")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    jax.config.update("jax_platforms", "cpu")  # the driver only measures this CPU's peak
    peak = estimate.measure_cpu_peak(args.dtype)
    device = jax.devices("cpu")[0]
    print(
        f"Python {platform.python_version()}, jax {jax.__version__} ({device.device_kind}: "
        f"{cpu_name()}, {os.cpu_count()} cores); measured {args.dtype} matmul peak "
        f"{peak / 1e9:.0f} GFLOP/s (jax: XLA:CPU, MKL or OpenBLAS, the fastest; used for every MFU)"
    )
    print(
        f"{args.steps} timed steps per implementation in {args.rounds} alternating rounds, "
        f"after 3 warm-up steps; median step time",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="maxlm-compare-"))
    rows: list[dict[str, Any]] = []
    try:
        for name in args.shapes:
            rows += compare_shape(name, args, workdir, peak)
    except BaseException:
        print(f"worker logs kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    peak_after = estimate.measure_cpu_peak(args.dtype)
    print(
        f"\nmatmul peak {peak / 1e9:.0f} GFLOP/s before, {peak_after / 1e9:.0f} after the run "
        "(MFU uses the one before)"
    )
    if not rows:
        raise SystemExit("nothing ran")
    versions = {row["kind"]: row["facts"].get("version") for row in rows}
    torch_facts = next((r["facts"] for r in rows if "torch_peak" in r["facts"]), None)
    print("\nversions: " + "; ".join(f"{kind}: {v}" for kind, v in versions.items() if v))
    if torch_facts:
        print(
            f"torch's own {args.dtype} matmul peak: {torch_facts['torch_peak'] / 1e9:.0f} "
            f"GFLOP/s on {torch_facts['threads']} threads (context only)"
        )
    print()
    print(table(rows))
    print()
    print("\n".join(verdict(rows)), flush=True)
    if "maxlm" in args.peers and not any(row["kind"] == "maxlm" for row in rows):
        raise SystemExit("maxlm itself did not run: no verdict")


if __name__ == "__main__":
    main()
