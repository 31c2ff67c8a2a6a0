"""Spectral metrics of many matrices of mixed shapes: same-shaped ones go through one batched call."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from gradspectra.functional.spectral import check_metric_names, spectral_metrics
from gradspectra.functional.svd import Method


def spectral_metrics_many(
    matrices: Sequence[Tensor],
    metrics: Sequence[str] | None = None,
    method: Method = "auto",
    max_batch: int = 8,
) -> Tensor:
    """Metrics of each matrix, as a float64 tensor ``(len(matrices), len(metrics))`` on the first matrix's device.

    Matrices of one shape are stacked ``max_batch`` at a time (a bounded extra copy) and decomposed
    in one batched call; results are identical to calling :func:`spectral_metrics` one by one.

    Example:
        >>> out = spectral_metrics_many([torch.eye(3), torch.eye(2) * 2], ["nuclear_norm"])
        >>> out[:, 0].tolist()
        [3.0, 4.0]
    """
    names = check_metric_names(metrics)
    if max_batch < 1:
        raise ValueError(f"`max_batch` must be >= 1, got {max_batch!r}")
    if not matrices:
        return torch.zeros((0, len(names)), dtype=torch.float64)
    device = matrices[0].device
    out = torch.empty((len(matrices), len(names)), dtype=torch.float64, device=device)
    groups: dict[tuple[tuple[int, ...], torch.dtype], list[int]] = defaultdict(list)
    for i, m in enumerate(matrices):
        groups[(tuple(m.shape), m.dtype)].append(i)
    for idx in groups.values():
        for start in range(0, len(idx), max_batch):
            chunk = idx[start : start + max_batch]
            batch = (
                torch.stack([matrices[i].detach() for i in chunk]) if len(chunk) > 1 else matrices[chunk[0]].detach()
            )
            values = spectral_metrics(batch, names, method)
            stacked = torch.stack([values[n].reshape(-1) for n in names], -1)
            out[chunk] = stacked.to(device)
    return out
