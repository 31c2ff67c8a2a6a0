r"""Simple peer detectors for benchmarks: a running z-score of one scalar (loss spikes, gradient-norm spikes).

:class:`ZScoreDetector` is what loss-spike and grad-norm-spike monitors usually do: the z-score of
the new value against the mean and standard deviation of the last ``window`` accepted values,

.. math::

    z_t = \frac{x_t - \bar x_W}{\max(s_W,\ 10^{-12} \max(1, |\bar x_W|))},

scored two-sided (:math:`|z|`) or one-sided (:math:`z` for ``"high"``, :math:`-z` for ``"low"``) and
flagged above a fixed ``threshold``. It shares :class:`~gradspectra.scoring.BatchScorer`'s warm-up
semantics: no score during the first ``warmup_steps`` accepted values, flagged and non-finite values
never enter the window, and a non-finite value is always flagged.

>>> import math
>>> import statistics
>>> history = [1.0, 1.1, 0.9, 1.0, 1.05]
>>> det = ZScoreDetector(name="loss", warmup_steps=5, side="high")
>>> [det.score(v).score for v in history]
[None, None, None, None, None]
>>> r = det.score(3.0)
>>> expected = (3.0 - statistics.mean(history)) / statistics.stdev(history)
>>> r.flagged, math.isclose(r.z["loss"], expected), r.reasons
(True, True, ['loss high (z=26.8)'])
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from gradspectra.scoring._checks import check_bool, check_float, check_int
from gradspectra.scoring.result import ScoreResult

Side = Literal["both", "high", "low"]
SIDES: tuple[str, ...] = ("both", "high", "low")


class ZScoreDetector:
    """Running mean/std z-score of one scalar per step, with a fixed threshold.

    Args:
        name: what the scalar is, used in ``z`` and the reasons (``"loss"``, ``"grad_norm"``).
        side: ``"both"`` scores ``|z|``; ``"high"`` scores ``z`` (only rises are anomalous);
            ``"low"`` scores ``-z``.
        threshold: flag when the score exceeds this many standard deviations.
        warmup_steps: accepted values before the first score, in ``[2, window]``.
        window: how many recent accepted values the mean and standard deviation use, ``>= 2``.
        log: score ``log(value)`` (for positive scalars such as a gradient norm).

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        *,
        name: str = "value",
        side: Side = "both",
        threshold: float = 3.0,
        warmup_steps: int = 20,
        window: int = 200,
        log: bool = False,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"`name` must be a non-empty string, got {name!r}")
        if side not in SIDES:
            raise ValueError(f"`side` can be {', '.join(SIDES)}, got {side!r}")
        self.name = name
        self.side: Side = side
        self.threshold = check_float("threshold", threshold, 0.0, low_open=True)
        self.window = check_int("window", window, 2)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 2, self.window, f"window={self.window}")
        self.log = check_bool("log", log)
        self._values: deque[float] = deque(maxlen=self.window)
        self._accepted = 0

    @property
    def in_warmup(self) -> bool:
        return self._accepted < self.warmup_steps

    def score(self, value: float | None) -> ScoreResult:
        """Score ``value`` against the window, then add it unless it was flagged or non-finite."""
        x = math.nan if value is None else float(value)
        if value is not None and not math.isfinite(x):
            reasons = [f"non-finite {self.name} ({x!r})"]
            return ScoreResult(None if self.in_warmup else math.inf, True, reasons, {}, self.in_warmup)
        if value is None:
            return ScoreResult(None, False, [], {}, self.in_warmup)
        y = math.log(max(x, 1e-30)) if self.log else x
        if self.in_warmup:
            self._push(y)
            return ScoreResult(None, False, [], {}, True)
        data = np.fromiter(self._values, dtype=np.float64, count=len(self._values))
        mean = float(data.mean())
        std = float(data.std(ddof=1))
        z = (y - mean) / max(std, 1e-12 * max(1.0, abs(mean)))
        score = abs(z) if self.side == "both" else (z if self.side == "high" else -z)
        flagged = score > self.threshold
        reasons = [f"{self.name} {'high' if z > 0 else 'low'} (z={z:.1f})"] if flagged else []
        if not flagged:
            self._push(y)
        return ScoreResult(score, flagged, reasons, {self.name: z}, False, self.threshold)

    def _push(self, y: float) -> None:
        self._values.append(y)
        self._accepted += 1

    def state_dict(self) -> dict[str, Any]:
        """The window (oldest first) and the accepted count, as plain lists and ints."""
        return {"values": list(self._values), "accepted": self._accepted}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        values = [float(v) for v in state.get("values", [])]
        self._values = deque(values[-self.window :], maxlen=self.window)
        self._accepted = int(state.get("accepted", len(values)))


def global_grad_norm(layer_metrics: Mapping[str, Mapping[str, float]]) -> float:
    r"""The gradient norm over the given layers, :math:`\sqrt{\sum_l \|G_l\|_F^2}`, from their ``frobenius_norm``.

    Layers without a ``frobenius_norm`` are skipped; a non-finite one gives a non-finite result.

    >>> global_grad_norm({"a": {"frobenius_norm": 3.0}, "b": {"frobenius_norm": 4.0}})
    5.0
    """
    total = 0.0
    for values in layer_metrics.values():
        fro = values.get("frobenius_norm")
        if fro is not None:
            total += float(fro) ** 2
    return math.sqrt(total)


# ---------------------------------------------------------------------------------------------- stability peers


class SpikeDetectionRule:
    """Lightning's ``SpikeDetection`` rule (``mode="min"``, its defaults), one loss per optimizer step.

    A loss is a spike when it is non-finite, or worse than the previous accepted loss and at least
    ``rtol`` times the running mean of the last ``window`` accepted losses away from it (from step
    ``warmup`` on). Spikes do not enter the window. :meth:`update` returns whether the step fired.

    >>> rule = SpikeDetectionRule()
    >>> [rule.update(v) for v in [1.0, 0.9, 0.8, 3.0]]
    [False, False, False, True]
    """

    def __init__(self, window: int = 10, warmup: int = 1, rtol: float = 2.0) -> None:
        self.window = check_int("window", window, 1)
        self.warmup = check_int("warmup", warmup, 0)
        self.rtol = check_float("rtol", rtol, 0.0, low_open=True)
        self._values: deque[float] = deque(maxlen=self.window)
        self._last = 0.0
        self._seen = 0

    def update(self, loss: float | None) -> bool:
        index, self._seen = self._seen, self._seen + 1
        if loss is None:
            return False
        x = float(loss)
        if index >= self.warmup and not math.isfinite(x):
            return True
        if index >= self.warmup and self._values and x - self._last > 0:
            mean = sum(self._values) / len(self._values)
            if abs(x - mean) >= abs(self.rtol * mean):
                return True
        if math.isfinite(x):
            self._values.append(x)
            self._last = x
        return False


class KillLossSpikeRule:
    """llm-foundry's ``KillLossSpike`` rule: once ``window`` losses are kept, a loss above ``multiplier``
    times their mean is an outlier; more than ``patience`` outliers in a row fire (a non-finite loss is
    an outlier). Every finite loss enters the rolling window, as there.

    >>> rule = KillLossSpikeRule(window=4, patience=1)
    >>> [rule.update(v) for v in [1.0, 1.0, 1.0, 1.0, 5.0, 5.0]]
    [False, False, False, False, False, True]
    """

    def __init__(self, window: int = 50, multiplier: float = 2.0, patience: int = 4) -> None:
        self.window = check_int("window", window, 1)
        self.multiplier = check_float("multiplier", multiplier, 0.0, low_open=True)
        self.patience = check_int("patience", patience, 0)
        self._values: deque[float] = deque(maxlen=self.window)
        self._outliers = 0

    def update(self, loss: float | None) -> bool:
        if loss is None:
            return False
        x = float(loss)
        fired = False
        if len(self._values) == self.window:
            mean = sum(self._values) / len(self._values)
            if not math.isfinite(x) or x > self.multiplier * mean:
                self._outliers += 1
                fired = self._outliers > self.patience
            else:
                self._outliers = 0
        if math.isfinite(x):
            self._values.append(x)
        return fired


class GradNormZRule:
    """A ZClip / OLMo-core style rule on the gradient norm: exponential moving mean and variance
    (``alpha``), after ``warmup`` steps a norm more than ``threshold`` standard deviations above the
    mean fires (a non-finite one always). Firing norms do not update the statistics.

    >>> rule = GradNormZRule(warmup=3)
    >>> [rule.update(v) for v in [1.0, 1.1, 0.9, 1.0, 5.0]]
    [False, False, False, False, True]
    """

    def __init__(self, alpha: float = 0.97, threshold: float = 2.5, warmup: int = 25) -> None:
        self.alpha = check_float("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
        self.threshold = check_float("threshold", threshold, 0.0, low_open=True)
        self.warmup = check_int("warmup", warmup, 2)
        self._first: list[float] = []
        self._mean = 0.0
        self._var = 0.0

    def update(self, norm: float | None) -> bool:
        if norm is None:
            return False
        x = float(norm)
        if len(self._first) < self.warmup:
            if math.isfinite(x):
                self._first.append(x)
                if len(self._first) == self.warmup:
                    self._mean = float(np.mean(self._first))
                    self._var = float(np.var(self._first))
            return False
        if not math.isfinite(x):
            return True
        std = math.sqrt(max(self._var, 0.0))
        if x - self._mean > self.threshold * max(std, 1e-12 * max(1.0, abs(self._mean))):
            return True
        delta = x - self._mean
        self._mean += (1 - self.alpha) * delta
        self._var = self.alpha * (self._var + (1 - self.alpha) * delta * delta)
        return False
