"""Per-step cost of BatchScorer.score at the scales the callback uses it (a tiny model's 32 layers, 200 layers)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from gradspectra.scoring import BatchScorer

from .streams import METRICS


def median_cost(n_layers: int, window: int) -> float:
    """Median CPU seconds of one ``score`` with full windows (every push evicts), 6 metrics and the loss."""
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 1.0, (n_layers, len(METRICS)))
    steps = [
        {
            f"layer.{i:03d}": dict(zip(METRICS, np.exp(base[i] + rng.normal(0.0, 0.1, len(METRICS))).tolist()))
            for i in range(n_layers)
        }
        for _ in range(40)
    ]
    scorer = BatchScorer(window=window)
    for t in range(window + 20):
        scorer.score(steps[t % len(steps)], loss=1.0 + 0.01 * (t % 7))
    times = []
    for t in range(60):
        start = time.process_time()
        scorer.score(steps[t % len(steps)], loss=1.0 + 0.01 * (t % 7))
        times.append(time.process_time() - start)
    return float(np.median(times))


@pytest.mark.parametrize(
    ("n_layers", "window", "limit"),
    [
        # about 0.25 ms on a shared 2-core machine (0.8 ms before the windows were merged and the
        # trends kept one series a row); a small model's step is ~20 ms, so this is most of the
        # scorer's share of a 3 % budget
        (32, 100, 0.0007),
        # about 0.8 ms; a per-step sort or median over the windows would cost several times more
        (200, 200, 0.005),
    ],
)
def test_score_cost_stays_small(n_layers: int, window: int, limit: float) -> None:
    # CPU time, not wall time, so other processes do not count
    assert median_cost(n_layers, window) < limit
