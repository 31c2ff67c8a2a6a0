"""The sorted sliding window and the across-layer trimmed mean, against brute force."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from gradspectra.scoring._window import ScalarWindow, SortedWindow
from gradspectra.scoring.batch import _trimmed_mean

QS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


def brute_quantiles(history: list[np.ndarray], capacity: int, shape: tuple[int, ...]) -> np.ndarray:
    """numpy's quantiles of the finite values among the last ``capacity`` pushes, per series."""
    out = np.full((len(QS), *shape), np.nan)
    if not history:
        return out
    recent = np.stack(history[-capacity:], axis=-1).astype(np.float32).astype(np.float64)
    for idx in np.ndindex(*shape):
        x = recent[idx]
        x = x[np.isfinite(x)]
        if x.size:
            key = (slice(None), *idx)
            out[key] = np.quantile(x, QS)
    return out


@settings(max_examples=25, deadline=None)
@given(
    capacity=st.integers(1, 9),
    rows=st.integers(1, 4),
    steps=st.integers(0, 30),
    seed=st.integers(0, 2**32 - 1),
    ties=st.booleans(),
)
def test_window_quantiles_and_history_match_brute_force(
    capacity: int, rows: int, steps: int, seed: int, ties: bool
) -> None:
    rng = np.random.default_rng(seed)
    shape = (rows, 2)
    win = SortedWindow(shape, capacity)
    history: list[np.ndarray] = []
    for _ in range(steps):
        v = rng.integers(0, 4, size=shape).astype(float) if ties else rng.normal(size=shape)
        v[rng.random(shape) < 0.2] = np.nan  # absent
        v[rng.random(shape) < 0.05] = np.inf  # non-finite: also absent
        win.push(v)
        history.append(v)
        # numpy's lerp rounds differently in the last bit
        np.testing.assert_allclose(win.quantiles(QS), brute_quantiles(history, capacity, shape), rtol=1e-12, atol=0)
        assert (win.count == np.isfinite(np.stack(history[-capacity:], -1)).sum(-1)).all()
    expected_history = np.stack(history[-capacity:], -1) if history else np.zeros((*shape, 0))
    expected_history = np.where(np.isfinite(expected_history), expected_history, np.nan).astype(np.float32)
    np.testing.assert_array_equal(win.history(), expected_history)
    # rebuilt from its history, a window answers (and evicts) exactly as the original
    clone = SortedWindow.from_history(win.history(), capacity)
    np.testing.assert_array_equal(clone.quantiles(QS), win.quantiles(QS))
    nxt = rng.normal(size=shape)
    win.push(nxt)
    clone.push(nxt)
    np.testing.assert_array_equal(clone.quantiles(QS), win.quantiles(QS))


@settings(max_examples=25, deadline=None)
@given(capacity=st.integers(1, 9), steps=st.integers(0, 30), seed=st.integers(0, 2**32 - 1), ties=st.booleans())
def test_scalar_window_matches_sorted_window(capacity: int, steps: int, seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    fast, general = ScalarWindow(capacity), SortedWindow((1,), capacity)
    for _ in range(steps):
        v = float(rng.integers(0, 4)) if ties else float(rng.normal())
        v = [v, np.nan, np.inf, 1e300][rng.choice(4, p=[0.8, 0.1, 0.05, 0.05])]
        fast.push(v)
        general.push(np.array([v]))
        np.testing.assert_array_equal(fast.quantiles(QS), general.quantiles(QS))
        np.testing.assert_array_equal(fast.count, general.count)
    np.testing.assert_array_equal(fast.history(), general.history())
    clone = ScalarWindow.from_history(fast.history(), capacity)
    np.testing.assert_array_equal(clone.history(), fast.history())
    np.testing.assert_array_equal(clone.quantiles(QS), fast.quantiles(QS))


def test_window_grow_keeps_old_series_and_starts_new_ones_empty() -> None:
    win = SortedWindow((2, 1), 5)
    for t in range(7):
        win.push(np.array([[t], [10.0 + t]]))
    win.grow((3, 2))
    q = win.quantiles((0.5,))[0]
    np.testing.assert_array_equal(q[:2, 0], [4.0, 14.0])
    assert np.isnan(q[2]).all() and np.isnan(q[:, 1]).all()
    win.push(np.ones((3, 2)))
    assert win.count.tolist() == [[5, 1], [5, 1], [1, 1]]


def test_window_values_beyond_float32_are_absent() -> None:
    win = SortedWindow((1,), 4)
    win.push(np.array([1e300]))
    win.push(np.array([2.0]))
    assert win.count.tolist() == [1]
    assert win.quantiles((0.5,))[0, 0] == 2.0


@settings(max_examples=40, deadline=None)
@given(
    n_layers=st.integers(1, 15),
    trim=st.sampled_from([0.0, 0.1, 0.25, 0.4]),
    seed=st.integers(0, 2**32 - 1),
)
def test_trimmed_mean_matches_scipy_per_column(n_layers: int, trim: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    z = rng.standard_t(2, size=(n_layers, 3))
    z[rng.random(z.shape) < 0.25] = np.nan  # layers without a z for this metric
    got = _trimmed_mean(z, trim)
    for j in range(3):
        col = z[:, j][~np.isnan(z[:, j])]
        if col.size == 0:
            assert np.isnan(got[j])
        else:
            assert np.isclose(got[j], stats.trim_mean(col, trim), rtol=1e-12, atol=1e-12)
