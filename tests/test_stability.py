"""Stability: spike and non-finite detection, the recovery budget, restore, state round-trip."""

import json
import math

import numpy as np
import pytest

from maxlm.config import StabilityConfig
from maxlm.stability import SpikeMonitor, StabilityError, Verdict


def loss_curve(steps: int, seed: int = 0) -> np.ndarray:
    """A pretraining-like curve: ln(32000) ~ 10.4 falling fast to ~2.5, with 2% noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    return (2.5 + 7.9 * np.exp(-t / 60.0)) * (1.0 + 0.02 * rng.standard_normal(steps))


def feed(monitor: SpikeMonitor, losses, start: int = 0) -> dict[int, Verdict]:
    """Check each loss (grad_norm 1.0) from step `start`; the verdicts by step."""
    verdicts = {}
    for step, loss in enumerate(losses, start):
        verdict = monitor.check(step, float(loss), 1.0)
        if verdict is not None:
            verdicts[step] = verdict
    return verdicts


def history_steps(monitor: SpikeMonitor) -> list[int]:
    return [step for step, _ in monitor.state_dict()["history"]]


def test_smooth_noisy_curve_never_triggers():
    monitor = SpikeMonitor(StabilityConfig())
    assert feed(monitor, loss_curve(1000)) == {}
    assert history_steps(monitor) == list(range(900, 1000))


def test_spike_by_factor():
    losses = loss_curve(400)
    losses[300] *= 10
    monitor = SpikeMonitor(StabilityConfig())
    verdicts = feed(monitor, losses)
    assert list(verdicts) == [300]
    assert verdicts[300].action == "restore_and_skip"
    reason = verdicts[300].reason
    assert reason.startswith(f"loss spike: {losses[300]:.2f} > 3.0 x running mean 2.")
    assert 300 not in history_steps(monitor)


def test_spike_by_zscore():
    losses = loss_curve(400)
    losses[300] *= 10
    monitor = SpikeMonitor(StabilityConfig(spike_factor=0))
    verdicts = feed(monitor, losses)
    assert list(verdicts) == [300]
    assert verdicts[300].action == "restore_and_skip"
    window = losses[200:300]
    sigma = (losses[300] - window.mean()) / window.std()
    assert verdicts[300].reason == (
        f"loss spike: {losses[300]:.2f} is {sigma:.1f} sigma above the running mean "
        f"{window.mean():.2f} (std {window.std():.2f})"
    )


def test_zscore_catches_a_spike_below_the_factor():
    losses = loss_curve(400)
    losses[300] *= 1.5  # far outside 2% noise, well under 3x the mean
    assert feed(SpikeMonitor(StabilityConfig(spike_factor=3.0)), losses)[300].action == (
        "restore_and_skip"
    )
    assert feed(SpikeMonitor(StabilityConfig(spike_zscore=0)), losses) == {}


@pytest.mark.parametrize(
    ("loss", "grad_norm", "reason"),
    [
        (math.nan, 1.0, "non-finite loss (nan)"),
        (math.inf, 1.0, "non-finite loss (inf)"),
        (2.5, math.inf, "non-finite grad_norm (inf)"),
        (2.5, math.nan, "non-finite grad_norm (nan)"),
    ],
)
def test_non_finite_skips_update_and_keeps_statistics_clean(loss, grad_norm, reason):
    losses = loss_curve(301)
    losses[300] *= 1.5  # a spike only the z-score sees, so a polluted std would miss it
    monitor = SpikeMonitor(StabilityConfig(spike_factor=0))
    assert feed(monitor, losses[:299]) == {}
    before = monitor.state_dict()
    assert monitor.check(299, loss, grad_norm) == Verdict(reason, "skip_update")
    assert monitor.state_dict()["history"] == before["history"]
    assert monitor.check(300, losses[300], 1.0).action == "restore_and_skip"


def test_no_spike_check_before_min_history():
    cfg = StabilityConfig(min_history=20)
    early = SpikeMonitor(cfg)
    assert feed(early, [1.0] * 19 + [100.0]) == {}
    ready = SpikeMonitor(cfg)
    assert list(feed(ready, [1.0] * 20 + [100.0])) == [20]


def test_budget_exceeded_within_window_raises_naming_the_keys():
    monitor = SpikeMonitor(StabilityConfig(max_recoveries=2, recovery_window_steps=100))
    assert monitor.check(10, math.nan, 1.0) is not None
    assert monitor.check(50, math.nan, 1.0) is not None
    with pytest.raises(StabilityError) as error:
        monitor.check(109, math.nan, 1.0)
    message = str(error.value)
    assert "3 recoveries in steps [10, 50, 109]" in message
    assert "stability.max_recoveries=2" in message
    assert "stability.recovery_window_steps=100" in message


def test_recoveries_spaced_beyond_window_never_raise():
    monitor = SpikeMonitor(StabilityConfig(max_recoveries=2, recovery_window_steps=100))
    # every 50 steps: each window (step - 100, step] holds exactly two
    for step in range(0, 5000, 50):
        assert monitor.check(step, math.inf, 1.0) is not None


def test_recovery_record_survives_restore():
    monitor = SpikeMonitor(StabilityConfig(max_recoveries=2, recovery_window_steps=100))
    feed(monitor, [2.0] * 500)
    assert monitor.check(500, 100.0, 1.0).action == "restore_and_skip"
    monitor.after_restore(450)
    assert monitor.check(460, math.nan, 1.0) is not None
    with pytest.raises(StabilityError, match=r"steps \[500, 460, 470\]"):
        monitor.check(470, math.nan, 1.0)


def test_after_restore_drops_abandoned_history():
    monitor = SpikeMonitor(StabilityConfig())
    feed(monitor, loss_curve(150))
    monitor.after_restore(120)
    assert history_steps(monitor) == list(range(50, 121))
    feed(monitor, loss_curve(150)[121:], start=121)
    assert history_steps(monitor) == list(range(50, 150))


def test_state_dict_round_trips_through_json():
    cfg = StabilityConfig(spike_factor=0, max_recoveries=10)
    losses = loss_curve(600, seed=1)
    losses[[250, 420, 530]] *= [1.5, 10.0, 1.3]
    losses[[330, 480]] = math.nan
    original = SpikeMonitor(cfg)
    feed(original, losses[:300])
    resumed = SpikeMonitor(cfg)
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert resumed.state_dict() == original.state_dict()
    verdicts = feed(original, losses[300:], start=300)
    assert sorted(verdicts) == [330, 420, 480, 530]
    assert feed(resumed, losses[300:], start=300) == verdicts
    assert resumed.state_dict() == original.state_dict()


def test_recovery_budget_survives_resume():
    cfg = StabilityConfig(max_recoveries=2, recovery_window_steps=100)
    original = SpikeMonitor(cfg)
    original.check(10, math.nan, 1.0)
    original.check(20, math.nan, 1.0)
    resumed = SpikeMonitor(cfg)
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    with pytest.raises(StabilityError, match=r"steps \[10, 20, 30\]"):
        resumed.check(30, math.nan, 1.0)


def test_load_into_smaller_window_keeps_the_latest_losses():
    original = SpikeMonitor(StabilityConfig())
    feed(original, loss_curve(200))
    smaller = SpikeMonitor(StabilityConfig(window=10, min_history=5))
    smaller.load_state_dict(original.state_dict())
    assert history_steps(smaller) == list(range(190, 200))
