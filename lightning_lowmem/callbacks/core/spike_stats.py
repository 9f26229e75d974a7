r"""Loss-spike detection from exponential moving statistics (no Lightning, no torch inside).

Each monitored value :math:`x_t` (the loss, the gradient norm) keeps an exponential moving mean and
variance with decay :math:`\beta` (West's incremental form):

.. math::

    \delta = x_t - \mu, \qquad \mu \leftarrow \mu + (1-\beta)\,\delta, \qquad
    \sigma^2 \leftarrow \beta\,\big(\sigma^2 + (1-\beta)\,\delta^2\big),

(the mean starts at the first value, the variance at 0), and its z-score against the statistics
*before* it, :math:`z_t = (x_t - \mu) / \max(\hat\sigma, 10^{-3}|\mu|)` with the bias-corrected
:math:`\hat\sigma^2 = \sigma^2 / (1 - \beta^{n-1})` after :math:`n` values (as Adam corrects its
moments; without it the variance is far too small for the first few hundred steps) and a floor that
keeps a nearly constant series from turning every small rise into a spike. A step is a spike when

* a monitored value is NaN or infinite (at any time, warmup included), or
* after ``warmup`` values entered the statistics, some :math:`z_t >` ``threshold`` (one-sided: only
  rises count) and, with ``min_ratio``, also :math:`x_t >` ``min_ratio`` :math:`\cdot\,\mu`.

Spikes never enter the statistics, so one bad batch does not raise the bar for the next.

Example::

    >>> detector = SpikeDetector(threshold=6.0, warmup=50)
    >>> decision = detector.check({"loss": 2.31, "grad_norm": 0.84})
    >>> detector.update({"loss": 2.31, "grad_norm": 0.84}, is_spike=decision.is_spike)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

#: Monitors a detector can watch: the loss averaged over ranks and micro-batches, and the global gradient norm.
MONITORS = ("loss", "grad_norm")
#: The standard deviation is floored at this fraction of the mean's magnitude.
MIN_RELATIVE_STD = 1e-3


class EmaStats:
    """Exponential moving mean and variance of one series.

    Args:
        decay: :math:`\\beta` in ``[0, 1)``; the statistics remember about ``1 / (1 - decay)`` values.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.mean = 0.0
        self.var = 0.0
        self.count = 0

    def update(self, x: float) -> None:
        """Add a finite value to the statistics."""
        if self.count == 0:
            self.mean, self.var = x, 0.0
        else:
            delta = x - self.mean
            self.mean += (1.0 - self.decay) * delta
            self.var = self.decay * (self.var + (1.0 - self.decay) * delta * delta)
        self.count += 1

    @property
    def std(self) -> float:
        """The standard deviation, bias-corrected for the statistics' start at 0 and floored."""
        correction = 1.0 - self.decay ** (self.count - 1) if self.count > 1 else 1.0
        var = self.var / correction if correction > 0 else self.var
        return max(math.sqrt(var), MIN_RELATIVE_STD * abs(self.mean))

    def zscore(self, x: float) -> float:
        """How many (floored) standard deviations ``x`` lies above the mean (0 before any value)."""
        if self.count == 0:
            return 0.0
        std = self.std
        if std == 0.0:
            return 0.0 if x <= self.mean else math.inf
        return (x - self.mean) / std

    def state_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


@dataclasses.dataclass(frozen=True)
class SpikeDecision:
    """What :meth:`SpikeDetector.check` found.

    Args:
        is_spike: the step is a spike.
        nonfinite: some monitored value is NaN or infinite.
        reason: a short human-readable reason (``""`` when not a spike).
        values: the monitored values.
        zscores: the z-score of each monitored value (NaN for a non-finite value).
    """

    is_spike: bool
    nonfinite: bool
    reason: str
    values: dict[str, float]
    zscores: dict[str, float]

    @property
    def max_z(self) -> float:
        """The largest z-score (``inf`` for a non-finite value, 0 without values)."""
        if self.nonfinite:
            return math.inf
        return max(self.zscores.values(), default=0.0)


class SpikeDetector:
    """Decides whether a step's monitored values are a spike (see the module docstring).

    Args:
        monitors: which values to watch, a subset of :data:`MONITORS`.
        threshold: z-score above which a value is a spike.
        decay: decay of the moving statistics.
        warmup: values that enter the statistics before z-scores are tested.
        min_ratio: if set, a value is only a spike if it is also above ``min_ratio`` times its mean.

    Raises:
        ValueError: for an unknown or empty ``monitors``, or a setting out of range.
    """

    def __init__(
        self,
        monitors: Sequence[str] = MONITORS,
        threshold: float = 6.0,
        decay: float = 0.99,
        warmup: int = 50,
        min_ratio: float | None = None,
    ) -> None:
        monitors = tuple(monitors)
        if not monitors or any(m not in MONITORS for m in monitors) or len(set(monitors)) != len(monitors):
            raise ValueError(f"monitor must be a non-empty selection of {MONITORS} without repeats, got {monitors!r}.")
        if not threshold > 0.0 or math.isinf(threshold):
            raise ValueError(f"threshold must be a positive finite z-score, got {threshold!r}.")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}.")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (values before z-scores are tested), got {warmup!r}.")
        if min_ratio is not None and not 1.0 <= min_ratio < math.inf:
            raise ValueError(f"min_ratio must be None or a finite number >= 1, got {min_ratio!r}.")
        self.monitors = monitors
        self.threshold = float(threshold)
        self.warmup = warmup
        self.min_ratio = min_ratio
        self.stats = {m: EmaStats(decay) for m in monitors}

    @property
    def warmed_up(self) -> bool:
        return min(s.count for s in self.stats.values()) >= self.warmup

    def check(self, values: Mapping[str, float | None]) -> SpikeDecision:
        """Decide on one step's values without changing the statistics (``None``: not measured)."""
        present = {m: float(values[m]) for m in self.monitors if values.get(m) is not None}
        bad = [m for m, x in present.items() if not math.isfinite(x)]
        zscores = {m: (math.nan if m in bad else self.stats[m].zscore(x)) for m, x in present.items()}
        if bad:
            return SpikeDecision(True, True, "non-finite " + " and ".join(bad), present, zscores)
        reasons = []
        if self.warmed_up:
            for m, x in present.items():
                stats = self.stats[m]
                if zscores[m] > self.threshold and (self.min_ratio is None or x > self.min_ratio * stats.mean):
                    reasons.append(f"{m} z={zscores[m]:.1f} > {self.threshold:g}")
        return SpikeDecision(bool(reasons), False, "; ".join(reasons), present, zscores)

    def update(self, values: Mapping[str, float | None], is_spike: bool) -> None:
        """Add the step's finite values to the statistics unless the step was a spike."""
        if is_spike:
            return
        for m in self.monitors:
            x = values.get(m)
            if x is not None and math.isfinite(x):
                self.stats[m].update(float(x))

    def state_dict(self) -> dict[str, Any]:
        return {m: s.state_dict() for m, s in self.stats.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore statistics saved by :meth:`state_dict`.

        Raises:
            ValueError: if the saved monitors differ from this detector's.
        """
        if set(state) != set(self.stats):
            raise ValueError(
                f"Cannot restore spike statistics: they were saved for monitors {sorted(state)}, "
                f"this detector watches {sorted(self.stats)}. Resume with the same monitor setting."
            )
        for m, s in self.stats.items():
            s.load_state_dict(state[m])
