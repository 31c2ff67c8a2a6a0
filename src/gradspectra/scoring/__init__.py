"""Anomaly scores per optimizer step: per-layer gradient metrics (and the loss) against a running robust baseline.

Pure numpy; no Lightning. :class:`BatchScorer` is what the callback uses; the benchmarks' AUROC and
peer detectors are in :mod:`gradspectra.evaluation`.
"""

from gradspectra.scoring.batch import LOSS_KEY, LOSS_SIDES, POSITIVE_METRICS, PROFILE_SUFFIX, BatchScorer
from gradspectra.scoring.result import ScoreResult
from gradspectra.scoring.samples import SAMPLE_METRICS, SAMPLE_TERMS, SampleScorer
from gradspectra.scoring.stability import StabilityDetector, StabilityResult

__all__ = [
    "LOSS_KEY",
    "LOSS_SIDES",
    "POSITIVE_METRICS",
    "PROFILE_SUFFIX",
    "SAMPLE_METRICS",
    "SAMPLE_TERMS",
    "BatchScorer",
    "SampleScorer",
    "ScoreResult",
    "StabilityDetector",
    "StabilityResult",
]
