"""Back-of-envelope numbers for a run: parameters, FLOPs, memory per device, training time, and
batch-size and mesh suggestions; `python -m maxlm.estimate --config=FILE [key=value ...]
[--hardware=v5p --chips=256 --mfu=0.4 --tokens=2e12 --target-loss=2.2 --json]`.

The formulas and an example are in docs/estimate.md; memory per device is maxlm.memory's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from maxlm import cli, config as config_lib, memory, mesh as mesh_lib, mkl
from maxlm.config import Config, ConfigError, ModelConfig
from maxlm.hardware import HARDWARE, PUBLISHED_PEAK_FLOPS, Hardware, lookup

# MiniCPM's fitted batch size (Hu et al. 2024, arXiv:2404.06395, section 4.2): the batch in
# tokens that reaches loss L fastest is 1.2110e9 / L^6.2393.
MINICPM_BATCH_SCALE = 1.2110e9
MINICPM_BATCH_EXPONENT = 6.2393
HBM_HEADROOM = 0.9  # plan for 90% of HBM: the runtime and XLA's fragmentation take the rest
CRITICAL_BATCH_KEY = "critical_batch_tokens"  # maxlm.noise_scale's metric in metrics.jsonl


# --------------------------------------------------------------------------- parameters


def param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count (embedding, blocks, final norm, untied head)."""
    return embedding_params(cfg) + cfg.num_layers * block_params(cfg) + cfg.d_model


def embedding_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)


def block_params(cfg: ModelConfig) -> int:
    d, h = cfg.d_model, cfg.head_size
    attention = d * cfg.num_heads * h * 2 + d * cfg.kv_heads * h * 2
    return attention + 3 * d * cfg.mlp_dim + 2 * d


def param_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by kind: embeddings (input table + output head), attention, mlp, norms."""
    d, h, layers = cfg.d_model, cfg.head_size, cfg.num_layers
    return {
        "embeddings": embedding_params(cfg),
        "attention": layers * 2 * d * h * (cfg.num_heads + cfg.kv_heads),
        "mlp": layers * 3 * d * cfg.mlp_dim,
        "norms": (2 * layers + 1) * d,
    }


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in matmuls: every block weight plus the output head, not the lookup."""
    return cfg.num_layers * (block_params(cfg) - 2 * cfg.d_model) + cfg.vocab_size * cfg.d_model


# --------------------------------------------------------------------------- FLOPs and time


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + 12 x L x (N*H) x seq for attention."""
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len
    return 6.0 * matmul_params(cfg) + attention


def flops_per_token_recomputed(cfg: ModelConfig, seq_len: int) -> float:
    """With full recomputation (model.remat=full) the forward pass runs twice: 8 x matmul
    params + 16 x L x (N*H) x seq."""
    return flops_per_token(cfg, seq_len) * 8 / 6


def run_tokens(cfg: Config) -> int:
    """Tokens of the configured run: train.steps x global_batch_size x seq_len."""
    return cfg.train.steps * cfg.train.tokens_per_step


def training_seconds(flops: float, chips: int, peak_per_chip: float, mfu: float) -> float:
    """Wall time of `flops` model FLOPs on `chips` chips running at `mfu` of their peak."""
    return flops / (chips * peak_per_chip * mfu)


def measure_cpu_peak(dtype: str = "float32", size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a square matmul on the first CPU device (the whole machine's cores): the fastest
    of `repeats` runs by XLA:CPU and, where installed, by MKL's custom call on each sgemm it can
    call (MKL's, OpenBLAS's): maxlm's products take the fastest route, so the peak is the best
    of them; machine noise only ever slows a run down."""
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    routes: list[tuple[str | None, Callable[..., jax.Array]]] = [(None, jax.jit(jnp.matmul))]
    in_use = None  # the sgemm the products run on, restored after timing each one
    if jnp.dtype(dtype) in mkl.TARGETS and mkl.unavailable_reason() is None:
        by_mkl = jax.jit(lambda x, y: mkl.gemm(x, y))
        in_use = mkl.float32_gemm()
        float32 = jnp.dtype(dtype) == jnp.float32
        routes += [
            (library, by_mkl) for library in mkl.float32_gemms() if float32 or library == in_use
        ]
    fastest = math.inf
    try:
        for library, product in routes:
            if library is not None:
                mkl.use_float32_gemm(library)
            product(a, a).block_until_ready()
            for _ in range(repeats):
                start = time.perf_counter()
                product(a, a).block_until_ready()
                fastest = min(fastest, time.perf_counter() - start)
    finally:
        if in_use is not None:
            mkl.use_float32_gemm(in_use)
    return 2 * size**3 / fastest


@functools.cache
def _cpu_peak(dtype: str) -> float:
    """`measure_cpu_peak` once per process (a process that trains several runs measures once)."""
    return measure_cpu_peak(dtype)


def peak_flops(devices: Sequence[jax.Device], dtype: str) -> tuple[float, str]:
    """Peak FLOP/s of the whole mesh and where the number comes from."""
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        # fake CPU devices share the same cores: the probe measures the machine, not a device
        peak = _cpu_peak(dtype)
        return peak, f"measured {dtype} matmul peak of this CPU: {peak / 1e9:.0f} GFLOP/s"
    for name, per_chip in PUBLISHED_PEAK_FLOPS.items():
        if kind.startswith(name):
            return per_chip * len(
                devices
            ), f"published peak of {kind}: {per_chip / 1e12:.0f} TFLOP/s"
    # training goes on without MFU (logged as nan) rather than failing on an unlisted chip
    return math.nan, (
        f"unknown peak of device kind {kind!r} (MFU is not computed; add it to "
        "PUBLISHED_PEAK_FLOPS in maxlm/hardware.py)"
    )


# --------------------------------------------------------------------------- batch and mesh


def minicpm_batch_tokens(target_loss: float) -> float:
    """MiniCPM's batch size (tokens) for reaching `target_loss` (nats per token)."""
    return MINICPM_BATCH_SCALE / target_loss**MINICPM_BATCH_EXPONENT


def batch_rows(tokens: float, seq_len: int) -> int:
    """A batch of about `tokens` tokens as whole sequences of `seq_len` (at least one)."""
    return max(1, round(tokens / seq_len))


def measured_critical_batch(run_dir: str | Path) -> float:
    """The last finite `critical_batch_tokens` that a run logged to its metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise cli.UsageError(f"--measured-run: no metrics.jsonl in {run_dir}")
    found = None
    for line in path.read_text().splitlines():
        value = json.loads(line).get(CRITICAL_BATCH_KEY) if line.strip() else None
        # non-finite values are logged as strings ("nan"); only numbers count
        if isinstance(value, int | float) and math.isfinite(value) and value > 0:
            found = float(value)
    if found is None:
        raise cli.UsageError(
            f"--measured-run: {path} has no finite {CRITICAL_BATCH_KEY} (it is measured with "
            "train.noise_scale.every_steps > 0)"
        )
    return found


def fits(usage: memory.Memory, hardware: Hardware) -> bool:
    return usage.total <= HBM_HEADROOM * hardware.hbm_bytes


def suggest_mesh(
    cfg: Config, hardware: Hardware, chips: int
) -> tuple[dict[str, int], memory.Memory]:
    """The mesh with the smallest FSDP axis (a power of 2) whose per-chip memory `fits`, the
    rest data parallel (tensor as configured, else 1), and its memory; when nothing fits, the
    largest FSDP that shards the weights evenly."""
    tensor = cfg.mesh.tensor if cfg.mesh.tensor > 0 and chips % cfg.mesh.tensor == 0 else 1
    tried: tuple[dict[str, int], memory.Memory] | None = None
    fsdp = 1
    while (chips // tensor) % fsdp == 0:
        shape = {"data": chips // tensor // fsdp, "fsdp": fsdp, "tensor": tensor}
        try:
            tried = shape, memory.per_device(cfg, shape, hardware.platform)
        except ConfigError:  # a weight dimension this FSDP size does not divide
            break
        if fits(tried[1], hardware):
            break
        fsdp *= 2
    if tried is None:
        raise ConfigError(f"mesh.tensor: {tensor} does not shard the weights evenly")
    return tried


# --------------------------------------------------------------------------- the report


@dataclasses.dataclass
class Estimate:
    """Everything the CLI prints, as numbers (`to_json`) or a table (`table`)."""

    cfg: Config
    hardware: Hardware | None
    chips: int
    mfu: float
    tokens: float
    mesh: dict[str, int]
    usage: memory.Memory  # per device, on `mesh`
    batch_tokens: float | None = None
    batch_source: str | None = None
    suggested_mesh: dict[str, int] | None = None
    suggested_memory: memory.Memory | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def flops(self) -> dict[str, float]:
        m, seq = self.cfg.model, self.cfg.train.seq_len
        return {
            "per_token": flops_per_token(m, seq),
            "per_token_recomputed": flops_per_token_recomputed(m, seq),
            "total": flops_per_token(m, seq) * self.tokens,
            "total_recomputed": flops_per_token_recomputed(m, seq) * self.tokens,
        }

    @property
    def seconds(self) -> float | None:
        if self.hardware is None:
            return None
        flops = self.flops["total"]
        return training_seconds(flops, self.chips, self.hardware.peak_flops, self.mfu)

    def fits(self, usage: memory.Memory | None) -> bool | None:
        return None if self.hardware is None or usage is None else fits(usage, self.hardware)

    def to_json(self) -> dict[str, Any]:
        m = self.cfg.model
        seconds = self.seconds
        rows = batch_rows(self.batch_tokens, self.cfg.train.seq_len) if self.batch_tokens else None
        hardware = self.hardware
        return {
            "model": m.preset,
            "parameters": {"total": param_count(m), **param_breakdown(m)},
            "matmul_parameters": matmul_params(m),
            "tied_embeddings": m.tie_embeddings,
            "seq_len": self.cfg.train.seq_len,
            "tokens": self.tokens,
            "flops": self.flops,
            "hardware": None if hardware is None else dataclasses.asdict(hardware),
            "peak_flops_per_chip": None if hardware is None else hardware.peak_flops,
            "chips": self.chips,
            "mfu": self.mfu,
            "training_seconds": seconds,
            "training_days": None if seconds is None else seconds / 86400,
            "memory_per_device": _memory_json(self.mesh, self.usage, self.fits(self.usage)),
            "hbm_bytes_per_chip": None if hardware is None else hardware.hbm_bytes,
            "hbm_headroom": HBM_HEADROOM,
            "batch": {
                "tokens": self.batch_tokens,
                "rows": rows,
                "data_parallel": _data_parallel(self),
                "source": self.batch_source,
            },
            "suggested_mesh": None
            if self.suggested_mesh is None
            else _memory_json(
                self.suggested_mesh, self.suggested_memory, self.fits(self.suggested_memory)
            ),
            "notes": self.notes,
        }

    def table(self) -> str:
        return "\n".join(
            _parameter_lines(self)
            + _flops_lines(self)
            + _memory_lines(self)
            + _batch_lines(self)
            + _mesh_lines(self)
            + [f"note: {note}" for note in self.notes]
        )


def _memory_json(
    mesh: dict[str, int], usage: memory.Memory | None, fits: bool | None
) -> dict[str, Any]:
    parts = {} if usage is None else dataclasses.asdict(usage)
    if usage is not None:
        parts |= {"activations": usage.activations, "total": usage.total}
    return {"mesh": mesh, **parts, "fits": fits}


def _gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _parameter_lines(e: Estimate) -> list[str]:
    m = e.cfg.model
    parts = param_breakdown(m)
    table = m.vocab_size * m.d_model
    head = "tied: the input table" if m.tie_embeddings else f"output head {table:,}"
    return [
        f"parameters ({m.preset or 'custom'})  {param_count(m):>16,}",
        f"  embeddings           {parts['embeddings']:>16,}   input {table:,} + {head}",
        f"  attention            {parts['attention']:>16,}",
        f"  mlp                  {parts['mlp']:>16,}",
        f"  norms                {parts['norms']:>16,}",
        "",
    ]


def _flops_lines(e: Estimate) -> list[str]:
    flops, m = e.flops, e.cfg.model
    used = "   <- model.remat=full" if m.remat == "full" else ""
    lines = [
        f"training FLOPs at seq_len {e.cfg.train.seq_len:<8} per token    run of {e.tokens:.3e} "
        "tokens",
        f"  6N + attention                 {flops['per_token']:.3e}    {flops['total']:.3e}",
        f"  8N + attention (remat full)    {flops['per_token_recomputed']:.3e}    "
        f"{flops['total_recomputed']:.3e}{used}",
        "",
    ]
    hw, seconds = e.hardware, e.seconds
    if hw is None or seconds is None:
        return [*lines, "training time: give --hardware and --chips (and --mfu, default 0.4)", ""]
    per_chip = e.mfu * hw.peak_flops / flops["per_token"]
    recompute = "; remat full does 8/6 of them" if m.remat == "full" else ""
    return [
        *lines,
        f"training time on {e.chips} x {hw.name} ({hw.peak_flops / 1e12:.0f} TFLOP/s dense bf16 "
        f"each{'; ' + hw.note if hw.note else ''}) at MFU {e.mfu:.2f}",
        f"  {flops['total']:.3e} / ({e.chips} x {hw.peak_flops:.3e} x {e.mfu:.2f}) = "
        f"{seconds:.3e} s = {seconds / 86400:.1f} days; {per_chip:,.0f} tokens/s per chip",
        f"  (MFU counts 6N + attention FLOPs, as maxlm.train reports it{recompute})",
        "",
    ]


def _memory_lines(e: Estimate) -> list[str]:
    m, usage = e.cfg.model, e.usage
    mesh = " x ".join(f"{k} {v}" for k, v in e.mesh.items())
    verdict = f"   {_verdict(e, usage)}" if e.hardware else ""
    return [
        f"memory per device (mesh {mesh}; {usage.rows:g} rows of {e.cfg.train.seq_len} tokens "
        "per micro-batch)",
        f"  remat {m.remat}, attention {m.attention}, params {m.param_dtype}, compute "
        f"{_compute_dtype(e)}, optimizer {e.cfg.optim.optimizer.kind}",
        f"  parameters       {_gib(usage.params):>12}",
        f"  gradients        {_gib(usage.gradients):>12}",
        f"  optimizer state  {_gib(usage.optimizer):>12}",
        f"  activations      {_gib(usage.activations):>12}   saved for the backward pass "
        f"{_gib(usage.saved)} + peak working set {_gib(usage.working)}",
        f"  total            {_gib(usage.total):>12}{verdict}",
        "",
    ]


def _verdict(e: Estimate, usage: memory.Memory) -> str:
    assert e.hardware is not None
    verdict = "FITS" if e.fits(usage) else "DOES NOT FIT"
    return (
        f"of {e.hardware.hbm_gib:g} GiB HBM ({usage.total / e.hardware.hbm_bytes:.0%}): "
        f"{verdict} (planning for {HBM_HEADROOM:.0%})"
    )


def _compute_dtype(e: Estimate) -> str:
    platform = e.hardware.platform if e.hardware else "cpu"
    return {4: "float32", 2: "bfloat16"}[memory.compute_bytes(e.cfg.model.dtype, platform)]


def _data_parallel(e: Estimate) -> int:
    """Data x fsdp of the suggested mesh (else the configured one): what a batch must divide."""
    mesh = e.suggested_mesh or e.mesh
    return mesh["data"] * mesh["fsdp"]


def _batch_lines(e: Estimate) -> list[str]:
    train = e.cfg.train
    configured = f"configured {train.global_batch_size} rows = {train.tokens_per_step:,} tokens"
    if e.batch_tokens is None:
        return [
            "batch size: give --target-loss=L (MiniCPM's rule), --critical-batch-tokens=N or "
            "--measured-run=RUN_DIR for a suggestion",
            f"  {configured}",
            "",
        ]
    rows, dp = batch_rows(e.batch_tokens, train.seq_len), _data_parallel(e)
    return [
        f"batch size: {e.batch_source}: {e.batch_tokens:.3e} tokens",
        f"  -> train.global_batch_size={rows} (rows of {train.seq_len}; {math.ceil(rows / dp) * dp}"
        f" as a multiple of data x fsdp = {dp})",
        f"  {configured}",
        "",
    ]


def _mesh_lines(e: Estimate) -> list[str]:
    if e.hardware is None or e.suggested_mesh is None or e.suggested_memory is None:
        return ["mesh suggestion: give --hardware and --chips", ""]
    shape = " x ".join(f"{k} {v}" for k, v in e.suggested_mesh.items())
    flags = " ".join(f"mesh.{k}={v}" for k, v in e.suggested_mesh.items())
    usage = e.suggested_memory
    if not e.fits(usage):
        return [
            f"mesh suggestion: NOTHING FITS on {e.chips} x {e.hardware.name}; even {shape} "
            f"needs {_gib(usage.total)} per chip, {_verdict(e, usage)}",
            f"  try {_fit_hint(e, usage)}",
            "",
        ]
    return [
        f"mesh suggestion: {shape} ({flags})",
        f"  {_gib(usage.total)} per chip {_verdict(e, usage)}",
        "",
    ]


def _fit_hint(e: Estimate, usage: memory.Memory) -> str:
    """What could make it fit: more chips when the state alone is too big, else less activation."""
    assert e.hardware is not None
    state = usage.params + usage.gradients + usage.optimizer
    if state > HBM_HEADROOM * e.hardware.hbm_bytes:
        return f"more chips: parameters, gradients and optimizer state alone need {_gib(state)}"
    hints = [] if e.cfg.model.remat == "full" else ["model.remat=full"]
    hints += ["fewer rows per micro-batch (train.grad_accum_steps)", "more chips"]
    return " or ".join(hints)


def build(
    cfg: Config,
    hardware: Hardware | None,
    chips: int,
    *,
    mfu: float = 0.4,
    tokens: float | None = None,
    batch_tokens: float | None = None,
    batch_source: str | None = None,
) -> Estimate:
    """All estimates for `cfg` on `chips` chips of `hardware` (None: as on this CPU)."""
    platform = hardware.platform if hardware else "cpu"
    shape = dict(zip(config_lib.MESH_AXES, mesh_lib.resolve_shape(cfg.mesh, chips), strict=True))
    estimate = Estimate(
        cfg=cfg,
        hardware=hardware,
        chips=chips,
        mfu=mfu,
        tokens=float(tokens if tokens is not None else run_tokens(cfg)),
        mesh=shape,
        usage=memory.per_device(cfg, shape, platform),
        batch_tokens=batch_tokens,
        batch_source=batch_source,
    )
    if cfg.model.dtype == "auto":
        estimate.notes.append(
            f"model.dtype auto -> {_compute_dtype(estimate)} (as on {platform.upper()})"
        )
    if hardware is None:
        estimate.notes.append("no --hardware: memory as this CPU would use it")
    data_parallel = shape["data"] * shape["fsdp"]
    if cfg.train.micro_batch_size % data_parallel:
        estimate.notes.append(
            f"train.global_batch_size / grad_accum_steps = {cfg.train.micro_batch_size} rows "
            f"do not split over data x fsdp = {data_parallel} devices; training refuses it"
        )
    if hardware is not None:
        estimate.suggested_mesh, estimate.suggested_memory = suggest_mesh(cfg, hardware, chips)
    return estimate


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m maxlm.estimate",
        description="Parameters, FLOPs, memory per device, training time, batch size and mesh "
        "for a config, in closed form (docs/estimate.md). Exit status 2 for a bad flag or config.",
    )
    parser.add_argument("--config", metavar="FILE", help="Run config (YAML).")
    parser.add_argument("--hardware", help=f"Accelerator: {', '.join(HARDWARE)}.")
    parser.add_argument(
        "--chips", type=int, help="Chips in the job (default: the config's fixed mesh, else 1)."
    )
    parser.add_argument("--mfu", type=float, default=0.4, help="Model FLOPs utilization.")
    parser.add_argument("--tokens", type=float, help="Training tokens (default: the config's).")
    parser.add_argument("--target-loss", type=float, help="Loss for MiniCPM's batch-size rule.")
    measured = parser.add_mutually_exclusive_group()
    measured.add_argument("--critical-batch-tokens", type=float, help="Measured critical batch.")
    measured.add_argument(
        "--measured-run", metavar="RUN_DIR", help="Take the critical batch a run measured."
    )
    parser.add_argument("--json", action="store_true", help="Print JSON instead of the table.")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="Config overrides, e.g. mesh.fsdp=-1."
    )
    return parser


def _check_positive(args: argparse.Namespace) -> None:
    for flag in ("chips", "mfu", "tokens", "target_loss", "critical_batch_tokens"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise cli.UsageError(f"--{flag.replace('_', '-')}: must be positive, got {value}")
    if args.mfu > 1:
        raise cli.UsageError(f"--mfu: a fraction of peak, at most 1, got {args.mfu}")


def _batch(args: argparse.Namespace) -> tuple[float | None, str | None]:
    """The suggested batch in tokens and where it comes from (measured first)."""
    if args.critical_batch_tokens:
        return args.critical_batch_tokens, "measured critical batch (--critical-batch-tokens)"
    if args.measured_run:
        tokens = measured_critical_batch(args.measured_run)
        return tokens, f"critical batch measured by {args.measured_run}"
    if args.target_loss:
        return (
            minicpm_batch_tokens(args.target_loss),
            f"MiniCPM's rule 1.2110e9 / L^6.2393 at L = {args.target_loss:g}",
        )
    return None, None


def _default_chips(cfg: Config) -> int:
    sizes = cfg.mesh.shape.values()
    return 1 if -1 in sizes else math.prod(sizes)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the estimate; 0 on success, 2 for a bad flag or config (one line on stderr)."""
    try:
        args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
        _check_positive(args)
        hardware = lookup(args.hardware) if args.hardware else None
        cfg = config_lib.load(args.config, args.overrides)
        batch_tokens, batch_source = _batch(args)
        estimate = build(
            cfg, hardware, args.chips or _default_chips(cfg), mfu=args.mfu,
            tokens=args.tokens, batch_tokens=batch_tokens, batch_source=batch_source,
        )  # fmt: skip
    except (cli.UsageError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(estimate.to_json(), indent=2) if args.json else estimate.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
