r"""The recent values of a block of series and a robust local-trend prediction of the next one.

Gradient metrics drift fast early in a fine-tune (norms can fall ten-fold in a few dozen steps) and
slowly later. A window median lags a trend by half the window; a least-squares line follows it
but is pulled by a single outlier. The prediction here is a median-based line whose slope is kept
only when the window shows it clearly, so it is a plain median on a steady series and a line on a
drifting one. For the values :math:`y_i` at steps :math:`t_i` in the window (:math:`n` of them,
oldest first, :math:`h = \lfloor n/2 \rfloor`):

.. math::

    b = \operatorname{med}_{i < n - h} \frac{y_{i+h} - y_i}{t_{i+h} - t_i}, \qquad
    e_i = y_i - \operatorname{med}_j (y_j - b t_j) - b t_i, \qquad
    \mathrm{se} = \frac{1.4826 \operatorname{med}_i |e_i|}{\sqrt{\sum_i (t_i - \bar t)^2}},

    b' = b \max\!\left(0,\ 1 - \left(\frac{2\,\mathrm{se}}{b}\right)^2\right), \qquad
    \hat y(t) = \operatorname{med}_i \bigl(y_i + b' (t - t_i)\bigr).

The slopes over half-window lags are few (:math:`n - h`) and far apart, so each is precise and
their median ignores a minority of outliers; the shrinkage drops a slope smaller than about two
standard errors (no trend: the median of the window) and keeps a clear one almost whole. With
fewer than :data:`MIN_TREND_POINTS` values the slope is not estimated.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

#: fewer finite values than this in the window: predict the median (no slope)
MIN_TREND_POINTS = 8
_MAD_PER_SIGMA = 1.4826022185056018  # 1 / Phi^{-1}(3/4)
_SLOPE_SE = 2.0  # slopes within about this many standard errors of zero are shrunk away
SLOPE_EVERY = 4  # pushes between two estimates of the slopes


def _median(x: FloatArray) -> FloatArray:
    """Median over axis 0 ignoring NaN; a direct partition when there is no NaN (numpy's median is slower)."""
    if np.isnan(x).any():
        # numpy's nanmedian goes through masked arrays and warnings per column (measured ~7 ms a step
        # with the spectra of most layers deferred); sorting puts NaN last, so the median of the n
        # finite values of a column sits at rows (n - 1) // 2 and n // 2
        ordered = np.sort(x, axis=0)
        n = np.sum(~np.isnan(x), axis=0)
        lo = np.take_along_axis(ordered, np.maximum((n - 1) // 2, 0)[None], axis=0)[0]
        hi = np.take_along_axis(ordered, np.maximum(n // 2, 0)[None], axis=0)[0]
        out: FloatArray = np.where(n > 0, 0.5 * (lo + hi), np.nan)  # all-NaN series give NaN, on purpose
        return out
    n = x.shape[0]
    h = n // 2
    if n % 2:
        odd: FloatArray = np.partition(x, h, axis=0)[h]
        return odd
    part = np.partition(x, (h - 1, h), axis=0)
    even: FloatArray = 0.5 * (part[h - 1] + part[h])
    return even


def trend_slope(values: FloatArray, steps: FloatArray) -> FloatArray:
    r"""The shrunk robust slope :math:`b'` of every series (0 with fewer than :data:`MIN_TREND_POINTS` values).

    Args:
        values: ``(n, series)`` window, oldest first; NaN = absent.
        steps: ``(n,)`` step numbers of the rows, increasing.
    """
    n = values.shape[0]
    slope = np.zeros(values.shape[1:])
    if n < MIN_TREND_POINTS:
        return slope
    count = np.isfinite(values).sum(axis=0)
    h = n // 2
    dt = (steps[h:] - steps[: n - h])[:, None]
    b = _median((values[h:] - values[: n - h]) / dt)
    b = np.where(np.isfinite(b), b, 0.0)
    centre = _median(values - b * steps[:, None])
    sigma = _MAD_PER_SIGMA * _median(np.abs(values - centre - b * steps[:, None]))
    spread = float(np.sum((steps - steps.mean()) ** 2))
    se = sigma / math.sqrt(spread) if spread > 0 else np.full_like(b, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = np.clip(1.0 - (_SLOPE_SE * se) ** 2 / np.maximum(b * b, 1e-300), 0.0, 1.0)
    out: FloatArray = np.where((count >= MIN_TREND_POINTS) & np.isfinite(keep), b * keep, 0.0)
    return out


def robust_trend(values: FloatArray, steps: FloatArray, at: float, slope: FloatArray | None = None) -> FloatArray:
    r"""The prediction :math:`\hat y(t)` at step ``at`` for every series (see the module docstring).

    Args:
        values: ``(n, series)`` window, oldest first; NaN = absent.
        steps: ``(n,)`` step numbers of the rows, increasing.
        at: the step to predict.
        slope: the slopes to use; ``None`` computes them (:func:`trend_slope`).

    Returns:
        ``(series,)`` predictions; NaN for a series without finite values.

    >>> t = np.arange(20.0)
    >>> y = np.stack([3.0 - 0.5 * t, np.full(20, 2.0)], axis=1)
    >>> y[7, 0] = 100.0  # one outlier does not bend the line
    >>> robust_trend(y, t, 20.0).round(6).tolist()
    [-7.0, 2.0]
    """
    if values.shape[0] == 0:
        return np.full(values.shape[1:], np.nan)
    if slope is None:
        slope = trend_slope(values, steps)
    pred: FloatArray = _median(values + slope * (at - steps[:, None]))
    return pred


class TrendWindow:
    """The last ``capacity`` rows of a block of series (any shape), with the step each row was pushed at.

    The slopes change slowly, so they are re-estimated every :data:`SLOPE_EVERY` pushes (and on every
    push while the window is still filling); the prediction itself is recomputed every time.
    """

    def __init__(self, shape: tuple[int, ...], capacity: int) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.capacity = int(capacity)
        self._values: list[FloatArray] = []
        self._steps: list[float] = []
        self._for_slope: list[bool] = []
        self._slope: FloatArray | None = None
        self._since = 0

    def __len__(self) -> int:
        return len(self._steps)

    def grow(self, shape: tuple[int, ...]) -> None:
        """Enlarge every stored row to ``shape`` (no dimension shrinks); new series start absent."""
        shape = tuple(int(s) for s in shape)
        if shape == self.shape:
            return
        old = tuple(slice(0, s) for s in self.shape)
        grown = []
        for row in self._values:
            new = np.full(shape, np.nan)
            new[old] = row
            grown.append(new)
        self._values, self.shape = grown, shape
        self._slope = None

    def push(self, values: FloatArray, step: float, for_slope: bool = True) -> None:
        """Append a row; ``for_slope=False`` (a flagged step) counts for the level but not for the slope."""
        self._values.append(np.array(values, dtype=np.float64).reshape(self.shape))
        self._steps.append(float(step))
        self._for_slope.append(bool(for_slope))
        if len(self._steps) > self.capacity:
            del self._values[0], self._steps[0], self._for_slope[0]
        self._since += 1
        if self._since >= SLOPE_EVERY or len(self._steps) < self.capacity:
            self._slope = None

    def predict(self, step: float, slope: bool = True) -> FloatArray:
        """Robust local-trend prediction of every series at ``step``; NaN where the window has no value.

        ``slope=False`` predicts the window's median (no trend).
        """
        if not self._steps:
            return np.full(self.shape, np.nan)
        stacked = np.stack(self._values).reshape(len(self._steps), -1)
        times = np.asarray(self._steps)
        if not slope:
            level: FloatArray = robust_trend(stacked, times, float(step), np.zeros(stacked.shape[1])).reshape(
                self.shape
            )
            return level
        if self._slope is None:
            mask = np.asarray(self._for_slope)
            self._slope = trend_slope(stacked if mask.all() else np.where(mask[:, None], stacked, np.nan), times)
            self._since = 0
        pred = robust_trend(stacked, times, float(step), self._slope)
        out: FloatArray = pred.reshape(self.shape)
        return out

    def state(self) -> dict[str, Any]:
        """The rows oldest first with their steps, the cached slopes (or None) and pushes since they were fitted."""
        return {
            "values": [row.tolist() for row in self._values],
            "steps": list(self._steps),
            "for_slope": list(self._for_slope),
            "slope": None if self._slope is None else self._slope.tolist(),
            "since": self._since,
        }

    @classmethod
    def from_state(cls, shape: tuple[int, ...], capacity: int, state: dict[str, Any]) -> TrendWindow:
        win = cls(shape, capacity)
        values = state.get("values") or []
        steps = state.get("steps") or []
        for_slope = list(state.get("for_slope") or [True] * len(steps))
        for row, step, use in list(zip(values, steps, for_slope))[-win.capacity :]:
            arr = np.asarray(row, dtype=np.float64)
            full = np.full(win.shape, np.nan)
            full[tuple(slice(0, s) for s in arr.shape)] = arr
            win.push(full, float(step), bool(use))
        slope = state.get("slope")
        if slope is not None and np.asarray(slope).size == math.prod(win.shape):
            win._slope = np.asarray(slope, dtype=np.float64).reshape(-1)
        win._since = int(state.get("since", 0))
        return win
