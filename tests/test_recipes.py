"""configs/recipes/: each recipe loads, and trains end to end on tiny data with the keys that
name hardware-sized things (model shape, paths, steps) overridden."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from training import MODEL_VOCAB, overrides, read_jsonl

from maxlm import config, optim, vocab
from maxlm.train import train

RECIPE = "configs/recipes/continual_pretraining.yaml"
PRETRAIN_LR = 3e-4
TINY_MODEL = [
    "model.preset=null",
    "model.remat=none",
    f"model.vocab_size={MODEL_VOCAB}",
    "model.d_model=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.mlp_dim=128",
]


def write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_continual_pretraining_recipe_as_written():
    cfg = config.load(RECIPE)
    assert cfg.checkpoint.init_from and cfg.data.tokenizer.path
    assert cfg.optim.lr == pytest.approx(3e-4 / 10), "a tenth of Llama 2's peak"
    assert cfg.warmup_steps == round(0.01 * cfg.train.steps)
    weights = {name: source.weight for name, source in cfg.data.sources.items()}
    assert weights == {"replay": 0.25, "domain": 0.75}
    assert cfg.model.num_layers == 32 and cfg.model.d_model == 4096  # the llama2-7b preset


@pytest.mark.slow
def test_continual_pretraining_recipe_trains_from_a_checkpoint(corpus, tmp_path, monkeypatch):
    """A tiny pretraining run (peak lr 3e-4) saves step 4; the recipe, on tiny replay (that run's
    text) and domain jsonl data, starts from its parameters as saved, re-warms over 1% of 100
    steps to a tenth of its peak, and reports the held-out loss of each source."""
    pretrain = config.load(None, overrides(
        corpus, tmp_path / "pretrain", "train.steps=4", "checkpoint.every_steps=4",
        f"optim.lr={PRETRAIN_LR}", "eval.every_steps=0", "metrics.tensorboard=false",
    ))  # fmt: skip
    train(pretrain)
    replay = Path(corpus["glob"].replace("*", "part0")).read_text().splitlines()  # pretraining's
    write_jsonl(tmp_path / "data" / "replay" / "0.jsonl", replay)
    write_jsonl(tmp_path / "data" / "domain" / "0.jsonl", [
        f"the xylophonist {verb} the marimba {i}"
        for i in range(100) for verb in ("tunes", "plays")
    ])  # fmt: skip
    step_dir = tmp_path / "pretrain" / "checkpoints" / "4"
    cfg = config.load(RECIPE, [
        f"run.dir={tmp_path / 'continual'}", *TINY_MODEL,
        f"checkpoint.init_from={step_dir}", "checkpoint.every_steps=0",
        f"data.tokenizer.path={tmp_path / 'pretrain' / 'tokenizer.json'}",
        f"data.sources.replay.paths=[{tmp_path / 'data' / 'replay' / '*.jsonl'}]",
        f"data.sources.domain.paths=[{tmp_path / 'data' / 'domain' / '*.jsonl'}]",
        "data.eval_fraction=0.1", "train.steps=100", "train.global_batch_size=8",
        "train.seq_len=64", "eval.every_steps=0", "eval.batches=2",
        "metrics.log_every_steps=1", "metrics.tensorboard=false",
    ])  # fmt: skip
    loaded = {}

    def init_from(*args, **kwargs):
        params = vocab_init_from(*args, **kwargs)
        loaded["params"] = jax.device_get(params)  # before the first step donates them
        return params

    vocab_init_from = vocab.init_from
    monkeypatch.setattr(vocab, "init_from", init_from)
    summary = train(cfg)

    saved = ocp.StandardCheckpointer().restore(step_dir / "state")["params"]
    assert jax.tree.structure(loaded["params"]) == jax.tree.structure(saved)
    for got, want in zip(jax.tree.leaves(loaded["params"]), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(got, want)
    records, _ = read_jsonl(tmp_path / "continual")
    lrs = [r["lr"] for r in records]
    assert cfg.warmup_steps == 1
    assert max(lrs) == pytest.approx(PRETRAIN_LR / 10, rel=1e-6)
    assert lrs[0] == 0.0 and lrs[cfg.warmup_steps] == max(lrs), "warmup, then the peak"
    _, schedule = optim.build(cfg)
    assert lrs[-1] == pytest.approx(float(schedule(99)), rel=1e-5) and lrs[-1] < max(lrs) / 2
    on_disk = json.loads((tmp_path / "continual" / "summary.json").read_text())
    for name in ("replay", "domain"):
        assert math.isfinite(on_disk[f"eval_loss/{name}"]) and on_disk[f"eval_loss/{name}"] > 0
        assert summary[f"eval_loss/{name}"] == on_disk[f"eval_loss/{name}"]
    assert set(on_disk["source_tokens"]) == {"replay", "domain"}
