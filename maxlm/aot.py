"""`python -m maxlm.aot --config=FILE --topology=v5p-8 [key=value ...]`: compile the real train
step ahead of time for a TPU slice, on any machine with libtpu installed (no TPU needed), and
report per-chip memory against HBM and XLA's FLOPs against maxlm.estimate; for several slices
(`mesh.dcn_*`), also which collectives cross the data-center network between them.

The slice's devices come from libtpu (`jax.experimental.topologies`); the mesh, state shardings,
batch and step are exactly training's (`mesh.make`, `train_step.build`), so a config that does
not fit here does not fit there. docs/aot.md has results for LLaMA 2 7B and Llama 3 8B.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
from jax.experimental import topologies

from maxlm import (
    cli,
    collectives as collectives_lib,
    config as config_lib,
    estimate,
    mesh as mesh_lib,
    optim,
    state as state_lib,
    train_step,
)
from maxlm.config import Config, ConfigError
from maxlm.train import check_batch

GiB = 2**30
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation: libtpu's topology prefix and what one chip holds."""

    prefix: str
    dims: int  # torus dimensions: 3 for v4/v5p, 2 for v5e/v6e
    cores_per_chip: int  # v4/v5p accelerator types count TensorCores; a chip is one megacore device
    hbm_gib: float  # HBM a program may use per chip, as libtpu 0.0.42's compiler counts it


GENERATIONS = {
    "v4": Generation("v4", 3, 2, 30.75),
    "v5p": Generation("v5p", 3, 2, 95.74),
    "v5e": Generation("v5e", 2, 1, 15.75),
    "v6e": Generation("v6e", 2, 1, 31.25),
}
ALIASES = {"v5litepod": "v5e", "v5": "v5p"}  # Cloud TPU's name for v5e; libtpu's for v5p
# Chips -> slice shape of the Cloud TPU accelerator types; other shapes go as raw topologies.
SHAPES = {
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    3: {
        4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
    },
}  # fmt: skip
HOST_BOUNDS = (2, 2, 1)  # chips per host of every multi-host slice of these generations


@dataclasses.dataclass(frozen=True)
class Target:
    """The slice to compile for: `name` as given, `topology` as libtpu names it."""

    name: str
    generation: Generation
    topology: str
    num_slices: int = 1

    @property
    def chips_per_host_bounds(self) -> tuple[int, ...]:
        dims = [int(d) for d in self.topology.split(":")[1].split("x")]
        dims += [1] * (3 - len(dims))
        return tuple(min(bound, dim) for bound, dim in zip(HOST_BOUNDS, dims, strict=True))


def known_targets() -> str:
    """The accepted names, for error messages."""
    cores = ", ".join(str(2 * chips) for chips in SHAPES[3])
    chips = ", ".join(str(chips) for chips in SHAPES[2])
    return (
        f"v4-N and v5p-N for N in {cores} (TensorCores); v5e-N (or v5litepod-N) and v6e-N for "
        f"N in {chips} (chips); or a libtpu topology such as v5e:4x4 or v5p:2x2x4"
    )


def resolve_target(name: str, num_slices: int = 1) -> Target:
    """An accelerator type (v5p-8, v5e-16) or raw topology (v5e:4x4) -> Target."""
    if num_slices < 1:
        raise cli.UsageError(f"--num-slices: must be at least 1, got {num_slices}")
    accelerator = re.fullmatch(r"(v\w+?)-(\d+)", name)
    raw = re.fullmatch(r"(v\w+?):(\d+(?:x\d+)*)", name)
    match = accelerator or raw
    prefix = ALIASES.get(match.group(1), match.group(1)) if match else ""
    generation = GENERATIONS.get(prefix)
    shape = None
    if generation is not None and accelerator is not None:
        count = int(accelerator.group(2))
        if count % generation.cores_per_chip == 0:
            shape = SHAPES[generation.dims].get(count // generation.cores_per_chip)
    elif generation is not None and raw is not None:
        shape = raw.group(2) if raw.group(2).count("x") + 1 == generation.dims else None
    if generation is None or shape is None:
        raise cli.UsageError(f"--topology: unknown TPU slice {name!r}; known: {known_targets()}")
    return Target(name, generation, f"{generation.prefix}:{shape}", num_slices)


@contextlib.contextmanager
def _held_stderr() -> Iterator[None]:
    """Hold back what libtpu prints to fd 2 while it loads (warnings about the Cloud TPU metadata
    a compile-only machine lacks); replay it if loading fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None or "TPU_LIBRARY_PATH" in os.environ


def topology_devices(target: Target) -> list[jax.Device]:
    """Compile-only devices of the slice(s), from libtpu; usage errors are one line."""
    if not libtpu_installed():
        raise cli.UsageError('compiling for TPU needs libtpu: pip install "maxlm[tpu]"')
    # No chip is touched, so libtpu's one-process-per-machine lock (which any jax process takes
    # where libtpu is installed) must not stop a compile beside another jax process.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    options: dict[str, Any] = {"chips_per_host_bounds": target.chips_per_host_bounds}
    if target.generation.cores_per_chip == 2:
        options["chip_config_name"] = "megacore"  # one device per chip, as JAX runs v4/v5p
    if target.num_slices > 1:
        options["num_slices"] = target.num_slices
    try:
        with _held_stderr():
            topology = topologies.get_topology_desc(target.topology, "tpu", **options)
    except jax.errors.JaxRuntimeError as err:
        raise cli.UsageError(f"--topology: {str(err).splitlines()[0]}") from None
    return list(topology.devices)


def for_tpu(cfg: Config) -> tuple[Config, str | None]:
    """The config as it runs on TPU: model.dtype auto resolves by the local backend (CPU here),
    so it is pinned to bfloat16, what auto gives on TPU; and a note saying so."""
    if cfg.model.dtype != "auto":
        return cfg, None
    return _with(cfg, model={"dtype": "bfloat16"}), "model.dtype auto -> bfloat16 (as on TPU)"


def _with(cfg: Config, **sections: dict[str, Any]) -> Config:
    """`cfg` with some keys of some sections changed, validated again."""
    raw = cfg.model_dump()
    for section, changes in sections.items():
        raw[section] = {**raw[section], **changes}
    return config_lib.from_dict(raw)


BUFFERS_HEADING = (
    "largest HBM buffers (XLA's buffer assignment; values sharing one are not live at once)"
)


@dataclasses.dataclass
class Report:
    """What compiling the train step for a slice tells: memory per chip, FLOPs, the setup."""

    target: Target
    device_kind: str
    devices: int
    mesh: dict[str, int]
    cfg: Config
    notes: list[str]
    state_bytes: dict[str, int]  # params / optimizer / batch per chip, from the shardings
    largest_state: list[tuple[int, str, str]]  # (bytes per chip, path, dtype[shard shape])
    compile_s: float = 0.0
    memory: dict[str, int] = dataclasses.field(default_factory=dict)  # compiled.memory_analysis
    largest_buffers: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    compiler_error: str | None = None  # the TPU compiler's own out-of-memory message
    flops: dict[str, float] = dataclasses.field(default_factory=dict)
    collectives: collectives_lib.Summary | None = None  # compiled for several slices

    @property
    def hbm_bytes(self) -> int:
        return int(self.target.generation.hbm_gib * GiB)

    @property
    def fits(self) -> bool:
        return self.compiler_error is None and self.memory["total"] <= self.hbm_bytes

    def verdict(self) -> str:
        """FITS, or DOES NOT FIT naming what is big."""
        hbm = f"{self.target.generation.hbm_gib} GiB"
        if self.compiler_error is not None:
            return f"DOES NOT FIT: {self.compiler_error.splitlines()[0]}"
        memory = self.memory
        used = (
            f"{_size(memory['total'])} of {hbm} per chip ({memory['total'] / self.hbm_bytes:.1%})"
        )
        if self.fits:
            # the compiler's plan leaves out the runtime's own small allocations
            tight = ", under 5% to spare" if memory["total"] > 0.95 * self.hbm_bytes else ""
            return f"FITS: {used}{tight}"
        temporaries = f"temporaries {_size(memory['temporaries'])}"
        if self.largest_buffers:
            size, shapes = self.largest_buffers[0]
            temporaries += f" (largest buffer {_size(size)}: {shapes})"
        size, path, shape = self.largest_state[0]
        arguments = (
            f"arguments {_size(memory['arguments'])} (largest {path} {shape}, {_size(size)})"
        )
        return f"DOES NOT FIT: {used}; biggest: {temporaries}, {arguments}"

    def table(self) -> str:
        cfg, target, model = self.cfg, self.target, self.cfg.model
        slices = f", {target.num_slices} slices" if target.num_slices > 1 else ""
        compiled = f", compiled in {self.compile_s:.1f} s" if self.compile_s else ""
        lines = [
            f"train step for {target.name} (topology {target.topology}{slices}: {self.devices} x "
            f"{self.device_kind}, {target.generation.hbm_gib} GiB HBM each){compiled}",
            f"  model    {model.preset or 'custom'}: {estimate.param_count(model):,} parameters, "
            f"params {model.param_dtype}, compute {model.dtype}, attention {model.attention}",
            f"  mesh     {' x '.join(f'{k} {v}' for k, v in self.mesh.items())}",
            f"  remat    {model.remat} (scan_layers {str(model.scan_layers).lower()})",
            f"  batch    {cfg.train.global_batch_size} x {cfg.train.seq_len} tokens = "
            f"{cfg.train.tokens_per_step:,} per step, grad_accum_steps "
            f"{cfg.train.grad_accum_steps}",
            *(f"  note     {note}" for note in self.notes),
            "",
        ]
        if self.memory:
            memory, state = self.memory, self.state_bytes
            arguments = (
                f"params {_size(state['params'])} + optimizer {_size(state['optimizer'])} + "
                f"batch {_size(state['batch'])}"
            )
            rows = [
                ("arguments", memory["arguments"], arguments),
                ("outputs", memory["outputs"], f"{_size(memory['aliased'])} reuse donated buffers"),
                ("temporaries", memory["temporaries"], "activations, gradients, collectives"),
                ("generated code", memory["generated_code"], ""),
                ("total", memory["total"], "arguments + outputs not aliased + temporaries + code"),
            ]
            lines.append("per chip (compiled.memory_analysis)")
            lines += [f"  {name:<15}{_size(size):>11}   {what}" for name, size, what in rows]
            lines.append("")
        lines += [self.verdict(), ""]
        if self.collectives is not None:
            lines += [*_collective_lines(self.collectives), ""]
        lines.append("largest state arrays per chip (from the shardings)")
        for size, path, shape in self.largest_state:
            lines.append(f"  {_size(size):>11}   {shape:<24} {path}")
        if self.largest_buffers:
            lines.append(BUFFERS_HEADING)
            lines += [f"  {_size(size):>11}   {shapes}" for size, shapes in self.largest_buffers]
        if self.compiler_error is not None and "\n" in self.compiler_error:
            lines += ["", "the TPU compiler said:", self.compiler_error]
        if self.flops:
            lines += ["", *self._flops_lines()]
        return "\n".join(lines)

    def _flops_lines(self) -> list[str]:
        flops, model = self.flops, self.cfg.model
        scanned = model.scan_layers and model.num_layers > 1
        how = "a 2-layer unrolled compile gives one layer's" if scanned else "as compiled"
        if self.cfg.train.grad_accum_steps > 1:
            how += f", x {self.cfg.train.grad_accum_steps} micro-batches"
        expect = {
            "none": "about 1: XLA also counts norms, softmax and the optimizer",
            "full": "up to 8/6: remat=full recomputes each layer's forward pass",
        }.get(model.remat, "between 1 and 8/6: remat recomputes part of the forward pass")
        return [
            "FLOPs per chip per step",
            f"  XLA cost_analysis, as counted  {flops['xla_counted']:.3e}  (a while loop's body "
            "counts once: scanned layers, micro-batches)",
            f"  XLA, whole step                {flops['xla_step']:.3e}  ({how})",
            f"  maxlm.estimate                 {flops['estimate']:.3e}  (flops_per_token x "
            f"{self.cfg.train.tokens_per_step:,} tokens / {self.devices} chips)",
            f"  ratio XLA / estimate           {flops['ratio']:.3f}  (expected {expect})",
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "topology": self.target.name,
            "libtpu_topology": self.target.topology,
            "num_slices": self.target.num_slices,
            "device_kind": self.device_kind,
            "devices": self.devices,
            "hbm_bytes_per_chip": self.hbm_bytes,
            "mesh": self.mesh,
            "model": self.cfg.model.preset,
            "parameters": estimate.param_count(self.cfg.model),
            "remat": self.cfg.model.remat,
            "dtype": self.cfg.model.dtype,
            "global_batch_size": self.cfg.train.global_batch_size,
            "seq_len": self.cfg.train.seq_len,
            "grad_accum_steps": self.cfg.train.grad_accum_steps,
            "notes": self.notes,
            "compile_s": self.compile_s,
            "fits": self.fits,
            "verdict": self.verdict(),
            "compiler_error": self.compiler_error,
            "memory_bytes_per_chip": self.memory,
            "state_bytes_per_chip": self.state_bytes,
            "largest_state": [
                {"bytes": size, "path": path, "shard": shape}
                for size, path, shape in self.largest_state
            ],
            "largest_buffers": [
                {"bytes": size, "shapes": shapes} for size, shapes in self.largest_buffers
            ],
            "flops_per_chip": self.flops,
            "collectives": None if self.collectives is None else {
                "crossing_slices": [
                    {**dataclasses.asdict(row), "expected": row.expected}
                    for row in self.collectives.crossing
                ],
                "within_slice": self.collectives.within,
            },
        }  # fmt: skip


def _collective_lines(summary: collectives_lib.Summary) -> list[str]:
    """What crosses slices, by kind and mesh axes; a warning for all but gradient all-reduces."""
    lines = ["collectives of the program each slice runs, as compiled (sizes: sent per chip)"]
    for row in summary.crossing:
        lines.append(
            f"  across slices (DCN)   {row.kind} over {'+'.join(row.axes)}: {row.count} per step "
            f"({_size(row.bytes)}) + {row.loop_count} per loop iteration ({_size(row.loop_bytes)})"
        )
    if not summary.crossing:
        lines.append("  across slices (DCN)   none")
    within = ", ".join(f"{kind} {count}" for kind, count in summary.within.items())
    lines.append(f"  within a slice (ICI)  {within or 'none'}")
    for row in summary.unexpected:
        lines.append(
            f"WARNING: {row.kind} over {'+'.join(row.axes)} crosses slices: only the "
            "data-parallel gradient all-reduce should; put the slices on mesh.dcn_data"
        )
    return lines


def _size(size: float) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if size >= _UNITS[unit]:
            return f"{size / _UNITS[unit]:.2f} {unit}"
    return f"{size:.0f} B"


def compile_report(cfg: Config, target: Target, *, flops: bool = True) -> Report:
    """Compile `cfg`'s train step for `target` and measure it. Raises ConfigError for a mesh or
    batch that does not divide the slice and UsageError for a bad topology or missing libtpu."""
    cfg, note = for_tpu(cfg)
    devices = topology_devices(target)
    mesh = mesh_lib.make(cfg.mesh, devices)
    check_batch(cfg, mesh_lib.data_parallel_size(mesh))
    # build() makes this blueprint again; the state listing is wanted when compiling fails too
    blue = state_lib.blueprint(cfg, optim.build(cfg)[0], mesh)
    report = Report(
        target=target,
        device_kind=devices[0].device_kind,
        devices=len(devices),
        mesh=dict(mesh.shape),
        cfg=cfg,
        notes=[note] if note else [],
        state_bytes=_state_bytes(cfg, blue, mesh),
        largest_state=largest_state_arrays(blue),
    )
    with tempfile.TemporaryDirectory() as dump:
        try:
            # the dump holds XLA's buffer assignment: what the temporaries are
            steps = train_step.build(cfg, mesh, {"xla_dump_to": dump})
        except jax.errors.JaxRuntimeError as err:
            if not str(err).startswith("RESOURCE_EXHAUSTED"):
                raise
            report.compiler_error = str(err).strip()
            return report
        report.largest_buffers = largest_buffers(Path(dump))
    report.compile_s = steps.compile_s
    report.memory = memory_per_chip(steps.train)
    if target.num_slices > 1:
        hlo = steps.train.as_text()
        if hlo is None:
            raise RuntimeError(f"{steps.train} has no HLO text")
        report.collectives = collectives_lib.summarize(hlo, mesh, cfg.mesh.dcn_shape)
    if flops:
        counted = counted_flops(steps.train)
        step = whole_step_flops(cfg, mesh, counted)
        per_chip = estimate.flops_per_token(cfg.model, cfg.train.seq_len)
        per_chip *= cfg.train.tokens_per_step / len(devices)
        report.flops = {
            "xla_counted": counted,
            "xla_step": step,
            "estimate": per_chip,
            "ratio": step / per_chip,
        }
    return report


def _state_bytes(cfg: Config, blue: state_lib.Blueprint, mesh: jax.sharding.Mesh) -> dict[str, int]:
    rows = cfg.train.global_batch_size // mesh_lib.data_parallel_size(mesh)
    keys = len(train_step.batch_keys(cfg))
    return {
        "params": state_lib.bytes_per_device(blue.abstract.params, blue.shardings.params),
        "optimizer": state_lib.bytes_per_device(blue.abstract.opt_state, blue.shardings.opt_state),
        "batch": keys * rows * cfg.train.seq_len * 4,  # int32 fields
    }


def largest_state_arrays(blue: state_lib.Blueprint, count: int = 5) -> list[tuple[int, str, str]]:
    """The biggest per-chip shards of the train state: (bytes, path, dtype[shard shape])."""
    rows = []
    for (path, leaf), shard in zip(
        jax.tree_util.tree_leaves_with_path(blue.abstract),
        jax.tree_util.tree_leaves(blue.shardings),
        strict=True,
    ):
        shape = shard.shard_shape(leaf.shape)
        size = math.prod(shape) * leaf.dtype.itemsize
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        rows.append((size, name, f"{leaf.dtype.name}{list(shape)}".replace(" ", "")))
    return sorted(rows, key=lambda row: row[0], reverse=True)[:count]


def memory_per_chip(compiled: jax.stages.Compiled) -> dict[str, int]:
    """compiled.memory_analysis() in bytes; outputs that reuse donated arguments count once."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(f"{compiled} has no memory analysis")
    memory = {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
        "generated_code": stats.generated_code_size_in_bytes,
    }
    memory["total"] = (
        memory["arguments"]
        + memory["outputs"]
        - memory["aliased"]
        + memory["temporaries"]
        + memory["generated_code"]
    )
    return memory


def counted_flops(compiled: jax.stages.Compiled) -> float:
    """FLOPs per chip of one run of the program, as XLA's cost analysis counts them."""
    analysis = compiled.cost_analysis()
    if not analysis:
        raise RuntimeError(f"{compiled} has no cost analysis")
    return float(analysis["flops"])


def largest_buffers(dump: Path, count: int = 6) -> list[tuple[int, str]]:
    """The biggest HBM buffers of XLA's buffer assignment, from the memory-usage report it dumps:
    (bytes, the shapes of the values placed in the buffer). [] when there is no report."""
    rows = []
    for report in dump.glob("*memory-usage-report.txt"):
        in_hbm = False
        for line in report.read_text().splitlines():
            if line.startswith("Memory Space:"):
                in_hbm = "(color=0)" in line  # HBM; the others are on-chip VMEM / SMEM
                continue
            fields = [field.strip() for field in line.split(";")]
            size = re.fullmatch(r"([\d.]+)([KMGT]?i?B)", fields[1]) if len(fields) == 5 else None
            if in_hbm and size and size.group(2) in _UNITS:
                rows.append((int(float(size.group(1)) * _UNITS[size.group(2)]), fields[4]))
    return sorted(rows, key=lambda row: row[0], reverse=True)[:count]


def whole_step_flops(cfg: Config, mesh: jax.sharding.Mesh, counted: float) -> float:
    """XLA's FLOPs per chip for the whole step. Its cost analysis counts a while loop's body once:
    for scanned layers, a 2-layer unrolled copy of the step (one micro-batch) gives one layer's
    FLOPs by difference; micro-batches of gradient accumulation multiply (the optimizer update,
    ~10 FLOPs per parameter, is then counted per micro-batch: negligible)."""
    accum = cfg.train.grad_accum_steps
    per_micro_batch = counted
    if cfg.model.scan_layers and cfg.model.num_layers > 1:
        two_layers = _with(
            cfg,
            model={"scan_layers": False, "num_layers": 2},
            train={
                "grad_accum_steps": 1,
                "global_batch_size": cfg.train.global_batch_size // accum,
            },
        )
        unrolled = counted_flops(train_step.build(two_layers, mesh).train)
        per_micro_batch = counted + (cfg.model.num_layers - 1) * (unrolled - counted)
    return accum * per_micro_batch


def _parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m maxlm.aot",
        description="Compile the train step for a TPU slice without one; report memory per chip "
        "and FLOPs. Exit status 1 when it does not fit.",
    )
    parser.add_argument("--config", metavar="FILE", help="Run config (YAML).")
    parser.add_argument(
        "--topology",
        required=True,
        help="A Cloud TPU accelerator type (v5p-8, v4-16, v5e-16, v6e-8) or a libtpu topology "
        "(v5e:4x4, v5p:2x2x2).",
    )
    parser.add_argument(
        "--num-slices",
        type=int,
        help="Slices joined over DCN (default: mesh.dcn_data*dcn_fsdp*dcn_tensor); the report "
        "then says which collectives cross slices.",
    )
    parser.add_argument("--json", metavar="PATH", help="Also write the numbers as JSON.")
    parser.add_argument(
        "--no-flops",
        action="store_true",
        help="Skip the FLOP count (it needs one more, smaller compile with scanned layers).",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="Config overrides, e.g. mesh.fsdp=-1."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Compile and print the report; 0 fits, 1 does not fit, 2 a bad flag, config or setup."""
    # The target's devices come from libtpu; never claim this machine's own accelerators.
    jax.config.update("jax_platforms", "cpu")
    try:
        args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
        cfg = config_lib.load(args.config, args.overrides)
        slices = cfg.mesh.num_slices if args.num_slices is None else args.num_slices
        target = resolve_target(args.topology, slices)
        start = time.perf_counter()
        report = compile_report(cfg, target, flops=not args.no_flops)
    except (cli.UsageError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"(maxlm.aot took {time.perf_counter() - start:.0f} s)", flush=True)
    if args.json:
        output = Path(args.json)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.fits else 1


if __name__ == "__main__":
    sys.exit(main())
