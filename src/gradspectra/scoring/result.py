"""The verdict a scorer gives one optimizer step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScoreResult:
    """One step's anomaly score and whether it was flagged.

    Attributes:
        score: higher = more anomalous, in robust standard deviations (the largest term, ``|Z|`` for a
            metric's level, ``max(Z, 0)`` for a layer profile and the loss; see
            :mod:`gradspectra.scoring.batch`); ``inf`` when a gradient or the loss was non-finite;
            ``None`` during warm-up or when nothing on the step could be scored.
        flagged: whether the step was flagged (its score exceeded ``threshold``, or a value was non-finite).
        reasons: human-readable reasons, strongest first; empty when not flagged.
        z: each term's robust z (signed: negative = lower than usual), e.g.
            ``{"effective_rank": -9.1, "nuclear_norm": 1.2, "nuclear_norm_profile": 0.4, "loss": 0.3}``;
            empty during warm-up.
        in_warmup: whether the scorer was still building its baseline.
        threshold: the threshold the score was compared with; ``None`` during warm-up.
        events: what happened to the baseline at this step, each ``{"kind": ..., "message": ...}``;
            ``"shift"``: a change that persisted (see :mod:`gradspectra.scoring.batch`) was adopted
            as the new normal, and this step was not flagged for it; ``"aftermath"``: the step moved only
            what a flagged step shortly before moved, no further, and is taken as that change going on (not
            flagged).
    """

    score: float | None
    flagged: bool
    reasons: list[str] = field(default_factory=list)
    z: dict[str, float] = field(default_factory=dict)
    in_warmup: bool = False
    threshold: float | None = None
    events: list[dict[str, str]] = field(default_factory=list)
