"""Batch-size ramp (fixed micro-batch, growing count) and the gradient noise scale."""

import itertools
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training import committed_steps, overrides, read_jsonl

from maxlm import config, estimate, mesh as mesh_lib, optim, state as state_lib, train_step
from maxlm.batch_size import BatchRamp
from maxlm.config import ConfigError
from maxlm.loss import LossSums
from maxlm.noise_scale import NoiseScale, unbiased_estimates
from maxlm.train import train


def ramp_config(*extra: str) -> config.Config:
    """Micro-batches of 2 rows x 64 tokens = 128 tokens; the final batch is 8 micro-batches."""
    return config.load(
        None,
        [
            "train.steps=20",
            "train.seq_len=64",
            "train.global_batch_size=16",
            "train.grad_accum_steps=8",
            *extra,
        ],
    )


# --------------------------------------------------------------------------- the ramp


def test_ramp_over_steps_grows_linearly_in_whole_increments():
    cfg = ramp_config("train.batch_ramp.start_tokens=256", "train.batch_ramp.ramp_steps=12",
                      "train.batch_ramp.increment_tokens=256")  # fmt: skip
    ramp = BatchRamp(cfg.train)
    counts = [ramp.micro_batches(step) for step in range(1, 21)]
    # 2 + 6 * (i / 12), rounded down to a multiple of 2 above the start: 2 until step 5, ...
    expected = [2 + 2 * int(6 * i / 12 / 2 + 1e-9) for i in range(20)]
    assert counts == [min(c, 8) for c in expected]
    assert counts[0] == 2 and counts[-1] == 8 and counts[12] == 8
    assert all(b - a in (0, 2) for a, b in itertools.pairwise(counts))


def test_ramp_over_tokens_counts_the_tokens_already_seen():
    cfg = ramp_config("train.batch_ramp.start_tokens=128", "train.batch_ramp.ramp_tokens=2048")
    ramp = BatchRamp(cfg.train)
    tokens, counts = 0, []
    for step in range(1, 21):
        count = ramp.micro_batches(step)
        assert count == min(1 + int(7 * min(tokens / 2048, 1.0)), 8)
        counts.append(count)
        tokens += count * 128
    assert counts[0] == 1 and counts[-1] == 8


def test_tokens_before_and_micro_batches_before_agree_with_the_counts():
    cfg = ramp_config("train.batch_ramp.start_tokens=128", "train.batch_ramp.ramp_steps=10")
    ramp = BatchRamp(cfg.train)
    counts = np.array([ramp.micro_batches(step) for step in range(1, 21)])
    cumulative = np.concatenate([[0], np.cumsum(counts)])
    steps, tokens = ramp.tokens_before()
    for step in range(21):  # 0-based: tokens before step index `step`
        assert np.interp(step, steps, tokens) == cumulative[step] * 128
        assert ramp.micro_batches_before(step + 1) == cumulative[step]


def test_learning_rate_over_tokens_follows_the_tokens_seen():
    cfg = ramp_config("train.batch_ramp.start_tokens=128", "train.batch_ramp.ramp_steps=10",
                      "optim.schedule.unit=tokens", "optim.schedule.kind=linear",
                      "optim.schedule.warmup_steps=0", "optim.schedule.min_lr_ratio=0")  # fmt: skip
    _, schedule = optim.build(cfg)
    ramp = BatchRamp(cfg.train)
    total = ramp.micro_batches_before(21) * 128
    for step in range(20):
        seen = ramp.micro_batches_before(step + 1) * 128
        assert float(schedule(step)) == pytest.approx(cfg.optim.lr * (1 - seen / total), rel=1e-5)
    steps_schedule = optim.build(ramp_config("optim.schedule.kind=linear"))[1]
    assert float(schedule(5)) > float(steps_schedule(5))  # small early batches: less decay


def test_following_the_noise_scale_grows_the_batch_early_and_never_shrinks():
    cfg = ramp_config(
        "train.batch_ramp.start_tokens=128",
        "train.batch_ramp.follow_noise_scale=true",
        "train.noise_scale.every_steps=1",
    )
    ramp = BatchRamp(cfg.train)
    assert ramp.micro_batches(10) == 1  # no schedule: only the noise scale moves it
    ramp.observe_noise_scale(10, 100.0)  # below the 128-token batch
    assert ramp.micro_batches(11) == 1
    ramp.observe_noise_scale(11, 1000.0)
    assert ramp.micro_batches(12) == 2
    ramp.observe_noise_scale(12, 10.0)
    assert ramp.micro_batches(13) == 2
    restored = BatchRamp(cfg.train)
    restored.load_state_dict(ramp.state_dict())
    assert restored.micro_batches(13) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["train.batch_ramp.start_tokens=100", "train.batch_ramp.ramp_steps=5"],
         "train.batch_ramp.start_tokens: 100 is not a whole number of micro-batches of 128"),
        (["train.batch_ramp.start_tokens=4096", "train.batch_ramp.ramp_steps=5"],
         "train.batch_ramp.start_tokens: 4096 exceeds the final batch of 1024 tokens"),
        (["train.batch_ramp.start_tokens=128"], "train.batch_ramp.ramp_steps: a batch ramp needs"),
        (["train.grad_accum_steps=1", "train.noise_scale.every_steps=5"],
         "train.noise_scale.every_steps: measuring the noise scale needs two batch sizes"),
        (["train.batch_ramp.start_tokens=128", "train.batch_ramp.follow_noise_scale=true"],
         "train.batch_ramp.follow_noise_scale: needs train.noise_scale.every_steps > 0"),
    ],
)  # fmt: skip
def test_bad_ramps_are_config_errors_naming_the_key(extra, message):
    with pytest.raises(ConfigError, match=message):
        ramp_config(*extra)


def test_micro_batch_steps_equal_the_fused_accumulation():
    """The same 8 rows through the fused step (4 micro-batches in a scan) and through the ramp's
    pieces (4 separate micro-batches): same loss, gradient norm and parameters."""
    base = ["model.vocab_size=128", "model.d_model=32", "model.num_layers=2", "model.num_heads=2",
            "model.mlp_dim=64", "train.seq_len=16", "train.global_batch_size=8",
            "train.grad_accum_steps=4", "train.noise_scale.every_steps=1",
            "mesh.data=1"]  # fmt: skip
    fused_cfg = config.load(None, base)
    micro_cfg = config.load(None, [*base, "train.batch_ramp.start_tokens=128",
                                   "train.batch_ramp.ramp_steps=1"])  # fmt: skip
    mesh = mesh_lib.make(fused_cfg.mesh, devices=jax.devices()[:1])
    fused, micro = train_step.build(fused_cfg, mesh), train_step.build(micro_cfg, mesh)
    assert micro.micro is not None and fused.micro is None
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 128, (8, 16), dtype=np.int32)
    batch = {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "segment_ids": np.ones_like(tokens),
        "positions": np.tile(np.arange(16), (8, 1)),
    }
    # the fused step takes micro-batch k as rows k, k+4 (rows strided over the devices)
    micro_batches = [{key: value[k::4] for key, value in batch.items()} for k in range(4)]
    runs = []
    for steps, batches in ((fused, [batch]), (micro, micro_batches)):
        state = state_lib.init(fused_cfg, steps.optimizer, steps.blueprint)
        placed = [jax.device_put(b, steps.batch_sharding) for b in batches]
        runs.append(steps.run(state, placed, measure_noise=True))
    (fused_state, fused_metrics), (micro_state, micro_metrics) = runs
    for key in ("loss", "grad_norm", "tokens", "batch_tokens", "noise_micro_sq",
                "noise_micro_tokens", "noise_micro_count"):  # fmt: skip
        assert float(micro_metrics[key]) == pytest.approx(float(fused_metrics[key]), rel=1e-5), key
    assert float(micro_metrics["batch_tokens"]) == 128
    for a, b in zip(jax.tree.leaves(fused_state.params), jax.tree.leaves(micro_state.params),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- noise scale


def test_unbiased_estimates_invert_the_expected_norms():
    grad_sq, trace = 2.0, 30.0
    small, big = 4.0, 32.0
    estimates = unbiased_estimates(grad_sq + trace / small, grad_sq + trace / big, small, big)
    assert estimates == pytest.approx((grad_sq, trace))


def test_noise_scale_of_linear_regression_matches_the_closed_form():
    """y = x.w* + noise, x ~ N(0, I_p), loss 0.5 (x.w - y)^2 at w = w* + d: per-example gradient
    x x^T d - x eps, so G = d and tr(Sigma) = (p + 1)|d|^2 + p sigma^2 (Isserlis). The train
    step's own accumulation measures it from micro-batches of 4 inside batches of 32."""
    p, sigma, count, rows = 8, 1.0, 8, 32
    d = np.full(p, 1 / math.sqrt(p), np.float32)  # |d| = 1
    truth = ((p + 1) * 1.0 + p * sigma**2) / 1.0

    def grad_fn(w, batch, rng):
        def summed(w):
            residual = batch["x"] @ w - batch["y"]
            return 0.5 * jnp.sum(residual**2)

        loss, grads = jax.value_and_grad(summed)(w)
        return grads, LossSums(loss, jnp.float32(0), jnp.float32(batch["x"].shape[0]))

    @jax.jit
    def measure(key):
        kx, ke = jax.random.split(key)
        x = jax.random.normal(kx, (rows, p))
        y = x @ jnp.zeros(p) + sigma * jax.random.normal(ke, (rows,))  # w* = 0
        batch = {"x": x, "y": y, "segment_ids": jnp.ones((rows, 1), jnp.int32)}
        total = train_step._accumulate(grad_fn, jnp.asarray(d), batch, None, count, True, 1)
        big_sq = jnp.sum(jnp.square(total.grads / total.sums.tokens))
        return total.micro_sq / count, big_sq, total.micro_tokens / count, total.sums.tokens

    noise = NoiseScale(ema_decay=0.995)
    for key in jax.random.split(jax.random.key(0), 2000):
        noise.update(*(float(v) for v in measure(key)))
    assert noise.value == pytest.approx(truth, rel=0.2)
    assert noise.metrics()["noise_scale/grad_sq"] == pytest.approx(1.0, rel=0.2)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_ramped_run_accounts_tokens_measures_noise_and_resumes_exactly(corpus, tmp_path):
    """8 steps growing from 1 to 4 micro-batches of 2 rows: the logged batch follows the ramp,
    tokens seen add up, the noise scale is logged, and a resume from step 4 repeats 5-8."""
    run_dir = tmp_path / "run"
    cfg = config.load(None, overrides(
        corpus, run_dir, "train.steps=8", "train.global_batch_size=8", "train.grad_accum_steps=4",
        "train.batch_ramp.start_tokens=128", "train.batch_ramp.ramp_steps=6",
        "train.noise_scale.every_steps=1", "checkpoint.every_steps=4", "eval.every_steps=0",
        "metrics.log_every_steps=1", "metrics.tensorboard=false", "mesh.data=2", "mesh.tensor=4",
    ))  # fmt: skip
    first = train(cfg)
    records, _ = read_jsonl(run_dir)
    ramp = BatchRamp(cfg.train)
    assert [r["batch_tokens"] for r in records] == [
        ramp.micro_batches(s) * 128 for s in range(1, 9)
    ]
    assert records[0]["batch_tokens"] == 128 and records[-1]["batch_tokens"] == 512
    assert first["tokens_seen"] == pytest.approx(sum(r["tokens"] for r in records))
    for r in records:
        assert r["tokens"] <= r["batch_tokens"]
        assert r["packing_efficiency"] == pytest.approx(r["tokens"] / r["batch_tokens"])
    measured = [r for r in records if "critical_batch_tokens" in r]
    # steps 1-2 have one micro-batch each: no second batch size to compare with
    assert [r["batch_tokens"] for r in records[:3]] == [128, 128, 256]
    assert measured and measured[0]["step"] == 3
    assert all(math.isfinite(r["noise_scale/trace"]) for r in measured)
    # the estimator takes the run's last finite measurement as its batch suggestion
    finite = [r["critical_batch_tokens"] for r in measured]
    finite = [v for v in finite if isinstance(v, float) and math.isfinite(v) and v > 0]
    assert estimate.measured_critical_batch(run_dir) == finite[-1]

    assert committed_steps(run_dir) == [4, 8]
    shutil.rmtree(run_dir / "checkpoints" / "8")
    second = train(cfg)
    again, _ = read_jsonl(run_dir)
    exact = ("loss", "grad_norm", "lr", "tokens", "batch_tokens", "tokens_seen")
    for a, b in zip(records, again, strict=True):
        assert {k: a[k] for k in exact} == {k: b[k] for k in exact}, a["step"]
        assert a.get("critical_batch_tokens") == b.get("critical_batch_tokens")
    assert second["tokens_seen"] == first["tokens_seen"]
