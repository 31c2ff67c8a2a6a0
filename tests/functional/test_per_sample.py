"""Per-sample spectra and inner products from the factors against forming every sample's gradient in numpy float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradspectra.functional import (
    METRIC_NAMES,
    carrying_tokens,
    compact_tokens,
    per_sample_cosines,
    per_sample_inner_products,
    per_sample_metrics,
    per_sample_singular_values,
    per_sample_sketches,
    per_sample_token_similarity,
    sketch_projections,
)
from reference import assert_metric_close, random_orthogonal, ref_metrics, ref_singular_values


def per_sample_gradients(delta: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """``(B, m, n)``: every sample's gradient, formed in float64 the slow way."""
    return np.stack([d.T @ x for d, x in zip(delta.astype(np.float64), inputs.astype(np.float64), strict=True)])


@pytest.mark.parametrize(("b", "t", "m", "n"), [(4, 5, 12, 9), (3, 20, 8, 6), (2, 1, 7, 7), (5, 7, 3, 30)])
def test_singular_values_and_metrics_match_forming_each_gradient(b: int, t: int, m: int, n: int) -> None:
    rng = np.random.default_rng(b * 100 + t)
    delta, inputs = rng.standard_normal((b, t, m)), rng.standard_normal((b, t, n))
    got_s = per_sample_singular_values(torch.from_numpy(delta).float(), torch.from_numpy(inputs).float())
    got = per_sample_metrics(torch.from_numpy(delta).float(), torch.from_numpy(inputs).float())
    grads = per_sample_gradients(delta.astype(np.float32), inputs.astype(np.float32))
    assert got_s.shape == (b, min(m, n)) and got_s.dtype == torch.float64
    for i, g in enumerate(grads):
        want_s = ref_singular_values(g)
        np.testing.assert_allclose(got_s[i].numpy(), want_s, rtol=1e-6, atol=1e-9 * want_s.sum())
        want = ref_metrics(g)
        for name in METRIC_NAMES:
            assert_metric_close(name, float(got[name][i]), want[name], context=(i, b, t, m, n))


def test_known_per_sample_spectra_are_recovered() -> None:
    # sample i's gradient is U diag(s_i) V^T with a chosen spectrum: delta = (U diag(s))^T, inputs = V^T
    rng = np.random.default_rng(3)
    m, n, r = 16, 12, 5
    spectra = [np.array([9.0, 4.0, 1.0, 1e-3, 0.0]), np.full(5, 2.0), np.array([1e6, 0, 0, 0, 0]), np.zeros(5)]
    delta = np.stack([(random_orthogonal(rng, m, r) * s).T for s in spectra])  # T = r tokens
    inputs = np.stack([random_orthogonal(rng, n, r).T for _ in spectra])
    s = per_sample_singular_values(torch.from_numpy(delta), torch.from_numpy(inputs))
    for i, want in enumerate(spectra):
        np.testing.assert_allclose(s[i, :r].numpy(), np.sort(want)[::-1], rtol=1e-9, atol=1e-9 * max(want.sum(), 1))
        assert bool((s[i, r:] == 0).all())
    metrics = per_sample_metrics(torch.from_numpy(delta), torch.from_numpy(inputs))
    assert float(metrics["effective_rank"][1]) == pytest.approx(5.0, rel=1e-9)  # flat spectrum: full rank
    assert float(metrics["effective_rank"][2]) == pytest.approx(1.0, rel=1e-9)
    assert float(metrics["nuclear_norm"][3]) == 0.0 and float(metrics["effective_rank"][3]) == 0.0


def test_samples_of_different_lengths_are_compacted_without_changing_anything() -> None:
    rng = np.random.default_rng(8)
    d, x = rng.standard_normal((3, 9, 7)), rng.standard_normal((3, 9, 5))
    lengths = [9, 4, 1]
    for i, n in enumerate(lengths):
        d[i, n:] = 0.0  # padding: no output gradient, but inputs that are not zero
    order = rng.permutation(9)  # carrying tokens anywhere in the sample, not only first
    d, x = d[:, order], x[:, order]
    cd, cx = compact_tokens(torch.from_numpy(d), torch.from_numpy(x))
    assert cd.shape == (3, 9, 7)  # the longest sample carries all 9
    cd, cx = compact_tokens(torch.from_numpy(d[1:]), torch.from_numpy(x[1:]))
    assert cd.shape == (2, 4, 7) and cx.shape == (2, 4, 5)
    assert bool((cx[1, 1:] == 0).all()) and bool((cd[1, 1:] == 0).all())  # a shorter sample's filler rows
    want = per_sample_gradients(d[1:], x[1:])
    got = per_sample_gradients(cd.numpy(), cx.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        per_sample_singular_values(torch.from_numpy(d), torch.from_numpy(x)).numpy()[:, :5],
        np.stack([ref_singular_values(g) for g in per_sample_gradients(d, x)]),
        rtol=1e-9,
        atol=1e-12,
    )


def test_padding_rows_change_nothing() -> None:
    rng = np.random.default_rng(5)
    d, x = rng.standard_normal((3, 6, 10)), rng.standard_normal((3, 6, 8))
    padded_d = np.concatenate([d, np.zeros((3, 4, 10))], axis=1)  # padding carries no output gradient
    padded_x = np.concatenate([x, rng.standard_normal((3, 4, 8))], axis=1)  # but does have inputs
    a = per_sample_metrics(torch.from_numpy(d), torch.from_numpy(x))
    b = per_sample_metrics(torch.from_numpy(padded_d), torch.from_numpy(padded_x))
    for name in METRIC_NAMES:
        np.testing.assert_allclose(b[name].numpy(), a[name].numpy(), rtol=1e-9)
    assert carrying_tokens(torch.from_numpy(padded_d)).sum(1).tolist() == [6, 6, 6]
    np.testing.assert_allclose(
        per_sample_inner_products(torch.from_numpy(padded_d), torch.from_numpy(padded_x)).numpy(),
        per_sample_inner_products(torch.from_numpy(d), torch.from_numpy(x)).numpy(),
        rtol=1e-12,
    )


@pytest.mark.parametrize("shape", [(5, 1, 4, 3), (4, 9, 6, 7), (3, 2, 3, 5)])
def test_inner_products_and_cosines_match_flattened_gradients(shape: tuple[int, int, int, int]) -> None:
    b, t, m, n = shape
    rng = np.random.default_rng(sum(shape))
    d, x = rng.standard_normal((b, t, m)), rng.standard_normal((b, t, n))
    d[1] = d[0] * 3.0  # sample 1 has sample 0's gradient, three times larger: cosine 1
    x[1] = x[0]
    flat = per_sample_gradients(d, x).reshape(b, -1)
    want = flat @ flat.T
    got = per_sample_inner_products(torch.from_numpy(d), torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    norms = np.linalg.norm(flat, axis=1)
    cos = per_sample_cosines(torch.from_numpy(d), torch.from_numpy(x))
    np.testing.assert_allclose(cos.numpy(), want / np.outer(norms, norms), rtol=1e-9, atol=1e-12)
    assert float(cos[0, 1]) == pytest.approx(1.0, abs=1e-12)


def test_two_dimensional_inputs_are_one_token_per_sample() -> None:
    rng = np.random.default_rng(1)
    d, x = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    s = per_sample_singular_values(torch.from_numpy(d), torch.from_numpy(x))
    want = np.linalg.norm(d, axis=1) * np.linalg.norm(x, axis=1)  # rank one: s_1 = |d| |x|
    np.testing.assert_allclose(s[:, 0].numpy(), want, rtol=1e-12)
    assert bool((s[:, 1:] == 0).all())


@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1e8, 1e30])
def test_extreme_magnitudes(scale: float) -> None:
    rng = np.random.default_rng(2)
    d, x = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 4, 5))
    base = per_sample_metrics(torch.from_numpy(d), torch.from_numpy(x))
    big = per_sample_metrics(torch.from_numpy(d * scale), torch.from_numpy(x * scale))
    for name in ("effective_rank", "stable_rank", "top_sv_ratio", "participation_ratio"):
        np.testing.assert_allclose(big[name].numpy(), base[name].numpy(), rtol=1e-9)
    np.testing.assert_allclose(big["nuclear_norm"].numpy(), base["nuclear_norm"].numpy() * scale**2, rtol=1e-9)
    gram = per_sample_inner_products(torch.from_numpy(d * scale), torch.from_numpy(x * scale))
    assert bool(torch.isfinite(gram).all())
    np.testing.assert_allclose(
        per_sample_cosines(torch.from_numpy(d * scale), torch.from_numpy(x * scale)).numpy(),
        per_sample_cosines(torch.from_numpy(d), torch.from_numpy(x)).numpy(),
        rtol=1e-9,
        atol=1e-12,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_factors_are_measured_in_float64(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    d, x = torch.randn(3, 5, 8, generator=gen).to(dtype), torch.randn(3, 5, 6, generator=gen).to(dtype)
    got = per_sample_metrics(d, x)
    grads = per_sample_gradients(d.double().numpy(), x.double().numpy())
    for i, g in enumerate(grads):
        want = ref_metrics(g)
        for name in METRIC_NAMES:
            assert_metric_close(name, float(got[name][i]), want[name], context=(dtype, i))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_sample_is_nan_and_others_are_kept(bad: float) -> None:
    gen = torch.Generator().manual_seed(1)
    d, x = torch.randn(3, 4, 6, generator=gen), torch.randn(3, 4, 5, generator=gen)
    clean = per_sample_metrics(d, x)
    d[1, 2, 3] = bad
    got = per_sample_metrics(d, x)
    assert bool(torch.isnan(got["nuclear_norm"][1])) and bool(torch.isnan(got["effective_rank"][1]))
    for name in METRIC_NAMES:
        np.testing.assert_allclose(got[name][[0, 2]].numpy(), clean[name][[0, 2]].numpy(), rtol=1e-12)


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`delta` and `inputs` must have the same samples and tokens"):
        per_sample_metrics(torch.zeros(3, 4, 5), torch.zeros(3, 5, 5))
    with pytest.raises(TypeError, match=r"`inputs` must be a torch\.Tensor"):
        per_sample_singular_values(torch.zeros(3, 4), [[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`delta` must have at least 2 dimensions"):
        per_sample_inner_products(torch.zeros(3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="`metrics` can be any of"):
        per_sample_metrics(torch.zeros(2, 3), torch.zeros(2, 3), metrics=["nuc"])


def test_sketches_are_unbiased_and_identical_for_identical_gradients() -> None:
    rng = np.random.default_rng(7)
    d, x = rng.standard_normal((4, 6, 20)), rng.standard_normal((4, 6, 15))
    d[3], x[3] = d[0], x[0]
    flat = per_sample_gradients(d, x).reshape(4, -1)
    want = flat @ flat.T
    total = np.zeros((4, 4))
    draws = 400
    for seed in range(draws):
        sk = per_sample_sketches(torch.from_numpy(d), torch.from_numpy(x), sketch_projections(20, 15, 8, seed))
        assert sk.shape == (4, 64) and sk.dtype == torch.float64
        assert bool(torch.equal(sk[0], sk[3]))  # identical gradients, identical sketches
        total += (sk @ sk.T).numpy()
    # the mean over draws approaches the exact inner products (a few standard errors of 400 draws)
    np.testing.assert_allclose(total / draws, want, atol=0.15 * np.abs(np.diag(want)).max())
    psi, omega = sketch_projections(20, 15, 8, seed=3)
    again = sketch_projections(20, 15, 8, seed=3)
    assert bool(torch.equal(psi, again[0])) and bool(torch.equal(omega, again[1]))
    with pytest.raises(ValueError, match="`size` must be a positive int, got 0"):
        sketch_projections(20, 15, 0)
    with pytest.raises(ValueError, match=r"`projections` must be \(20, k\) and \(15, k\)"):
        per_sample_sketches(torch.from_numpy(d), torch.from_numpy(x), sketch_projections(15, 20, 8))


def test_token_similarity_finds_copies_of_a_text_whatever_the_dropout() -> None:
    gen = torch.Generator().manual_seed(4)
    b, t, n = 8, 10, 32
    position = torch.randn(t, n, generator=gen)  # a part common to every sample at a position
    x = position + 2.0 * torch.randn(b, t, n, generator=gen)
    x[5] = x[2]
    keep = (torch.rand(b, t, n, generator=gen) > 0.1).double() / 0.9  # dropout on every copy
    carries = torch.ones(b, t, dtype=torch.bool)
    carries[6, 7:] = False  # a shorter sample
    sim = per_sample_token_similarity(x * keep, carries)
    assert sim.shape == (b, b) and sim.dtype == torch.float64
    assert float(sim[2, 5]) > 0.8
    off = sim.clone()
    off[2, 5] = off[5, 2] = 0.0
    off.fill_diagonal_(0.0)
    assert float(off.abs().max()) < 0.4  # the position's common part does not make texts alike
    assert float(sim[6, 6]) == pytest.approx(7 / 7, rel=1e-9)  # its own 7 tokens over the longer of 7 and 7
    # the same text cut to half its length: at most half as similar
    y = x.clone()
    y[5] = x[2]
    cut = carries.clone()
    cut[5, 5:] = False
    assert float(per_sample_token_similarity(y, cut)[2, 5]) <= 0.5 + 1e-9
    with pytest.raises(ValueError, match=r"`carries` must have shape \(8, 10\)"):
        per_sample_token_similarity(x, carries[:, :5])
