"""LayerwiseSpectrum: several steps folded in one update equal one update per step, and numpy float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradspectra.metrics import LayerwiseSpectrum

LAYERS = [f"fc/layer_{i:02d}" for i in range(5)]
METRICS = ["nuclear_norm", "spectral_norm", "frobenius_norm"]


def steps(n: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, len(LAYERS), len(METRICS), generator=g, dtype=torch.float64).mul(8).exp()
    values[2, 1, 0] = float("nan")
    values[4, 3, 2] = float("inf")
    values[n - 1, 0, 1] = float("nan")  # a NaN as the last value of a cell
    values[0, 2, 2] = 1e-30
    values[1, 2, 2] = 1e30
    mask = torch.rand(n, len(LAYERS), len(METRICS), generator=g) > 0.3
    mask[:, 4, 1] = False  # never measured: keeps its empty state
    mask[n - 1, 0, 1] = True
    return values, mask


@pytest.mark.parametrize("split", [[9], [3, 6], [1, 1, 7]])
def test_several_steps_at_once_equal_one_update_per_step(split: list[int]) -> None:
    values, mask = steps()
    one, many = LayerwiseSpectrum(LAYERS, METRICS), LayerwiseSpectrum(LAYERS, METRICS)
    for t in range(len(values)):
        one.update(values[t], mask=mask[t])
    start = 0
    for size in split:
        many.update(values[start : start + size], mask=mask[start : start + size])
        start += size
    a, b = one.compute(), many.compute()
    for stat in a:
        torch.testing.assert_close(a[stat], b[stat], equal_nan=True, rtol=1e-12, atol=0.0)


def test_several_steps_match_numpy_float64() -> None:
    values, mask = steps(seed=1)
    metric = LayerwiseSpectrum(LAYERS, METRICS)
    metric.update(values, mask=mask)
    got = metric.compute()
    v, keep = values.numpy(), mask.numpy()
    for i in range(len(LAYERS)):
        for j in range(len(METRICS)):
            kept = v[keep[:, i, j], i, j]
            finite = kept[np.isfinite(kept)]
            assert got["count"][i, j] == len(finite) and got["nonfinite"][i, j] == len(kept) - len(finite)
            if len(finite):
                assert float(got["mean"][i, j]) == pytest.approx(finite.mean(), rel=1e-9)
                assert float(got["min"][i, j]) == finite.min() and float(got["max"][i, j]) == finite.max()
            else:
                assert np.isnan(float(got["mean"][i, j]))
            last = float(got["last"][i, j])
            assert (np.isnan(last) and (len(kept) == 0 or np.isnan(kept[-1]))) or last == kept[-1]


def test_a_layer_mask_over_several_steps_and_bad_shapes() -> None:
    values, _ = steps()
    layers = torch.ones(len(values), len(LAYERS), dtype=torch.bool)
    layers[:, 3] = False
    metric = LayerwiseSpectrum(LAYERS, METRICS)
    metric.update(values, mask=layers)
    assert metric.compute()["count"][3].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"`mask` must be shaped \(9, 5\) or \(9, 5, 3\)"):
        metric.update(values, mask=layers[:, :2])
    with pytest.raises(ValueError, match=r"`values` must be shaped \(5, 3\) or \(steps, \*\(5, 3\)\), got \(9, 4\)"):
        metric.update(torch.zeros(9, 4))
