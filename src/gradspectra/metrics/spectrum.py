"""Streaming spectral metrics of gradient matrices as torchmetrics ``Metric`` classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric

from gradspectra.functional.spectral import check_metric_names, spectral_metrics
from gradspectra.functional.streaming import (
    EMPTY_LAST,
    STAT_NAMES,
    StreamingState,
    streaming_compute,
    streaming_update,
    take_last,
)
from gradspectra.functional.svd import Method, check_method


def add_streaming_states(metric: Metric, shape: tuple[int, ...], persistent: bool) -> None:
    """The streaming-statistics states, shaped ``shape``, with their DDP reductions.

    Counts and sums are summed across ranks, extremes reduced by min/max, ``last`` taken from the
    highest rank that has observed something (see :func:`gradspectra.functional.streaming.take_last`).
    """
    f64 = torch.float64
    for name in ("count", "nonfinite", "sum", "sum_sq"):
        metric.add_state(name, torch.zeros(shape, dtype=f64), dist_reduce_fx="sum", persistent=persistent)
    metric.add_state("min", torch.full(shape, float("inf"), dtype=f64), dist_reduce_fx="min", persistent=persistent)
    metric.add_state("max", torch.full(shape, -float("inf"), dtype=f64), dist_reduce_fx="max", persistent=persistent)
    metric.add_state("last", torch.full(shape, EMPTY_LAST, dtype=f64), dist_reduce_fx=take_last, persistent=persistent)


class GradientSpectrum(Metric):
    r"""Streaming statistics of spectral metrics of gradient matrices over training steps.

    Each :meth:`update` takes one gradient matrix ``(m, n)`` (or a batch ``(..., m, n)``, each
    matrix one observation), computes the requested metrics from one decomposition, and folds
    them into per-metric ``count``/``sum``/``sum_sq``/``min``/``max``/``last`` state.
    :meth:`compute` returns ``{"<metric>/<stat>": Tensor}`` with the stats ``mean``, ``std``
    (population), ``min``, ``max``, ``last``, ``count`` (finite observations) and ``nonfinite``.

    Non-finite observations (from NaN/Inf gradients) are counted in ``nonfinite`` and kept out of
    the moments, so one bad step does not poison the running mean.

    Under DDP, ``count``, ``nonfinite``, ``sum`` and ``sum_sq`` are summed across ranks, ``min``
    and ``max`` reduced by min and max, and ``last`` taken from the highest rank that has observed
    anything (see :func:`gradspectra.functional.streaming.take_last`).

    Args:
        metrics: names from :data:`gradspectra.functional.METRIC_NAMES`; ``None`` for all.
        method: singular value route, see :func:`gradspectra.functional.singular_values`.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = GradientSpectrum(metrics=["nuclear_norm"])
        >>> metric.update(torch.diag(torch.tensor([3.0, 1.0])))
        >>> metric.update(torch.diag(torch.tensor([5.0, 1.0])))
        >>> {k: v.item() for k, v in metric.compute().items()}["nuclear_norm/mean"]
        5.0
    """

    # plain (not ClassVar) annotations: torchmetrics declares these as instance-overridable attributes
    is_differentiable: bool = False
    higher_is_better: bool | None = None
    full_state_update: bool = False

    count: Tensor
    nonfinite: Tensor
    sum: Tensor
    sum_sq: Tensor
    min: Tensor
    max: Tensor
    last: Tensor

    def __init__(self, metrics: Sequence[str] | None = None, method: Method = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metric_names: tuple[str, ...] = check_metric_names(metrics)
        check_method(method)
        self.method: Method = method
        k = len(self.metric_names)
        add_streaming_states(self, (k,), persistent=False)

    def update(self, grad_matrix: Tensor) -> None:
        """Fold the metrics of ``grad_matrix`` (``(m, n)`` or ``(..., m, n)``) into the state."""
        if not isinstance(grad_matrix, Tensor):
            raise TypeError(f"`grad_matrix` must be a torch.Tensor, got {type(grad_matrix).__name__}")
        values = spectral_metrics(grad_matrix.detach(), self.metric_names, self.method)
        self.update_values(torch.stack([values[name].reshape(-1) for name in self.metric_names], -1))

    def update_values(self, values: Tensor) -> None:
        """Fold already computed metric values, shaped ``(N, K)`` in ``metric_names`` order."""
        if values.ndim != 2 or values.shape[1] != len(self.metric_names):
            # a (N, 1) block would otherwise broadcast silently into every metric's state
            raise ValueError(
                f"`values` must be shaped (N, {len(self.metric_names)}) for metrics {list(self.metric_names)}, "
                f"got shape {tuple(values.shape)}"
            )
        batch = streaming_update(values.to(self.sum.device))
        self.count += batch.count
        self.nonfinite += batch.nonfinite
        self.sum += batch.sum
        self.sum_sq += batch.sum_sq
        self.min = torch.minimum(self.min, batch.min)
        self.max = torch.maximum(self.max, batch.max)
        if values.shape[0]:
            self.last = batch.last

    def compute(self) -> dict[str, Tensor]:
        """``{"<metric>/<stat>": Tensor}`` for every metric and every stat in ``STAT_NAMES``."""
        stats = streaming_compute(
            StreamingState(self.count, self.nonfinite, self.sum, self.sum_sq, self.min, self.max, self.last)
        )
        return {f"{name}/{stat}": stats[stat][i] for i, name in enumerate(self.metric_names) for stat in STAT_NAMES}


class _SingleSpectralMetric(GradientSpectrum):
    """One spectral metric; same state and output keys as :class:`GradientSpectrum`."""

    metric_name: ClassVar[str]

    def __init__(self, method: Method = "auto", **kwargs: Any) -> None:
        super().__init__(metrics=[self.metric_name], method=method, **kwargs)


class NuclearNorm(_SingleSpectralMetric):
    r"""Streaming nuclear norm :math:`\sum_i s_i` of gradient matrices."""

    metric_name: ClassVar[str] = "nuclear_norm"


class SpectralNorm(_SingleSpectralMetric):
    r"""Streaming spectral norm :math:`s_1` of gradient matrices."""

    metric_name: ClassVar[str] = "spectral_norm"


class FrobeniusNorm(_SingleSpectralMetric):
    r"""Streaming Frobenius norm of gradient matrices (exact from the entries)."""

    metric_name: ClassVar[str] = "frobenius_norm"


class StableRank(_SingleSpectralMetric):
    r"""Streaming stable rank :math:`\sum_i s_i^2 / s_1^2` of gradient matrices."""

    metric_name: ClassVar[str] = "stable_rank"


class TopSVRatio(_SingleSpectralMetric):
    r"""Streaming share of the top singular value :math:`s_1 / \sum_i s_i`."""

    metric_name: ClassVar[str] = "top_sv_ratio"


class EffectiveRank(_SingleSpectralMetric):
    r"""Streaming effective rank :math:`\exp(-\sum_i p_i \ln p_i)`, :math:`p_i = s_i / \sum_j s_j`."""

    metric_name: ClassVar[str] = "effective_rank"
