"""BatchScorer against a plain float64 re-implementation of the math in its module docstring.

The reference keeps explicit lists (every step's values for the trends, the clean steps' residuals,
terms and scores) and recomputes every slope, median, quartile and trimmed mean with numpy/scipy from
scratch, in loops. Residual, term and score windows store float32 (see ``_window``), so the reference
rounds what it stores the same way. With ``profile_components=0`` the profile term is the mean square
of the profile z, which keeps the reference free of the iterative basis (tested on its own in
``test_scoring_trend.py``). The profile's residuals are the nuclear norm's residuals less their
interquartile mean over layers.

While a window holds fewer than ``PRIOR_UNTIL`` values its median and scale are shrunk toward a
prior, and level 2 and the score window are rebuilt in-sample after every clean step (as at the end
of warm-up; accepted scores that did not teach the windows are kept) until the residual windows hold
``PRIOR_UNTIL`` steps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from gradspectra.scoring import BatchScorer

from .streams import METRICS, SyntheticRun, finetune_drift

IQR_PER_SIGMA = 2 * stats.norm.ppf(0.75)
MAD_PER_SIGMA = 1 / stats.norm.ppf(0.75)
NUCLEAR = METRICS.index("nuclear_norm")
HIGH = ("nuclear_norm", "frobenius_norm", "spectral_norm")  # BatchScorer's default high_metrics
PRIOR_UNTIL = 30
EARLY_MARGIN = 0.5  # BatchScorer's default early_margin
LOSS_PRIOR = 0.1  # times the loss's prediction (linear), or on log scale


def shrunk(history: np.ndarray, prior: np.ndarray | None, groups: list[slice], centred: np.ndarray) -> tuple:
    """Median and scale of each column of ``history`` (rows: steps), shrunk toward the prior while young.

    ``prior``: a fixed prior scale per column (NaN: none); ``groups``: column ranges whose median scale
    is pooled (one metric over the layers); ``centred``: columns whose median is shrunk toward 0.
    """
    q1, med, q3 = np.quantile(history, [0.25, 0.5, 0.75], axis=0)
    scale = (q3 - q1) / IQR_PER_SIGMA
    w = max(0.0, 1.0 - history.shape[0] / PRIOR_UNTIL)
    if w == 0.0:
        return med, scale
    target = scale.copy() if prior is None else np.fmax(scale, prior)
    for g in groups:
        target[g] = np.maximum(target[g], np.median(scale[g]))
    med = np.where(centred, (1.0 - w) * med, med)
    return med, np.sqrt((1.0 - w) * scale**2 + w * target**2)


def f32(x: np.ndarray | float) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def slope_of(ys: np.ndarray, ts: np.ndarray) -> float:
    """The shrunk half-lag slope of one series, written out (NaN rows = not used for the slope)."""
    keep = ~np.isnan(ys)
    n = len(ts)
    if n < 8:
        return 0.0
    h = n // 2
    lag = [(ys[i + h] - ys[i]) / (ts[i + h] - ts[i]) for i in range(n - h) if keep[i] and keep[i + h]]
    if keep.sum() < 8 or not lag:
        return 0.0
    b = float(np.median(lag))
    centre = float(np.median(ys[keep] - b * ts[keep]))
    sigma = MAD_PER_SIGMA * float(np.median(np.abs(ys[keep] - centre - b * ts[keep])))
    se = sigma / math.sqrt(float(np.sum((ts - ts.mean()) ** 2)))
    return b * min(max(1.0 - (2.0 * se) ** 2 / max(b * b, 1e-300), 0.0), 1.0)


class Trend:
    """The last ``capacity`` rows of a flat series vector, slopes refitted every 4 pushes (as documented)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: list[np.ndarray] = []
        self.steps: list[float] = []
        self.for_slope: list[bool] = []
        self.slope: np.ndarray | None = None
        self.since = 0

    def predict(self, t: float) -> np.ndarray:
        ys = np.stack(self.rows)
        ts = np.asarray(self.steps)
        if self.slope is None:
            masked = np.where(np.asarray(self.for_slope)[:, None], ys, np.nan)
            self.slope = np.array([slope_of(masked[:, k], ts) for k in range(ys.shape[1])])
            self.since = 0
        return np.array([np.median(ys[:, k] + self.slope[k] * (t - ts)) for k in range(ys.shape[1])])

    def push(self, row: np.ndarray, t: float, for_slope: bool) -> None:
        self.rows.append(row)
        self.steps.append(t)
        self.for_slope.append(for_slope)
        if len(self.rows) > self.capacity:
            del self.rows[0], self.steps[0], self.for_slope[0]
        self.since += 1
        if self.since >= 4 or len(self.rows) < self.capacity:
            self.slope = None


class Reference:
    def __init__(
        self, warmup: int, window: int, trend_window: int, threshold_window: int, alpha: float, loss_window: int | None
    ) -> None:
        self.warmup, self.window, self.threshold_window, self.alpha = warmup, window, threshold_window, alpha
        # loss_window None: the loss is one more trend-followed series (given as log loss); else it is
        # given linear and predicted by the median of its last loss_window values
        self.loss_window = loss_window
        self.losses: list[float] = []
        self.trend = Trend(trend_window)
        self.start = max(2, min(5, warmup // 4))
        self.accepted = 0
        self.res: list[np.ndarray] = []  # clean residuals: metrics (L*M), profile (L), loss (1), float32
        self.terms: list[np.ndarray] = []  # clean terms: loss, profile, metrics, float32
        self.scores: list[float] = []  # accepted scores, float32
        self.young: list[float] = []  # accepted but not clean while young, float32

    def features(self, y: np.ndarray, loss: float) -> np.ndarray:
        self.n_layers = y.shape[0]
        return np.concatenate([y.ravel(), [loss]])

    def with_profile(self, r: np.ndarray) -> np.ndarray:
        """The residuals with the profile's inserted: the nuclear norm's, less their interquartile mean."""
        values = r[:-1].reshape(self.n_layers, len(METRICS))[:, NUCLEAR]
        return np.concatenate([r[:-1], values - stats.trim_mean(values, 0.25), r[-1:]])

    def z_of(self, r: np.ndarray, pred_loss: float = 1.0) -> np.ndarray:
        history = np.stack(self.res[-self.window :])
        n_layers, n_metrics = self.n_layers, len(METRICS)
        n = n_layers * n_metrics
        groups = [slice(m, n, n_metrics) for m in range(n_metrics)] + [slice(n, n + n_layers)]
        prior = np.full(history.shape[1], np.nan)
        prior[-1] = LOSS_PRIOR * (abs(pred_loss) if self.loss_window is not None else 1.0)
        centred = np.ones(history.shape[1], dtype=bool)
        centred[-1] = False
        med, scale = shrunk(history, prior, groups, centred)
        return (r - med) / np.maximum(scale, 1e-3)

    def terms_of(self, z: np.ndarray, n_layers: int) -> np.ndarray:
        n = n_layers * len(METRICS)
        level = stats.trim_mean(z[:n].reshape(n_layers, len(METRICS)), 0.25, axis=0)
        profile = np.mean(z[n : n + n_layers] ** 2)
        return np.concatenate([[z[-1]], [math.log(profile + 1e-12)], level])

    def level2(self, terms: np.ndarray) -> np.ndarray:
        history = np.stack(self.terms[-self.window :])
        med, scale = shrunk(history, np.ones(history.shape[1]), [], np.ones(history.shape[1], dtype=bool))
        return (terms - med) / np.maximum(scale, 0.05)

    @staticmethod
    def strength(z: np.ndarray) -> float:
        # loss and profile upwards only; the norms upwards only; the other metrics either way
        levels = [max(v, 0.0) if m in HIGH else abs(v) for m, v in zip(METRICS, z[2:])]
        return float(max(max(z[0], 0.0), max(z[1], 0.0), *levels))

    def threshold(self) -> float:
        q50, q90 = np.quantile(self.scores[-self.threshold_window :], [0.5, 0.9])
        return max(3.5, float(q90 + (q90 - q50) * math.log(0.1 / self.alpha) / math.log(5.0)))  # min_threshold

    def z_of_loss(self, r: np.ndarray, pred_loss: float) -> np.ndarray:
        """Like z_of, with the linear-scale floor ``1e-3 * |prediction|`` for a linear loss."""
        z = self.z_of(r, pred_loss)
        if self.loss_window is not None:
            history = np.stack(self.res[-self.window :])[:, -1:]
            prior = np.array([LOSS_PRIOR * abs(pred_loss)])
            med, scale = shrunk(history, prior, [], np.zeros(1, dtype=bool))
            z[-1] = (r[-1] - med[0]) / max(scale[0], 1e-3 * abs(pred_loss))
        return z

    def restart(self, pred_loss: float) -> None:
        """Level 2 and the score window from the residuals, in-sample (the scorer's levels: this step's)."""
        self.terms = [f32(self.terms_of(self.z_of_loss(rr, pred_loss), self.n_layers)) for rr in self.res]
        self.scores = [float(f32(self.strength(self.level2(tt)))) for tt in self.terms] + self.young

    def score(self, y: np.ndarray, loss: float, t: float) -> tuple[float | None, bool, np.ndarray | None, float | None]:
        v = self.features(y, loss)
        r = v - self.trend.predict(t) if len(self.trend.rows) >= self.start else None
        pred_loss = float("nan")
        if r is not None and self.loss_window is not None:
            pred_loss = float(np.median(self.losses[-self.loss_window :]))
            r[-1] = loss - pred_loss
        if r is not None:
            r = self.with_profile(r)
        self.losses.append(loss)
        if self.accepted < self.warmup:
            self.trend.push(v, t, True)
            if r is not None:
                self.res.append(f32(r))
            self.accepted += 1
            if self.accepted == self.warmup:  # in-sample start of level 2 and of the score window
                self.restart(pred_loss if self.loss_window is not None else 1.0)
            return None, False, None, None
        assert r is not None
        terms = self.terms_of(self.z_of_loss(r, pred_loss), y.shape[0])
        z = self.level2(terms)
        s = self.strength(z)
        threshold = self.threshold()
        over = s > threshold  # what the scorer learns from
        # the early margin: flagged only above 1 + 0.5 (1 - n / min(60, window)) times that
        flag_at = threshold * (1.0 + EARLY_MARGIN * max(0.0, 1.0 - len(self.res) / min(60, self.window)))
        self.trend.push(v, t, not over)
        if not over:
            self.scores.append(float(f32(s)))
            if s > 0.75 * threshold and len(self.res) < PRIOR_UNTIL:  # the rebuilds keep it
                self.young.append(float(f32(s)))
            if s <= 0.75 * threshold:
                self.res.append(f32(r))
                self.terms.append(f32(terms))
                self.accepted += 1
                if len(self.res) <= PRIOR_UNTIL:  # still young: start over in-sample
                    self.restart(pred_loss if self.loss_window is not None else 1.0)
        return s, s > flag_at, z, flag_at


@pytest.mark.parametrize("loss_window", [None, 50])
@pytest.mark.parametrize(("window", "trend_window", "threshold_window"), [(30, 12, 40), (100, 32, 1000)])
def test_scores_flags_and_z_match_the_reference(
    window: int, trend_window: int, threshold_window: int, loss_window: int | None
) -> None:
    run = SyntheticRun(seed=5, n_layers=7)
    rng = np.random.default_rng(5)
    scorer = BatchScorer(
        warmup_steps=20,
        window=window,
        trend_window=trend_window,
        threshold_window=threshold_window,
        rebaseline_after=None,
        profile_components=0,
        # None: the loss on log scale, trend-followed like the metrics; else linear, a window median
        log_loss=loss_window is None,
        loss_trend=loss_window is None,
        loss_window=loss_window,
    )
    ref = Reference(20, window, trend_window, threshold_window, alpha=0.01, loss_window=loss_window)
    n_flagged = 0
    names = ["loss", "nuclear_norm_profile", *METRICS]
    for t in range(200):
        offsets, loss_factor = finetune_drift(t)  # the trends' slopes matter
        shift = {METRICS[rng.integers(len(METRICS))]: float(rng.choice([-10.0, 10.0]))} if t % 9 == 8 else None
        step = run.step(shift, offset=offsets)
        loss = run.loss(loss_factor * (3.0 if t % 23 == 22 else 1.0))
        result = scorer.score(step, loss=loss)
        y = np.log([[step[layer][m] for m in METRICS] for layer in run.layer_names])
        s, flagged, z, threshold = ref.score(y, math.log(loss) if loss_window is None else loss, float(t))
        assert result.flagged == flagged, t
        n_flagged += flagged
        if s is None:
            assert result.score is None
            continue
        assert result.score == pytest.approx(s, rel=1e-9, abs=1e-9), t
        assert z is not None
        assert result.z == pytest.approx(dict(zip(names, z.tolist())), rel=1e-9, abs=1e-9), t
        # the in-sample start scores float64 terms, the reference its float32-rounded copies
        assert result.threshold == pytest.approx(threshold, rel=1e-6)
    assert n_flagged >= 10  # the shifted steps were caught, so both branches were exercised
