"""high_metrics: the norms count only upwards by default; every other metric either way."""

from __future__ import annotations

import pytest

from gradspectra.scoring import BatchScorer

from .streams import SyntheticRun

NORMS = ("nuclear_norm", "frobenius_norm", "spectral_norm")


def _scored(scorer: BatchScorer, run: SyntheticRun, shift: dict[str, float]) -> tuple[bool, dict[str, float]]:
    for _ in range(60):
        scorer.score(run.step(), loss=run.loss())
    result = scorer.score(run.step(shift), loss=run.loss())
    return result.flagged, result.z


@pytest.mark.parametrize("metric", NORMS)
def test_norms_lower_than_usual_are_not_flagged(metric: str) -> None:
    flagged, z = _scored(BatchScorer(warmup_steps=20), SyntheticRun(seed=3), {metric: -12.0})
    assert z[metric] < -3  # seen, and signed, in z
    assert not flagged


@pytest.mark.parametrize("metric", NORMS)
def test_norms_higher_than_usual_are_flagged(metric: str) -> None:
    flagged, z = _scored(BatchScorer(warmup_steps=20), SyntheticRun(seed=3), {metric: 12.0})
    assert z[metric] > 3
    assert flagged


@pytest.mark.parametrize("metric", ["effective_rank", "stable_rank"])
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_rank_metrics_count_either_way(metric: str, sign: float) -> None:
    flagged, z = _scored(BatchScorer(warmup_steps=20), SyntheticRun(seed=3), {metric: sign * 12.0})
    assert z[metric] * sign > 3
    assert flagged


def test_empty_high_metrics_makes_the_norms_two_sided() -> None:
    flagged, _ = _scored(BatchScorer(warmup_steps=20, high_metrics=()), SyntheticRun(seed=3), {"nuclear_norm": -12.0})
    assert flagged


def test_high_metrics_must_be_names() -> None:
    with pytest.raises(ValueError, match="`high_metrics` must be a sequence of metric names"):
        BatchScorer(high_metrics="nuclear_norm")  # type: ignore[arg-type]
