"""Metrics: JSON lines and TensorBoard writers, throughput/MFU windows, progress formatting."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maxlm import metrics
from maxlm.metrics import MetricsWriter, Throughput, format_duration, format_progress


def strict_json(line: str) -> dict:
    """json.loads that rejects the NaN / Infinity extensions (they are not JSON)."""

    def reject(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=reject)


def read_jsonl(run_dir) -> list[dict]:
    return [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_records_are_valid_json_with_plain_values(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(1, {"loss": np.float32(2.5), "lr": jnp.asarray(1e-3), "tokens": np.int32(7)})
    writer.write(2, {"loss": float("nan"), "grad_norm": np.float32("inf"), "note": "spike"})
    writer.write(3, {"eval_loss": -float("inf"), "eval_tokens": 640.0})
    writer.close()
    records = read_jsonl(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0] == {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3), "tokens": 7}
    assert isinstance(records[0]["tokens"], int)
    # non-finite floats neither crash nor produce invalid JSON
    assert records[1] == {"step": 2, "loss": "nan", "grad_norm": "inf", "note": "spike"}
    assert records[2] == {"step": 3, "eval_loss": "-inf", "eval_tokens": 640.0}
    assert not (tmp_path / "tensorboard").exists()


def test_lines_are_flushed_as_they_are_written(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(5, {"loss": 1.0})
    assert read_jsonl(tmp_path) == [{"step": 5, "loss": 1.0}]  # readable before close()
    writer.close()


def test_tensorboard_scalars_are_readable(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=True)
    for step, loss in [(10, 3.0), (20, 2.0), (30, float("nan"))]:
        writer.write(step, {"loss": np.float32(loss), "lr": 1e-3 * step, "phase": "train"})
    writer.write(30, {"eval_loss": 1.5})
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss", "lr", "eval_loss"} <= set(scalars)
    assert "phase" not in scalars and "step" not in scalars
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 3.0), (20, 2.0)]
    assert [e.step for e in events.Scalars("lr")] == [10, 20, 30]
    assert events.Scalars("lr")[-1].value == pytest.approx(0.03)
    assert [(e.step, e.value) for e in events.Scalars("eval_loss")] == [(30, 1.5)]


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = MetricsWriter(tmp_path, tensorboard=True)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert list(tmp_path.iterdir()) == []


class Clock:
    """A settable perf_counter."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock(100.0)
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=clock))
    return clock


def test_throughput_over_a_controlled_window(clock):
    throughput = Throughput(flops_per_token=6_000.0, peak_flops=1e7)
    for _ in range(4):
        throughput.add(512)
    clock.now += 2.0
    report = throughput.report()
    assert report["tokens_per_s"] == pytest.approx(4 * 512 / 2.0)
    assert report["step_time_s"] == pytest.approx(0.5)
    assert report["mfu"] == pytest.approx(1024 * 6_000.0 / 1e7)
    # report() starts a new window: nothing added since means zero throughput, not a leftover
    clock.now += 1.0
    assert throughput.report()["tokens_per_s"] == 0.0


def test_restart_drops_time_and_tokens_before_it(clock):
    throughput = Throughput(flops_per_token=1.0, peak_flops=1.0)
    throughput.add(1000)
    clock.now += 50.0  # e.g. an evaluation: not training time
    throughput.restart()
    throughput.add(300)
    throughput.add(300)
    clock.now += 3.0
    report = throughput.report()
    assert report["tokens_per_s"] == pytest.approx(200.0)
    assert report["step_time_s"] == pytest.approx(1.5)


def test_zero_elapsed_time_does_not_divide_by_zero(clock):
    throughput = Throughput(flops_per_token=1.0, peak_flops=1.0)
    throughput.add(10)
    report = throughput.report()
    assert np.isfinite(report["tokens_per_s"]) and report["tokens_per_s"] > 0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0:00"),
        (-5, "0:00"),
        (59.9, "0:59"),
        (61, "1:01"),
        (3599, "59:59"),
        (3600, "1:00:00"),
        (3723, "1:02:03"),
        (90_000, "25:00:00"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_progress():
    record = {
        "loss": 9.0,  # the line shows the window mean, not the last step's loss
        "loss_avg": 2.345678,
        "lr": 3e-4,
        "grad_norm": 0.5,
        "tokens_per_s": 12345.6,
        "mfu": 0.1234,
    }
    line = format_progress(12, 1000, record, eta_s=75.0)
    assert line == (
        "step     12/1000  loss 2.3457  lr 3.00e-04  grad_norm 0.500  tok/s 12,346  "
        "MFU 12.3%  ETA 1:15"
    )
