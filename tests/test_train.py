"""End to end: train(cfg) on a tiny learnable corpus; run-dir artifacts; sharded mesh; CLI; NaN.

Compiling dominates each run's time, so there are few runs, each checked from several angles:
one 40-step train(cfg) in process (data=8), and command-line runs (a (2, 2, 2) mesh, a NaN
run) at XLA's lowest optimization level. Document ids contain the tmp path, so the train /
held-out split (and the exact losses) vary from session to session; the bounds leave room.
"""

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training import (
    MODEL_VOCAB,
    TOKENIZER_VOCAB,
    Run,
    cli,
    committed_steps,
    overrides,
    read_jsonl,
    write_config,
)

from maxlm import config, estimate, optim
from maxlm.config import ConfigError
from maxlm.train import main, train

# --------------------------------------------------------------------------- the main run


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """40 steps on the default mesh (data=8), logging every 5 steps, evaluating every 20."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = config.load(
        None,
        overrides(
            corpus,
            run_dir,
            "train.steps=40",
            "eval.every_steps=20",
            "metrics.log_every_steps=5",
        ),
    )
    summary = train(cfg)
    train_records, eval_records = read_jsonl(run_dir)
    return Run(cfg, run_dir, summary, train_records, eval_records)


@pytest.mark.slow
def test_loss_falls_below_the_baselines(run):
    losses = [r["loss_avg"] for r in run.train]
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-2:]) < 0.5 * losses[0], losses
    final = run.summary["eval_loss"]
    assert final < math.log(TOKENIZER_VOCAB) - 2.0  # a model that learnt nothing: ln V
    assert final < run.summary["unigram_entropy"] - 1.0  # one that ignores context
    assert run.eval[-1]["eval_loss"] < run.eval[0]["eval_loss"]  # still improving at 20 -> 40
    assert run.summary["eval_perplexity"] == pytest.approx(math.exp(final))


@pytest.mark.slow
def test_metrics_jsonl_has_one_record_per_logged_step(run):
    assert [r["step"] for r in run.train] == list(range(5, 41, 5))
    assert [r["step"] for r in run.eval] == [20, 40]
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    all_steps = [json.loads(line)["step"] for line in lines]
    assert all_steps == sorted(set(all_steps)), "one JSON object per logged step"
    _, schedule = optim.build(run.cfg)
    for record in run.train:
        assert {"step", "loss", "loss_avg", "lr", "grad_norm", "tokens", "tokens_seen"} <= set(
            record
        )
        assert {"tokens_per_s", "mfu", "step_time_s", "packing_efficiency"} <= set(record)
        assert 0.5 < record["packing_efficiency"] <= 1.0
        assert record["tokens_per_s"] > 0 and record["mfu"] > 0 and record["grad_norm"] > 0
        # the logged lr is the one the step used: schedule(steps taken before it)
        assert record["lr"] == pytest.approx(float(schedule(record["step"] - 1)), rel=1e-6)
        assert 0 < record["tokens"] <= run.cfg.train.tokens_per_step
    for record in run.eval:
        assert {"eval_loss", "eval_perplexity", "eval_tokens"} <= set(record)
        assert record["eval_perplexity"] == pytest.approx(math.exp(record["eval_loss"]))
    seen = [r["tokens_seen"] for r in run.train]
    assert seen == sorted(seen) and seen[-1] == run.summary["tokens_seen"]
    # 40 steps of at most 512 tokens, and packing leaves little padding
    assert 0.5 * 40 * 512 < run.summary["tokens_seen"] <= 40 * 512


@pytest.mark.slow
def test_summary_json_matches_the_returned_summary(run):
    on_disk = json.loads((run.dir / "summary.json").read_text())
    assert on_disk == run.summary
    assert run.summary["steps"] == 40
    assert run.summary["parameters"] == estimate.param_count(run.cfg.model)
    assert run.summary["final_train_loss"] == run.train[-1]["loss"]
    assert run.summary["eval_loss"] == run.eval[-1]["eval_loss"]
    assert 0 < run.summary["compile_s"] < run.summary["wall_s"]


@pytest.mark.slow
def test_saved_config_reloads_to_the_same_config(run):
    reloaded = config.load(str(run.dir / "config.yaml"))
    assert reloaded == run.cfg
    assert reloaded.data.sources["corpus"].paths == run.cfg.data.sources["corpus"].paths


@pytest.mark.slow
def test_tensorboard_has_the_logged_scalars(run):
    event_files = list((run.dir / "tensorboard").glob("events.out.tfevents.*"))
    assert event_files
    events = EventAccumulator(str(run.dir / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [r["step"] for r in run.train]
    np.testing.assert_allclose([e.value for e in loss], [r["loss"] for r in run.train], rtol=1e-6)
    assert [e.step for e in events.Scalars("eval_loss")] == [20, 40]


# --------------------------------------------------------------------------- command line


class CliRun(NamedTuple):
    result: subprocess.CompletedProcess
    expected: config.Config  # what the file plus the command-line overrides should resolve to
    run: Run


@pytest.fixture(scope="module")
def sharded(corpus, tmp_path_factory):
    """The command line on a (data 2, fsdp 2, tensor 2) mesh of 8 devices: the file says 50
    steps, the command line 5, logging every step, evaluating only at the end."""
    tmp = tmp_path_factory.mktemp("sharded")
    cfg = config.load(
        None,
        overrides(
            corpus,
            tmp / "run",
            "mesh.data=2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
            "train.steps=50",
            "metrics.tensorboard=false",
        ),
    )
    config_file = write_config(tmp / "run.yaml", cfg)
    cmd_overrides = ["train.steps=5", "metrics.log_every_steps=1", "eval.every_steps=0"]
    result = cli([f"--config={config_file}", *cmd_overrides], cwd=tmp, devices=8)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    expected = config.load(str(config_file), cmd_overrides)
    return CliRun(result, expected, Run(expected, tmp / "run", summary, *read_jsonl(tmp / "run")))


def test_command_line_prints_the_resolved_config_and_done(sharded):
    stdout = sharded.result.stdout
    # the resolved config is printed first, as saved to the run dir, overrides applied
    header, _, rest = stdout.partition("\n")
    assert header == f"# resolved config (saved to {sharded.run.dir / 'config.yaml'})"
    printed = config.from_dict(yaml.safe_load(rest.split("\n\n", 1)[0]))
    assert printed == sharded.expected == config.load(str(sharded.run.dir / "config.yaml"))
    assert printed.train.steps == 5
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 cpu devices" in stdout
    assert "step      5/5  loss " in stdout
    done = [line for line in stdout.splitlines() if line.startswith("done:")]
    tokens = f"{sharded.run.summary['tokens_seen']:,.0f} tokens"
    assert len(done) == 1 and done[0].startswith(f"done: 5 steps, {tokens} in ")


def test_fsdp_and_tensor_parallel_run(sharded):
    run = sharded.run
    assert [r["step"] for r in run.train] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in run.eval] == [5]
    # a fresh model predicts near-uniformly over the model's vocabulary
    assert run.train[0]["loss"] == pytest.approx(math.log(MODEL_VOCAB), abs=0.3)
    assert run.train[-1]["loss"] < run.train[0]["loss"] - 0.1
    # every step logged: tokens_seen is exactly the sum of the steps' real-token counts
    assert run.summary["tokens_seen"] == sum(r["tokens"] for r in run.train)
    # warmup over 2 steps from 0, then constant: step s ran with schedule(s - 1)
    assert [r["lr"] for r in run.train] == pytest.approx([0.0, 1.5e-3, 3e-3, 3e-3, 3e-3])
    assert [r["tokens_seen"] for r in run.train] == list(
        np.cumsum([r["tokens"] for r in run.train])
    )
    assert math.isfinite(run.summary["eval_loss"])
    assert run.summary["parameters"] == estimate.param_count(run.cfg.model)
    assert not (run.dir / "tensorboard").exists()


@pytest.mark.slow
def test_sharding_does_not_change_the_math(run, sharded):
    """Same seed, data and schedule on data=8 (in process) vs (2, 2, 2) (command line, XLA
    optimization level 0): after 4 updates step 5 sees the same loss up to float rounding
    (seen: 1e-7 relative)."""
    step5 = next(r for r in run.train if r["step"] == 5)
    assert sharded.run.train[4]["tokens"] == step5["tokens"]
    assert sharded.run.train[4]["loss"] == pytest.approx(step5["loss"], rel=1e-5)
    assert sharded.run.train[4]["grad_norm"] == pytest.approx(step5["grad_norm"], rel=1e-4)


def test_command_line_config_error_exits_2_with_one_line(tmp_path):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("model:\n  d_modle: 64\n")
    result = cli([f"--config={config_file}"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: model.d_modle: unknown key; did you mean 'model.d_model'?\n"
    assert result.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_config_error_found_during_the_run_exits_2(corpus, tmp_path, capsys):
    """An error train() finds (the model's vocabulary is smaller than the tokenizer's) takes
    the same exit: code 2 and one line on stderr."""
    argv = overrides(corpus, tmp_path, "model.vocab_size=100", "train.steps=3")
    with pytest.raises(ConfigError, match=r"^model\.vocab_size: 100 "):
        train(config.load(None, argv))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: model.vocab_size: 100 is smaller than the tokenizer's {TOKENIZER_VOCAB} tokens\n"
    )


def test_non_finite_steps_change_nothing_until_the_run_gives_up(corpus, tmp_path):
    """lr 1e6 without clipping: once a step's loss or gradient norm is not finite its update is
    not applied (events.jsonl says so); after stability.max_recoveries of them the run stops
    with a one-line error naming the keys, exit code 1, and writes no summary."""
    cfg = config.load(
        None,
        overrides(
            corpus,
            tmp_path / "run",
            "optim.lr=1e6",
            "optim.clip_grad_norm=null",
            "train.steps=20",
            "eval.every_steps=0",
            "metrics.log_every_steps=1",
            "metrics.tensorboard=false",
            "stability.max_recoveries=3",
        ),
    )
    result = cli([f"--config={write_config(tmp_path / 'run.yaml', cfg)}"], cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        r"error: giving up at step (\d+): 4 recoveries in steps \[.*\] exceed "
        r"stability\.max_recoveries=3 within stability\.recovery_window_steps=1000 .*",
        last,
    )
    assert match, result.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").open()]
    assert [e["event"] for e in events] == ["skip_update"] * 3
    assert all("non-finite" in e["reason"] for e in events)
    train_records, _ = read_jsonl(tmp_path / "run")
    first_bad = events[0]["step"]
    assert all(math.isfinite(r["loss"]) for r in train_records if r["step"] < first_bad)
    assert not (tmp_path / "run" / "summary.json").exists()


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_resume_from_a_checkpoint_repeats_the_run_exactly(corpus, tmp_path):
    """Lose the newest checkpoint (as if the run died right after step 8's save) and rerun:
    steps 9-10 repeat bit for bit, tokens and held-out loss included."""
    run_dir = tmp_path / "run"
    cfg = config.load(
        None,
        overrides(
            corpus,
            run_dir,
            "train.steps=10",
            "checkpoint.every_steps=4",
            "checkpoint.keep=3",
            "eval.every_steps=0",
            "metrics.log_every_steps=1",
            "metrics.tensorboard=false",
        ),
    )
    first = train(cfg)
    first_records, _ = read_jsonl(run_dir)
    checkpoints = run_dir / "checkpoints"
    assert committed_steps(run_dir) == [4, 8, 10]
    shutil.rmtree(checkpoints / "10")

    second = train(cfg)
    second_records, _ = read_jsonl(run_dir)
    assert [r["step"] for r in second_records] == list(range(1, 11))
    exact = ("loss", "grad_norm", "param_norm", "lr", "tokens", "tokens_seen")
    for a, b in zip(first_records, second_records, strict=True):
        assert {k: a[k] for k in exact} == {k: b[k] for k in exact}, a["step"]
        # logged every step: the window is that one step
        tokens_per_step = cfg.train.tokens_per_step
        assert b["packing_efficiency"] == pytest.approx(b["tokens"] / tokens_per_step)
    assert second["eval_loss"] == first["eval_loss"]
    assert second["tokens_seen"] == first["tokens_seen"]
    assert committed_steps(run_dir) == [4, 8, 10]


def test_finished_run_resumes_to_nothing_left(corpus, tmp_path):
    """Rerunning a finished run restores its last step and trains no more."""
    cfg = config.load(
        None,
        overrides(corpus, tmp_path / "run", "train.steps=3", "metrics.tensorboard=false"),
    )
    train(cfg)
    records_before = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = train(cfg)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == records_before
    assert again["steps"] == 3


def test_resuming_with_another_tokenizer_is_a_config_error(corpus, tmp_path):
    """A checkpoint remembers its tokenizer: resuming with a different one stops before training."""
    run_dir = tmp_path / "run"
    first = overrides(corpus, run_dir, "train.steps=2", "metrics.tensorboard=false")
    train(config.load(None, first))
    other = config.load(None, [*first, f"data.tokenizer.vocab_size={TOKENIZER_VOCAB - 20}"])
    with pytest.raises(ConfigError, match=r"data\.tokenizer: the checkpoint of step 2 .* trained"):
        train(other)


@pytest.mark.slow
def test_mixture_of_objectives_with_stages_trains_and_resumes_exactly(corpus, tmp_path):
    """Two named sources, FIM code lines and UL2 prose from Parquet, mixed 1:1 and then only
    prose from step 5: tokens seen per source follow the stages, held-out loss is reported
    per source, and a resume across the stage boundary repeats steps 5-8 bit for bit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [line for path in sorted(Path(corpus["glob"]).parent.glob("*.txt"))
             for line in path.read_text().splitlines()]  # fmt: skip
    prose = [" ".join(reversed(line.split())) for line in lines]
    pq.write_table(pa.table({"text": prose}), tmp_path / "prose.parquet")
    run_dir = tmp_path / "run"
    run_settings = ["train.steps=8", "checkpoint.every_steps=4", "eval.every_steps=0",
                    "metrics.log_every_steps=1", "metrics.tensorboard=false"]  # fmt: skip
    argv = [
        *overrides(corpus, run_dir, *run_settings),
        "data.sources.corpus.objective.kind=fim",
        "data.sources.prose.kind=parquet",
        f"data.sources.prose.paths=[{tmp_path / 'prose.parquet'}]",
        "data.sources.prose.objective.kind=ul2",
        "data.sources.prose.objective.num_sentinels=8",
        "data.mixture_stages=[{start_step: 1, weights: {corpus: 1, prose: 1}},"
        " {start_step: 5, weights: {prose: 1}}]",
    ]
    cfg = config.load(None, argv)
    first = train(cfg)
    records, _ = read_jsonl(run_dir)
    code_seen = [r["tokens_seen/corpus"] for r in records]
    prose_seen = [r["tokens_seen/prose"] for r in records]
    assert code_seen[0] > 0 and prose_seen[0] > 0
    assert code_seen[3] == code_seen[-1], "no code rows after step 4"
    assert prose_seen[-1] > prose_seen[3]
    for r in records:
        assert r["tokens_seen"] == pytest.approx(r["tokens_seen/corpus"] + r["tokens_seen/prose"])
        assert r["loss_tokens"] < r["tokens"], "UL2 prefixes are read but not scored"
    assert first["source_tokens"] == {"corpus": code_seen[-1], "prose": prose_seen[-1]}
    assert math.isfinite(first["eval_loss/corpus"]) and math.isfinite(first["eval_loss/prose"])
    assert first["final_train_loss"] < math.log(MODEL_VOCAB)

    shutil.rmtree(run_dir / "checkpoints" / "8")
    second = train(cfg)
    again, _ = read_jsonl(run_dir)
    exact = ("loss", "grad_norm", "tokens", "loss_tokens", "tokens_seen/corpus",
             "tokens_seen/prose")  # fmt: skip
    for a, b in zip(records, again, strict=True):
        assert {k: a[k] for k in exact} == {k: b[k] for k in exact}, a["step"]
    assert second["eval_loss/prose"] == first["eval_loss/prose"]


@pytest.mark.slow
def test_worker_processes_resume_exactly_and_their_count_is_checked(corpus, tmp_path):
    """With data.num_workers=2 a resumed run repeats the lost steps bit for bit; resuming with
    another worker count (whose iterator state cannot fit) is a clear error naming the key."""
    run_dir = tmp_path / "run"
    argv = overrides(
        corpus, run_dir, "train.steps=6", "checkpoint.every_steps=3", "eval.every_steps=0",
        "metrics.log_every_steps=1", "metrics.tensorboard=false", "data.num_workers=2",
    )  # fmt: skip
    cfg = config.load(None, argv)
    train(cfg)
    first, _ = read_jsonl(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    train(cfg)
    again, _ = read_jsonl(run_dir)
    assert [(r["loss"], r["tokens"]) for r in again] == [(r["loss"], r["tokens"]) for r in first]
    with pytest.raises(ConfigError, match=r"data\.num_workers: the checkpoint of step 6 .* "
                                          r"written with 2, this run has 0"):  # fmt: skip
        train(config.load(None, [*argv, "data.num_workers=0"]))
