"""Checkpoints: checksums, damaged steps walked back over, restoring onto other meshes,
init_from, retention, restore-and-skip on spikes and skipped non-finite updates."""

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from training import overrides, read_jsonl

from maxlm import config, mesh as mesh_lib, state as state_lib, train_step
from maxlm.checkpoint import Checkpointer, CheckpointError, load_params, state_checksums
from maxlm.data.synthetic import packed_batch
from maxlm.train import train


def tiny_run(corpus, run_dir, *extra):
    return config.load(
        None,
        overrides(
            corpus, run_dir, "eval.every_steps=0", "metrics.log_every_steps=1",
            "metrics.tensorboard=false", *extra,
        ),
    )  # fmt: skip


def test_checksums_are_mesh_independent_and_catch_one_changed_value():
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    value = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8) / 7
    tree = {"w": value, "b": jnp.ones((8,), jnp.bfloat16), "n": jnp.int32(3)}
    sharded = {**tree, "w": jax.device_put(value, NamedSharding(mesh, P("a", "b")))}
    assert state_checksums(tree) == state_checksums(sharded)
    changed = {**tree, "w": value.at[17, 3].set(np.nextafter(value[17, 3], np.float32(1e9)))}
    sums, other = state_checksums(tree), state_checksums(changed)
    assert sums["['w']"] != other["['w']"] and sums["['b']"] == other["['b']"]


def damage(step_dir, kind):
    """What disks and crashes do to files: a flipped byte, a truncated file, lost metadata."""
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)  # fmt: skip
    if kind == "flipped_byte":
        data = bytearray(files[-1].read_bytes())
        data[len(data) // 2] ^= 0x40
        files[-1].write_bytes(bytes(data))
    elif kind == "truncated":
        files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 3])
    else:
        (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flipped_byte", "truncated", "missing_metadata"])
def test_damaged_newest_checkpoint_is_quarantined_and_the_previous_one_resumes(
    corpus, tmp_path, kind, capsys
):
    cfg = tiny_run(corpus, tmp_path / "run", "train.steps=6", "checkpoint.every_steps=2")
    first = train(cfg)
    records, _ = read_jsonl(tmp_path / "run")
    damage(tmp_path / "run" / "checkpoints" / "6", kind)
    capsys.readouterr()
    again = train(cfg)
    out = capsys.readouterr().out
    assert "checkpoint 6 in" in out and "cannot be restored" in out
    assert "resumed from the checkpoint of step 4" in out
    assert again["state_hash"] == first["state_hash"]
    exact = ("step", "loss", "grad_norm", "param_norm", "tokens", "tokens_seen")
    assert [{k: r[k] for k in exact} for r in read_jsonl(tmp_path / "run")[0]] == [
        {k: r[k] for k in exact} for r in records
    ]
    quarantined = list((tmp_path / "run" / "checkpoints-quarantine").iterdir())
    assert [p.name.split("-")[0] for p in quarantined] == ["6"]


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(corpus, tmp_path):
    cfg = tiny_run(corpus, tmp_path / "run", "train.steps=2", "checkpoint.every_steps=1")
    train(cfg)
    for step in (1, 2):
        damage(tmp_path / "run" / "checkpoints" / str(step), "missing_metadata")
    with pytest.raises(CheckpointError, match=r"none of the checkpoints in .* \(steps \[1, 2\]\)"):
        train(cfg)


def position(start=0):
    """A grain iterator over 0, 1, 2, ... advanced to `start`: the checkpoint's data item."""
    iterator = iter(grain.MapDataset.range(1000).to_iter_dataset())
    for _ in range(start):
        next(iterator)
    return iterator


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), "one device"])
def test_restoring_onto_another_mesh_gives_the_same_next_step(tmp_path, shape):
    """Saved on (8, 1, 1), restored on another mesh or one device: the next step's loss is
    the same (the checksums verify the restored bytes on the new layout)."""
    base = ["model.vocab_size=256", "model.d_model=64", "model.num_layers=2", "model.num_heads=4",
            "model.mlp_dim=128", "train.seq_len=32", "train.global_batch_size=8"]  # fmt: skip
    batch = packed_batch(8, 32, 256, seed=0)

    def steps_on(mesh_overrides, devices=None):
        cfg = config.load(None, [*base, *mesh_overrides])
        mesh = mesh_lib.make(cfg.mesh, devices)
        return cfg, train_step.build(cfg, mesh)

    cfg, saved_on = steps_on(["mesh.data=8"])
    state = state_lib.init(cfg, saved_on.optimizer, saved_on.blueprint)
    checkpointer = Checkpointer(cfg.checkpoint, tmp_path)
    checkpointer.save(3, state, position(7), {"tokens_seen": 0})
    checkpointer.close()
    _, expected = saved_on.train(state, jax.device_put(batch, saved_on.batch_sharding))

    if shape == "one device":
        _, other = steps_on(["mesh.data=1"], jax.devices()[:1])
    else:
        _, other = steps_on([f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}",
                             f"mesh.tensor={shape[2]}"])  # fmt: skip
    rewound = position()
    restored, progress = Checkpointer(cfg.checkpoint, tmp_path).restore(3, other.blueprint,
                                                                       rewound)  # fmt: skip
    assert next(rewound) == 7 and progress == {"tokens_seen": 0}
    _, metrics = other.train(restored, jax.device_put(batch, other.batch_sharding))
    np.testing.assert_allclose(float(metrics["loss"]), float(expected["loss"]), rtol=1e-5)


@pytest.mark.slow
def test_init_from_loads_parameters_only_and_retention_keeps_every_mth(corpus, tmp_path):
    """Run A keeps the newest 2 checkpoints plus every 4th; run B starts from A's step-8
    parameters with a fresh optimizer and schedule (continual pretraining)."""
    a = tiny_run(corpus, tmp_path / "a", "train.steps=10", "checkpoint.every_steps=2",
                 "checkpoint.keep=2", "checkpoint.keep_every_steps=4")  # fmt: skip
    train(a)
    kept = sorted(int(p.name) for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert kept == [4, 8, 10]

    b = tiny_run(corpus, tmp_path / "b", "train.steps=2",
                 f"checkpoint.init_from={tmp_path / 'a' / 'checkpoints' / '8'}")  # fmt: skip
    mesh = mesh_lib.make(b.mesh)
    built = train_step.build(b, mesh)
    params = load_params(
        b.checkpoint.init_from, built.blueprint.abstract.params, built.blueprint.shardings.params
    )
    saved = ocp.StandardCheckpointer().restore(tmp_path / "a" / "checkpoints" / "8" / "state")
    loaded, on_disk = jax.tree.leaves(params), jax.tree.leaves(saved["params"])
    assert len(loaded) == len(on_disk) > 0
    for got, want in zip(loaded, on_disk, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    train(b)
    b_records, _ = read_jsonl(tmp_path / "b")
    a_records, _ = read_jsonl(tmp_path / "a")
    assert b_records[0]["lr"] < a_records[8]["lr"], "a fresh schedule warms up again"
    assert b_records[0]["loss"] < a_records[0]["loss"] - 0.5, "it starts from trained weights"
    with pytest.raises(config.ConfigError, match=r"checkpoint\.init_from: .* not a checkpoint"):
        load_params(
            str(tmp_path / "a"),
            built.blueprint.abstract.params,
            built.blueprint.shardings.params,
        )


@pytest.mark.slow
def test_spike_restores_the_last_good_checkpoint_and_skips_batches(corpus, tmp_path, monkeypatch):
    """A batch of random tokens at step 13 (a real loss spike, judged against the last 4
    losses): it is judged while step 14 runs, before step 14 is saved; step 12's checkpoint
    comes back, 3 batches are skipped and logged, and the run finishes its 16 steps."""
    monkeypatch.setenv("MAXLM_FAULT_SPIKE_AT_STEPS", "13")
    cfg = tiny_run(corpus, tmp_path / "run", "train.steps=16", "checkpoint.every_steps=2",
                   "stability.window=4", "stability.min_history=4", "stability.spike_factor=1.3",
                   "stability.skip_batches=3")  # fmt: skip
    summary = train(cfg)
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").open()]
    assert [e["event"] for e in events] == ["restore_and_skip", "restored"]
    assert events[0]["step"] == 13 and events[0]["reason"].startswith("loss spike")
    assert events[1]["restored_step"] == 12
    assert [b["index"] for b in events[1]["skipped_batches"]] == [12, 13, 14]
    assert events[1]["skipped_batches"][0]["rows"] == {"corpus": 8}
    records, _ = read_jsonl(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 17))
    assert max(r["loss"] for r in records[12:]) < 1.3 * records[11]["loss"]
    assert summary["steps"] == 16


@pytest.mark.slow
def test_non_finite_step_is_not_applied(corpus, tmp_path, monkeypatch):
    """A target outside the vocabulary at step 4 makes its loss NaN: the parameters after step
    4 are those after step 3, and training goes on."""
    monkeypatch.setenv("MAXLM_FAULT_NAN_AT_STEPS", "4")
    cfg = tiny_run(corpus, tmp_path / "run", "train.steps=6")
    train(cfg)
    records, _ = read_jsonl(tmp_path / "run")
    assert records[3]["loss"] == "nan"  # JSON has no NaN: non-finite values are strings
    assert records[3]["update_applied"] == 0 and records[4]["update_applied"] == 1
    assert records[3]["param_norm"] == records[2]["param_norm"]
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").open()]
    assert events == [{"step": 4, "event": "skip_update", "reason": "non-finite loss (nan)"}]
