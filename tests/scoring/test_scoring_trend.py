"""The robust local trend and the profile basis, against exact answers and numpy's SVD."""

from __future__ import annotations

import numpy as np
import pytest

from gradspectra.scoring._profile import ROW_CLIP, ProfileBasis, _top_directions
from gradspectra.scoring._trend import TrendWindow, robust_trend, trend_slope


def test_a_line_is_recovered_exactly_despite_a_minority_of_outliers() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(32.0)
    y = np.stack([2.0 - 0.3 * t, 5.0 + 0.01 * t, np.full(32, -1.0)], axis=1)
    dirty = y.copy()
    rows = rng.choice(32, size=6, replace=False)  # under a fifth of the window
    dirty[rows] += rng.choice([-50.0, 50.0], size=(6, 1))
    assert np.allclose(robust_trend(dirty, t, 40.0), y[0] + 40.0 * np.array([-0.3, 0.01, 0.0]), atol=1e-9)


def test_noise_without_a_trend_gives_the_window_median() -> None:
    # a slope within about two standard errors of zero is dropped: the prediction is the median
    rng = np.random.default_rng(1)
    t = np.arange(32.0)
    y = rng.normal(0.0, 1.0, size=(32, 500))
    slope = trend_slope(y, t)
    assert np.mean(slope == 0.0) > 0.8
    flat = slope == 0.0
    assert np.allclose(robust_trend(y, t, 32.0, slope)[flat], np.median(y, axis=0)[flat])


def test_a_clear_trend_in_noise_is_kept_almost_whole() -> None:
    rng = np.random.default_rng(2)
    t = np.arange(32.0)
    y = -0.1 * t[:, None] + rng.normal(0.0, 0.05, size=(32, 200))
    slope = trend_slope(y, t)
    assert np.all(np.abs(slope + 0.1) < 0.02)


def test_short_windows_absent_values_and_masked_rows() -> None:
    t = np.arange(6.0)
    y = np.stack([t, np.full(6, np.nan)], axis=1)
    # fewer than 8 values: no slope, the median
    pred = robust_trend(y, t, 10.0)
    assert pred[0] == pytest.approx(2.5) and np.isnan(pred[1])
    win = TrendWindow((2,), capacity=16)
    for k in range(16):
        # the last rows are flagged: they count for the level but not for the slope
        win.push(np.array([float(k) if k < 12 else 100.0, 1.0]), float(k), for_slope=k < 12)
    # the slope of the unflagged rows (1 per step) and the median level: the flagged rows are a minority
    assert win.predict(16.0).tolist() == pytest.approx([16.0, 1.0])
    state = win.state()
    clone = TrendWindow.from_state((2,), 16, state)
    assert np.array_equal(clone.predict(17.0), win.predict(17.0))
    assert np.isnan(TrendWindow((2,), 4).predict(0.0)).all()


def test_trend_window_grows_and_keeps_old_series() -> None:
    win = TrendWindow((2,), capacity=10)
    for k in range(10):
        win.push(np.array([k, 2.0 * k]), float(k))
    win.grow((3,))
    assert win.shape == (3,)
    pred = win.predict(10.0)
    assert pred[:2] == pytest.approx([10.0, 20.0]) and np.isnan(pred[2])


@pytest.mark.parametrize("size", [1, 3])  # one series keeps a sorted list for its median: it must follow
def test_keep_last_predicts_the_new_level_and_counts_the_kept_rows_for_the_slope(size: int) -> None:
    win = TrendWindow((size,), capacity=32)
    for k in range(20):
        win.push(np.full(size, 1.0), float(k))
    for k in range(20, 24):  # a new level, pushed as flagged rows (not for the slope)
        win.push(np.full(size, 5.0), float(k), for_slope=False)
    assert win.predict(24.0, slope=False) == pytest.approx(np.full(size, 1.0))
    win.keep_last(4)
    assert len(win) == 4
    assert win.predict(24.0) == pytest.approx(np.full(size, 5.0))
    assert win.predict(24.0, slope=False) == pytest.approx(np.full(size, 5.0))
    assert win.state()["for_slope"] == [True] * 4
    win.keep_last(10)  # more than it holds: nothing to forget
    assert len(win) == 4
    for k in range(24, 60):  # and it fills up again as usual
        win.push(np.full(size, 5.0 + 0.1 * (k - 24)), float(k))
    assert len(win) == 32 and win.predict(60.0) == pytest.approx(np.full(size, 8.6), abs=1e-9)


def projector(v: np.ndarray) -> np.ndarray:
    return v.T @ v


def test_basis_spans_the_top_principal_directions() -> None:
    rng = np.random.default_rng(3)
    n_layers = 24
    directions = np.linalg.qr(rng.normal(size=(n_layers, 2)))[0].T  # two orthonormal directions
    rows = rng.normal(size=(100, 2)) * [2.0, 1.2] @ directions + 0.15 * rng.normal(size=(100, n_layers))
    basis = ProfileBasis(n_layers, capacity=100, components=2)
    for row in rows:
        basis.push(row)
    centred = rows - rows.mean(axis=0)
    exact = np.linalg.svd(centred, full_matrices=False)[2][:2]
    assert np.abs(projector(basis.basis()) - projector(exact)).max() < 1e-6
    # the part outside the basis of a profile change
    x = rng.normal(size=n_layers)
    assert np.allclose(basis.residual(x), x - projector(exact) @ x, atol=1e-6)
    # warm restart after more rows: still the exact subspace of the current window
    for row in rng.normal(size=(30, 2)) * [2.0, 1.2] @ directions + 0.15 * rng.normal(size=(30, n_layers)):
        basis.push(row)
    window = np.stack(basis.state()["rows"])
    exact = np.linalg.svd(window - window.mean(axis=0), full_matrices=False)[2][:2]
    assert np.abs(projector(basis.basis()) - projector(exact)).max() < 1e-4


def test_a_few_huge_rows_do_not_displace_the_usual_directions() -> None:
    # rows are clipped entrywise and norm-capped: anomalies that slipped into the window (4 % here)
    # do not replace the clean steps' usual directions of change, so the next anomaly of their kind
    # still stands out
    rng = np.random.default_rng(4)
    n_layers = 24
    usual = np.linalg.qr(rng.normal(size=(n_layers, 2)))[0].T
    basis = ProfileBasis(n_layers, capacity=100, components=2)
    anomaly = np.zeros(n_layers)
    anomaly[[2, 5, 11]] = [40.0, -40.0, 40.0]
    for k in range(100):
        clean = rng.normal(size=2) * [3.0, 2.0] @ usual + 0.5 * rng.normal(size=n_layers)
        basis.push(anomaly if k % 25 == 0 else clean)
    assert np.abs(projector(basis.basis()) - projector(usual)).max() < 0.1
    remaining = basis.residual(anomaly)
    assert remaining @ remaining > 0.8 * (anomaly @ anomaly)
    assert np.abs(np.stack(basis.state()["rows"])).max() <= ROW_CLIP


def test_absent_layers_growth_and_state() -> None:
    rng = np.random.default_rng(5)
    basis = ProfileBasis(4, capacity=20, components=1)
    for _ in range(20):
        basis.push(np.array([1.0, -1.0, 0.0, 0.0]) * rng.normal() + 0.01 * rng.normal(size=4))
    x = np.array([1.0, np.nan, 0.0, 0.0])
    rem = basis.residual(x)
    assert np.isnan(rem[1]) and np.all(np.isfinite(rem[[0, 2, 3]]))
    clone = ProfileBasis.from_state(4, 20, 1, basis.state())
    assert np.array_equal(clone.residual(x), rem, equal_nan=True)
    basis.grow(6)
    assert basis.basis().shape == (1, 6)
    assert ProfileBasis(3, 10, 2).basis().shape == (0, 3)  # no rows yet: no directions


def test_top_directions_cold_start_matches_svd() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(60, 10)) * np.array([5.0, 4.0, 3.0, 1.5, 1.2, 1.0, 0.8, 0.6, 0.5, 0.4])
    x -= x.mean(axis=0)
    v = _top_directions(x, 3, None)
    exact = np.linalg.svd(x, full_matrices=False)[2][:3]
    assert np.allclose(v @ v.T, np.eye(3), atol=1e-12)
    assert np.abs(projector(v) - projector(exact)).max() < 1e-6


def test_median_with_absent_values_equals_numpy_nanmedian() -> None:
    import warnings

    from gradspectra.scoring._trend import _median

    rng = np.random.default_rng(0)
    for shape in [(1, 5), (2, 4), (7, 3), (8, 40), (33, 100)]:
        x = rng.normal(size=shape)
        x[rng.random(shape) < 0.4] = np.nan
        x[:, 0] = np.nan  # an absent series stays absent
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = np.nanmedian(x, axis=0)
        np.testing.assert_array_equal(_median(np.ascontiguousarray(x.T)), want)  # one series a row
