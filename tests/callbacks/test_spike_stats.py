"""The framework-free spike detector: EMA statistics, warmup, z-scores, ratio test, state round trip."""

from __future__ import annotations

import math
import random

import pytest

from lightning_lowmem.callbacks.core.spike_stats import EmaStats, SpikeDetector


def test_ema_stats_two_values_exact() -> None:
    stats = EmaStats(decay=0.9)
    stats.update(1.0)
    stats.update(3.0)
    assert stats.mean == pytest.approx(1.0 + 0.1 * 2.0)
    assert stats.var == pytest.approx(0.9 * 0.1 * 4.0)
    # bias correction divides by 1 - 0.9 ** 1
    assert stats.std == pytest.approx(math.sqrt(0.9 * 0.1 * 4.0 / 0.1))


def test_ema_stats_estimate_a_stationary_series() -> None:
    rng = random.Random(0)
    stats = EmaStats(decay=0.99)
    for _ in range(5000):
        stats.update(rng.gauss(10.0, 2.0))
    assert stats.mean == pytest.approx(10.0, abs=0.6)
    assert stats.std == pytest.approx(2.0, rel=0.25)


def test_bias_correction_keeps_early_zscores_honest() -> None:
    """Right after warmup the uncorrected variance would be ~(1 - 0.99^n) of the truth: z-scores 3x too big."""
    rng = random.Random(1)
    stats = EmaStats(decay=0.99)
    for _ in range(12):
        stats.update(rng.gauss(0.0, 1.0))
    assert 0.4 < stats.std < 2.0


def test_zscore_floor_for_a_constant_series() -> None:
    stats = EmaStats(decay=0.99)
    for _ in range(10):
        stats.update(2.0)
    assert stats.zscore(2.001) == pytest.approx(0.5)  # std floored at 1e-3 * 2
    assert stats.zscore(1.0) < 0


def steady(detector: SpikeDetector, n: int, loss: float = 2.0, grad_norm: float = 1.0, seed: int = 0) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        values = {"loss": loss + rng.gauss(0, 0.02), "grad_norm": grad_norm + rng.gauss(0, 0.05)}
        decision = detector.check(values)
        assert not decision.is_spike, decision
        detector.update(values, decision.is_spike)


def test_no_spike_during_warmup_then_spike() -> None:
    detector = SpikeDetector(warmup=20)
    steady(detector, 5)
    assert not detector.check({"loss": 50.0, "grad_norm": 1.0}).is_spike  # still warming up
    steady(detector, 15)
    decision = detector.check({"loss": 50.0, "grad_norm": 1.0})
    assert decision.is_spike and not decision.nonfinite
    assert decision.reason.startswith("loss z=")
    assert decision.max_z == decision.zscores["loss"] > 6


def test_spikes_stay_out_of_the_statistics() -> None:
    detector = SpikeDetector(warmup=10)
    steady(detector, 30)
    before = detector.state_dict()
    decision = detector.check({"loss": 50.0, "grad_norm": 20.0})
    detector.update({"loss": 50.0, "grad_norm": 20.0}, decision.is_spike)
    assert decision.is_spike
    assert detector.state_dict() == before
    # ...so the same spike again is still a spike
    assert detector.check({"loss": 50.0, "grad_norm": 20.0}).is_spike


def test_only_rises_are_spikes() -> None:
    detector = SpikeDetector(warmup=10)
    steady(detector, 30)
    assert not detector.check({"loss": 0.01, "grad_norm": 0.001}).is_spike


def test_nonfinite_is_a_spike_even_in_warmup() -> None:
    detector = SpikeDetector(warmup=100)
    steady(detector, 3)
    decision = detector.check({"loss": math.nan, "grad_norm": 1.0})
    assert decision.is_spike and decision.nonfinite and decision.reason == "non-finite loss"
    assert math.isinf(decision.max_z)
    decision = detector.check({"loss": 2.0, "grad_norm": math.inf})
    assert decision.is_spike and decision.reason == "non-finite grad_norm"


def test_min_ratio_requires_a_relative_rise() -> None:
    # Tiny noise: a 5% rise has a huge z-score but is below a 1.5x ratio.
    plain, ratio = SpikeDetector(warmup=10), SpikeDetector(warmup=10, min_ratio=1.5)
    for d in (plain, ratio):
        steady(d, 30)
    values = {"loss": 2.3, "grad_norm": 1.0}
    assert plain.check(values).is_spike
    assert not ratio.check(values).is_spike
    assert ratio.check({"loss": 3.5, "grad_norm": 1.0}).is_spike


def test_monitor_selection_and_missing_values() -> None:
    detector = SpikeDetector(monitors=("grad_norm",), warmup=10)
    steady(detector, 30)
    assert not detector.check({"loss": 1e9, "grad_norm": 1.0}).is_spike  # loss is not watched
    assert detector.check({"grad_norm": 10.0}).is_spike
    full = SpikeDetector(warmup=10)
    steady(full, 30)
    decision = full.check({"loss": None, "grad_norm": 1.0})  # loss not measured this step
    assert not decision.is_spike and "loss" not in decision.values


def test_state_round_trip_gives_the_same_decisions() -> None:
    a = SpikeDetector(warmup=10)
    steady(a, 40)
    b = SpikeDetector(warmup=10)
    b.load_state_dict(a.state_dict())
    for loss in (2.0, 2.1, 2.5, 4.0):
        assert a.check({"loss": loss, "grad_norm": 1.0}) == b.check({"loss": loss, "grad_norm": 1.0})
    with pytest.raises(ValueError, match=r"saved for monitors \['grad_norm', 'loss'\], this detector watches \['loss'\]"):
        SpikeDetector(monitors=("loss",)).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(monitors=()), r"monitor must be a non-empty selection of \('loss', 'grad_norm'\)"),
        (dict(monitors=("loss", "accuracy")), r"got \('loss', 'accuracy'\)"),
        (dict(monitors=("loss", "loss")), "without repeats"),
        (dict(threshold=0.0), r"threshold must be a positive finite z-score, got 0.0"),
        (dict(threshold=math.nan), "got nan"),
        (dict(threshold=math.inf), "got inf"),
        (dict(decay=1.0), r"decay must be in \[0, 1\), got 1.0"),
        (dict(decay=math.nan), "got nan"),
        (dict(warmup=0), r"warmup must be an int >= 1 .*got 0"),
        (dict(warmup=2.5), "got 2.5"),
        (dict(min_ratio=0.5), r"min_ratio must be None or a finite number >= 1, got 0.5"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpikeDetector(**kwargs)
