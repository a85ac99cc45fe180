"""Multi-stage training: stage plan, the joined lr schedule, and a tiny four-stage run end to
end (boundaries, sequence length, RoPE base, mixture, resume at a stage boundary)."""

import json
import shutil

import numpy as np
import pytest
from training import committed_steps, overrides, read_jsonl

from maxlm import config, optim, stages as stages_lib, state as state_lib
from maxlm.config import ConfigError
from maxlm.train import train

FOUR_STAGES = (
    "stages=["
    "{name: warmup, steps: 2, lr: warmup, mixture: {corpus: 1}},"
    "{name: stable, steps: 3, lr: stable, mixture: {corpus: 1}},"
    "{name: long_context, steps: 2, lr: stable, seq_len: 128, rope_theta: 100000,"
    " mixture: {corpus: 1}},"
    "{name: anneal, steps: 2, lr: decay, mixture: {corpus: 1, hq: 1}}]"
)


def staged(*extra: str) -> config.Config:
    sources = ["data.sources.corpus.kind=python_stdlib", "data.sources.hq.kind=python_stdlib"]
    return config.load(None, [*sources, FOUR_STAGES, *extra])


def test_plan_resolves_each_stage():
    cfg = staged()
    plan = stages_lib.plan(cfg)
    assert cfg.train.steps == 9  # the stages' total
    assert [(s.name, s.first, s.last) for s in plan] == [
        ("warmup", 1, 2), ("stable", 3, 5), ("long_context", 6, 7), ("anneal", 8, 9)
    ]  # fmt: skip
    assert [s.cfg.train.seq_len for s in plan] == [256, 256, 128, 256]
    assert [s.cfg.model.rope_theta for s in plan] == [10000.0, 10000.0, 100000.0, 10000.0]
    assert [s.weights for s in plan] == [[1, 0], [1, 0], [1, 0], [1, 1]]  # corpus, hq
    assert [stages_lib.stage_of(plan, step).name for step in (1, 2, 3, 5, 6, 8, 9, 10)] == [
        "warmup", "warmup", "stable", "stable", "long_context", "anneal", "anneal", "anneal"
    ]  # fmt: skip
    assert len({s.seed for s in plan}) == 4 and plan[0].seed == cfg.run.seed


def test_stage_lengths_in_tokens_round_up_to_whole_steps():
    cfg = config.load(
        None, ["stages=[{name: a, tokens: 5000}, {name: b, tokens: 2048, seq_len: 512}]"]
    )
    # 8 x 256 = 2048 tokens a step: 5000 -> 3 steps; 8 x 512: 2048 -> 1 step
    assert [s.last - s.first + 1 for s in stages_lib.plan(cfg)] == [3, 1]
    assert cfg.train.steps == 4


def test_staged_schedule_warms_holds_and_decays():
    cfg = staged(
        "optim.lr=1e-3", "optim.schedule.min_lr_ratio=0.1", "optim.schedule.decay_shape=linear"
    )
    _, schedule = optim.build(cfg)
    lrs = [float(schedule(step)) for step in range(9)]  # 0-based steps
    np.testing.assert_allclose(
        lrs, [0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 5.5e-4], rtol=1e-6
    )


def test_stage_rope_base_reaches_the_model():
    cfg = staged("model.d_model=32", "model.num_heads=2", "model.num_layers=1", "model.mlp_dim=64")
    plan = stages_lib.plan(cfg)
    head_dim = cfg.model.head_size
    for stage in plan:
        model = state_lib.build_model(stage.cfg.model, 0)
        theta = stage.cfg.model.rope_theta
        expected = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
        np.testing.assert_allclose(model.inv_freq, expected, rtol=1e-6)
    assert plan[2].cfg.model.rope_theta == 100000.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["train.steps=5"], "train.steps: 5, but the stages add up to 9 steps"),
        (["train.batch_ramp.start_tokens=256", "train.batch_ramp.ramp_steps=2"],
         "train.batch_ramp: not combined with stages"),
        (["data.mixture_stages=[{start_step: 0, weights: {hq: 1}}]"],
         "data.mixture_stages: with stages, give each stage its mixture"),
    ],
)  # fmt: skip
def test_conflicting_keys_are_config_errors(extra, message):
    with pytest.raises(ConfigError, match=message):
        staged(*extra)


def test_unknown_stage_source_names_the_key():
    with pytest.raises(
        ConfigError, match=r"stages.0.mixture.hqq: no such source; did you mean 'hq'"
    ):
        config.load(
            None,
            [
                "data.sources.hq.kind=python_stdlib",
                "stages=[{name: a, steps: 1, mixture: {hqq: 1}}]",
            ],
        )


def tiny_recipe(corpus, run_dir, *extra: str) -> config.Config:
    """configs/recipes/four_stage.yaml with the tiny corpus and 2+3+2+2 steps of 8 x 64 tokens
    (the long-context stage: 16 x 32, the same tokens per step)."""
    corpus_source = [f"paths=[{corpus['glob']}]", "document_per=line", "kind=text_files"]
    return config.load(
        "configs/recipes/four_stage.yaml",
        [
            *overrides(corpus, run_dir),
            *[f"data.sources.{name}.{item}" for name in ("general", "high_quality")
              for item in corpus_source],
            "stages.0.steps=2", "stages.1.steps=3", "stages.2.steps=2", "stages.3.steps=2",
            "stages.2.seq_len=32", "stages.2.global_batch_size=16",
            "optim.schedule.min_lr_ratio=0.1",
            "checkpoint.every_steps=4", "eval.every_steps=0", "metrics.log_every_steps=1",
            "metrics.tensorboard=false", "mesh.data=8", *extra,
        ],
    )  # fmt: skip


@pytest.mark.slow
def test_four_stage_recipe_switches_where_configured_resumes_and_branches(corpus, tmp_path, capsys):
    """The shipped recipe, shrunk to 9 steps: the lr follows the joined schedule, sequence
    length and RoPE base change in stage 3, the high-quality source enters only in stage 4;
    losing the last checkpoint and resuming from step 4 (mid-stage) repeats steps 5-9 exactly;
    a decay branched from the stable stage's step 4 goes on from there under its own stages."""
    run_dir = tmp_path / "run"
    cfg = tiny_recipe(corpus, run_dir)
    assert [s.name for s in cfg.stages] == ["warmup", "stable", "long_context", "anneal"]
    first = train(cfg)
    out = capsys.readouterr().out
    records, _ = read_jsonl(run_dir)
    _, schedule = optim.build(cfg)
    assert [r["lr"] for r in records] == pytest.approx([float(schedule(s)) for s in range(9)])
    assert records[4]["lr"] == pytest.approx(cfg.optim.lr) and records[8]["lr"] < cfg.optim.lr
    assert [r["stage"] for r in records] == [0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert all(r["batch_tokens"] == 512 for r in records)  # 8 x 64, then 16 x 32
    hq = [r["tokens_seen/high_quality"] for r in records]
    assert hq[6] == 0 and hq[8] > hq[7] > 0
    assert "stage 2 'long_context': steps 6-7, seq_len 32, batch 16, rope_theta 500000" in out
    assert out.count("compiled train step for stage") == 2  # warmup/stable/anneal share one
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["name"]) for e in events if e["event"] == "stage"] == [
        (3, "stable"), (6, "long_context"), (8, "anneal")
    ]  # fmt: skip

    assert committed_steps(run_dir) == [4, 8, 9]
    shutil.rmtree(run_dir / "checkpoints" / "9")
    shutil.rmtree(run_dir / "checkpoints" / "8")
    second = train(cfg)
    again, _ = read_jsonl(run_dir)
    exact = ("loss", "grad_norm", "lr", "tokens", "batch_tokens", "tokens_seen", "stage")
    for a, b in zip(records, again, strict=True):
        assert {k: a[k] for k in exact} == {k: b[k] for k in exact}, a["step"]
    assert second["eval_loss"] == first["eval_loss"]

    branch_dir = tmp_path / "branch"
    branched_cfg = tiny_recipe(
        corpus, branch_dir, f"checkpoint.branch_from={run_dir}/checkpoints/4",
        "stages.1.steps=2", "stages.3.steps=3",
    )  # fmt: skip
    train(branched_cfg)
    assert "branched from step 4" in capsys.readouterr().out
    branched, _ = read_jsonl(branch_dir)
    _, branch_schedule = optim.build(branched_cfg)
    assert [r["step"] for r in branched] == [5, 6, 7, 8, 9]
    assert [r["stage"] for r in branched] == [2, 2, 3, 3, 3]  # stable ended at step 4
    assert [r["lr"] for r in branched] == pytest.approx(
        [float(branch_schedule(s)) for s in range(4, 9)]
    )
    assert branched[0]["tokens_seen"] == pytest.approx(
        records[3]["tokens_seen"] + branched[0]["tokens"]
    )
