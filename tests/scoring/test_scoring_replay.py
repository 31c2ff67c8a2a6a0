"""Replay of a recorded real stream: the per-step metrics of a MiniLM-L6 fine-tune with injected near-duplicate batches.

``data/minilm_near_duplicate.npz`` holds what ``GradientSpectrumMonitor`` recorded (float32) in
``benchmarks/detection.py --kinds near_duplicate --seed 0 --records ...``: 150 optimizer steps, the
24 attention projections x 6 metrics, the loss, and which batches were corrupted (16 of the 125
after the 25 clean ones; a corrupted batch is one review repeated 16 times with one word changed
per copy). The fine-tune drifts fast at first: the gradient norms fall by about half in the first
30 steps. The scorer is a pure function of this stream, so the replay is what the callback saw live.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradspectra.evaluation import auroc
from gradspectra.scoring import BatchScorer

DATA = Path(__file__).parent / "data" / "minilm_near_duplicate.npz"


def replay(scorer: BatchScorer) -> tuple[list[float], list[bool], list[bool], list[list[str]]]:
    data = np.load(DATA)
    layers = [str(n) for n in data["layer_names"]]
    metrics = [str(n) for n in data["metric_names"]]
    scores: list[float] = []
    labels: list[bool] = []
    flags: list[bool] = []
    reasons: list[list[str]] = []
    for values, loss, bad in zip(data["metrics"], data["loss"], data["corrupted"]):
        step = {layer: dict(zip(metrics, map(float, row))) for layer, row in zip(layers, values)}
        result = scorer.score(step, loss=float(loss))
        if result.score is None:
            continue
        scores.append(result.score)
        labels.append(bool(bad))
        flags.append(result.flagged)
        reasons.append(result.reasons)
    return scores, labels, flags, reasons


def test_recorded_finetune_is_scored_as_the_benchmark_reports() -> None:
    scores, labels, flags, reasons = replay(BatchScorer(warmup_steps=20))
    assert len(scores) == 130 and sum(labels) == 16
    assert auroc(scores, labels) >= 0.95
    clean = [f for f, bad in zip(flags, labels) if not bad]
    assert np.mean(clean) <= 0.02
    # what gives a near-duplicate batch away, in words: effective rank down in (nearly) every layer
    caught = [r[0] for r, f, bad in zip(reasons, flags, labels) if f and bad]
    assert len(caught) >= 6
    assert np.mean([r.startswith("effective_rank low in ") and share_of_layers(r) >= 0.75 for r in caught]) >= 0.75


def share_of_layers(reason: str) -> float:
    """``"effective_rank low in 23/24 layers (z=-7.6)"`` -> 23/24."""
    count, total = reason.split(" in ", 1)[1].split(" ", 1)[0].split("/")
    return int(count) / int(total)


def test_a_long_trend_window_lags_behind_the_drift() -> None:
    # the same stream with the trend fitted to the last 100 steps instead of 32: it follows the early
    # drift late, and the ranking suffers
    slow_scores, labels, _, _ = replay(BatchScorer(warmup_steps=20, trend_window=100))
    fast_scores, _, _, _ = replay(BatchScorer(warmup_steps=20))
    assert auroc(fast_scores, labels) > auroc(slow_scores, labels) + 0.03
