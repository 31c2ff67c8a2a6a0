"""Sliding windows kept sorted, so that medians and quartiles of the last ``capacity`` values cost O(1) per series.

A window holds a block of independent series (any leading shape, e.g. ``(layers, metrics)``). Each
``push`` appends one value per series (NaN = nothing this time) and evicts the value pushed
``capacity`` pushes ago; the sorted copy is updated by one vectorised delete-and-insert, O(capacity)
elementwise work per series and no sort. Values are stored in float32: the scores use them on log
scale or in robust-z units, where 1e-7 relative precision is far below any meaningful change, and
half the bytes makes the per-step update several times faster (it is memory-bound). The quartiles'
read positions depend only on the counts, so they are kept until a count changes (``version``).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
StoredArray = NDArray[np.float32]
STORED = np.float32
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class SortedWindow:
    """The last ``capacity`` finite values of every series in a block of shape ``shape``."""

    def __init__(self, shape: tuple[int, ...], capacity: int) -> None:
        self.capacity = int(capacity)
        self.shape = tuple(int(s) for s in shape)
        self.pushes = 0  # pushes so far; the ring slot written next is pushes % capacity
        # raw: values in ring order (NaN = none); srt: finite values ascending, +inf after them,
        # with one extra +inf column so that shifted reads never run off the end
        self.raw: StoredArray = np.full((*self.shape, self.capacity), np.nan, dtype=STORED)
        self.srt: StoredArray = np.full((*self.shape, self.capacity + 1), np.inf, dtype=STORED)
        self.count = np.zeros(self.shape, dtype=np.int64)
        self._quantile_cache: tuple[Any, ...] | None = None  # read positions for the current counts
        self.version = 0  # changes whenever a count does
        self._row_numbers = np.arange(self.rows)

    @property
    def rows(self) -> int:
        return math.prod(self.shape)

    def grow(self, shape: tuple[int, ...]) -> None:
        """Enlarge the block to ``shape`` (no dimension may shrink); new series start empty."""
        shape = tuple(int(s) for s in shape)
        if shape == self.shape:
            return
        old = tuple(slice(0, s) for s in self.shape)
        raw = np.full((*shape, self.capacity), np.nan, dtype=STORED)
        srt = np.full((*shape, self.capacity + 1), np.inf, dtype=STORED)
        count = np.zeros(shape, dtype=np.int64)
        raw[old] = self.raw
        srt[old] = self.srt
        count[old] = self.count
        self.shape, self.raw, self.srt, self.count = shape, raw, srt, count
        self._quantile_cache = None
        self.version += 1
        self._row_numbers = np.arange(self.rows)

    def push(self, values: FloatArray) -> None:
        """Append one value per series (shape ``shape``); non-finite entries count as absent."""
        w = self.capacity
        n = self.rows
        if n == 0:
            self.pushes += 1
            return
        raw = self.raw.reshape(n, w)
        srt = self.srt.reshape(n, w + 1)
        body = srt[:, :w]
        with np.errstate(over="ignore"):  # beyond float32's range: stored as absent, like any non-finite value
            new = np.asarray(values).astype(STORED).reshape(n)
        slot = self.pushes % w
        old = raw[:, slot]  # read before the slot is overwritten, at the end
        has_old = old == old  # not NaN
        has_new = np.isfinite(new)
        # A missing new value is inserted as +inf (the end of the finite values), and a missing old value
        # is the first +inf: every row then does exactly one delete and one insert.
        old_key = np.where(has_old, old, np.inf)
        new_key = np.where(has_new, new, np.inf)
        # the sorted values ascend, so each comparison is a prefix mask: below_old[j] <=> j < position of old;
        # the last column is +inf, so every mask ends in False and its first False is its count of True
        below_old = srt < old_key[:, None]
        below_new = srt < new_key[:, None]
        k_ins = np.argmin(below_new, axis=1) - (old_key < new_key)
        # values between the two positions move one slot: left (old below new) from the old value's
        # position up to k_ins, right (old above new) from k_ins up to it; everything else stays put
        # (for masks, ``b > a`` is ``b & ~a``)
        before = body.copy()
        np.copyto(body[:, : w - 1], before[:, 1:], where=below_new[:, 1:w] > below_old[:, : w - 1])
        np.copyto(body[:, 1:], before[:, : w - 1], where=below_old[:, : w - 1] > below_new[:, : w - 1])
        body[self._row_numbers, k_ins] = new_key
        raw[:, slot] = np.where(has_new, new, np.nan)
        if (has_new != has_old).any():
            count = self.count.reshape(n)
            count += has_new
            count -= has_old
            self._quantile_cache = None
        self.version += 1
        self.pushes += 1

    def quantiles(self, qs: tuple[float, ...]) -> FloatArray:
        """Per-series quantiles (numpy's default linear interpolation), shape ``(len(qs), *shape)``; NaN if empty.

        The read positions depend only on the counts, so they are kept until a count changes.
        """
        n = self.rows
        cache = self._quantile_cache
        if cache is None or cache[0] != qs:
            w1 = self.capacity + 1
            count = self.count.reshape(n)
            last = np.maximum(count - 1, 0)
            h = last[None, :] * np.asarray(qs, dtype=np.float64)[:, None]  # (Q, n)
            lo = np.floor(h).astype(np.int64)
            hi = np.minimum(lo + 1, last[None, :])
            base = np.arange(n, dtype=np.int64) * w1
            frac = h - lo
            cache = (qs, np.stack((base + lo, base + hi)), frac, frac > 0, count > 0, bool((count == 0).any()))
            self._quantile_cache = cache
        _, at, frac, between, filled, some_empty = cache
        a, b = self.srt.reshape(-1)[at].astype(np.float64)
        if some_empty:
            with np.errstate(invalid="ignore"):  # inf - inf past the end of empty series; masked below
                val = np.where(between, a + frac * (b - a), a)
            val = np.where(filled, val, np.nan)
        else:
            val = np.where(between, a + frac * (b - a), a)
        out: FloatArray = val.reshape((len(qs), *self.shape))
        return out

    def history(self) -> StoredArray:
        """The stored values oldest first, shape ``shape + (min(pushes, capacity),)`` (NaN = absent)."""
        w = self.capacity
        if self.pushes <= w:
            recent: StoredArray = self.raw[..., : self.pushes].copy()
            return recent
        rolled: StoredArray = np.roll(self.raw, -(self.pushes % w), axis=-1)
        return rolled

    def set_rows(self, rows: slice, history: NDArray[np.floating[Any]]) -> None:
        """Replace the values of the series ``rows`` (of a one-dimensional block) with ``history``.

        ``history`` is ``(rows, T)``, oldest first, and lines up with the last pushes at its newest end:
        older values beyond it are absent, and values older than the window's are dropped.
        """
        w = self.capacity
        held = min(self.pushes, w)
        with np.errstate(over="ignore"):
            hist = np.asarray(history).astype(STORED)
        hist = hist[:, max(hist.shape[-1] - held, 0) :]
        t = hist.shape[-1]
        raw = np.full((hist.shape[0], w), np.nan, dtype=STORED)
        slots = (self.pushes - t + np.arange(t)) % w
        raw[:, slots] = np.where(np.isfinite(hist), hist, np.nan)
        self.raw[rows] = raw
        self.srt[rows, :w] = np.sort(np.where(np.isnan(raw), np.inf, raw), axis=-1)
        self.count[rows] = np.isfinite(raw).sum(axis=-1)
        self._quantile_cache = None
        self.version += 1

    @classmethod
    def from_history(cls, history: NDArray[np.floating[Any]], capacity: int) -> SortedWindow:
        """A window that has seen ``history`` (shape ``shape + (T,)``, oldest first); keeps the last ``capacity``."""
        with np.errstate(over="ignore"):
            hist = np.asarray(history).astype(STORED)
        win = cls(hist.shape[:-1], capacity)
        hist = hist[..., -win.capacity :] if hist.shape[-1] else hist
        t = hist.shape[-1]
        hist = np.where(np.isfinite(hist), hist, np.nan)
        win.raw[..., :t] = hist
        win.srt[..., :t] = np.sort(np.where(np.isnan(hist), np.inf, hist), axis=-1)
        win.count = np.isfinite(hist).sum(axis=-1).astype(np.int64)
        win.pushes = t
        return win


class ScalarWindow:
    """The same window for one series (the accepted scores), as a sorted Python list.

    For a single series numpy's per-call overhead dominates; ``bisect`` on a list is several times
    faster. Values are rounded to float32 and quantiles interpolated exactly as in
    :class:`SortedWindow`, so either class gives the same numbers.
    """

    shape = (1,)

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.pushes = 0
        self._order: deque[float] = deque()  # push order, NaN = absent
        self._sorted: list[float] = []

    @property
    def count(self) -> NDArray[np.int64]:
        return np.array([len(self._sorted)], dtype=np.int64)

    def grow(self, shape: tuple[int, ...]) -> None:
        """Nothing to do: one series never grows. Here so that every window can be grown alike."""
        if tuple(shape) != self.shape:
            raise ValueError(f"a ScalarWindow holds one series, shape {self.shape}, not {tuple(shape)}")

    def push(self, values: FloatArray | float) -> None:
        value = values if type(values) is float else float(np.asarray(values, dtype=np.float64).reshape(-1)[0])
        if len(self._order) == self.capacity:
            old = self._order.popleft()
            if not math.isnan(old):
                del self._sorted[bisect.bisect_left(self._sorted, old)]
        if math.isfinite(value) and abs(value) <= _FLOAT32_MAX:
            value = float(np.float32(value))
            bisect.insort(self._sorted, value)
        else:
            value = math.nan
        self._order.append(value)
        self.pushes += 1

    def quantiles(self, qs: tuple[float, ...]) -> FloatArray:
        """Quantiles as :meth:`SortedWindow.quantiles`, shape ``(len(qs), 1)``."""
        data = self._sorted
        n = len(data)
        out = np.full((len(qs), 1), np.nan)
        if n:
            for i, q in enumerate(qs):
                h = (n - 1) * q
                lo = math.floor(h)
                frac = h - lo
                a = data[lo]
                out[i, 0] = a + frac * (data[min(lo + 1, n - 1)] - a) if frac > 0 else a
        return out

    def __len__(self) -> int:
        """How many finite values the window holds."""
        return len(self._sorted)

    def quantile_values(self, qs: tuple[float, ...]) -> list[float]:
        """:meth:`quantiles` as plain floats (the same numbers); the window must not be empty."""
        data = self._sorted
        last = len(data) - 1
        out = []
        for q in qs:
            h = last * q
            lo = math.floor(h)
            frac = h - lo
            a = data[lo]
            out.append(a + frac * (data[min(lo + 1, last)] - a) if frac > 0 else a)
        return out

    def history(self) -> StoredArray:
        """The stored values oldest first, shape ``(1, min(pushes, capacity))``."""
        return np.array(self._order, dtype=STORED).reshape(1, -1)

    @classmethod
    def from_history(cls, history: NDArray[np.floating[Any]], capacity: int) -> ScalarWindow:
        """A window that has seen ``history`` (shape ``(1, T)`` or ``(T,)``, oldest first)."""
        win = cls(capacity)
        for value in np.asarray(history, dtype=np.float64).reshape(-1)[-win.capacity :]:
            win.push(float(value))
        return win
