r"""Streaming statistics of metric values over steps: the update and compute halves used by ``gradspectra.metrics``.

State per metric: ``count`` of finite values, ``nonfinite`` count, ``sum``, ``sum_sq``, ``min``,
``max`` and ``last``. Non-finite values are counted, not folded into the moments.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

STAT_NAMES: tuple[str, ...] = ("mean", "std", "min", "max", "last", "count", "nonfinite")


class StreamingState(NamedTuple):
    count: Tensor
    nonfinite: Tensor
    sum: Tensor
    sum_sq: Tensor
    min: Tensor
    max: Tensor
    last: Tensor


def streaming_update(values: Tensor) -> StreamingState:
    """Statistics of ``values`` shaped ``(N, K)``: N observations of K metrics, in order.

    Returns per-metric tensors of shape ``(K,)``; ``last`` is the final observation (NaN included).
    """
    v = values.to(torch.float64)
    if v.ndim != 2:
        raise ValueError(f"`values` must be shaped (N, K), got shape {tuple(v.shape)}")
    finite = torch.isfinite(v)
    zeros = torch.zeros_like(v)
    fv = torch.where(finite, v, zeros)
    inf = torch.full_like(v, float("inf"))
    return StreamingState(
        count=finite.sum(0).to(torch.float64),
        nonfinite=(~finite).sum(0).to(torch.float64),
        sum=fv.sum(0),
        sum_sq=(fv * fv).sum(0),
        min=torch.where(finite, v, inf).amin(0) if v.shape[0] else inf.new_full((v.shape[1],), float("inf")),
        max=torch.where(finite, v, -inf).amax(0) if v.shape[0] else inf.new_full((v.shape[1],), -float("inf")),
        last=v[-1] if v.shape[0] else v.new_full((v.shape[1],), float("nan")),
    )


def streaming_compute(state: StreamingState) -> dict[str, Tensor]:
    """Mean, population standard deviation, extremes, last value and counts, each shaped ``(K,)``.

    With no finite value yet, mean/std/min/max are NaN.
    """
    n = state.count
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    mean = state.sum / safe_n
    var = (state.sum_sq / safe_n - mean * mean).clamp_min(0.0)
    nan = torch.full_like(mean, float("nan"))
    empty = n == 0
    return {
        "mean": torch.where(empty, nan, mean),
        "std": torch.where(empty, nan, var.sqrt()),
        "min": torch.where(empty, nan, state.min),
        "max": torch.where(empty, nan, state.max),
        "last": state.last,
        "count": state.count,
        "nonfinite": state.nonfinite,
    }


def take_last(stacked: Tensor) -> Tensor:
    """Reduction for ``last`` states: the newest entry of a stack (the highest rank's under DDP)."""
    return stacked[-1]
