"""The fault-injection suite: the real trainer in a subprocess, killed with SIGKILL at several
steps and in the middle of an asynchronous save, or preempted with SIGTERM; rerunning the same
command must end in the very state of an uninterrupted run (state hash), having trained every
step on the same data (per-step trace of loss bits and batch hashes).
"""

import json
import os
import re
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
from training import cli, committed_steps, overrides, trace_of, write_config

from maxlm import config

STEPS = 10


def setup(corpus, tmp_path, name):
    run_dir = tmp_path / name
    cfg = config.load(
        None,
        overrides(
            corpus, run_dir, f"train.steps={STEPS}", "checkpoint.every_steps=3",
            "eval.every_steps=0", "metrics.tensorboard=false", "metrics.log_every_steps=1",
        ),
    )  # fmt: skip
    return write_config(tmp_path / f"{name}.yaml", cfg), run_dir


def run(config_file, cwd, trace, **faults):
    env = {"MAXLM_TRACE": str(trace), **{f"MAXLM_FAULT_{k.upper()}": str(v) for k, v in
                                         faults.items()}}  # fmt: skip
    return cli([f"--config={config_file}"], cwd=cwd, devices=2, env=env)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baseline")
    config_file, run_dir = setup(corpus, tmp, "run")
    result = run(config_file, tmp, tmp / "trace.jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["state_hash"], trace_of(tmp / "trace.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault", [{"kill_at_step": 5}, {"kill_at_step": 8}, {"kill_after_save": 6}], ids=str
)
def test_sigkill_then_rerun_ends_in_the_uninterrupted_state(corpus, tmp_path, uninterrupted,
                                                            fault):  # fmt: skip
    config_file, run_dir = setup(corpus, tmp_path, "run")
    killed = run(config_file, tmp_path, tmp_path / "trace.jsonl", **fault)
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()
    # a save the kill tore is never listed (orbax renames a step only once it is complete)
    committed = committed_steps(run_dir)
    resumed = run(config_file, tmp_path, tmp_path / "trace.jsonl")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if committed:
        assert f"resumed from the checkpoint of step {max(committed)} " in resumed.stdout
    else:
        assert "resumed from" not in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    state_hash, trace = uninterrupted
    assert summary["state_hash"] == state_hash
    assert trace_of(tmp_path / "trace.jsonl") == trace  # same loss bits, same data, every step


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_the_rerun_finishes_exactly(corpus, tmp_path, uninterrupted):
    config_file, run_dir = setup(corpus, tmp_path, "run")
    preempted = run(config_file, tmp_path, tmp_path / "trace.jsonl", sigterm_at_step=4)
    assert preempted.returncode == 0, preempted.stderr[-3000:]
    assert "preempted: saved step 4" in preempted.stdout
    assert (run_dir / "checkpoints" / "4").is_dir()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").open()]
    assert events == [{"step": 4, "event": "preempted"}]
    resumed = run(config_file, tmp_path, tmp_path / "trace.jsonl")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from the checkpoint of step 4" in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state_hash"] == uninterrupted[0]
    assert trace_of(tmp_path / "trace.jsonl") == uninterrupted[1]


@pytest.mark.slow
def test_full_disk_stops_with_the_path_and_keeps_the_committed_checkpoints(
    corpus, tmp_path, uninterrupted
):
    """Files capped at 150 KB (`ulimit -f`; a checkpoint of the tiny model is 1.4 MB): the first
    save that cannot be written stops the run at the next step with an error naming the path;
    the checkpoints committed before stay intact and a rerun with room finishes exactly."""
    config_file, run_dir = setup(corpus, tmp_path, "run")
    trace = tmp_path / "trace.jsonl"
    env = {"MAXLM_TRACE": str(trace)}
    first = cli([f"--config={config_file}", "train.steps=3"], cwd=tmp_path, devices=2, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    capped = subprocess.run(
        ["bash", "-c", f"ulimit -f 150 && {sys.executable} -m maxlm.train --config={config_file}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "MAXLM_TRACE": str(trace),
             "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                          "--xla_backend_optimization_level=0"},
    )  # fmt: skip
    assert capped.returncode == 1
    last = capped.stderr.strip().splitlines()[-1]
    assert re.match(rf"error: checkpoint: writing step \d+ to {run_dir / 'checkpoints'} failed "
                    r"\(noticed at step -?\d+\): .*File too large", last), last  # fmt: skip
    committed = committed_steps(run_dir)
    assert committed == [3]
    resumed = run(config_file, tmp_path, trace)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state_hash"] == uninterrupted[0]
    assert trace_of(trace) == uninterrupted[1]


@pytest.mark.slow
def test_resume_on_another_mesh_continues_the_run(corpus, tmp_path, uninterrupted):
    """Saved on (data 2), resumed on (tensor 2): the restore reshards the state, and every
    later step follows the uninterrupted run to float32 rounding (another mesh sums in
    another order, so bits may differ)."""
    config_file, run_dir = setup(corpus, tmp_path, "run")
    trace = tmp_path / "trace.jsonl"
    first = run(config_file, tmp_path, trace, kill_at_step=7)
    assert first.returncode == -signal.SIGKILL
    other_mesh = ["mesh.data=1", "mesh.tensor=2"]
    resumed = cli([f"--config={config_file}", *other_mesh], cwd=tmp_path, devices=2,
                  env={"MAXLM_TRACE": str(trace)})  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 2}" in resumed.stdout
    assert "resumed from the checkpoint of step" in resumed.stdout
    got, want = trace_of(trace), uninterrupted[1]
    assert [got[s][1] for s in sorted(got)] == [want[s][1] for s in sorted(want)], "same data"
    losses = [struct.unpack("<f", struct.pack("<I", got[s][0]))[0] for s in sorted(got)]
    expected = [struct.unpack("<f", struct.pack("<I", want[s][0]))[0] for s in sorted(want)]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
