"""Singular values by every route, and the factored route, against numpy float64 SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradspectra.functional.svd as svd_module
from gradspectra.functional import METHODS, factored_singular_values, singular_values
from reference import SHAPES, random_orthogonal, ref_singular_values, spectra, to_numpy64, with_spectrum

METHOD_LIST = ("svd", "gram", "auto")


def assert_sv_close(got: torch.Tensor, want: np.ndarray, context: object = "") -> None:
    """Each value to 1e-6 relative, or to 1e-9 of the nuclear norm for values near zero.

    The absolute floor is what "exact" can mean for a zero singular value: float64 SVD itself
    returns about eps * s_1 there, and the Gram route promises 1e-9 of the nuclear norm in total.
    """
    assert got.dtype == torch.float64
    g = got.numpy()
    assert g.shape == want.shape, context
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-9 * float(want.sum()), err_msg=str(context))


def test_methods_are_the_documented_ones() -> None:
    assert set(METHODS) == {"auto", "svd", "gram"}


@pytest.mark.parametrize("method", METHOD_LIST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_matrices_match_numpy(shape: tuple[int, int], dtype: torch.dtype, method: str) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    s = singular_values(a, method)  # type: ignore[arg-type]
    assert s.shape == (min(shape),)
    assert bool((s[:-1] >= s[1:]).all()), "not descending"
    assert_sv_close(s, ref_singular_values(to_numpy64(a)), (shape, dtype, method))


@pytest.mark.parametrize("method", METHOD_LIST)
@pytest.mark.parametrize("kind", list(spectra(8)))
@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 48)])
def test_known_spectra_are_recovered(shape: tuple[int, int], kind: str, method: str) -> None:
    rng = np.random.default_rng([*shape, list(spectra(8)).index(kind)])
    r = min(shape)
    s_true = spectra(r)[kind]
    a = with_spectrum(rng, *shape, s_true)
    s = singular_values(torch.from_numpy(a), method)  # type: ignore[arg-type]
    # the constructed spectrum itself, not only numpy's answer, up to float64 rounding of U diag(s) V^T
    np.testing.assert_allclose(s.numpy(), s_true, rtol=1e-6, atol=1e-9 * s_true.sum())
    # and in fp32: the float64 value of the rounded numbers
    a32 = torch.from_numpy(a).float()
    assert_sv_close(singular_values(a32, method), ref_singular_values(to_numpy64(a32)), (shape, kind))  # type: ignore[arg-type]


@pytest.mark.parametrize("method", METHOD_LIST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e25, 1e-20])
def test_extreme_scales(scale: float, dtype: torch.dtype, method: str) -> None:
    rng = np.random.default_rng(7)
    a = torch.from_numpy(with_spectrum(rng, 60, 20, spectra(20)["geometric"]) * scale).to(dtype)
    s = singular_values(a, method)  # type: ignore[arg-type]
    assert bool(torch.isfinite(s).all())
    assert_sv_close(s, ref_singular_values(to_numpy64(a)), (scale, dtype, method))


@pytest.mark.parametrize("method", METHOD_LIST)
@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_float64_beyond_squaring_range(scale: float, method: str) -> None:
    # s_i^2 overflows (1e400) or underflows (1e-400) in float64: only rescaling saves the Gram route
    rng = np.random.default_rng(8)
    base = with_spectrum(rng, 30, 10, spectra(10)["steep_geometric"])
    s = singular_values(torch.from_numpy(base * scale), method)  # type: ignore[arg-type]
    np.testing.assert_allclose(s.numpy() / scale, ref_singular_values(base), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("method", METHOD_LIST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_measured_in_float64(dtype: torch.dtype, method: str) -> None:
    rng = np.random.default_rng(9)
    a = torch.from_numpy(with_spectrum(rng, 48, 24, spectra(24)["geometric"])).to(dtype)
    s = singular_values(a, method)  # type: ignore[arg-type]
    assert s.dtype == torch.float64
    assert_sv_close(s, ref_singular_values(to_numpy64(a)), (dtype, method))
    # the half-precision SVD would be far off: this is what upcasting buys (bf16 keeps 8 bits)
    if dtype == torch.bfloat16:
        naive = torch.linalg.svdvals(a.float()).to(dtype).double()
        assert not np.allclose(naive.numpy(), ref_singular_values(to_numpy64(a)), rtol=1e-6)


@pytest.mark.parametrize("method", METHOD_LIST)
def test_zero_matrix_has_zero_singular_values(method: str) -> None:
    s = singular_values(torch.zeros(5, 3), method)  # type: ignore[arg-type]
    assert s.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("method", METHOD_LIST)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_entries_give_nan_without_raising(bad: float, method: str) -> None:
    a = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(0))
    a[1, 2, 3] = bad
    s = singular_values(a, method)  # type: ignore[arg-type]
    assert bool(s[1].isnan().all())
    for i in (0, 2):
        assert_sv_close(s[i], ref_singular_values(to_numpy64(a[i])), (bad, method, i))


@pytest.mark.parametrize("method", METHOD_LIST)
def test_batched_equals_per_matrix(method: str) -> None:
    rng = np.random.default_rng(10)
    mats = [with_spectrum(rng, 20, 12, spec) for spec in spectra(12).values()]
    stacked = torch.from_numpy(np.stack(mats)).reshape(2, 3, 20, 12)
    s = singular_values(stacked, method)  # type: ignore[arg-type]
    assert s.shape == (2, 3, 12)
    flat = s.reshape(6, 12)
    for i, m in enumerate(mats):
        assert_sv_close(flat[i], ref_singular_values(m), (method, i))
        # same answer as one call per matrix
        torch.testing.assert_close(flat[i], singular_values(torch.from_numpy(m), method), rtol=1e-12, atol=1e-14)  # type: ignore[arg-type]


class _CountingSvd:
    """Stands in for the private svdvals route to see whether the Gram route handed a matrix over."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.linalg.svdvals(a)


def test_gram_route_falls_back_where_float64_gram_is_not_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # rank one of 200: a Gram route turns each zero singular value into about sqrt(eps) * s_1,
    # which moves the effective rank (entropy weighs tiny p_i by ln p_i) far beyond 1e-6
    rng = np.random.default_rng(11)
    s_true = np.concatenate([[1.0], np.zeros(199)])
    a = with_spectrum(rng, 300, 200, s_true)
    naive = np.sqrt(np.clip(np.linalg.eigvalsh(a.T @ a), 0, None))
    p = naive[naive > 0] / naive.sum()
    naive_erank = np.exp(-np.sum(p * np.log(p)))
    assert naive_erank - 1.0 > 1e-6, "the case must be one that a plain float64 Gram route gets wrong"
    counting = _CountingSvd()
    monkeypatch.setattr(svd_module, "_svd_route", counting)
    s = singular_values(torch.from_numpy(a), "gram")
    assert counting.calls == 1
    assert abs(float(s.sum()) - 1.0) <= 1e-9
    assert float(s[1:].sum()) <= 1e-9


@pytest.mark.parametrize("shape", [(600, 150), (150, 600), (800, 200)])
def test_gram_route_keeps_well_conditioned_gradients(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    # a decaying top spectrum over a noise floor 100x lower, the shape of an MLP weight's gradient:
    # the Gram answer is exact to far below 1e-6 here, so paying for svdvals as well would be waste
    rng = np.random.default_rng(shape)
    r = min(shape)
    spectrum = np.maximum(0.8 ** np.arange(r), np.geomspace(1e-2, 5e-4, r))
    a = torch.from_numpy(with_spectrum(rng, *shape, spectrum)).float()
    counting = _CountingSvd()
    monkeypatch.setattr(svd_module, "_svd_route", counting)
    s = singular_values(a, "gram")
    assert counting.calls == 0
    assert_sv_close(s, ref_singular_values(to_numpy64(a)), shape)


def test_empty_matrices() -> None:
    for method in METHOD_LIST:
        assert singular_values(torch.zeros(0, 4), method).shape == (0,)  # type: ignore[arg-type]
        assert singular_values(torch.zeros(2, 3, 0), method).shape == (2, 0)  # type: ignore[arg-type]
        assert singular_values(torch.zeros(0, 3, 4), method).shape == (0, 3)  # type: ignore[arg-type]


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`method` can be auto, svd, gram, got 'qr'"):
        singular_values(torch.eye(3), "qr")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`matrix` must be a torch\.Tensor, got list"):
        singular_values([[1.0, 0.0], [0.0, 1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`matrix` must have at least 2 dimensions .* got shape \(3,\)"):
        singular_values(torch.ones(3))
    with pytest.raises(TypeError, match=r"`matrix` must be a real floating point tensor, got dtype torch\.int64"):
        singular_values(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="`matrix` must be a real floating point tensor"):
        singular_values(torch.ones(3, 3, dtype=torch.complex64))


# --- factored route: G = delta^T @ x, never formed -------------------------------------------------


def _factors(rng: np.random.Generator, tokens: int, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # token-correlated factors with decaying scales, like real output gradients and activations
    delta = rng.standard_normal((tokens, m)) * (0.9 ** np.arange(m))
    x = rng.standard_normal((tokens, n)) @ random_orthogonal(rng, n, n) * 3.0
    return torch.from_numpy(delta), torch.from_numpy(x)


@pytest.mark.parametrize(("tokens", "m", "n"), [(8, 40, 30), (30, 40, 30), (64, 24, 16), (1, 10, 12), (5, 1, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_factored_matches_forming_the_gradient(tokens: int, m: int, n: int, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(tokens * 1000 + m + n)
    d, x = _factors(rng, tokens, m, n)
    d, x = d.to(dtype), x.to(dtype)
    g = to_numpy64(d).T @ to_numpy64(x)
    s = factored_singular_values(d, x)
    assert s.shape == (min(m, n),)
    assert_sv_close(s, ref_singular_values(g), (tokens, m, n, dtype))


def test_factored_batched_scaled_and_non_finite() -> None:
    rng = np.random.default_rng(12)
    pairs = [_factors(rng, 6, 20, 14) for _ in range(3)]
    d = torch.stack([p[0] for p in pairs]) * 1e20
    x = torch.stack([p[1] for p in pairs]) * 1e-25
    d[2, 0, 0] = float("nan")
    s = factored_singular_values(d, x)
    assert s.shape == (3, 14)
    for i in range(2):
        assert_sv_close(s[i], ref_singular_values(to_numpy64(d[i]).T @ to_numpy64(x[i])), i)
    assert bool(s[2].isnan().all())


def test_factored_errors_name_the_arguments() -> None:
    with pytest.raises(ValueError, match="`delta` and `inputs` must have the same number of tokens, got 3 and 4"):
        factored_singular_values(torch.ones(3, 5), torch.ones(4, 5))
    with pytest.raises(ValueError, match="`delta` must have at least 2 dimensions"):
        factored_singular_values(torch.ones(5), torch.ones(4, 5))
    with pytest.raises(TypeError, match=r"`inputs` must be a torch\.Tensor"):
        factored_singular_values(torch.ones(4, 5), np.ones((4, 5)))  # type: ignore[arg-type]
