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

import bisect
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


def _median(x: FloatArray, scratch: bool = False) -> FloatArray:
    """Median over the last axis ignoring NaN (numpy's median and nanmedian are slower).

    Series are rows (``(series, n)``): sorting contiguous rows of a few dozen values is faster than a
    two-point partition, and puts NaN last, so the median of the ``m`` finite values of a series sits
    at ``(m - 1) // 2`` and ``m // 2``. ``scratch``: ``x`` is a temporary and may be sorted in place.
    """
    ordered = x if scratch else x.copy()
    ordered.sort(axis=-1)
    n = ordered.shape[-1]
    if n == 0:
        return np.full(ordered.shape[:-1], np.nan)
    if np.isnan(ordered[..., -1]).any():
        # numpy's nanmedian goes through masked arrays and warnings per series (measured ~7 ms a step
        # with the spectra of most layers deferred)
        m = np.sum(~np.isnan(ordered), axis=-1)
        if ordered.ndim == 2:
            series = np.arange(ordered.shape[0])
            lo = ordered[series, np.maximum((m - 1) // 2, 0)]
            hi = ordered[series, np.maximum(m // 2, 0)]
        else:
            lo = np.take_along_axis(ordered, np.maximum((m - 1) // 2, 0)[..., None], axis=-1)[..., 0]
            hi = np.take_along_axis(ordered, np.maximum(m // 2, 0)[..., None], axis=-1)[..., 0]
        out: FloatArray = np.where(m > 0, 0.5 * (lo + hi), np.nan)  # all-NaN series give NaN, on purpose
        return out
    h = n // 2
    if n % 2:
        odd: FloatArray = ordered[..., h]
        return odd
    even: FloatArray = 0.5 * (ordered[..., h - 1] + ordered[..., h])
    return even


def trend_slope(values: FloatArray, steps: FloatArray) -> FloatArray:
    r"""The shrunk robust slope :math:`b'` of every series (0 with fewer than :data:`MIN_TREND_POINTS` values).

    Args:
        values: ``(n, series)`` window, oldest first; NaN = absent.
        steps: ``(n,)`` step numbers of the rows, increasing.
    """
    return _slopes(np.ascontiguousarray(values.T), steps)


def _slopes(values: FloatArray, steps: FloatArray) -> FloatArray:
    """:func:`trend_slope` of a ``(series, n)`` window (one series a row)."""
    n = values.shape[-1]
    slope = np.zeros(values.shape[:-1])
    if n < MIN_TREND_POINTS:
        return slope
    count = np.isfinite(values).sum(axis=-1) if np.isnan(values).any() else None  # None: all n finite
    h = n // 2
    dt = steps[h:] - steps[: n - h]
    b = _median((values[:, h:] - values[:, : n - h]) / dt, scratch=True)
    b = np.where(np.isfinite(b), b, 0.0)
    b_t = b[:, None] * steps
    centre = _median(values - b_t, scratch=True)
    sigma = _MAD_PER_SIGMA * _median(np.abs(values - centre[:, None] - b_t), scratch=True)
    spread = float(np.sum((steps - steps.mean()) ** 2))
    se = sigma / math.sqrt(spread) if spread > 0 else np.full_like(b, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = np.clip(1.0 - (_SLOPE_SE * se) ** 2 / np.maximum(b * b, 1e-300), 0.0, 1.0)
    use = np.isfinite(keep) if count is None else (count >= MIN_TREND_POINTS) & np.isfinite(keep)
    out: FloatArray = np.where(use, b * keep, 0.0)
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
    rows = np.ascontiguousarray(values.T)
    return _predict(rows, steps, at, _slopes(rows, steps) if slope is None else slope)


def _predict(values: FloatArray, steps: FloatArray, at: float, slope: FloatArray) -> FloatArray:
    """:func:`robust_trend` of a ``(series, n)`` window with the given slopes."""
    if values.shape[-1] == 0:
        return np.full(values.shape[:-1], np.nan)
    pred: FloatArray = _median(values + slope[:, None] * (at - steps), scratch=True)
    return pred


class TrendWindow:
    """The last ``capacity`` rows of a block of series (any shape), with the step each row was pushed at.

    The slopes change slowly, so they are re-estimated every :data:`SLOPE_EVERY` pushes (and on every
    push while the window is still filling); the prediction itself is recomputed every time.

    The values live in one preallocated ``(series, 2 * capacity)`` buffer, one column a push, written
    in order: the window is a view of it (each series a contiguous stretch of a row), moved to the
    front once every ``capacity`` pushes; no per-step stacking.
    """

    def __init__(self, shape: tuple[int, ...], capacity: int) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.capacity = int(capacity)
        self._size = math.prod(self.shape)
        self._buf = np.full((self._size, 2 * self.capacity), np.nan)
        self._times = np.zeros(2 * self.capacity)
        self._use = np.ones(2 * self.capacity, dtype=bool)
        self._start = 0
        self._end = 0
        self._slope: FloatArray | None = None
        self._since = 0
        # one series: its finite values (plus 0.0, as the prediction adds) kept sorted, for the median
        self._sorted: list[float] | None = [] if self._size == 1 else None

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def _values(self) -> FloatArray:
        """``(series, n)``, oldest first (a view)."""
        return self._buf[:, self._start : self._end]

    def grow(self, shape: tuple[int, ...]) -> None:
        """Enlarge every stored row to ``shape`` (no dimension shrinks); new series start absent."""
        shape = tuple(int(s) for s in shape)
        if shape == self.shape:
            return
        n = len(self)
        old = (*(slice(0, s) for s in self.shape), slice(None))
        grown = np.full((*shape, n), np.nan)
        grown[old] = self._values.reshape(*self.shape, n)
        times = self._times[self._start : self._end].copy()
        use = self._use[self._start : self._end].copy()
        self.shape, self._size = shape, math.prod(shape)
        self._buf = np.full((self._size, 2 * self.capacity), np.nan)
        self._buf[:, :n] = grown.reshape(self._size, n)
        self._times[:n], self._use[:n] = times, use
        self._start, self._end = 0, n
        self._slope = None
        finite = [float(v) + 0.0 for v in self._buf[0, :n]] if self._size == 1 else None
        self._sorted = None if finite is None else sorted(v for v in finite if v == v)

    def push(self, values: FloatArray, step: float, for_slope: bool = True) -> None:
        """Append a row; ``for_slope=False`` (a flagged step) counts for the level but not for the slope."""
        if self._end == 2 * self.capacity:  # the buffer's end: move the window to its front
            n = len(self)
            self._buf[:, :n] = self._buf[:, self._start : self._end]
            self._times[:n] = self._times[self._start : self._end]
            self._use[:n] = self._use[self._start : self._end]
            self._start, self._end = 0, n
        end = self._end
        self._buf[:, end] = np.reshape(values, -1)
        self._times[end] = step
        self._use[end] = for_slope
        self._end = end + 1
        ordered = self._sorted
        if ordered is not None:
            value = float(self._buf[0, end]) + 0.0
            if value == value:
                bisect.insort(ordered, value)
        if self._end - self._start > self.capacity:
            if ordered is not None:
                dropped = float(self._buf[0, self._start]) + 0.0
                if dropped == dropped:
                    del ordered[bisect.bisect_left(ordered, dropped)]
            self._start += 1
        self._since += 1
        if self._since >= SLOPE_EVERY or self._end - self._start < self.capacity:
            self._slope = None

    def rows_since(self, step: float) -> int:
        """How many of the rows held were pushed at ``step`` or later."""
        return int(np.count_nonzero(self._times[self._start : self._end] >= step))

    def keep_last(self, rows: int) -> None:
        """Forget all but the last ``rows`` rows (a regime shift); they count for the slopes from now on."""
        self._start = self._end - min(rows, len(self))
        self._use[self._start : self._end] = True
        self._slope = None
        if self._sorted is not None:
            self._sorted = sorted(v for v in (float(x) + 0.0 for x in self._buf[0, self._start : self._end]) if v == v)

    def predict(self, step: float, slope: bool = True) -> FloatArray:
        """Robust local-trend prediction of every series at ``step``; NaN where the window has no value.

        ``slope=False`` predicts the window's median (no trend).
        """
        if self._end == self._start:
            return np.full(self.shape, np.nan)
        values = self._values
        if not slope:
            ordered = self._sorted
            if ordered is not None:  # the median of the sorted list, as _median computes it
                m = len(ordered)
                if m == 0:
                    return np.full(self.shape, np.nan)
                h = m // 2
                middle = ordered[h] if m % 2 else 0.5 * (ordered[h - 1] + ordered[h])
                return np.full(self.shape, middle)
            level: FloatArray = _median(values + 0.0, scratch=True).reshape(self.shape)  # + 0.0: -0.0 as sloped
            return level
        times = self._times[self._start : self._end]
        if self._slope is None:
            mask = self._use[self._start : self._end]
            self._slope = _slopes(values if mask.all() else np.where(mask, values, np.nan), times)
            self._since = 0
        out: FloatArray = _predict(values, times, float(step), self._slope).reshape(self.shape)
        return out

    def state(self) -> dict[str, Any]:
        """The rows oldest first with their steps, the cached slopes (or None) and pushes since they were fitted."""
        return {
            "values": [row.reshape(self.shape).tolist() for row in self._values.T],
            "steps": self._times[self._start : self._end].tolist(),
            "for_slope": self._use[self._start : self._end].tolist(),
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
