r"""Streaming statistics of metric values over steps: the update and compute halves used by ``gradspectra.metrics``.

State per metric: ``count`` of finite values, ``nonfinite`` count, ``sum``, ``sum_sq``, ``min``,
``max`` and ``last``. Non-finite values are counted, not folded into the moments.

A ``last`` state that has seen nothing holds :data:`EMPTY_LAST` (``-inf``), not NaN: NaN is a real
last value (a non-finite gradient), and merges must tell "nothing seen" from it. No spectral or
cross-layer metric is ever ``-inf``; :func:`streaming_compute` reports an empty ``last`` as NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

STAT_NAMES: tuple[str, ...] = ("mean", "std", "min", "max", "last", "count", "nonfinite")

EMPTY_LAST: float = float("-inf")


class StreamingState(NamedTuple):
    count: Tensor  # type: ignore[assignment]  # shadows tuple.count on purpose: one name per idea
    nonfinite: Tensor
    sum: Tensor
    sum_sq: Tensor
    min: Tensor
    max: Tensor
    last: Tensor


def streaming_update(values: Tensor) -> StreamingState:
    """Statistics of ``values`` shaped ``(N, K)``: N observations of K metrics, in order.

    Returns per-metric tensors of shape ``(K,)``; ``last`` is the final observation (NaN included),
    :data:`EMPTY_LAST` when ``N == 0``.
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
        last=v[-1] if v.shape[0] else v.new_full((v.shape[1],), EMPTY_LAST),
    )


def streaming_compute(state: StreamingState) -> dict[str, Tensor]:
    """Mean, population standard deviation, extremes, last value and counts, each shaped ``(K,)``.

    With no finite value yet, mean/std/min/max are NaN; with no value at all, ``last`` is NaN too.
    The variance is ``sum_sq / n - mean^2`` in float64, so its relative error is about
    ``eps * (mean / std)^2``: exact enough unless the values barely vary (std < 1e-6 * |mean|).
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
        "last": torch.where(state.last == EMPTY_LAST, nan, state.last),
        "count": state.count,
        "nonfinite": state.nonfinite,
    }


def take_last(stacked: Tensor) -> Tensor:
    """Reduction for ``last`` states: per entry, the newest one of a stack that has seen a value.

    Under DDP the stack is ordered by rank, so this is the highest rank's ``last`` among the ranks
    that observed anything; in ``forward`` and ``merge_state`` torchmetrics stacks
    ``[accumulated, incoming batch or self]``. Entries equal to :data:`EMPTY_LAST` are skipped.

    Example:
        >>> take_last(torch.tensor([[1.0, 2.0], [3.0, float("-inf")]])).tolist()
        [3.0, 2.0]
    """
    rows = torch.arange(stacked.shape[0], device=stacked.device).view(-1, *([1] * (stacked.ndim - 1)))
    newest = torch.where(stacked != EMPTY_LAST, rows, -1).amax(0)
    picked = stacked.gather(0, newest.clamp_min(0).unsqueeze(0)).squeeze(0)
    return torch.where(newest >= 0, picked, stacked[-1])
