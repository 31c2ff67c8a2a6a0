"""Streaming statistics of every watched layer's spectral metrics in one ``Metric`` (one update per step)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from gradspectra.functional.spectral import check_metric_names
from gradspectra.functional.streaming import (
    STAT_NAMES,
    StreamingState,
    streaming_compute,
    streaming_update,
)
from gradspectra.metrics.spectrum import add_streaming_states


class LayerwiseSpectrum(Metric):
    """Per-layer streaming statistics of already computed spectral metrics.

    State is shaped ``(layers, metrics)`` with the reductions of
    :class:`~gradspectra.metrics.GradientSpectrum` (sums summed, extremes by min/max, ``last`` from
    the highest rank that has measured that layer). States are persistent, so ``state_dict()``
    carries them into checkpoints.

    Args:
        layer_keys: one name per layer (row order of the values passed to :meth:`update`).
        metrics: metric names (column order).

    Example:
        >>> m = LayerwiseSpectrum(["a", "b"], ["nuclear_norm"])
        >>> m.update(torch.tensor([[1.0], [2.0]]))
        >>> m.update(torch.tensor([[3.0], [float("nan")]]))
        >>> out = m.compute()
        >>> out["mean"][:, 0].tolist(), out["nonfinite"][:, 0].tolist()
        ([2.0, 2.0], [0.0, 1.0])
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

    def __init__(self, layer_keys: Sequence[str], metrics: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layer_keys: tuple[str, ...] = tuple(layer_keys)
        if not self.layer_keys:
            raise ValueError("`layer_keys` must name at least one layer, got an empty sequence")
        self.metric_names: tuple[str, ...] = check_metric_names(metrics)
        shape = (len(self.layer_keys), len(self.metric_names))
        add_streaming_states(self, shape, persistent=True)

    def update(self, values: Tensor, mask: Tensor | None = None) -> None:
        """Fold one step's values, shaped ``(layers, metrics)``, or several steps' in order, ``(steps, layers,
        metrics)`` (the same state as one update per step, in one pass).

        ``mask`` (bool, ``(layers,)`` or ``(layers, metrics)``, with a leading ``steps`` dimension for
        several steps) marks the layers (or single values) measured that step; the others (no gradient,
        or a spectrum deferred to a later step) keep their state untouched rather than counting as non-finite.
        """
        if values.ndim == 3 and tuple(values.shape[1:]) == tuple(self.sum.shape):
            self._update_steps(values, mask)
            return
        if tuple(values.shape) != tuple(self.sum.shape):
            raise ValueError(
                f"`values` must be shaped {tuple(self.sum.shape)} or (steps, *{tuple(self.sum.shape)}), "
                f"got {tuple(values.shape)}"
            )
        shape = self.sum.shape
        batch = streaming_update(values.to(device=self.sum.device).reshape(1, -1))
        if mask is None:
            keep = torch.ones(shape, dtype=torch.bool, device=self.sum.device)
        elif mask.ndim == 1 and mask.shape[0] == shape[0]:
            keep = mask.to(device=self.sum.device, dtype=torch.bool)[:, None].expand(shape)
        elif tuple(mask.shape) == tuple(shape):
            keep = mask.to(device=self.sum.device, dtype=torch.bool)
        else:
            raise ValueError(f"`mask` must be shaped ({shape[0]},) or {tuple(shape)}, got {tuple(mask.shape)}")
        zero = torch.zeros((), dtype=self.sum.dtype, device=self.sum.device)
        self.count += torch.where(keep, batch.count.view(shape), zero)
        self.nonfinite += torch.where(keep, batch.nonfinite.view(shape), zero)
        self.sum += torch.where(keep, batch.sum.view(shape), zero)
        self.sum_sq += torch.where(keep, batch.sum_sq.view(shape), zero)
        self.min = torch.where(keep, torch.minimum(self.min, batch.min.view(shape)), self.min)
        self.max = torch.where(keep, torch.maximum(self.max, batch.max.view(shape)), self.max)
        self.last = torch.where(keep, batch.last.view(shape), self.last)

    def _update_steps(self, values: Tensor, mask: Tensor | None) -> None:
        shape = (values.shape[0], *self.sum.shape)
        v = values.to(device=self.sum.device, dtype=torch.float64)
        if mask is None:
            keep = torch.ones(shape, dtype=torch.bool, device=self.sum.device)
        elif mask.ndim == 2 and tuple(mask.shape) == shape[:2]:
            keep = mask.to(device=self.sum.device, dtype=torch.bool)[:, :, None].expand(shape)
        elif tuple(mask.shape) == shape:
            keep = mask.to(device=self.sum.device, dtype=torch.bool)
        else:
            raise ValueError(
                f"`mask` must be shaped {shape[:2]} or {shape} for values shaped {shape}, got {tuple(mask.shape)}"
            )
        finite = torch.isfinite(v)
        good = keep & finite
        fv = torch.where(good, v, torch.zeros((), dtype=v.dtype, device=v.device))
        inf = torch.tensor(float("inf"), dtype=v.dtype, device=v.device)
        self.count += good.sum(0).to(self.count.dtype)
        self.nonfinite += (keep & ~finite).sum(0).to(self.nonfinite.dtype)
        self.sum += fv.sum(0)
        self.sum_sq += (fv * fv).sum(0)
        self.min = torch.minimum(self.min, torch.where(good, v, inf).amin(0))
        self.max = torch.maximum(self.max, torch.where(good, v, -inf).amax(0))
        # each value's last kept step (NaN included); a value kept on no step keeps its state
        order = torch.arange(1, shape[0] + 1, device=v.device).view(-1, 1, 1)
        last = (keep * order).amax(0)
        taken = v.gather(0, (last - 1).clamp_min(0)[None]).squeeze(0)
        self.last = torch.where(last > 0, taken, self.last)

    def compute(self) -> dict[str, Tensor]:
        """``{stat: Tensor (layers, metrics)}`` for every stat in ``STAT_NAMES``."""
        stats = streaming_compute(
            StreamingState(self.count, self.nonfinite, self.sum, self.sum_sq, self.min, self.max, self.last)
        )
        return {stat: stats[stat] for stat in STAT_NAMES}
