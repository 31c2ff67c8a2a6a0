"""Cross-layer statistics: paper 1's MAD (whole curve and depth segments) and paper 2's adjacent-layer cosine."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from gradspectra.functional import adjacent_cosine, layer_mad, paper_segments
from reference import ref_cosine, ref_mad


@pytest.mark.parametrize("length", [1, 2, 5, 28])
def test_layer_mad_matches_a_plain_loop(length: int) -> None:
    rng = np.random.default_rng(length)
    curve = rng.gamma(2.0, 3.0, size=length)
    got = layer_mad(torch.from_numpy(curve))
    assert got.dtype == torch.float64
    assert got.shape == ()
    assert got.item() == pytest.approx(ref_mad(curve.tolist()), rel=1e-12, abs=0.0)
    # a list of floats works as well as a tensor
    assert layer_mad(curve.tolist()).item() == pytest.approx(ref_mad(curve.tolist()), rel=1e-12, abs=0.0)


def test_layer_mad_batched_curves() -> None:
    rng = np.random.default_rng(0)
    curves = rng.standard_normal((3, 4, 10)).astype(np.float32)
    got = layer_mad(torch.from_numpy(curves))
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert got[i, j].item() == pytest.approx(ref_mad(curves[i, j].astype(np.float64).tolist()), rel=1e-12)


def test_layer_mad_segments() -> None:
    rng = np.random.default_rng(1)
    curve = rng.standard_normal((2, 12))
    segments = [(0, 4), (4, 9), (9, 12), (3, 3), (5, 6)]
    got = layer_mad(torch.from_numpy(curve), segments=segments)
    assert got.shape == (2, len(segments))
    for b in range(2):
        for k, (start, stop) in enumerate(segments):
            # inside the segment only: the step across a boundary belongs to neither side (paper 1's code)
            want = ref_mad(curve[b, start:stop].tolist())
            assert got[b, k].item() == pytest.approx(want, rel=1e-12, abs=0.0)
    assert layer_mad(torch.from_numpy(curve), segments=[]).shape == (2, 0)


@pytest.mark.parametrize("num_layers", [26, 28, 32, 42, 6, 12, 24, 36, 1, 2])
def test_paper_segments_with_layer_mad(num_layers: int) -> None:
    segments = paper_segments(num_layers)
    curve = np.random.default_rng(num_layers).standard_normal(num_layers)
    got = layer_mad(torch.from_numpy(curve), segments=segments)
    want = [ref_mad(curve[a:b].tolist()) for a, b in segments]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=0.0)


def test_paper_segments_are_paper_ones() -> None:
    # the splits of paper 1's released analysis code (Layer_Gradient, code_vis/exp_utils.py)
    assert paper_segments(28) == ((0, 7), (7, 21), (21, 28))
    assert paper_segments(26) == ((0, 7), (7, 20), (20, 26))
    assert paper_segments(32) == ((0, 10), (10, 20), (20, 32))
    assert paper_segments(42) == ((0, 12), (12, 30), (30, 42))


@pytest.mark.parametrize("num_layers", [1, 2, 3, 5, 6, 12, 13, 24, 40, 80])
def test_other_depths_split_in_contiguous_thirds(num_layers: int) -> None:
    segments = paper_segments(num_layers)
    assert len(segments) == 3
    assert segments[0][0] == 0
    assert segments[-1][1] == num_layers
    assert all(a[1] == b[0] for a, b in itertools.pairwise(segments))
    sizes = [b - a for a, b in segments]
    assert max(sizes) - min(sizes) <= 1


def test_layer_mad_nan_propagates() -> None:
    out = layer_mad(torch.tensor([[1.0, float("nan"), 2.0], [1.0, 2.0, 4.0]]))
    assert np.isnan(out[0].item())
    assert out[1].item() == 1.5


@pytest.mark.parametrize("num_layers", [2, 3, 7])
def test_adjacent_cosine_matches_numpy(num_layers: int) -> None:
    rng = np.random.default_rng(num_layers)
    base = rng.standard_normal((16, 8))
    grads = [base + 0.7 * rng.standard_normal((16, 8)) * (k + 1) for k in range(num_layers)]
    want = [ref_cosine(grads[k], grads[k + 1]) for k in range(num_layers - 1)]
    as_list = adjacent_cosine([torch.from_numpy(g).float() for g in grads])
    stacked = adjacent_cosine(torch.from_numpy(np.stack(grads)))
    assert as_list.dtype == torch.float64
    assert as_list.shape == (num_layers - 1,)
    # fp32 inputs: compare with float64 math on the same rounded numbers
    want32 = [
        ref_cosine(np.float32(grads[k]).astype(np.float64), np.float32(grads[k + 1]).astype(np.float64))
        for k in range(num_layers - 1)
    ]
    np.testing.assert_allclose(as_list.numpy(), want32, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stacked.numpy(), want, rtol=1e-9, atol=1e-12)


def test_adjacent_cosine_zero_gradients_give_zero() -> None:
    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    out = adjacent_cosine([g, torch.zeros(4, 3), torch.zeros(4, 3), -g])
    assert out.tolist() == [0.0, 0.0, 0.0]


def test_adjacent_cosine_extreme_scales_and_half_precision() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 10, 6))
    # a naive dot product overflows (1e200^2) or underflows (1e-200^2) in float64
    out = adjacent_cosine(torch.from_numpy(np.stack([a * 1e200, b * 1e-200])))
    assert out.item() == pytest.approx(ref_cosine(a, b), rel=1e-9)
    ah, bh = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
    out_h = adjacent_cosine([ah, bh])
    assert out_h.item() == pytest.approx(ref_cosine(ah.double().numpy(), bh.double().numpy()), rel=1e-9)


def test_adjacent_cosine_non_finite_propagates() -> None:
    g = torch.ones(3, 3)
    bad = g.clone()
    bad[0, 0] = float("inf")
    out = adjacent_cosine([g, g, bad])
    assert out[0].item() == pytest.approx(1.0)
    assert np.isnan(out[1].item())


def test_adjacent_cosine_of_stacked_scalars_and_single_layer() -> None:
    assert adjacent_cosine(torch.tensor([2.0, 3.0, -1.0])).tolist() == [1.0, -1.0]
    assert adjacent_cosine([torch.ones(2, 2)]).shape == (0,)


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`values` must have a layer dimension"):
        layer_mad(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"`segments` entries must satisfy 0 <= start <= stop <= 4, got \(2, 5\)"):
        layer_mad([1.0, 2.0, 3.0, 4.0], segments=[(0, 2), (2, 5)])
    with pytest.raises(ValueError, match="`segments` entries must satisfy"):
        layer_mad([1.0, 2.0, 3.0, 4.0], segments=[(3, 1)])
    with pytest.raises(ValueError, match=r"`segments` entries must be \(start, stop\) pairs"):
        layer_mad([1.0, 2.0, 3.0, 4.0], segments=[(1,)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="`num_layers` must be a positive int, got 0"):
        paper_segments(0)
    with pytest.raises(ValueError, match="`num_layers` must be a positive int"):
        paper_segments(12.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`grads` must all have the same shape, got shapes \[\(2, 2\), \(3, 2\)\]"):
        adjacent_cosine([torch.ones(2, 2), torch.ones(3, 2)])
    with pytest.raises(ValueError, match="`grads` must hold at least one gradient"):
        adjacent_cosine([])
    with pytest.raises(ValueError, match="`grads` must be stacked"):
        adjacent_cosine(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"`grads` must hold torch\.Tensor gradients"):
        adjacent_cosine([np.ones(2), np.ones(2)])  # type: ignore[list-item]
