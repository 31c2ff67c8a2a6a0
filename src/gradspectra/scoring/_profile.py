r"""How unusual the shape of a metric's layer profile is: its change outside the usual directions of change.

A step's profile residual is a vector :math:`x` with one robust z per layer (the layer's value over
the cross-layer median, against its own recent trend). Clean steps move it mostly along a few
shared directions (e.g. upper layers against lower ones); the principal directions :math:`V`
(``components`` of them) of the recent clean rows capture those. What remains,

.. math::

    Q = \frac{1}{L} \bigl\| x - V^\top V x \bigr\|^2,

is the change no recent clean step made (the squared prediction error of multivariate statistical
process control). The basis is estimated robustly: rows are clipped entrywise at ``clip`` and
their norm capped at :math:`\sqrt{2L}\,`, so a few anomalous rows that slip into the window cannot
become a principal direction (and thereby hide the anomaly they carry).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

ROW_CLIP = 3.0  # entrywise clip of a stored row, in robust standard deviations
_ROW_NORM = 2.0  # a stored row's squared norm is capped at this many times its length
_REFRESH = 10  # recompute the basis every this many pushes (and while the window is short)
_ROWS_PER_COMPONENT = 10  # fewer rows than this per direction: the directions would fit the rows themselves


class ProfileBasis:
    """A window of clean profile rows (``capacity`` x layers) and the principal directions of its rows."""

    def __init__(self, n_layers: int, capacity: int, components: int) -> None:
        self.n_layers = int(n_layers)
        self.capacity = int(capacity)
        self.components = int(components)
        # the rows, oldest first, are the contiguous stretch [start, end) of a buffer of twice the capacity
        self._buf = np.zeros((2 * self.capacity, self.n_layers))
        self._start = 0
        self._end = 0
        self._basis: FloatArray | None = None
        self._warm: FloatArray | None = None  # the last basis computed, the start of the next iteration
        self._since = 0

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def _rows(self) -> FloatArray:
        """``(rows, layers)``, oldest first (a view)."""
        return self._buf[self._start : self._end]

    def grow(self, n_layers: int) -> None:
        if n_layers == self.n_layers:
            return
        rows = self._rows
        buf = np.zeros((2 * self.capacity, int(n_layers)))
        buf[: rows.shape[0], : self.n_layers] = rows
        self._buf, self._start, self._end = buf, 0, rows.shape[0]
        self.n_layers = int(n_layers)
        self._basis = None
        self._warm = None

    def _append(self, row: FloatArray) -> None:
        if self._end == self._buf.shape[0]:  # the buffer's end: move the window to its front
            n = len(self)
            self._buf[:n] = self._buf[self._start : self._end]
            self._start, self._end = 0, n
        self._buf[self._end] = row
        self._end += 1
        if len(self) > self.capacity:
            self._start += 1

    def restarted(self) -> ProfileBasis:
        """An empty basis of the same size whose next directions start from this one's last."""
        out = ProfileBasis(self.n_layers, self.capacity, self.components)
        out._warm = self._warm
        return out

    def push(self, z: FloatArray) -> None:
        """Store one clean row of per-layer z (NaN = absent, stored as 0)."""
        z = np.asarray(z, dtype=np.float64)
        row = np.where(np.isnan(z), 0.0, z)  # +-inf are clipped below
        np.clip(row, -ROW_CLIP, ROW_CLIP, out=row)
        cap = math.sqrt(_ROW_NORM * row.size)
        norm = math.sqrt(float(row @ row))
        if norm > cap:
            row = row * (cap / norm)
        self._append(row)
        self._since += 1
        if self._since >= _REFRESH or len(self) < 2 * _REFRESH:
            self._basis = None

    def basis(self) -> FloatArray:
        """``(k, layers)`` orthonormal principal directions of the stored rows (k <= components).

        Found by subspace iteration on the centred rows, warm-started from the previous basis: only
        matrix products and a k x k orthonormalisation, no LAPACK decomposition of the whole window.
        """
        if self._basis is None:
            # and two directions of the profile's own left free: a profile of two layers is one direction
            k = min(self.components, len(self) // _ROWS_PER_COMPONENT, self.n_layers - 2)
            if k <= 0:
                self._basis = np.zeros((0, self.n_layers))
            else:
                x = self._rows
                x = x - x.mean(axis=0)
                start = self._warm if self._warm is not None and self._warm.shape == (k, self.n_layers) else None
                self._basis = _top_directions(x, k, start)
                self._warm = self._basis
            self._since = 0
        return self._basis

    def residual(self, z: FloatArray) -> FloatArray:
        """The part of ``z`` outside the basis (NaN entries count as 0 and stay NaN in the result)."""
        absent = np.isnan(z)
        v = self.basis()
        if not absent.any():
            x = np.ascontiguousarray(z)  # as np.where would give: the same (BLAS) products
            full: FloatArray = x - v.T @ (v @ x)
            return full
        x = np.where(absent, 0.0, z)
        out: FloatArray = x - v.T @ (v @ x)
        return np.where(absent, np.nan, out)

    def state(self) -> dict[str, Any]:
        """The rows oldest first, the cached basis (or None) and the pushes since it was computed."""
        return {
            "rows": [r.tolist() for r in self._rows],
            "basis": None if self._basis is None else self._basis.tolist(),
            "warm": None if self._warm is None else self._warm.tolist(),
            "since": self._since,
        }

    @classmethod
    def from_state(cls, n_layers: int, capacity: int, components: int, state: Any) -> ProfileBasis:
        """Rebuild from :meth:`state`; rows from fewer layers are padded with zeros, a stale basis is recomputed."""
        out = cls(n_layers, capacity, components)
        state = state if isinstance(state, dict) else {}
        for row in list(state.get("rows") or [])[-out.capacity :]:
            arr = np.zeros(n_layers)
            values = np.asarray(row, dtype=np.float64)[:n_layers]
            arr[: values.size] = values
            out._append(arr)
        for key in ("basis", "warm"):
            stored = state.get(key)
            if stored is not None:
                b = np.asarray(stored, dtype=np.float64)
                if b.ndim == 2 and b.shape[1] == n_layers and b.shape[0] <= components:
                    setattr(out, "_" + key, b)
        out._since = int(state.get("since", 0))
        return out


_COLD_ITERATIONS = 60
_WARM_ITERATIONS = 10


def _orthonormal_rows(v: FloatArray) -> FloatArray:
    """Gram-Schmidt on the rows of a small ``(k, n)`` matrix (twice, for stability); a dependent row becomes 0."""
    out: FloatArray = np.array(v, dtype=np.float64)
    rows = list(out)  # views
    for _ in range(2):
        for i, row in enumerate(rows):
            for j in range(i):
                row -= row.dot(rows[j]) * rows[j]  # .dot: the same product as @, with less overhead
            norm = math.sqrt(row.dot(row))
            if norm > 1e-12:
                row /= norm
            else:
                row[:] = 0.0
    return out


def _top_directions(x: FloatArray, k: int, start: FloatArray | None) -> FloatArray:
    """The top ``k`` right singular directions of ``x`` (rows: samples) by subspace iteration.

    Cold start: the ``k`` columns of largest variance (deterministic). The subspace converges at the
    rate of the ratio of the (k+1)-th to the k-th singular value per iteration.
    """
    n = x.shape[1]
    if start is None:
        v = np.zeros((k, n))
        v[np.arange(k), np.argsort(-np.sum(x * x, axis=0), kind="stable")[:k]] = 1.0
        v += 1e-3  # not exactly orthogonal to any direction
        iterations = _COLD_ITERATIONS
    else:
        v = start.copy()
        iterations = _WARM_ITERATIONS
    v = _orthonormal_rows(v)
    for _ in range(iterations):
        v = _orthonormal_rows((x @ v.T).T @ x)
    return v
