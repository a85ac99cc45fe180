"""Estimates: parameters, FLOPs, peak FLOP/s, memory per device (against the model's saved
residuals and XLA), training time, batch and mesh suggestions, and the CLI."""

import contextlib
import io
import json
import math
import re
import typing
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from maxlm import (
    cli,
    estimate,
    hardware,
    memory,
    mesh as mesh_lib,
    metrics as metrics_lib,
    mkl,
    optim,
    state as state_lib,
    train_step,
)
from maxlm.config import Config, ConfigError, ModelConfig, OptimizerKind, load
from maxlm.model import Llama


def counted(m: ModelConfig) -> int:
    """Parameters of the real model, from shapes only (nnx.eval_shape allocates nothing)."""
    abstract = nnx.eval_shape(lambda: Llama(m, rngs=nnx.Rngs(0)))
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


TINY = dict(vocab_size=96, d_model=32, num_layers=3, num_heads=4, mlp_dim=80)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(TINY, id="tiny"),
        pytest.param({**TINY, "tie_embeddings": True}, id="tied"),
        pytest.param({**TINY, "num_kv_heads": 2}, id="gqa"),
        pytest.param({**TINY, "num_kv_heads": 1, "head_dim": 16}, id="mqa-wide-heads"),
    ],
)
def test_param_count_matches_the_model(fields):
    m = ModelConfig(**fields)
    assert estimate.param_count(m) == counted(m)


def test_param_count_of_tiny_preset():
    m = load(None, ["model.preset=tiny"]).model
    V, D, L, F = 8192, 256, 4, 688  # configs/models/tiny.yaml
    by_hand = 2 * V * D + L * (4 * D * D + 3 * D * F + 2 * D) + D
    assert estimate.param_count(m) == counted(m) == by_hand == 7_358_720


def test_small_preset_matmul_params_and_flops_by_hand():
    m = load(None, ["model.preset=small"]).model
    L, D, F, V = 8, 512, 1376, 32000
    assert (m.num_layers, m.d_model, m.mlp_dim, m.vocab_size) == (L, D, F, V)
    # per layer: q, k, v, o (D x D each) + gate, up, down (D x F each); plus the LM head
    matmul = L * (4 * D * D + 3 * D * F) + V * D
    assert matmul == 41_680_896
    assert estimate.matmul_params(m) == matmul
    # FACTS.md's MFU convention: 6 x matmul params (incl. LM head) + 12 x L x d x seq
    seq = 512
    assert estimate.flops_per_token(m, seq) == 6 * matmul + 12 * L * D * seq == 275_251_200
    assert estimate.flops_per_token(m, 2 * seq) - estimate.flops_per_token(m, seq) == (
        12 * L * D * seq
    )


def test_tied_head_still_counts_as_a_matmul():
    untied = load(None, ["model.preset=small"]).model
    tied = load(None, ["model.preset=small", "model.tie_embeddings=true"]).model
    assert estimate.param_count(untied) - estimate.param_count(tied) == 32000 * 512
    assert estimate.matmul_params(tied) == estimate.matmul_params(untied)


def test_gqa_shrinks_matmul_params_by_the_kv_projections():
    full = ModelConfig(**TINY)
    gqa = ModelConfig(**TINY, num_kv_heads=1)
    head = full.head_size
    saved = full.num_layers * 2 * full.d_model * (full.num_heads - 1) * head
    assert estimate.matmul_params(full) - estimate.matmul_params(gqa) == saved


def test_cpu_peak_is_measured():
    peak, source = estimate.peak_flops(jax.devices(), "float32")
    assert jax.devices()[0].platform == "cpu"
    assert 1e8 < peak < 1e14  # a real machine: more than 0.1 GFLOP/s, less than 100 TFLOP/s
    assert "measured" in source
    assert f"{peak / 1e9:.0f} GFLOP/s" in source


@pytest.mark.parametrize("mkl_installed", [
    pytest.param(True, marks=pytest.mark.skipif(
        not mkl.installable(), reason="Intel MKL has no wheel for this machine (x86-64 only)")),
    False,
])  # fmt: skip
def test_cpu_peak_times_every_route_the_products_can_take(mkl_installed, monkeypatch):
    """The probe times MKL's product as well where MKL is usable, on each sgemm it can call
    (maxlm's products then take whichever route is faster), and XLA:CPU's alone where it is
    not; the sgemm in use before is in use after."""
    calls, switches = [], []
    real_gemm, real_use = mkl.gemm, mkl.use_float32_gemm
    in_use = mkl.float32_gemm() if mkl_installed else None

    def counted_gemm(a, b, **kwargs):
        calls.append(a.shape)
        return real_gemm(a, b, **kwargs)

    def counted_use(library):
        switches.append(library)
        real_use(library)

    monkeypatch.setattr(mkl, "gemm", counted_gemm)
    monkeypatch.setattr(mkl, "use_float32_gemm", counted_use)
    monkeypatch.setattr(mkl, "unavailable_reason", lambda: None if mkl_installed else "absent")
    assert estimate.measure_cpu_peak(size=64, repeats=2) > 1e6
    assert calls == ([(64, 64)] if mkl_installed else [])  # traced once by jit
    if mkl_installed:
        assert switches == [*mkl.float32_gemms(), in_use]
        assert mkl.float32_gemm() == in_use
    else:
        assert switches == []


def fake_devices(kind: str, count: int, platform: str = "tpu") -> list[SimpleNamespace]:
    return [SimpleNamespace(platform=platform, device_kind=kind) for _ in range(count)]


@pytest.mark.parametrize(
    ("kind", "platform", "per_chip"),
    [
        ("TPU v4", "tpu", 275e12),
        ("TPU v5 lite", "tpu", 197e12),
        ("TPU v5p", "tpu", 459e12),
        ("TPU v6 lite", "tpu", 918e12),
        ("NVIDIA H100 80GB HBM3", "gpu", 989e12),
        ("NVIDIA A100-SXM4-40GB", "gpu", 312e12),
    ],
)
def test_published_peak_scales_with_device_count(kind, platform, per_chip):
    peak, source = estimate.peak_flops(fake_devices(kind, 4, platform), "bfloat16")
    assert peak == 4 * per_chip
    assert "published" in source and kind in source


def test_unknown_accelerator_trains_without_mfu():
    """An unlisted chip is no reason to stop a run: no peak (nan), and the log says why."""
    for kind, platform in [("TPU v99", "tpu"), ("Some Accelerator", "gpu")]:
        peak, source = estimate.peak_flops(fake_devices(kind, 8, platform), "bfloat16")
        assert math.isnan(peak)
        assert repr(kind) in source and "PUBLISHED_PEAK_FLOPS" in source
    throughput = metrics_lib.Throughput(flops_per_token=1e6, peak_flops=math.nan)
    throughput.add(1000)
    assert math.isnan(throughput.report()["mfu"])
    assert estimate.peak_flops(fake_devices("Tesla T4", 1, "gpu"), "float16")[0] == 65e12


# --------------------------------------------------------------------------- presets and shapes

PUBLISHED = {  # parameter counts as published (papers, Hugging Face model cards / configs)
    "llama-7b": 6_738_415_616,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_parameter_counts_match_published_and_the_model(preset):
    m = load(None, [f"model.preset={preset}"]).model
    assert estimate.param_count(m) == counted(m) == PUBLISHED[preset]
    assert sum(estimate.param_breakdown(m).values()) == PUBLISHED[preset]


def test_breakdown_of_llama2_7b_by_hand():
    V, D, L, F = 32000, 4096, 32, 11008
    parts = estimate.param_breakdown(load(None, ["model.preset=llama2-7b"]).model)
    assert parts == {
        "embeddings": 2 * V * D,  # input table + untied output head
        "attention": L * 4 * D * D,
        "mlp": L * 3 * D * F,
        "norms": (2 * L + 1) * D,
    }


@pytest.mark.parametrize(
    "fields", [TINY, {**TINY, "tie_embeddings": True}, {**TINY, "num_kv_heads": 2, "head_dim": 16}]
)
def test_parameter_table_is_the_models(fields):
    """maxlm.memory's table of shapes and logical axes is what the real model creates."""
    model = nnx.eval_shape(lambda: state_lib.build_model(ModelConfig(**fields), 0))
    shapes = state_lib.split_params(model)[1]
    names = state_lib.logical_names(model)
    table = {
        tuple(p.path.split(".")): (p.shape, p.names)
        for p in memory.parameters(ModelConfig(**fields))
    }
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_names = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, PartitionSpec))
    model_table = {
        tuple(k.key for k in path): (leaf.shape, tuple(spec))
        for (path, leaf), spec in zip(flat_shapes, flat_names, strict=True)
    }
    assert table == model_table


# --------------------------------------------------------------------------- FLOPs and time


def test_full_recomputation_costs_eight_sixths():
    m = load(None, ["model.preset=small"]).model
    L, D, seq = 8, 512, 512
    assert estimate.flops_per_token_recomputed(m, seq) == pytest.approx(
        8 * estimate.matmul_params(m) + 16 * L * D * seq
    )


def test_llama_65b_training_time_from_its_published_throughput():
    """Touvron et al. 2023 (LLaMA), section 2.4: the 65B model processes ~380 tokens/s/GPU on
    2048 A100-80GB GPUs, so the 1.4T-token run takes ~21 days. The MFU that throughput implies
    (380 tokens/s x FLOPs per token / 312 TFLOP/s) put back into training_seconds gives the days."""
    m = load(None, ["model.preset=llama-65b"]).model
    assert estimate.param_count(m) == 65_285_660_672
    per_token = estimate.flops_per_token(m, 2048)  # LLaMA's context length
    a100 = hardware.lookup("a100")
    mfu = 380 * per_token / a100.peak_flops
    assert 0.45 < mfu < 0.55  # what the paper's throughput means: a plausible MFU
    seconds = estimate.training_seconds(1.4e12 * per_token, 2048, a100.peak_flops, mfu)
    assert seconds == pytest.approx(1.4e12 / (380 * 2048))
    assert seconds / 86400 == pytest.approx(21, abs=0.5)


# --------------------------------------------------------------------------- batch size


def test_minicpm_batch_by_hand():
    """Hu et al. 2024 (MiniCPM), section 4.2: bs = 1.2110e9 / L^6.2393 tokens."""
    tokens = estimate.minicpm_batch_tokens(2.2)
    assert tokens == pytest.approx(1.2110e9 / math.exp(6.2393 * math.log(2.2)))
    assert tokens == pytest.approx(8.84e6, rel=1e-3)
    assert estimate.batch_rows(tokens, 4096) == 2159  # 8.84e6 / 4096 = 2159.2
    assert estimate.batch_rows(10, 4096) == 1  # never less than one row
    # a lower target loss needs a bigger batch
    assert estimate.minicpm_batch_tokens(2.0) > tokens


def test_critical_batch_is_the_last_finite_one_a_run_logged(tmp_path):
    records = [
        {"step": 1, "loss": 5.0},
        {"step": 2, "critical_batch_tokens": "nan"},
        {"step": 3, "critical_batch_tokens": 65536.0},
        {"step": 4, "critical_batch_tokens": 131072.0},
        {"step": 5, "critical_batch_tokens": "nan"},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert estimate.measured_critical_batch(tmp_path) == 131072.0
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    with pytest.raises(cli.UsageError, match=r"--measured-run: .* no finite critical_batch_tokens"):
        estimate.measured_critical_batch(tmp_path)


# --------------------------------------------------------------------------- memory


def by_optimizer(kind: str) -> list[str]:
    extra = ["optim.optimizer.momentum=0.9"] if kind == "adafactor" else []
    return [f"optim.optimizer.kind={kind}", *extra]


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["adamw", "adafactor", "lion", "sophia"])
def test_state_bytes_per_device_equal_the_sharded_state(kind, param_dtype):
    """Params and optimizer state per device, in closed form, equal what the blueprint's
    shardings hold on an fsdp 4 x tensor 2 mesh (adafactor's factored moments replicated;
    Sophia's float32 whatever the parameter dtype)."""
    cfg = load(
        None,
        [
            "model.preset=tiny", f"model.param_dtype={param_dtype}", "mesh.data=1", "mesh.fsdp=4",
            "mesh.tensor=2", *by_optimizer(kind),
        ],
    )  # fmt: skip
    mesh = mesh_lib.make(cfg.mesh)
    blue = state_lib.blueprint(cfg, optim.build(cfg)[0], mesh)
    usage = memory.per_device(cfg, dict(mesh.shape), "cpu")
    assert usage.params == state_lib.bytes_per_device(blue.abstract.params, blue.shardings.params)
    small = 64 * len(memory.parameters(cfg.model))  # optax's per-leaf scalars, counts, (1,) arrays
    held = state_lib.bytes_per_device(blue.abstract.opt_state, blue.shardings.opt_state)
    assert held - small <= usage.optimizer <= held


def test_every_optimizer_kind_has_a_memory_rule():
    kinds = {
        member.model_fields["kind"].default
        for member in typing.get_args(typing.get_args(OptimizerKind)[0])
    }
    assert kinds <= set(memory.OPTIMIZER_STATE)
    with pytest.raises(
        ConfigError, match=r"optim\.optimizer\.kind: no memory rule for .*'shampoo'"
    ):
        memory.optimizer_rule("shampoo")


FLOAT_BYTES = {"f32": 4, "bf16": 2, "float32": 4, "bfloat16": 2}


def saved_residual_bytes(cfg: Config, platform: str, monkeypatch) -> tuple[int, int]:
    """(bytes per token, other bytes) of what autodiff keeps for the backward pass of the train
    forward (`jax.ad_checkpoint.print_saved_residuals`), minus the parameters themselves."""
    monkeypatch.setattr("maxlm.model.target_platform", lambda constrain: platform)
    m, B, T = cfg.model, cfg.train.global_batch_size, cfg.train.seq_len
    graphdef, params = state_lib.split_params(nnx.eval_shape(lambda: state_lib.build_model(m, 0)))
    batch = {k: jnp.zeros((B, T), jnp.int32) for k in train_step.BATCH_KEYS}

    def objective(params):
        return train_step._forward(graphdef, params, batch, None, loss_chunk=T)[0]

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(objective, params)
    per_token = other = 0
    for line in out.getvalue().splitlines():
        dtype, shape = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
        # parameters are no copies; token ids and lookup indices (int32) are not counted
        if "from the argument" in line or dtype not in FLOAT_BYTES:
            continue
        size = math.prod(int(d) for d in shape.split(",") if d) * FLOAT_BYTES[dtype]
        if size % (B * T) == 0:
            per_token += size // (B * T)
        else:
            other += size
    return per_token, other


@pytest.mark.parametrize("remat", ["none", "full", "minimal", "dots_saveable"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("platform, cpu_matmul", [("cpu", "auto"), ("cpu", "xla"), ("tpu", "auto")])
def test_saved_activations_are_what_autodiff_keeps(remat, dtype, platform, cpu_matmul, monkeypatch):
    """The per-layer formulas of maxlm.memory equal, byte for byte, the residuals JAX saves for
    the backward pass, for each remat policy, compute dtype and matmul path (MKL where
    installed, XLA:CPU layouts, or plain einsums). Dimensions are chosen so that only
    activations are multiples of B*T = 15."""
    cfg = load(
        None,
        [
            "model.vocab_size=64", "model.d_model=16", "model.num_layers=2", "model.num_heads=4",
            "model.num_kv_heads=2", "model.head_dim=8", "model.mlp_dim=44",
            f"model.remat={remat}", f"model.dtype={dtype}", f"model.cpu_matmul={cpu_matmul}",
            "train.global_batch_size=3", "train.seq_len=5",
        ],
    )  # fmt: skip
    per_token, other = saved_residual_bytes(cfg, platform, monkeypatch)
    m, c, cpu = cfg.model, 2 if dtype == "bfloat16" else 4, platform == "cpu"
    mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    w = memory.widths(cfg, mesh)
    route = memory.matmul_route(cfg, platform, devices=1)
    attention = memory.attention_path(cfg, route)
    layers = m.num_layers * memory.layer_bytes(w, remat, c, cpu, attention)
    assert per_token == layers + memory.outside_layers_bytes(w, remat, c, cfg.train.loss_chunk_size)
    params = memory.parameters(m)
    head_gradient = m.d_model * m.vocab_size * 4  # the fused head's d(head), a gradient
    copies = memory.weight_copies(cfg, params, [1] * len(params), c, route)
    assert other == copies + head_gradient


def compiled_temporaries(cfg: Config) -> int:
    """XLA's temporaries for the real compiled train step on 8 fake CPU devices' first ones."""
    devices = math.prod(cfg.mesh.shape.values())
    mesh = mesh_lib.make(cfg.mesh, jax.devices()[:devices])
    stats = train_step.build(cfg, mesh).train.memory_analysis()
    return stats.temp_size_in_bytes


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["model.remat=none"], id="none"),
        pytest.param(["model.remat=full"], id="full"),
        pytest.param(["model.remat=none", "mesh.data=8", "train.global_batch_size=64"], id="dp8"),
    ],
)
def test_activations_within_a_quarter_of_xla(overrides):
    """Gradients and activations (saved + peak working set) against the compiled step's
    temporaries on CPU (d_model 256, 4 layers, seq 256, 8 rows per device). XLA:CPU's
    temporaries are exactly those: the state is an argument, and the update writes into its
    donated buffers.
    If this fails after a model change, re-derive maxlm.memory's formulas (docs/estimate.md)."""
    cfg = load(
        None, ["model.preset=tiny", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", *overrides]
    )
    temporaries = compiled_temporaries(cfg)
    usage = memory.per_device(cfg, cfg.mesh.shape, "cpu")
    assert usage.rows == 8
    assert usage.saved > 0.05 * temporaries  # activations matter, for both policies
    assert usage.gradients + usage.activations == pytest.approx(temporaries, rel=0.25)
    assert usage.activations == pytest.approx(temporaries - usage.gradients, rel=0.25)


# --------------------------------------------------------------------------- suggestions


def test_llama2_7b_fits_a_v5p_8():
    """v5p-8 is 4 chips of 95 GiB: FSDP over 2 of them already holds 7B with AdamW."""
    cfg = load(None, ["model.preset=llama2-7b", "model.remat=full", "train.seq_len=2048"])
    shape, usage = estimate.suggest_mesh(cfg, hardware.lookup("v5p"), 4)
    assert estimate.fits(usage, hardware.lookup("v5p"))
    assert usage.total <= 0.9 * 95 * 2**30
    assert shape == {"data": 2, "fsdp": 2, "tensor": 1}
    # the state: 16 bytes per parameter (f32 params, grads, mu, nu), over 2 chips but the norms
    norms = (2 * 32 + 1) * 4096
    state = usage.params + usage.gradients + usage.optimizer
    assert state == 16 * ((6_738_415_616 - norms) / 2 + norms)


def test_llama2_70b_does_not_fit_eight_v5e_chips():
    """8 x 16 GiB = 128 GiB cannot hold 70B parameters' 16 bytes each (1.1 TB)."""
    cfg = load(None, ["model.preset=llama2-70b", "model.remat=full"])
    shape, usage = estimate.suggest_mesh(cfg, hardware.lookup("v5e"), 8)
    assert not estimate.fits(usage, hardware.lookup("v5e"))
    assert usage.params > 16 * 2**30  # even the parameters alone
    assert shape == {"data": 1, "fsdp": 8, "tensor": 1}  # the most sharding it tried
    est = estimate.build(cfg, hardware.lookup("v5e"), 8)
    assert "NOTHING FITS" in est.table() and "more chips" in est.table()
    assert est.to_json()["suggested_mesh"]["fits"] is False


# --------------------------------------------------------------------------- CLI


def test_cli_prints_the_table(capsys, tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10, "critical_batch_tokens": 4e5}))
    argv = ["model.preset=llama2-7b", "train.seq_len=4096", "--hardware=v5p", "--chips=256"]
    assert estimate.main([*argv, "--tokens=2e12", f"--measured-run={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out and "embeddings" in out and "norms" in out
    assert "training time on 256 x v5p" in out and "days" in out
    assert "train.global_batch_size=98" in out  # 4e5 tokens / 4096 = 97.7 rows
    assert "mesh suggestion: data" in out and "FITS" in out


def test_cli_json(capsys):
    argv = ["model.preset=tiny", "--hardware=h100", "--chips=8", "--target-loss=3", "--json"]
    assert estimate.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["total"] == 7_358_720
    assert report["tokens"] == 1000 * 8 * 256  # train.steps x global_batch_size x seq_len
    assert report["flops"]["total"] == report["flops"]["per_token"] * report["tokens"]
    assert report["batch"]["tokens"] == pytest.approx(1.2110e9 / 3**6.2393)
    assert report["memory_per_device"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert report["memory_per_device"]["fits"] is True
    expected = report["flops"]["total"] / (8 * 989e12 * 0.4)
    assert report["training_seconds"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hardwre=v5p"], "unrecognized arguments: --hardwre=v5p"),
        (["--hardware=v7"], "--hardware: unknown accelerator 'v7'"),
        (["--mfu=1.5"], "--mfu: a fraction of peak"),
        (["--chips=x"], "argument --chips: invalid int value"),
        (["model.num_layrs=2"], "model.num_layrs"),
        (["--chips=3", "mesh.fsdp=2"], "mesh: fixed axes"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert estimate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
