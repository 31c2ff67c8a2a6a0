"""The spectral-metric estimator against numpy float64 on matrices with known spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradspectra.functional import (
    METRIC_NAMES,
    SpectralEstimate,
    estimate_spectral_metrics_many,
    frobenius_norm,
    spectral_metrics_many,
)
from reference import random_orthogonal, ref_metrics, to_numpy64, with_spectrum

IDX = {name: i for i, name in enumerate(METRIC_NAMES)}
# small settings keep the file fast; a tail is left whenever min(m, n) > RANK
RANK = 24
FAST = {"rank": RANK, "power_iters": 2, "probes": 8, "lanczos_steps": 12}


def decaying(kind: str, r: int) -> np.ndarray:
    """Known spectra of length ``r`` with a real tail beyond the deflated rank."""
    i = np.arange(r, dtype=np.float64)
    return {
        "geometric": 0.97**i,
        "power_law": 1.0 / (1.0 + i),
        "flat": np.ones(r),
        "low_rank_plus_noise": np.concatenate([np.linspace(5.0, 1.0, 10), np.full(r - 10, 1e-2)]),
        "rank_deficient_power_law": np.concatenate([1.0 / (1.0 + i[: r // 2]), np.zeros(r - r // 2)]),
    }[kind]


def rel_errors(est: SpectralEstimate, matrices: list[torch.Tensor]) -> np.ndarray:
    """``|estimate - exact| / exact`` per matrix and metric, against numpy float64 on the same numbers."""
    out = np.zeros(tuple(est.values.shape))
    for row, a in enumerate(matrices):
        want = ref_metrics(to_numpy64(a))
        for name, col in IDX.items():
            got = float(est.values[row, col])
            out[row, col] = abs(got - want[name]) / abs(want[name]) if want[name] != 0 else abs(got)
    return out


def matrix(shape: tuple[int, int], s: np.ndarray, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(with_spectrum(rng, *shape, s)).to(dtype)


@pytest.mark.parametrize("kind", ["geometric", "power_law", "flat", "low_rank_plus_noise", "rank_deficient_power_law"])
@pytest.mark.parametrize("shape", [(160, 96), (96, 160), (120, 120)])
def test_known_spectra(shape: tuple[int, int], kind: str) -> None:
    a = matrix(shape, decaying(kind, min(shape)), seed=sum(shape))
    est = estimate_spectral_metrics_many([a], **FAST)
    err = rel_errors(est, [a])[0]
    # deflating 24 of ~100 directions leaves most of the spectrum to the quadrature (a gapless geometric
    # spectrum also leaves the top subspace unconverged): percent-level errors, which the plain
    # Gauss quadrature misses by 5-20x
    assert err[IDX["nuclear_norm"]] < 0.05, err
    assert err[IDX["effective_rank"]] < 0.08, err
    assert err[IDX["spectral_norm"]] < 5e-3, err
    assert err[IDX["stable_rank"]] < 1e-2, err
    assert err[IDX["frobenius_norm"]] < 1e-6, err  # from the entries: float32 row sums
    # and every value within 3x its own estimated error
    spectral = [IDX[n] for n in METRIC_NAMES if n != "frobenius_norm"]
    assert (err[spectral] <= 3 * est.rel_error[0, spectral].numpy()).all(), (err, est.rel_error)


def test_rank_below_the_rank_parameter_is_near_exact() -> None:
    s = np.linspace(3.0, 0.5, 10)
    a = matrix((100, 80), np.concatenate([s, np.zeros(70)]), seed=1)
    est = estimate_spectral_metrics_many([a], rank=32)
    err = rel_errors(est, [a])[0]
    assert err.max() < 1e-4, err
    assert float(est.rel_error.max()) < 1e-2


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (64, 64)])
def test_min_dimension_within_rank_is_exact(shape: tuple[int, int]) -> None:
    s = 0.9 ** np.arange(min(shape))
    a32 = matrix(shape, s, seed=2)
    a64 = matrix(shape, s, seed=2, dtype=torch.float64)
    err32 = rel_errors(estimate_spectral_metrics_many([a32], rank=64), [a32])[0]
    err64 = rel_errors(estimate_spectral_metrics_many([a64], rank=64), [a64])[0]
    assert err32.max() < 1e-5, err32
    assert err64.max() < 1e-10, err64


def test_zero_matrix_is_all_zero() -> None:
    est = estimate_spectral_metrics_many([torch.zeros(50, 40), torch.zeros(3, 0)])
    assert est.values.dtype == torch.float64
    assert (est.values == 0).all()
    assert (est.rel_error == 0).all()
    assert est.bases[1].shape == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e25, 1e-20])
def test_extreme_scales(scale: float, dtype: torch.dtype) -> None:
    a = matrix((90, 60), decaying("power_law", 60), seed=3, dtype=torch.float64)
    base = estimate_spectral_metrics_many([a.to(dtype)], **FAST)
    big = estimate_spectral_metrics_many([(a * scale).to(dtype)], **FAST)
    assert torch.isfinite(big.values).all()
    ratio = big.values / base.values
    for name in ("nuclear_norm", "spectral_norm", "frobenius_norm"):
        assert abs(float(ratio[0, IDX[name]]) / scale - 1) < 1e-5, name
    for name in ("stable_rank", "top_sv_ratio", "effective_rank"):
        assert abs(float(ratio[0, IDX[name]]) - 1) < 1e-5, name
    scaled = (a * scale).to(dtype)
    err = rel_errors(big, [scaled])[0]
    assert err[IDX["nuclear_norm"]] < 0.02 and err[IDX["effective_rank"]] < 0.05, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype: torch.dtype) -> None:
    a = matrix((100, 70), decaying("geometric", 70), seed=4).to(dtype)
    est = estimate_spectral_metrics_many([a], **FAST)
    # the same numbers in float32 give the same answer: the half input was only upcast
    same = estimate_spectral_metrics_many([a.float()], **FAST)
    torch.testing.assert_close(est.values, same.values, rtol=1e-12, atol=0)
    err = rel_errors(est, [a])[0]
    assert err[IDX["nuclear_norm"]] < 0.05 and err[IDX["effective_rank"]] < 0.08, err
    assert est.bases[0].dtype == torch.float32


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_matrix_gives_nan_and_leaves_the_others_alone(bad: float) -> None:
    good = matrix((60, 50), decaying("power_law", 50), seed=5)
    broken = good.clone()
    broken[3, 7] = bad
    est = estimate_spectral_metrics_many([good, broken, good.clone()], **FAST)
    spectral = [IDX[n] for n in METRIC_NAMES if n != "frobenius_norm"]
    assert torch.isnan(est.values[1, spectral]).all()
    assert torch.isnan(est.rel_error[1, spectral]).all()
    fro = float(est.values[1, IDX["frobenius_norm"]])
    assert math.isnan(fro) if math.isnan(bad) else fro == math.inf
    assert float(est.rel_error[1, IDX["frobenius_norm"]]) == 0.0
    assert torch.isfinite(est.values[[0, 2]]).all()
    assert rel_errors(est, [good])[0, IDX["nuclear_norm"]] < 0.05
    assert torch.isfinite(est.bases[1]).all()


def test_mixed_shapes_in_one_call_keep_their_order() -> None:
    shapes = [(80, 50), (50, 80), (80, 50), (30, 30), (70, 40), (80, 50)]
    mats = [matrix(sh, decaying("power_law", min(sh)), seed=i) for i, sh in enumerate(shapes)]
    est = estimate_spectral_metrics_many(mats, ["effective_rank", "nuclear_norm"], **FAST)
    assert est.values.shape == (6, 2)
    exact = spectral_metrics_many(mats, ["effective_rank", "nuclear_norm"])
    rel = ((est.values - exact).abs() / exact).numpy()
    assert (rel[:, 0] < 0.05).all() and (rel[:, 1] < 0.02).all(), rel
    for basis, (m, n) in zip(est.bases, shapes):
        k = min(RANK, m, n)
        assert basis.shape == (n, k)
        torch.testing.assert_close(basis.mT @ basis, torch.eye(k), atol=1e-4, rtol=0)


def test_more_than_one_chunk_of_a_shape() -> None:
    mats = [matrix((40, 30), decaying("power_law", 30), seed=i) for i in range(19)]  # chunks of 8, 8 and 3
    est = estimate_spectral_metrics_many(mats, rank=12, power_iters=2, probes=8, lanczos_steps=10)
    assert est.values.shape == (19, len(METRIC_NAMES)) and len(est.bases) == 19
    err = rel_errors(est, mats)[:, IDX["nuclear_norm"]]
    assert (err < 0.06).all(), err
    assert (err <= 3 * est.rel_error[:, IDX["nuclear_norm"]].numpy()).all()


def test_metrics_are_consistent_with_each_other() -> None:
    a = matrix((90, 70), decaying("geometric", 70), seed=6)
    v = estimate_spectral_metrics_many([a], **FAST).values[0]
    s1, nuc, fro = v[IDX["spectral_norm"]], v[IDX["nuclear_norm"]], v[IDX["frobenius_norm"]]
    torch.testing.assert_close(v[IDX["stable_rank"]], (fro / s1) ** 2)
    torch.testing.assert_close(v[IDX["top_sv_ratio"]], s1 / nuc)
    torch.testing.assert_close(fro, frobenius_norm(a), rtol=1e-6, atol=0)
    assert 1.0 <= float(v[IDX["effective_rank"]]) <= 70.0


def test_warm_start_of_the_wrong_shape_is_ignored() -> None:
    a = matrix((80, 60), decaying("power_law", 60), seed=7)
    cold = estimate_spectral_metrics_many([a], **FAST)
    for wrong in (torch.randn(60, RANK + 1), torch.randn(59, RANK), torch.randn(RANK, 60), torch.randn(60)):
        warm = estimate_spectral_metrics_many([a], warm_start=[wrong], **FAST)
        torch.testing.assert_close(warm.values, cold.values, rtol=0, atol=0)
    nan_basis = torch.full((60, RANK), math.nan)
    warm = estimate_spectral_metrics_many([a], warm_start=[nan_basis], **FAST)
    torch.testing.assert_close(warm.values, cold.values, rtol=0, atol=0)


def test_warm_start_replaces_power_iterations() -> None:
    # a slowly decaying spectrum: one cold iteration leaves the top subspace visibly unconverged
    rng = np.random.default_rng(8)
    u, v = random_orthogonal(rng, 200, 150), random_orthogonal(rng, 150, 150)
    s = 1.0 / (1.0 + np.arange(150)) ** 0.7
    steps = [torch.from_numpy((u * (s * (1 + 0.05 * rng.standard_normal(150)))) @ v.T).float() for _ in range(2)]
    opts = {"rank": 32, "probes": 16, "lanczos_steps": 16}
    first = estimate_spectral_metrics_many(steps[:1], power_iters=3, **opts)
    cold = estimate_spectral_metrics_many(steps[1:], power_iters=1, **opts)
    warm = estimate_spectral_metrics_many(steps[1:], power_iters=1, warm_start=first.bases, **opts)
    e_cold = rel_errors(cold, steps[1:])[0, IDX["nuclear_norm"]]
    e_warm = rel_errors(warm, steps[1:])[0, IDX["nuclear_norm"]]
    assert e_warm < 0.5 * e_cold, (e_warm, e_cold)
    # the returned basis spans the top of the spectrum: most of the top-32 energy of the next step
    basis = first.bases[0].double()
    top = torch.from_numpy(v[:, :32])
    assert float((basis.mT @ top).pow(2).sum()) > 0.9 * 32


def test_reproducible_with_a_seed() -> None:
    a = matrix((100, 80), decaying("power_law", 80), seed=9)
    one = estimate_spectral_metrics_many([a], seed=3, **FAST)
    two = estimate_spectral_metrics_many([a], seed=3, **FAST)
    other = estimate_spectral_metrics_many([a], seed=4, **FAST)
    torch.testing.assert_close(one.values, two.values, rtol=0, atol=0)
    torch.testing.assert_close(one.rel_error, two.rel_error, rtol=0, atol=0)
    assert float(one.values[0, IDX["nuclear_norm"]]) != float(other.values[0, IDX["nuclear_norm"]])
    unseeded = estimate_spectral_metrics_many([a], seed=None, **FAST)
    # random: median error ~0.7%, the worst of 200 draws 2.8%
    assert rel_errors(unseeded, [a])[0, IDX["nuclear_norm"]] < 0.05


def test_rel_error_is_meaningful() -> None:
    """The error estimate covers the true error (within 3x) almost always, and it is not vacuous."""
    cases = []
    for seed in range(24):
        rng = np.random.default_rng(100 + seed)
        m, n = (int(x) for x in rng.integers(60, 160, size=2))
        r = min(m, n)
        exponent = rng.uniform(0.3, 2.0)
        s = (1.0 + np.arange(r)) ** -exponent
        s[rng.integers(r // 3, r) :] *= rng.choice([0.0, 1.0])  # half of them rank-deficient
        cases.append(torch.from_numpy(with_spectrum(rng, m, n, s)).float())
    settings = {"rank": 16, "power_iters": 2, "probes": 8, "lanczos_steps": 8}
    est = estimate_spectral_metrics_many(cases, **settings)
    err = rel_errors(est, cases)
    for name in ("nuclear_norm", "effective_rank", "spectral_norm", "top_sv_ratio"):
        col = IDX[name]
        covered = np.mean(err[:, col] <= 3 * est.rel_error[:, col].numpy())
        assert covered >= 0.9, (name, covered)
    for name in ("nuclear_norm", "effective_rank"):
        col = IDX[name]
        # not vacuous: the typical estimate is within 10x of the typical error
        assert np.median(est.rel_error[:, col].numpy()) < 10 * np.median(err[:, col]), name
    # and it shrinks when the work grows
    better = estimate_spectral_metrics_many(cases, rank=48, power_iters=2, probes=8, lanczos_steps=16)
    for name in ("nuclear_norm", "effective_rank"):
        col = IDX[name]
        assert np.median(better.rel_error[:, col].numpy()) < 0.7 * np.median(est.rel_error[:, col].numpy())
        assert np.median(rel_errors(better, cases)[:, col]) < np.median(err[:, col])


def test_empty_input() -> None:
    est = estimate_spectral_metrics_many([], ["nuclear_norm"])
    assert est.values.shape == (0, 1) and est.rel_error.shape == (0, 1) and est.bases == []


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"power_iters": 0}, "power_iters"),
        ({"probes": 1}, "probes"),
        ({"lanczos_steps": 0}, "lanczos_steps"),
        ({"seed": "zero"}, "seed"),
        ({"metrics": ["nuclear_norm", "nuc"]}, "metrics"),
        ({"metrics": []}, "metrics"),
        ({"warm_start": [None, None]}, "warm_start"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`") as info:
        estimate_spectral_metrics_many([torch.randn(10, 8)], **kwargs)  # type: ignore[arg-type]
    value = next(iter(kwargs.values()))
    if argument != "warm_start":
        assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_bad_matrices() -> None:
    with pytest.raises(ValueError, match=r"`matrices\[1\]` must be 2-D"):
        estimate_spectral_metrics_many([torch.randn(4, 4), torch.randn(2, 4, 4)])
    with pytest.raises(TypeError, match=r"`matrices\[0\]`"):
        estimate_spectral_metrics_many([torch.ones(4, 4, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"`warm_start\[0\]`"):
        estimate_spectral_metrics_many([torch.randn(4, 4)], warm_start=[np.eye(4)])  # type: ignore[list-item]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stays_on_device() -> None:
    mats = [matrix((200, 120), decaying("power_law", 120), seed=i).cuda() for i in range(3)]
    est = estimate_spectral_metrics_many(mats, **FAST)
    assert est.values.device.type == "cuda" and est.bases[0].device.type == "cuda"
    err = rel_errors(SpectralEstimate(est.values.cpu(), est.rel_error.cpu(), []), [m.cpu() for m in mats])
    assert (err[:, IDX["nuclear_norm"]] < 0.02).all()


@pytest.mark.benchmark
def test_real_minilm_gradients_meet_the_targets() -> None:
    """Median error on MiniLM-L6 fine-tuning gradients: <= 1% nuclear norm, <= 3% effective rank."""
    from reference import load_benchmark

    bench = load_benchmark("accuracy")
    steps = bench.minilm_gradients(2, seed=0)
    mats = [g for step in steps for g in step.values()]
    est = estimate_spectral_metrics_many(mats)
    exact = spectral_metrics_many(mats)
    rel = ((est.values - exact).abs() / exact).numpy()
    assert np.median(rel[:, IDX["nuclear_norm"]]) <= 0.01
    assert np.median(rel[:, IDX["effective_rank"]]) <= 0.03
