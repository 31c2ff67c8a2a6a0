r"""Threshold-free evaluation of anomaly scores against known labels (used by the benchmarks).

The AUROC is the probability that a randomly chosen anomalous step scores higher than a randomly
chosen clean one, ties counting one half (the Mann-Whitney :math:`U` statistic, normalised):

.. math::

    \mathrm{AUROC} = \frac{1}{n_+ n_-} \sum_{i:\,y_i=1} \sum_{j:\,y_j=0}
        \Bigl(\mathbb{1}[s_i > s_j] + \tfrac12 \mathbb{1}[s_i = s_j]\Bigr)
      = \frac{R_+ - n_+(n_+ + 1)/2}{n_+ n_-},

where :math:`R_+` is the sum of the (tie-averaged, 1-based) ranks of the anomalous scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def average_ranks(values: ArrayLike) -> np.ndarray:
    """1-based ranks of ``values`` with ties given the mean of the ranks they span.

    >>> average_ranks([10.0, 20.0, 10.0, 5.0]).tolist()
    [2.5, 4.0, 2.5, 1.0]
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # boundaries of runs of equal values in sorted order
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based positions start+1 .. end
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(scores: Sequence[float] | ArrayLike, labels: Sequence[bool | int] | ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` (higher = more anomalous) for binary ``labels``.

    Args:
        scores: one score per step; ``inf`` and ``-inf`` are allowed (they rank first and last).
        labels: 1/True for anomalous steps, 0/False for clean ones.

    Returns:
        The AUROC in ``[0, 1]``: 1 when every anomalous step outscores every clean one, 0.5 for
        chance, ties counting one half.

    Raises:
        ValueError: lengths differ, a score is NaN or None, a label is not 0/1, or one class is absent.

    >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> auroc([1.0, 1.0, 1.0], [0, 1, 0])
    0.5
    """
    try:
        s = np.asarray(scores, dtype=np.float64).ravel()
    except (TypeError, ValueError) as err:
        raise ValueError(f"`scores` must be numbers (no None), got {scores!r}") from err
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"`scores` and `labels` must have the same length, got {s.size} and {y.size}")
    if np.isnan(s).any():
        raise ValueError(f"`scores` must not contain NaN (or None), got {int(np.isnan(s).sum())} NaN values")
    if y.dtype == bool:
        positive = y
    else:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"`labels` must be 0/1 or booleans, got values {np.unique(y).tolist()}")
        positive = y.astype(bool)
    n_pos = int(positive.sum())
    n_neg = int(positive.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"`labels` must contain both classes, got {n_pos} positive and {n_neg} negative")
    ranks = average_ranks(s)
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)
