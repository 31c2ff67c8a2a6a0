"""What the benchmarks measure the score with: the AUROC against known labels, and the peer detectors.

Kept apart from :mod:`gradspectra.scoring`, which the monitor runs during training, so that the
runtime package exports only what a run uses. Pure numpy, like the scoring.
"""

from gradspectra.evaluation.peers import (
    GradNormZRule,
    KillLossSpikeRule,
    SpikeDetectionRule,
    ZScoreDetector,
    global_grad_norm,
)
from gradspectra.evaluation.roc import auroc, average_ranks

__all__ = [
    "GradNormZRule",
    "KillLossSpikeRule",
    "SpikeDetectionRule",
    "ZScoreDetector",
    "auroc",
    "average_ranks",
    "global_grad_norm",
]
