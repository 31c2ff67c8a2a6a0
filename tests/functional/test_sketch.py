"""The cheap spectral tier against numpy float64 on matrices with known spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradspectra.functional import CHEAP_METRICS, cheap_spectral_metrics_many, participation_ratio
from reference import ref_metrics, to_numpy64


def known(m: int, n: int, s: np.ndarray, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(m, len(s))))
    v, _ = np.linalg.qr(rng.normal(size=(n, len(s))))
    return torch.tensor((u * s) @ v.T, dtype=torch.float32)


def reference(a: torch.Tensor) -> np.ndarray:
    want = ref_metrics(to_numpy64(a))
    return np.array([want[name] for name in CHEAP_METRICS])


def run(matrices: list[torch.Tensor], calls: int = 1, **kwargs: int) -> torch.Tensor:
    out = cheap_spectral_metrics_many(matrices, **kwargs)
    for _ in range(calls - 1):
        out = cheap_spectral_metrics_many(matrices, warm_start=out.bases, **kwargs)
    return out


def test_metric_order_and_exact_participation_ratio() -> None:
    assert CHEAP_METRICS == ("spectral_norm", "stable_rank", "participation_ratio")
    a = known(40, 30, np.array([3.0, 2.0, 1.0]), 0)
    assert participation_ratio(a).item() == pytest.approx(14.0**2 / (81 + 16 + 1), rel=1e-5)
    assert participation_ratio(torch.zeros(4, 5)).item() == 0.0


@pytest.mark.parametrize(("m", "n"), [(300, 200), (200, 300), (256, 256)])
@pytest.mark.parametrize("decay", ["steep", "flat"])
def test_known_spectra_within_the_estimated_error(m: int, n: int, decay: str) -> None:
    r = min(m, n)
    s = 0.7 ** np.arange(r) if decay == "steep" else np.linspace(1.0, 0.5, r)
    mats = [known(m, n, s * (1 + 0.1 * k), seed=k) for k in range(3)]
    out = run(mats, calls=3)
    assert out.values.dtype == torch.float64 and not out.exact.any()
    for row, a in enumerate(mats):
        want = reference(a)
        err = np.abs(out.values[row].numpy() - want) / want
        est = out.rel_error[row].numpy()
        assert (err <= 3 * est + 1e-6).all(), (decay, err, est)
        # steep spectra are captured by the block; a flat top has no gap for s_1 to converge (several %)
        assert (err <= (1e-3 if decay == "steep" else 0.12)).all(), (decay, err)


def test_warm_start_follows_a_slowly_changing_gradient() -> None:
    """Gradients of one layer over steps share their top directions: a few % of change a step."""
    rng = np.random.default_rng(1)
    m, n, t = 384, 256, 96
    x = rng.normal(size=(t, n)) * np.linspace(3, 0.1, n)
    delta = rng.normal(size=(t, m)) * np.linspace(2, 0.1, m)
    warm, errs = None, []
    for step in range(6):
        x = x + 0.1 * rng.normal(size=x.shape)
        delta = delta + 0.1 * rng.normal(size=delta.shape)
        g = torch.tensor(delta.T @ x, dtype=torch.float32)
        out = cheap_spectral_metrics_many([g], warm_start=warm, seed=step)
        warm = out.bases
        errs.append(np.abs(out.values[0].numpy() - reference(g)) / reference(g))
    assert np.median(np.array(errs[1:]), axis=0).max() < 0.01, errs


def test_small_matrices_are_exact() -> None:
    a = known(20, 12, np.array([5.0, 1.0, 0.5]), 3)
    out = cheap_spectral_metrics_many([a, a.T])
    assert out.exact.all()
    assert out.rel_error.abs().max().item() == 0.0
    for row in range(2):
        np.testing.assert_allclose(out.values[row].numpy(), reference(a), rtol=1e-6)  # Frobenius: float32 reads


def test_zero_nonfinite_and_extreme_magnitudes() -> None:
    a = known(200, 150, 0.8 ** np.arange(150), 4)
    warm = cheap_spectral_metrics_many([a]).bases
    bad = a.clone()
    bad[3, 4] = float("nan")
    out = cheap_spectral_metrics_many(
        [torch.zeros(200, 150), bad, a * 1e30, a * 1e-30], warm_start=[None, warm[0], None, None]
    )
    assert out.values[0].tolist() == [0.0, 0.0, 0.0]
    assert torch.isnan(out.values[1]).all()
    assert out.bases[1] is warm[0]  # a bad gradient does not spoil the warm start
    want = reference(a)
    for row in (2, 3):  # float32 products would overflow / lose digits: the float64 route, exact
        assert out.exact[row]
        np.testing.assert_allclose(out.values[row, 1:].numpy(), want[1:], rtol=1e-6)
    assert out.values[2, 0].item() == pytest.approx(want[0] * 1e30, rel=1e-6)
    inf = a.clone()
    inf[0, 0] = float("inf")
    assert torch.isnan(cheap_spectral_metrics_many([inf]).values).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_double_precision(dtype: torch.dtype) -> None:
    a = known(256, 200, 0.6 ** np.arange(200), 5).to(dtype)
    out = run([a], calls=3)
    want = reference(a)  # the same numbers, in float64
    np.testing.assert_allclose(out.values[0].numpy(), want, rtol=2e-3)


def test_bad_arguments_name_themselves() -> None:
    a = torch.randn(50, 40)
    with pytest.raises(ValueError, match="`rank` must be an int >= 1, got 0"):
        cheap_spectral_metrics_many([a], rank=0)
    with pytest.raises(ValueError, match="`probes` must be an int >= 2, got 1"):
        cheap_spectral_metrics_many([a], probes=1)
    with pytest.raises(ValueError, match="`extra` must be an int >= 0, got -1"):
        cheap_spectral_metrics_many([a], extra=-1)
    with pytest.raises(ValueError, match=r"`warm_start` must have one entry per matrix \(1\), got 2"):
        cheap_spectral_metrics_many([a], warm_start=[None, None])
    assert cheap_spectral_metrics_many([]).values.shape == (0, 3)


def test_gram_route_is_exact_on_flat_spectra() -> None:
    s = np.linspace(1.0, 0.5, 200)
    mats = [known(300, 200, s * (1 + 0.05 * k), seed=10 + k) for k in range(2)]
    sketch = run(mats, calls=3)
    gram = cheap_spectral_metrics_many(mats, warm_start=sketch.bases, gram=[True, True])
    for row, a in enumerate(mats):
        want = reference(a)
        err = np.abs(gram.values[row].numpy() - want) / want
        assert (err < 5e-3).all() and (err <= 3 * gram.rel_error[row].numpy() + 1e-6).all(), err
        # the flat spectrum is where the sketch is least accurate, and says so
        assert sketch.rel_error[row].max() > 1e-3
    assert gram.bases[0] is not None and gram.bases[0].shape == (8, 200)
    with pytest.raises(ValueError, match=r"`gram` must have one entry per matrix \(2\), got 1"):
        cheap_spectral_metrics_many(mats, gram=[True])
