"""The one-read Frobenius norm: rows of very different magnitudes in one matrix, every input dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradspectra.functional import frobenius_norm, spectral_metrics


def _rows(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 40, generator=g, dtype=torch.float64)
    a[1] *= 1e-20  # squares subnormal in float32
    a[2] = 0.0  # a dead unit
    a[3] *= 1e18  # squares near float32 overflow
    a[4, :3] = torch.tensor([1e-30, 3e-25, 2e15], dtype=torch.float64)
    return a.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_mixed_magnitude_rows_match_numpy_float64(dtype: torch.dtype) -> None:
    a = _rows(dtype)
    if dtype == torch.float16:
        a = torch.where(a.abs() < 6e4, a, torch.zeros((), dtype=a.dtype))  # fp16 cannot hold 1e18
    want = float(np.linalg.norm(a.to(torch.float64).numpy()))
    got = float(frobenius_norm(a))
    assert abs(got - want) <= 1e-6 * want
    assert float(spectral_metrics(a, ["frobenius_norm"])["frobenius_norm"]) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_entries_say_what_they_are(bad: float) -> None:
    a = _rows(torch.float32)
    a[0, 0] = bad
    got = float(frobenius_norm(a))
    assert np.isnan(got) if np.isnan(bad) else got == float("inf")


def test_batch_of_matrices_one_call() -> None:
    a = torch.stack([_rows(torch.float32), _rows(torch.float32) * 2])
    want = [float(np.linalg.norm(m.to(torch.float64).numpy())) for m in a]
    got = frobenius_norm(a)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_many_norms_of_mixed_shapes_and_magnitudes_match_numpy() -> None:
    from gradspectra.functional import frobenius_norms

    mats = [
        _rows(torch.float32),
        _rows(torch.float64).T.contiguous(),
        torch.ones(3, 5),
        torch.zeros(2, 2),
        torch.full((2, 3), float("nan")),
        _rows(torch.bfloat16)[:3, :3],
    ]
    got = frobenius_norms(mats)
    assert got.dtype == torch.float64 and got.shape == (len(mats),)
    for g, m in zip(got.tolist(), mats, strict=True):
        want = float(np.linalg.norm(m.to(torch.float64).numpy()))
        if np.isnan(want):
            assert np.isnan(g)
        else:
            assert abs(g - want) <= 1e-6 * want
    assert frobenius_norms([]).shape == (0,)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-12, 1e-6, 1.0, 1e6, 1e14, 1e18, 1e25])
def test_fused_float32_norms_match_numpy_at_every_magnitude(scale: float) -> None:
    """frobenius_norms reads float32 matrices in one fused call; what leaves its safe range is redone."""
    from gradspectra.functional import frobenius_norms

    g = torch.Generator().manual_seed(1)
    shapes = [(16, 16), (16, 16), (32, 16), (16, 32), (200, 64), (3, 5)]
    mats = [(torch.randn(*s, generator=g, dtype=torch.float64) * scale).float() for s in shapes]
    mats[1][0, 0] = float(mats[1][0, 0]) * 1e6  # one entry far above the rest
    mats.append(torch.zeros(4, 4))
    mats.append(torch.randn(8, 8, generator=g).T)  # a non-contiguous view, as a Conv1D gradient is
    got = frobenius_norms(mats).tolist()
    for value, m in zip(got, mats, strict=True):
        want = float(np.linalg.norm(m.to(torch.float64).numpy()))
        assert abs(value - want) <= 1e-6 * want, (scale, m.shape, value, want)


def test_the_common_case_one_fused_read_matches_numpy() -> None:
    """Every matrix a float32 2-D gradient on one device, every norm in range: the fused route alone, float64 out;
    NaN entries give NaN there, and an infinite entry or a matrix of another kind takes the checked routes."""
    from gradspectra.functional import frobenius_norms

    g = torch.Generator().manual_seed(2)
    mats = [torch.randn(*s, generator=g) for s in [(128, 128), (256, 128), (1000, 128), (7, 3)]]
    mats.append(torch.randn(5, 9, generator=g)[:, ::2])  # a strided view
    want = [float(np.linalg.norm(m.to(torch.float64).numpy())) for m in mats]
    got = frobenius_norms(mats)
    assert got.dtype == torch.float64 and got.device == mats[0].device
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    with_nan = [m.detach().clone() for m in mats]
    with_nan[1][3, 4] = float("nan")
    got = frobenius_norms(with_nan).numpy()
    assert np.isnan(got[1]) and np.allclose(np.delete(got, 1), np.delete(want, 1), rtol=1e-6)
    with_inf = [m.detach().clone() for m in mats]
    with_inf[2][0, 0] = float("inf")
    got = frobenius_norms(with_inf).numpy()
    assert got[2] == float("inf") and np.allclose(np.delete(got, 2), np.delete(want, 2), rtol=1e-6)
    # a 3-D float32 block among them and a float64 matrix: the general routes, the same values
    mixed = [*mats[:2], mats[2].reshape(10, 100, 128), mats[3].double()]
    np.testing.assert_allclose(frobenius_norms(mixed).numpy(), want[:4], rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-12, 1e-6, 1.0, 1e6, 1e14, 1e18, 1e25])
def test_fused_route_alone_is_exact_or_redone_at_every_magnitude(scale: float) -> None:
    """The same magnitudes with nothing out of range by itself (no zero matrix): where the fused float32 norm
    loses digits or overflows, its range check sends the list to the checked routes."""
    from gradspectra.functional import frobenius_norms

    g = torch.Generator().manual_seed(3)
    mats = [(torch.randn(*s, generator=g, dtype=torch.float64) * scale).float() for s in [(16, 16), (64, 32), (3, 5)]]
    got = frobenius_norms(mats).tolist()
    for value, m in zip(got, mats, strict=True):
        want = float(np.linalg.norm(m.to(torch.float64).numpy()))
        assert abs(value - want) <= 1e-6 * want, (scale, m.shape, value, want)


def test_not_a_tensor_is_a_type_error() -> None:
    from gradspectra.functional import frobenius_norms

    with pytest.raises(TypeError, match=r"`matrix` must be a torch\.Tensor, got list"):
        frobenius_norms([[1.0, 2.0]])  # type: ignore[list-item]


def _same_floats(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(x == y or (x != x and y != y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-12, 1e-6, 1.0, 1e6, 1e14, 1e18, 1e25])
def test_host_values_are_the_norms_at_every_magnitude(scale: float) -> None:
    """frobenius_norm_values gives frobenius_norms's values as host floats, bit for bit, on the fused CPU read and
    on every route it falls through to (out of float32's safe range, a zero matrix, NaN and Inf entries)."""
    from gradspectra.functional import frobenius_norm_values, frobenius_norms

    g = torch.Generator().manual_seed(4)
    shapes = [(128, 128), (256, 128), (1000, 128), (3, 5)]
    mats = [(torch.randn(*s, generator=g, dtype=torch.float64) * scale).float() for s in shapes]
    mats.append(torch.randn(8, 8, generator=g).T * scale)  # a non-contiguous view
    got = frobenius_norm_values(mats)
    assert isinstance(got, list) and all(type(v) is float for v in got)
    assert _same_floats(got, frobenius_norms(mats).tolist())
    for value, m in zip(got, mats, strict=True):
        want = float(np.linalg.norm(m.to(torch.float64).numpy()))
        assert abs(value - want) <= 1e-6 * want, (scale, m.shape, value, want)
    for entry in (float("nan"), float("inf")):
        odd = [m.clone() for m in mats]
        odd[1][2, 3] = entry
        got = frobenius_norm_values(odd)
        assert _same_floats(got, frobenius_norms(odd).tolist())
        assert got[1] != got[1] if entry != entry else got[1] == float("inf")
    with_zero = [*mats, torch.zeros(4, 4)]
    assert _same_floats(frobenius_norm_values(with_zero), frobenius_norms(with_zero).tolist())
    assert frobenius_norm_values(with_zero)[-1] == 0.0


def test_host_values_of_other_kinds_empty_and_not_a_tensor() -> None:
    """Matrices the fused read does not take (bf16, float64, 3-D, requiring grad) give the checked routes' values;
    an empty list gives an empty list; a non-tensor is a TypeError."""
    from gradspectra.functional import frobenius_norm_values, frobenius_norms

    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, 32, generator=g)
    for mats in (
        [base, base.bfloat16()],
        [base.double(), base],
        [base, base.reshape(4, 16, 32)],
        [base.clone().requires_grad_(), base],
    ):
        got = frobenius_norm_values(mats)
        assert _same_floats(got, frobenius_norms(mats).tolist())
        for value, m in zip(got, mats, strict=True):
            want = float(np.linalg.norm(m.detach().to(torch.float64).numpy()))
            assert abs(value - want) <= 1e-2 * want if m.dtype == torch.bfloat16 else abs(value - want) <= 1e-6 * want
    assert frobenius_norm_values([]) == []
    with pytest.raises(TypeError, match=r"`matrix` must be a torch\.Tensor, got list"):
        frobenius_norm_values([[1.0, 2.0]])  # type: ignore[list-item]
