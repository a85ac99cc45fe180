"""Multi-host: two trainer processes on 127.0.0.1 (gloo collectives, 2 fake CPU devices each)
form one 4-device (data=2, fsdp=2) mesh, each feeding its half of the global batch.

One uninterrupted two-process run is the reference for the rest:
- a one-process run on 4 devices fed the very same global batches follows it step by step (to
  float32 rounding: gloo sums the devices' partial results across processes in another order
  than the in-process all-reduce, so the last bits differ from the first loss on);
- a run whose process 1 is SIGKILLed fails fast on both processes, and rerunning the gang ends
  in the reference's state bit for bit (state hash, loss bits and data of every step);
- SIGTERM to process 1 alone stops both processes at one step agreed by JAX's preemption sync
  point; they save it, exit 0, and the rerun ends in the reference's state bit for bit.

Run as a script (`python tests/test_multihost.py ARGS`), this file is the trainer of one
process that reads both processes' shards (see `train_on_both_shards`).
"""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import portpicker
import pytest
from training import committed_steps, overrides, read_jsonl, trace_of, write_config

from maxlm import config

STEPS = 16
PROCESSES = 2
DEVICES = 2  # per process
TIMEOUT_S = 240  # for one run of the gang (compiling dominates: about 25 s here)
# a survivor exits once its next collective fails (well under a second here), not after JAX's
# 100 s heartbeat timeout (maxlm.train.exit_without_peers)
SURVIVOR_EXIT_S = 30


class Exit(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    at_s: float  # when the process ended, seconds after the launch


def run_config(corpus, run_dir: Path, *extra: str) -> config.Config:
    """The tiny run of tests/training.py for STEPS steps on a (2, 2, 1) mesh, saving every 3."""
    return config.load(None, overrides(
        corpus, run_dir, f"train.steps={STEPS}", "checkpoint.every_steps=3",
        "eval.every_steps=0", "metrics.tensorboard=false", "metrics.log_every_steps=1",
        "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1", *extra,
    ))  # fmt: skip


def launch(corpus, run_dir: Path, logs: Path, envs: list[dict[str, str]]) -> list[Exit]:
    """`python -m maxlm.train` as process i of a gang with environment envs[i], until all have
    ended; any left after TIMEOUT_S (or a failing test) are killed."""
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    flags = f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0"
    logs.mkdir(parents=True, exist_ok=True)
    procs, ended = [], {}
    start = time.monotonic()
    with contextlib.ExitStack() as files:
        try:
            for i, env in enumerate(envs):
                cfg = run_config(
                    corpus, run_dir, f"distributed.coordinator_address={address}",
                    f"distributed.num_processes={len(envs)}", f"distributed.process_id={i}",
                )  # fmt: skip
                config_file = write_config(logs / f"process{i}.yaml", cfg)
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "maxlm.train", f"--config={config_file}"],
                        cwd=logs,
                        # files, not pipes: a full pipe would stall a process mid-collective
                        stdout=files.enter_context((logs / f"process{i}.out").open("w")),
                        stderr=files.enter_context((logs / f"process{i}.err").open("w")),
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **env},
                    )
                )
            while len(ended) < len(procs):
                assert time.monotonic() - start < TIMEOUT_S, f"the gang ran past {TIMEOUT_S} s"
                for i, proc in enumerate(procs):
                    if i not in ended and proc.poll() is not None:
                        ended[i] = time.monotonic() - start
                time.sleep(0.05)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    return [
        Exit(
            proc.returncode,
            (logs / f"process{i}.out").read_text(),
            (logs / f"process{i}.err").read_text(),
            ended[i],
        )
        for i, proc in enumerate(procs)
    ]


def assert_ok(exits: list[Exit]) -> None:
    for i, e in enumerate(exits):
        assert e.returncode == 0, f"process {i} exited {e.returncode}:\n{e.stderr[-3000:]}"


def iterator_states(run_dir: Path, step: int) -> list[str]:
    """The data iterator files of a checkpoint: one per process that took part in the save."""
    return sorted(p.name for p in (run_dir / "checkpoints" / str(step) / "data").glob("process_*"))


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """The reference two-process run: its dir, final state hash and per-step trace."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    trace = {"MAXLM_TRACE": str(tmp / "trace.jsonl")}
    exits = launch(corpus, tmp / "run", tmp / "logs", [trace, trace])
    assert_ok(exits)
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    return tmp / "run", summary["state_hash"], trace_of(tmp / "trace.jsonl")


@pytest.mark.slow
def test_two_processes_train_like_one_on_the_same_global_batches(corpus, tmp_path, uninterrupted):
    run_dir, _, _ = uninterrupted
    two, _ = read_jsonl(run_dir)
    # process 0 alone wrote the metrics: one record per step, none twice
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    # the newest checkpoint.keep=3 steps, each with every process's data iterator
    assert committed_steps(run_dir) == [12, 15, 16]
    for step in committed_steps(run_dir):
        assert iterator_states(run_dir, step) == ["process_0-of-2.json", "process_1-of-2.json"]

    one_dir = tmp_path / "one"
    config_file = write_config(tmp_path / "one.yaml", run_config(corpus, one_dir))
    flags = (
        f"--xla_force_host_platform_device_count={PROCESSES * DEVICES} "
        "--xla_backend_optimization_level=0"
    )
    result = subprocess.run(
        [sys.executable, str(Path(__file__).absolute()), f"--config={config_file}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    one, _ = read_jsonl(one_dir)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for key in ("loss", "grad_norm"):
        # measured: at most 2 float32 ulps apart (relative 2e-7); a one-process run reading all
        # documents itself (other batches) is 2e-4 to 6e-3 apart
        np.testing.assert_allclose(
            [r[key] for r in one], [r[key] for r in two], rtol=1e-5, err_msg=key
        )
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]


@pytest.mark.slow
def test_sigkill_of_one_process_then_rerun_ends_in_the_uninterrupted_state(
    corpus, tmp_path, uninterrupted
):
    _, state_hash, reference_trace = uninterrupted
    run_dir, trace = tmp_path / "run", {"MAXLM_TRACE": str(tmp_path / "trace.jsonl")}
    killed = launch(
        corpus, run_dir, tmp_path / "killed", [trace, {**trace, "MAXLM_FAULT_KILL_AT_STEP": "8"}]
    )
    assert killed[1].returncode == -9
    # the survivor's next collective fails: it exits non-zero at once, not after 100 s
    assert killed[0].returncode not in (0, None), killed[0].stderr[-3000:]
    assert killed[0].at_s - killed[1].at_s < SURVIVOR_EXIT_S, killed
    assert not (run_dir / "summary.json").exists()
    committed = committed_steps(run_dir)
    assert committed and max(committed) <= 8

    rerun = launch(corpus, run_dir, tmp_path / "rerun", [trace, trace])
    assert_ok(rerun)
    assert f"resumed from the checkpoint of step {max(committed)} " in rerun[0].stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state_hash"] == state_hash
    assert trace_of(tmp_path / "trace.jsonl") == reference_trace


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_then_rerun_finishes_exactly(
    corpus, tmp_path, uninterrupted
):
    _, state_hash, reference_trace = uninterrupted
    run_dir, trace = tmp_path / "run", {"MAXLM_TRACE": str(tmp_path / "trace.jsonl")}
    # JAX's notifier polls for SIGTERM once a second, then the processes agree on the step after
    # the furthest one's: a few steps later, well before STEPS here
    preempted = launch(
        corpus, run_dir, tmp_path / "preempted",
        [trace, {**trace, "MAXLM_FAULT_SIGTERM_AT_STEP": "2"}],
    )  # fmt: skip
    assert_ok(preempted)
    assert (run_dir / "events.jsonl").exists(), "the run ended before the preemption sync point"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").open()]
    assert len(events) == 1 and events[0]["event"] == "preempted", events
    step = events[0]["step"]
    assert 2 < step < STEPS and f"preempted: saved step {step};" in preempted[0].stdout
    # the save is collective: both processes' iterator states are in the committed step
    assert max(committed_steps(run_dir)) == step
    assert iterator_states(run_dir, step) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert not (run_dir / "summary.json").exists()

    rerun = launch(corpus, run_dir, tmp_path / "rerun", [trace, trace])
    assert_ok(rerun)
    assert f"resumed from the checkpoint of step {step} " in rerun[0].stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state_hash"] == state_hash
    assert trace_of(tmp_path / "trace.jsonl") == reference_trace


def train_on_both_shards(argv: list[str]) -> None:
    """maxlm.train in one process whose batches join what each of the PROCESSES processes of a
    gang would read (its own shard of the documents), in process order: the same global batches
    as the gang's. A one-process run reads all documents itself, so its batches differ."""
    from maxlm import train
    from maxlm.data import pipeline

    per_process = pipeline.train_dataset

    class Joined:
        def __init__(self, shards):
            self.shards = [iter(shard) for shard in shards]

        def __next__(self):
            batches = [next(shard) for shard in self.shards]
            return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

        def get_state(self):
            return [shard.get_state() for shard in self.shards]

    class Gang:
        def __init__(self, sources, layout, *, batch_size, **kwargs):
            self.shards = [
                per_process(
                    sources,
                    dataclasses.replace(layout, process_index=i, process_count=PROCESSES),
                    batch_size=batch_size // PROCESSES,
                    **kwargs,  # the mixture stages are not rescaled: one source here
                )
                for i in range(PROCESSES)
            ]

        def __iter__(self):
            return Joined(self.shards)

    pipeline.train_dataset = Gang
    train.main(argv)


if __name__ == "__main__":
    train_on_both_shards(sys.argv[1:])
