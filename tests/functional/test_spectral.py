"""Every spectral metric against its formula written out on numpy float64 singular values."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradspectra.functional import (
    METRIC_NAMES,
    effective_rank,
    frobenius_norm,
    metrics_from_singular_values,
    needs_spectrum,
    nuclear_norm,
    participation_ratio,
    singular_values,
    spectral_metrics,
    spectral_norm,
    stable_rank,
    top_sv_ratio,
)
from reference import (
    SHAPES,
    assert_metric_close,
    random_orthogonal,
    ref_metrics,
    ref_singular_values,
    spectra,
    to_numpy64,
    with_spectrum,
)

METHOD_LIST = ("svd", "gram", "auto")

FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "nuclear_norm": nuclear_norm,
    "spectral_norm": spectral_norm,
    "frobenius_norm": lambda a, method="auto": frobenius_norm(a),
    "stable_rank": stable_rank,
    "top_sv_ratio": top_sv_ratio,
    "effective_rank": effective_rank,
    "participation_ratio": participation_ratio,
}


def check_all(a: torch.Tensor, method: str, context: object = "") -> None:
    """``spectral_metrics`` and each single-metric function against the numpy reference of the same numbers."""
    want = ref_metrics(to_numpy64(a))
    got = spectral_metrics(a, method=method)  # type: ignore[arg-type]
    assert set(got) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert got[name].dtype == torch.float64
        assert got[name].shape == ()
        assert_metric_close(name, got[name].item(), want[name], context=(context, method, "spectral_metrics"))
        single = FUNCTIONS[name](a, method=method)
        assert_metric_close(name, single.item(), want[name], context=(context, method, "single"))


def test_metric_names_are_the_design_table() -> None:
    assert METRIC_NAMES == (
        "nuclear_norm",
        "spectral_norm",
        "frobenius_norm",
        "stable_rank",
        "top_sv_ratio",
        "effective_rank",
        "participation_ratio",
    )


@pytest.mark.parametrize("method", METHOD_LIST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_matrices(shape: tuple[int, int], dtype: torch.dtype, method: str) -> None:
    gen = torch.Generator().manual_seed(31 * shape[0] + shape[1])
    a = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    check_all(a, method, (shape, dtype))


@pytest.mark.parametrize("method", METHOD_LIST)
@pytest.mark.parametrize("kind", list(spectra(4)))
@pytest.mark.parametrize("shape", [(80, 24), (24, 80), (40, 40), (1, 30), (30, 1)])
def test_known_spectra(shape: tuple[int, int], kind: str, method: str) -> None:
    rng = np.random.default_rng([*shape, list(spectra(4)).index(kind)])
    a64 = with_spectrum(rng, *shape, spectra(min(shape))[kind])
    for dtype in (torch.float64, torch.float32):
        check_all(torch.from_numpy(a64).to(dtype), method, (shape, kind, dtype))


@pytest.mark.parametrize("method", METHOD_LIST)
@pytest.mark.parametrize("kind", ["geometric", "rank_deficient", "low_rank_plus_noise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e25, 1e-20])
def test_extreme_scales(scale: float, dtype: torch.dtype, kind: str, method: str) -> None:
    rng = np.random.default_rng(3)
    a = torch.from_numpy(with_spectrum(rng, 50, 20, spectra(20)[kind]) * scale).to(dtype)
    check_all(a, method, (scale, dtype, kind))


@pytest.mark.parametrize("method", METHOD_LIST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["geometric", "rank_deficient"])
def test_half_precision_inputs(kind: str, dtype: torch.dtype, method: str) -> None:
    rng = np.random.default_rng(4)
    a = torch.from_numpy(with_spectrum(rng, 64, 32, spectra(32)[kind])).to(dtype)
    check_all(a, method, (dtype, kind))


@pytest.mark.parametrize("method", METHOD_LIST)
@pytest.mark.parametrize("shape", [(4, 3), (1, 5), (5, 1)])
def test_zero_matrix_is_all_zero_never_nan(shape: tuple[int, int], method: str) -> None:
    z = torch.zeros(shape)
    out = spectral_metrics(z, method=method)  # type: ignore[arg-type]
    assert {k: v.item() for k, v in out.items()} == dict.fromkeys(METRIC_NAMES, 0.0)
    for name, fn in FUNCTIONS.items():
        assert fn(z, method=method).item() == 0.0, name


@pytest.mark.parametrize("method", METHOD_LIST)
def test_nan_entry(method: str) -> None:
    a = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    a[2, 1] = float("nan")
    out = spectral_metrics(a, method=method)  # type: ignore[arg-type]
    assert all(math.isnan(v.item()) for v in out.values()), out
    for name, fn in FUNCTIONS.items():
        assert math.isnan(fn(a, method=method).item()), name


@pytest.mark.parametrize("method", METHOD_LIST)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_inf_entry(sign: float, method: str) -> None:
    a = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    a[0, 0] = sign * float("inf")
    out = spectral_metrics(a, method=method)  # type: ignore[arg-type]
    assert out["frobenius_norm"].item() == float("inf")
    for name in METRIC_NAMES:
        if name != "frobenius_norm":
            assert math.isnan(out[name].item()), name
            assert math.isnan(FUNCTIONS[name](a, method=method).item()), name
    both = a.clone()
    both[1, 1] = float("nan")
    assert math.isnan(frobenius_norm(both).item())


@pytest.mark.parametrize("method", METHOD_LIST)
def test_batch_only_the_bad_matrix_is_nan(method: str) -> None:
    rng = np.random.default_rng(5)
    mats = [with_spectrum(rng, 12, 9, spec) for spec in spectra(9).values()]
    batch = torch.from_numpy(np.stack(mats)).float()
    batch[3, 4, 4] = float("nan")
    batch[4] = 0.0
    out = spectral_metrics(batch, method=method)  # type: ignore[arg-type]
    for name in METRIC_NAMES:
        assert out[name].shape == (6,)
        assert math.isnan(out[name][3].item())
        for i in (0, 1, 2, 4, 5):
            want = ref_metrics(to_numpy64(batch[i]))[name]
            assert_metric_close(name, out[name][i].item(), want, context=(method, i))
        # single functions agree
        single = FUNCTIONS[name](batch, method=method)
        torch.testing.assert_close(single, out[name], equal_nan=True, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("method", METHOD_LIST)
def test_batched_equals_per_matrix(method: str) -> None:
    rng = np.random.default_rng(6)
    mats = np.stack([with_spectrum(rng, 15, 10, spec) for spec in spectra(10).values()])
    batch = torch.from_numpy(mats).reshape(3, 2, 15, 10)
    out = spectral_metrics(batch, method=method)  # type: ignore[arg-type]
    for name in METRIC_NAMES:
        assert out[name].shape == (3, 2)
        for i in range(6):
            one = spectral_metrics(torch.from_numpy(mats[i]), method=method)[name]  # type: ignore[arg-type]
            torch.testing.assert_close(out[name].reshape(-1)[i], one, rtol=1e-12, atol=0.0)


def test_subset_of_metrics_and_frobenius_without_decomposition() -> None:
    a = torch.randn(9, 5, generator=torch.Generator().manual_seed(3))
    out = spectral_metrics(a, metrics=["effective_rank", "nuclear_norm"])
    assert list(out) == ["effective_rank", "nuclear_norm"]
    assert list(spectral_metrics(a, metrics="stable_rank")) == ["stable_rank"]
    fro = spectral_metrics(a, metrics=["frobenius_norm"])
    assert list(fro) == ["frobenius_norm"]
    assert_metric_close("frobenius_norm", fro["frobenius_norm"].item(), float(np.linalg.norm(to_numpy64(a))))
    assert not needs_spectrum(["frobenius_norm"])
    assert needs_spectrum(["frobenius_norm", "spectral_norm"])
    assert needs_spectrum(None)


def test_metrics_from_singular_values() -> None:
    rng = np.random.default_rng(7)
    a = with_spectrum(rng, 30, 12, spectra(12)["geometric"])
    want = ref_metrics(a)
    s = singular_values(torch.from_numpy(a))
    # without a Frobenius norm from the entries it comes from the singular values
    for given_fro in (None, torch.tensor(want["frobenius_norm"], dtype=torch.float64)):
        out = metrics_from_singular_values(s, given_fro)
        for name in METRIC_NAMES:
            assert_metric_close(name, out[name].item(), want[name], context=given_fro)
    # overflow-free: singular values near the float64 limit
    big = metrics_from_singular_values(torch.tensor([3e200, 4e200], dtype=torch.float64).sort(descending=True).values)
    assert_metric_close("frobenius_norm", big["frobenius_norm"].item(), 5e200)
    assert_metric_close("stable_rank", big["stable_rank"].item(), 25 / 16)
    nan = metrics_from_singular_values(torch.tensor([[2.0, 1.0], [float("nan")] * 2]))
    for name in METRIC_NAMES:
        assert not math.isnan(nan[name][0].item())
    assert math.isnan(nan["effective_rank"][1].item())


# --- known values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_effective_rank_of_identity_is_n(n: int) -> None:
    for method in METHOD_LIST:
        assert effective_rank(torch.eye(n), method=method).item() == pytest.approx(n, rel=1e-12)  # type: ignore[arg-type]
        assert top_sv_ratio(torch.eye(n), method=method).item() == pytest.approx(1 / n, rel=1e-12)  # type: ignore[arg-type]
        assert stable_rank(torch.eye(n), method=method).item() == pytest.approx(n, rel=1e-12)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (1, 9), (9, 1)])
def test_rank_one_has_effective_rank_one(shape: tuple[int, int]) -> None:
    # float64: an fp32 outer product is rank one only up to rounding (its other s_i are ~1e-7 s_1)
    gen = torch.Generator().manual_seed(4)
    f64 = torch.float64
    a = torch.randn(shape[0], 1, generator=gen, dtype=f64) @ torch.randn(1, shape[1], generator=gen, dtype=f64)
    for method in METHOD_LIST:
        out = spectral_metrics(a, method=method)  # type: ignore[arg-type]
        assert out["effective_rank"].item() == pytest.approx(1.0, rel=1e-6)
        assert out["top_sv_ratio"].item() == pytest.approx(1.0, rel=1e-6)
        assert out["stable_rank"].item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("r", [1, 3, 16])
def test_flat_spectrum_ratio_is_one_over_r(r: int) -> None:
    rng = np.random.default_rng(r)
    a = torch.from_numpy(with_spectrum(rng, 40, 32, np.full(r, 2.5)))
    for method in METHOD_LIST:
        out = spectral_metrics(a, method=method)  # type: ignore[arg-type]
        assert out["top_sv_ratio"].item() == pytest.approx(1 / r, rel=1e-6)
        assert out["effective_rank"].item() == pytest.approx(r, rel=1e-6)
        assert out["stable_rank"].item() == pytest.approx(r, rel=1e-6)


def test_effective_rank_drops_zero_terms() -> None:
    # p = (1/2, 1/4, 1/4, 0): entropy ln 2 / 2 + 2 * ln 4 / 4 = 1.5 ln 2, erank 2^1.5
    a = torch.diag(torch.tensor([2.0, 1.0, 1.0, 0.0]))
    assert effective_rank(a).item() == pytest.approx(2**1.5, rel=1e-12)


# --- properties -----------------------------------------------------------------------------------

dims = st.integers(min_value=1, max_value=12)
PROPERTY_SETTINGS = settings(max_examples=30, deadline=None)


def _matrix(seed: int, m: int, n: int, decay: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = min(m, n)
    return with_spectrum(rng, m, n, decay ** np.arange(r))


def _all_metrics(a: np.ndarray, method: str = "auto") -> dict[str, float]:
    return {k: v.item() for k, v in spectral_metrics(torch.from_numpy(a), method=method).items()}  # type: ignore[arg-type]


@PROPERTY_SETTINGS
@given(m=dims, n=dims, seed=st.integers(0, 2**31), decay=st.floats(0.05, 1.0), method=st.sampled_from(METHOD_LIST))
def test_orthogonal_invariance(m: int, n: int, seed: int, decay: float, method: str) -> None:
    rng = np.random.default_rng(seed + 1)
    a = _matrix(seed, m, n, decay)
    b = random_orthogonal(rng, m, m) @ a @ random_orthogonal(rng, n, n)
    ma, mb = _all_metrics(a, method), _all_metrics(b, method)
    for name in METRIC_NAMES:
        assert_metric_close(name, mb[name], ma[name], context="Q1 A Q2")


@PROPERTY_SETTINGS
@given(
    m=dims,
    n=dims,
    seed=st.integers(0, 2**31),
    decay=st.floats(0.05, 1.0),
    c=st.floats(1e-30, 1e30).flatmap(lambda x: st.sampled_from([x, -x])),
)
def test_scaling(m: int, n: int, seed: int, decay: float, c: float) -> None:
    a = _matrix(seed, m, n, decay)
    ma, mc = _all_metrics(a), _all_metrics(c * a)
    for name in ("nuclear_norm", "spectral_norm", "frobenius_norm"):
        assert_metric_close(name, mc[name], abs(c) * ma[name], context=c)
    for name in ("stable_rank", "top_sv_ratio", "effective_rank"):
        assert_metric_close(name, mc[name], ma[name], context=c)


@PROPERTY_SETTINGS
@given(m=dims, n=dims, seed=st.integers(0, 2**31), decay=st.floats(0.05, 1.0), method=st.sampled_from(METHOD_LIST))
def test_transpose_invariance(m: int, n: int, seed: int, decay: float, method: str) -> None:
    a = _matrix(seed, m, n, decay)
    ma, mt = _all_metrics(a, method), _all_metrics(np.ascontiguousarray(a.T), method)
    for name in METRIC_NAMES:
        assert_metric_close(name, mt[name], ma[name], context="transpose")


@PROPERTY_SETTINGS
@given(m=dims, n=dims, seed=st.integers(0, 2**31), rank=st.integers(1, 12))
def test_stable_rank_and_effective_rank_bounds(m: int, n: int, seed: int, rank: int) -> None:
    rng = np.random.default_rng(seed)
    r = min(m, n, rank)
    a = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    out = _all_metrics(a)
    true_rank = int(np.sum(ref_singular_values(a) > 1e-10 * np.abs(a).max()))
    slack = 1e-9
    assert 1 - slack <= out["stable_rank"] <= true_rank * (1 + slack)
    assert 1 - slack <= out["effective_rank"] <= true_rank * (1 + slack)
    assert 1 / true_rank * (1 - slack) <= out["top_sv_ratio"] <= 1 + slack


# --- errors ---------------------------------------------------------------------------------------


def test_errors_name_the_argument() -> None:
    a = torch.eye(3)
    with pytest.raises(ValueError, match=r"`metrics` can be any of nuclear_norm, .*got \['rank'\]"):
        spectral_metrics(a, metrics=["rank"])
    with pytest.raises(ValueError, match="`metrics` can be any of"):
        spectral_metrics(a, metrics=[])
    with pytest.raises(ValueError, match="`metrics` can be any of"):
        metrics_from_singular_values(torch.ones(3), metrics=["nuclear"])
    for metrics in (None, ["frobenius_norm"]):
        with pytest.raises(ValueError, match="`method` can be auto, svd, gram, got 'fast'"):
            spectral_metrics(a, metrics=metrics, method="fast")  # type: ignore[arg-type]
    for fn in FUNCTIONS.values():
        with pytest.raises(TypeError, match=r"`matrix` must be a torch\.Tensor, got ndarray"):
            fn(np.eye(3))
        with pytest.raises(ValueError, match="`matrix` must have at least 2 dimensions"):
            fn(torch.ones(4))
    with pytest.raises(ValueError, match="`method` can be"):
        nuclear_norm(a, method="lanczos")  # type: ignore[arg-type]
