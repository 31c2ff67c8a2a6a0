"""BatchScorer against a plain float64 re-implementation of the math in its module docstring.

The reference keeps explicit lists of the accepted steps and recomputes every median, quartile and
trimmed mean with numpy/scipy from scratch. Windows store float32 (see ``_window``), so the reference
rounds what it stores the same way.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from gradspectra.scoring import BatchScorer

from .streams import METRICS, SyntheticRun

IQR_PER_SIGMA = 2 * stats.norm.ppf(0.75)


def f32(x: np.ndarray | float) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def robust(history: list[np.ndarray], floor: float) -> tuple[np.ndarray, np.ndarray]:
    h = np.stack(history)
    q1, med, q3 = np.quantile(h, [0.25, 0.5, 0.75], axis=0)
    return med, np.maximum((q3 - q1) / IQR_PER_SIGMA, floor)


class Reference:
    def __init__(self, warmup: int, window: int, threshold_window: int, alpha: float, min_threshold: float) -> None:
        self.warmup, self.window, self.threshold_window = warmup, window, threshold_window
        self.alpha, self.min_threshold = alpha, min_threshold
        self.y: list[np.ndarray] = []  # accepted log values, (layers, metrics)
        self.loss: list[float] = []
        self.agg: list[np.ndarray] = []  # accepted aggregates: loss, then metrics
        self.scores: list[float] = []

    def aggregates(self, y: np.ndarray, loss: float) -> np.ndarray:
        med, scale = robust(self.y[-self.window :], 1e-3)
        z = (y - med) / scale
        lmed, lscale = robust([np.array(v) for v in self.loss[-self.window :]], 1e-3)
        return np.concatenate([[(loss - lmed) / lscale], stats.trim_mean(z, 0.25, axis=0)])

    def level2(self, agg: np.ndarray) -> np.ndarray:
        med, scale = robust(self.agg[-self.window :], 0.05)
        out: np.ndarray = (agg - med) / scale
        return out

    def threshold(self) -> float:
        q50, q90 = np.quantile(self.scores[-self.threshold_window :], [0.5, 0.9])
        return max(self.min_threshold, float(q90 + (q90 - q50) * math.log(0.1 / self.alpha) / math.log(5.0)))

    def score(self, y: np.ndarray, loss: float) -> tuple[float | None, bool, np.ndarray | None, float | None]:
        if len(self.y) < self.warmup:
            self.y.append(f32(y))
            self.loss.append(float(f32(loss)))
            if len(self.y) == self.warmup:  # in-sample start of level 2 and of the score window
                self.agg = [f32(self.aggregates(v, lv)) for v, lv in zip(self.y, self.loss)]
                self.scores = [float(f32(np.max(np.abs(self.level2(a))))) for a in self.agg]
            return None, False, None, None
        agg = self.aggregates(y, loss)
        z = self.level2(agg)
        s = float(np.max(np.abs(z)))
        threshold = self.threshold()
        flagged = s > threshold
        if not flagged:
            self.y.append(f32(y))
            self.loss.append(float(f32(loss)))
            self.agg.append(f32(agg))
            self.scores.append(float(f32(s)))
        return s, flagged, z, threshold


@pytest.mark.parametrize(("window", "threshold_window"), [(30, 40), (200, 1000)])
def test_scores_flags_and_z_match_the_reference(window: int, threshold_window: int) -> None:
    run = SyntheticRun(seed=5, n_layers=7)
    rng = np.random.default_rng(5)
    scorer = BatchScorer(warmup_steps=12, window=window, threshold_window=threshold_window, rebaseline_after=None)
    ref = Reference(12, window, threshold_window, alpha=0.01, min_threshold=3.0)
    n_flagged = 0
    for t in range(160):
        shift = {METRICS[rng.integers(len(METRICS))]: float(rng.choice([-6.0, 6.0]))} if t % 9 == 8 else None
        step = run.step(shift)
        loss = run.loss(3.0 if t % 23 == 22 else 1.0)
        result = scorer.score(step, loss=loss)
        y = np.log([[step[layer][m] for m in METRICS] for layer in run.layer_names])
        s, flagged, z, threshold = ref.score(y, math.log(loss))
        assert result.flagged == flagged, t
        n_flagged += flagged
        if s is None:
            assert result.score is None
            continue
        assert result.score == pytest.approx(s, rel=1e-9, abs=1e-9)
        assert z is not None
        expected_z = dict(zip(["loss", *METRICS], z.tolist()))
        assert result.z == pytest.approx(expected_z, rel=1e-9, abs=1e-9)
        # the in-sample start scores float64 aggregates, the reference its float32-rounded copies
        assert result.threshold == pytest.approx(threshold, rel=1e-6)
    assert n_flagged >= 10  # the shifted steps were caught, so both branches were exercised
