"""Mesh construction, logical-axis rules, and loss parity across meshes on 8 fake devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from maxlm import config, mesh as mesh_lib, optim, sharding, state as state_lib, train_step
from maxlm.config import ConfigError

STEPS = 5


def tiny_config(*extra: str, **mesh_shape: int) -> config.Config:
    overrides = [f"mesh.{axis}={size}" for axis, size in mesh_shape.items()] + list(extra)
    return config.load(
        None,
        [
            "model.vocab_size=256",
            "model.d_model=64",
            "model.num_layers=2",
            "model.num_heads=4",
            "model.num_kv_heads=2",
            "model.mlp_dim=128",
            "model.dtype=float32",
            "train.steps=5",
            "train.global_batch_size=8",
            "train.seq_len=32",
            "optim.lr=1e-2",
            "optim.schedule.warmup_steps=1",
            *overrides,
        ],
    )


def synthetic_batches(cfg: config.Config, count: int) -> list[dict[str, np.ndarray]]:
    """Packed rows: two documents each, then padding, so masking and token counts matter."""
    rng = np.random.default_rng(0)
    rows, length = cfg.train.global_batch_size, cfg.train.seq_len
    batches = []
    for _ in range(count):
        # a small sub-vocabulary gives the model something to learn within a few steps
        tokens = rng.integers(3, 24, (rows, length + 1), dtype=np.int32)
        segment_ids = np.zeros((rows, length), np.int32)
        positions = np.zeros((rows, length), np.int32)
        for r in range(rows):
            first, second = rng.integers(4, length // 2, 2)
            segment_ids[r, :first] = 1
            segment_ids[r, first : first + second] = 2
            positions[r, :first] = np.arange(first)
            positions[r, first : first + second] = np.arange(second)
        batches.append(
            {
                "tokens": tokens[:, :-1],
                "targets": tokens[:, 1:],
                "segment_ids": segment_ids,
                "positions": positions,
            }
        )
    return batches


def run_losses(cfg: config.Config, devices: list) -> tuple[list[float], state_lib.TrainState]:
    mesh = mesh_lib.make(cfg.mesh, devices)
    steps = train_step.build(cfg, mesh)
    state = state_lib.init(cfg, steps.optimizer, steps.blueprint)
    losses = []
    for batch in synthetic_batches(cfg, STEPS):
        placed = {k: jax.device_put(v, steps.batch_sharding) for k, v in batch.items()}
        state, metrics = steps.train(state, placed)
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def single_device_losses():
    return run_losses(tiny_config(data=1), jax.devices()[:1])[0]


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)])
def test_loss_parity_across_meshes(shape, single_device_losses):
    cfg = tiny_config(data=shape[0], fsdp=shape[1], tensor=shape[2])
    losses, state = run_losses(cfg, jax.devices())
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    q = state.params["layers"]["self_attn"]["q_proj"]["kernel"]
    k = state.params["layers"]["self_attn"]["k_proj"]["kernel"]
    embed = state.params["embed_tokens"]["embedding"]
    down = state.params["layers"]["mlp"]["down_proj"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert k.sharding.spec == P(None, "fsdp", "tensor", None)
    assert embed.sharding.spec == P("tensor", "fsdp")
    assert down.sharding.spec == P(None, "tensor", "fsdp")
    # the weights really are split: each device holds 1/(fsdp*tensor) of the embedding
    assert embed.addressable_shards[0].data.shape == (256 // shape[2], 64 // shape[1])
    # optimizer moments follow their parameter's sharding
    mu = state.opt_state[1][0].mu["layers"]["self_attn"]["q_proj"]["kernel"]
    assert mu.sharding == q.sharding


def test_grad_accumulation_matches_one_batch(single_device_losses):
    accumulated = tiny_config("train.grad_accum_steps=4", data=1)
    losses, _ = run_losses(accumulated, jax.devices()[:1])
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)


def test_mesh_auto_fill_and_errors():
    assert mesh_lib.resolve_shape(config.MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_lib.resolve_shape(config.MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
    with pytest.raises(ConfigError, match=r"mesh: data\*fsdp\*tensor = 4 but there are 8 devices"):
        mesh_lib.resolve_shape(config.MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ConfigError, match="do not divide the 8 devices"):
        mesh_lib.resolve_shape(config.MeshConfig(data=-1, fsdp=3, tensor=1), 8)
    mesh = mesh_lib.make(config.MeshConfig(data=2, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh_lib.data_parallel_size(mesh) == 4


def test_partition_spec_rules():
    rules = config.DEFAULT_SHARDING_RULES
    assert sharding.partition_spec(("layers", "embed", "q_heads", "head_dim"), rules) == P(
        None, "fsdp", "tensor", None
    )
    assert sharding.partition_spec(sharding.BATCH_AXES, rules) == P(("data", "fsdp"), None)
    with pytest.raises(ConfigError, match="shard two dimensions"):
        sharding.partition_spec(("embed", "embed"), rules)


def test_indivisible_parameter_names_the_rule():
    cfg = tiny_config(data=1, fsdp=1, tensor=8)  # 2 kv heads cannot split 8 ways
    mesh = mesh_lib.make(cfg.mesh)
    optimizer, _ = optim.build(cfg)
    with pytest.raises(ConfigError, match=r"mesh.rules.kv_heads: parameter .*k_proj.*"):
        state_lib.blueprint(cfg, optimizer, mesh)


def test_bad_global_batch_names_the_key():
    from maxlm.train import check_batch

    cfg = config.load(None, ["train.global_batch_size=6"])
    with pytest.raises(ConfigError, match=r"train\.global_batch_size: 6 is not divisible"):
        check_batch(cfg, 4)


@pytest.mark.parametrize(
    ("env", "enabled", "joins"),
    [
        ({}, "auto", False),
        ({"SLURM_NTASKS": "1"}, "auto", False),
        ({"SLURM_NTASKS": "4"}, "auto", True),  # JAX's SLURM detection fills in the rest
        ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, "auto", True),
        ({"TPU_WORKER_HOSTNAMES": "w0", "MEGASCALE_COORDINATOR_ADDRESS": "w0"}, "auto", True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "auto", True),
        ({"SLURM_NTASKS": "4"}, "off", False),
        ({}, "on", True),
    ],
)
def test_when_a_run_joins_a_multi_process_job(monkeypatch, env, enabled, joins):
    calls = []
    for key in (
        "SLURM_NTASKS",
        "TPU_WORKER_HOSTNAMES",
        "JAX_COORDINATOR_ADDRESS",
        "MEGASCALE_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    mesh_lib.initialize_distributed(config.DistributedConfig(enabled=enabled))
    assert bool(calls) == joins
