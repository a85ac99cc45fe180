"""Observability: goodput across restarts, the progress display, jax.profiler traces and
Weights & Biases (offline) logging from the real trainer."""

import gzip
import io
import json
import signal
import struct

import pytest
from training import cli, committed_steps, overrides, read_jsonl, write_config

from maxlm import config
from maxlm.goodput import BUCKETS, Goodput, summary_line
from maxlm.metrics import ProgressDisplay


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def session(run_dir, clock, start_step=0, compile_s=10.0, startup_s=5.0):
    """A session that compiled for `compile_s` and spent `startup_s` on the rest of startup."""
    goodput = Goodput(run_dir, True, clock=clock)
    clock.tick(compile_s + startup_s)
    goodput.add("compile", compile_s)
    goodput.started(start_step)
    return goodput


def test_one_session_splits_its_wall_time(tmp_path):
    clock = Clock()
    goodput = session(tmp_path, clock)
    for step in range(1, 11):  # 10 steps of 1 s, of which 0.25 s waiting for data
        with goodput.timed("data"):
            clock.tick(0.25)
        clock.tick(0.75)
        goodput.stepped(step)
    with goodput.timed("checkpoint"):
        clock.tick(2.0)
    goodput.saved(10)
    goodput.write(finished=True)
    totals = goodput.totals()
    assert totals["compile_s"] == 10.0 and totals["startup_s"] == 5.0
    assert totals["data_s"] == 2.5 and totals["checkpoint_s"] == 2.0
    assert totals["step_s"] == pytest.approx(7.5)
    assert totals["wall_s"] == pytest.approx(27.0)
    assert totals["goodput"] == pytest.approx(7.5 / 27.0)
    assert sum(totals[f"{b}_s"] for b in BUCKETS) == pytest.approx(totals["wall_s"])
    line = summary_line(totals)
    assert line.startswith("goodput 27.8% of 27.0 s: steps 27.8%, compile 37.0%")
    assert "lost to restarts" not in line  # buckets under 0.05% are left out


def test_a_restart_counts_redone_steps_and_downtime_as_lost(tmp_path):
    clock = Clock()
    first = session(tmp_path, clock)
    for step in range(1, 8):  # saves step 5; crashes after step 7 was logged
        clock.tick(1.0)
        first.stepped(step)
        if step == 5:
            first.saved(5)
        first.write()
    clock.tick(30.0)  # the crash and the time until the relaunch (unrecorded)
    second = session(tmp_path, clock, start_step=5)
    assert second.totals()["lost_s"] == pytest.approx(2.0 + 30.0)  # steps 6-7 and the gap
    for step in range(6, 11):
        clock.tick(1.0)
        second.stepped(step)
    second.saved(10)
    second.write(finished=True)
    totals = second.totals()
    # two startups (15 s each), 5 + 5 productive steps, 2 redone, 30 s down
    assert totals["step_s"] == pytest.approx(10.0)
    assert totals["compile_s"] == 20.0 and totals["startup_s"] == 10.0
    assert totals["lost_s"] == pytest.approx(32.0)
    assert totals["wall_s"] == pytest.approx(72.0)
    lines = (tmp_path / "goodput.jsonl").read_text().splitlines()
    assert [json.loads(line)["finished"] for line in lines] == [False, True]

    # rerunning the finished run: no downtime counted, nothing redone
    third = session(tmp_path, Clock(clock.now + 1000.0), start_step=10)
    assert third.totals()["lost_s"] == pytest.approx(32.0)


def test_a_restart_before_everything_the_last_session_saw_loses_all_of_it(tmp_path):
    clock = Clock()
    first = session(tmp_path, clock, start_step=5)
    clock.tick(4.0)
    first.stepped(9)
    first.write()
    second = session(tmp_path, clock, start_step=3)  # its checkpoints of 5.. were damaged
    assert second.totals()["lost_s"] == pytest.approx(4.0)


def test_restore_and_skip_loses_the_steps_since_the_checkpoint(tmp_path):
    clock = Clock()
    goodput = session(tmp_path, clock)
    clock.tick(3.0)
    goodput.saved(3)
    clock.tick(2.0)  # steps 4-5, then a spike: back to step 3
    goodput.rewound(3)
    with goodput.timed("lost"):
        clock.tick(1.0)  # the restore itself
    totals = goodput.totals()
    assert totals["step_s"] == pytest.approx(3.0)
    assert totals["lost_s"] == pytest.approx(3.0)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


RECORD = {"loss_avg": 3.25, "lr": 1e-3, "tokens_per_s": 12345.0, "mfu": 0.42}


def test_a_terminal_gets_a_live_bar_with_eta():
    stream = Terminal()
    display = ProgressDisplay("auto", total=100, start=20, stream=stream)
    display.advance(21)
    display.advance(30)
    display.show(30, 100, RECORD, eta_s=70.0)
    display.close()
    shown = stream.getvalue()
    assert "\r" in shown  # redrawn in place
    assert "30/100" in shown and "30%" in shown
    assert "loss 3.2500" in shown and "tok/s 12,345" in shown and "MFU 42.0%" in shown
    assert "<" in shown  # tqdm's elapsed<remaining: the ETA


def test_logs_get_a_line_per_logging_step():
    stream = io.StringIO()  # not a terminal: CI, a pod's log file
    display = ProgressDisplay("auto", total=100, start=0, stream=stream)
    display.advance(5)
    display.show(10, 100, {**RECORD, "grad_norm": 1.5}, eta_s=75.0)
    display.close()
    assert stream.getvalue() == (
        "step     10/100  loss 3.2500  lr 1.00e-03  grad_norm 1.500  tok/s 12,345  MFU 42.0%  "
        "ETA 1:15\n"
    )
    forced = io.StringIO()
    bar = ProgressDisplay("bar", total=10, start=0, stream=forced)
    bar.advance(10)
    bar.close()
    assert "10/10" in forced.getvalue()


# --------------------------------------------------------------------------- end to end


def wandb_records(run_dir):
    """Every record of the run's offline W&B files, oldest run first: W&B's transaction log is
    LevelDB's log format (7-byte file header, 32 KiB blocks of checksummed chunks) around
    `wandb_internal_pb2.Record` protobufs."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        position, payload = 7, b""
        while position + 7 <= len(data):
            if (position % 32768) + 7 > 32768:  # a block's tail too short for a header
                position += 32768 - position % 32768
                continue
            _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
            if kind == 0:
                break
            payload += data[position + 7 : position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(payload)
                records.append(record)
                payload = b""
    return records


def items(update) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}


def of_kind(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


@pytest.mark.slow
def test_a_killed_and_rerun_trainer_reports_goodput_profile_and_wandb(corpus, tmp_path):
    """The trainer in a subprocess, SIGKILLed after step 5 (checkpoint at 3), then rerun: the
    second summary's goodput counts both sessions and what the crash cost; the first session
    left a profile of steps 2-3; both logged to the same offline W&B run."""
    run_dir = tmp_path / "run"
    cfg = config.load(None, overrides(
        corpus, run_dir, "train.steps=6", "checkpoint.every_steps=3", "checkpoint.async_save=false",
        "metrics.log_every_steps=1", "eval.every_steps=0", "metrics.tensorboard=false",
        "profile.start_step=2", "profile.steps=2", "metrics.wandb.enabled=true",
        "metrics.wandb.mode=offline", "metrics.wandb.project=tests", "metrics.progress=lines",
    ))  # fmt: skip
    args = [f"--config={write_config(tmp_path / 'run.yaml', cfg)}"]
    killed = cli(args, cwd=tmp_path, env={"MAXLM_FAULT_KILL_AT_STEP": "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert committed_steps(run_dir) == [3]
    first = json.loads((run_dir / "goodput.jsonl").read_text())
    assert not first["finished"] and first["step"] >= 3

    traces = list((run_dir / "profile" / "plugins" / "profile").glob("*/*"))
    assert {p.name.split(".", 1)[1] for p in traces} >= {"xplane.pb", "trace.json.gz"}
    perfetto = [p for p in traces if p.name == "perfetto_trace.json.gz"]
    assert perfetto and json.loads(gzip.decompress(perfetto[0].read_bytes()))  # loads whole
    assert "profile of steps 2-3 written to" in killed.stdout

    rerun = cli(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    split = summary["goodput"]
    sessions = [json.loads(line) for line in (run_dir / "goodput.jsonl").read_text().splitlines()]
    assert [s["finished"] for s in sessions] == [False, True]
    assert sessions[1]["start_step"] == 3
    assert sessions[1]["redone_before"] > 0 and sessions[1]["gap_before"] > 0
    assert split["lost_s"] == pytest.approx(
        sessions[1]["redone_before"] + sessions[1]["gap_before"]
    )
    assert split["compile_s"] > 0 and split["startup_s"] > 0 and split["step_s"] > 0
    assert sum(split[f"{b}_s"] for b in BUCKETS) == pytest.approx(split["wall_s"])
    assert split["wall_s"] >= sessions[1]["time"] - sessions[0]["session_start"] - 1.0
    assert 0 < split["goodput"] == pytest.approx(split["step_s"] / split["wall_s"])
    assert f"goodput {100 * split['goodput']:.1f}%" in rerun.stdout
    train_records, _ = read_jsonl(run_dir)
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert all(0 < r["goodput"] <= 1 for r in train_records)

    # W&B: one run id for both sessions. wandb-core buffers what it writes, so a SIGKILLed
    # offline session loses its records (metrics.jsonl is the record that survives); the
    # rerun's history holds its steps' metrics.jsonl losses, its summary the run's.
    records = wandb_records(run_dir)
    runs = {r.run_id for r in of_kind(records, "run")}
    assert runs == {(run_dir / "wandb_id").read_text().strip()}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    logged = {h["step"]: h["loss"] for h in (items(r.item) for r in of_kind(records, "history"))}
    assert logged == {r["step"]: r["loss"] for r in train_records if r["step"] > 3}
    configured = {k: v for r in of_kind(records, "run") for k, v in items(r.config.update).items()}
    assert configured["model"]["d_model"] == 64
    final = {k: v for s in of_kind(records, "summary") for k, v in items(s.update).items()}
    assert final["final_train_loss"] == summary["final_train_loss"]
    assert final["goodput"] == summary["goodput"]


def test_step_profiler_traces_exactly_its_steps(tmp_path):
    """Steps 2-3 of 1-4: the trace starts before step 2, stops after step 3 (the seconds spent
    writing it are returned once), and leaves an XProf and a Perfetto file; steps=0 is off."""
    import jax.numpy as jnp

    from maxlm.config import ProfileConfig
    from maxlm.profiling import StepProfiler

    logged: list[str] = []
    profiler = StepProfiler(ProfileConfig(steps=2, start_step=2), tmp_path, logged.append)
    spent = []
    for step in range(1, 5):
        profiler.before(step)
        state = jnp.ones(4) * step
        spent.append(profiler.after(step, state))
    assert spent[0] == spent[1] == spent[3] == 0.0 and spent[2] > 0
    assert logged == [f"profile of steps 2-3 written to {tmp_path / 'profile'}"]
    written = {p.name.split(".", 1)[-1] for p in (tmp_path / "profile").rglob("*") if p.is_file()}
    assert {"xplane.pb", "json.gz"} <= written

    off = StepProfiler(ProfileConfig(steps=0), tmp_path / "off", logged.append)
    for step in range(1, 8):
        off.before(step)
        assert off.after(step, None) == 0.0
    assert not (tmp_path / "off").exists()
