"""Anomaly scores per optimizer step: per-layer gradient metrics (and the loss) against a running robust baseline.

Pure numpy; no Lightning. :class:`BatchScorer` is what the callback uses; :class:`ZScoreDetector`
and :func:`auroc` serve the benchmarks.
"""

from gradspectra.scoring.batch import LOSS_KEY, LOSS_SIDES, POSITIVE_METRICS, PROFILE_SUFFIX, BatchScorer
from gradspectra.scoring.evaluation import auroc, average_ranks
from gradspectra.scoring.peers import ZScoreDetector, global_grad_norm
from gradspectra.scoring.result import ScoreResult

__all__ = [
    "LOSS_KEY",
    "LOSS_SIDES",
    "POSITIVE_METRICS",
    "PROFILE_SUFFIX",
    "BatchScorer",
    "ScoreResult",
    "ZScoreDetector",
    "auroc",
    "average_ranks",
    "global_grad_norm",
]
