r"""One anomaly score per optimizer step from per-layer gradient metrics (and the loss), against a robust baseline.

A bad batch shows in the gradients in one of two ways. Either a metric moves in the same direction in
many layers at once (effective rank down in every layer for one sample repeated, norms up for
flipped labels), or the *shape* of a metric across layers changes while its overall level does not
(random-token text moves the nuclear norm up in some layers and down in others). And during a real
fine-tune every metric also drifts, fast at first (norms can fall ten-fold in a few dozen steps),
slowly later. The score follows the drift with a robust local trend, measures both kinds of change
in units that mean the same for every term, and flags a step when the largest change is rarer than
the target false-flag rate allows. Nothing in it says which direction is bad, except for the loss
(see below).

**Features.** Metric values are put on log scale when positive (all spectral metrics; the loss
stays linear unless ``log_loss``): :math:`y_{l,m} = \log \max(x_{l,m}, 10^{-30})`.

**Level 1: each series against its own recent trend.** Every series :math:`s` (each :math:`y_{l,m}`
and the loss) is predicted from its last ``trend_window`` steps (every step,
flagged or not) by a robust local trend :math:`\hat s_t` (:func:`gradspectra.scoring._trend.robust_trend`:
a median-based line whose slope is kept only when it is clear, a plain median otherwise). A bad
step among them cannot bend it (medians), and because flagged steps are not left out, the baseline
keeps up with a real change of regime instead of flagging it forever. The loss is predicted by
the plain median of its last ``loss_window`` values (``loss_trend=False``, the default): a
falling loss sits below it, which the one-sided loss term ignores, and a run of bad batches
cannot bend a line up to meet them. The residual
:math:`r_t = s_t - \hat s_t` is standardised against the window :math:`R` of the residuals of the
last ``window`` *clean* steps:

.. math::

    z = \frac{r_t - \operatorname{med} R}{\max\!\bigl((Q_3(R) - Q_1(R)) / 1.349,\ \epsilon\bigr)},

with :math:`\epsilon` = ``min_scale`` on log scale, ``min_scale`` :math:`\cdot |\hat s_t|` on linear scale.
For each *profile metric* (``profile_metrics``, default the nuclear norm, the layer-wise curve of the
papers) the *profile residual* of a layer, :math:`r_{l,m} - \operatorname{IQM}_{l'} r_{l',m}` (the
interquartile mean over the layers measured), is standardised the same way: the step's common shift
cancels in it, and as every layer is measured against its own trend, it does not depend on which
layers were measured (a spectral budget measures a few per step).

**Terms.** Per metric :math:`m`, the *level* term is the interquartile mean of the layers' :math:`z`
(``layer_trim`` cut from each end): a shift shared by most layers moves it fully, one wild layer
cannot. Per profile metric, the *profile* term is how far the vector of profile :math:`z` over
layers lies outside the directions in which clean steps' profiles usually vary
(:mod:`gradspectra.scoring._profile`): :math:`\log Q` with
:math:`Q = \|x - V^\top V x\|^2 / L` and :math:`V` the top ``profile_components`` principal
directions of recent clean profile residuals (at most :math:`L - 2` of them, one per 10 clean rows;
the term is left out while a layer that has a profile residual has no baseline for it yet, a new
layer). The loss term is the loss's :math:`z`.

**Level 2.** How much each term varies on clean steps depends on how correlated the layers are, which
is not known in advance, so each term :math:`A_k` is standardised once more against the window of
its last ``window`` clean values, :math:`Z_k = (A_k - \operatorname{med}) / \max(\mathrm{IQR}/1.349, 0.05)`.
The step's score is the largest deviation in the direction that can mean trouble:

.. math::

    S_t = \max\Bigl(\max_m |Z_{m}|,\ \max_p Z_{p}^{+},\ Z_{\mathrm{loss}}^{+}\Bigr)

(:math:`Z^{+} = \max(Z, 0)`). Level terms are two-sided: effective rank falls for a duplicated
sample and rises for flipped labels; except the norms (``high_metrics``), whose level counts only
upwards: both papers find larger gradients for worse data, and an easy batch is not a bad one.
A profile term is one-sided by construction (a profile that is *more* typical than usual is not an
anomaly). The loss term is one-sided (``loss_side="high"``)
because the per-batch loss of a fine-tune has a long, harmless low tail (batches without any noisy
label) and the batches whose loss is low for a bad reason (one easy sample repeated) change the
spectra far more than the loss; ``loss_side="both"`` scores :math:`|Z_{\mathrm{loss}}|`.

**Threshold.** :math:`S` is compared with a threshold set from the window :math:`U` of the last
``threshold_window`` accepted (not flagged) scores, an exponential tail through their median and
90th percentile extrapolated to the :math:`1 - \alpha` quantile (:math:`\alpha` = ``false_flag_rate``):

.. math::

    \theta = \max\!\left(\theta_{\min},\ q_{0.9}(U) + \bigl(q_{0.9}(U) - q_{0.5}(U)\bigr)
        \frac{\ln(0.1/\alpha)}{\ln 5}\right).

The :math:`1 - \alpha` quantile of :math:`U` itself would ratchet down (flagged steps never enter
:math:`U`), and using all scores would let the bad batches set the threshold; the median and the
90th percentile barely move when the top :math:`\alpha` is cut off, so this is a stable fixed point.

**Which steps teach the baseline.** Every step with finite values updates the trend windows. Only
*clean-looking* steps, not flagged and with :math:`S \le 0.75\,\theta`, update the residual,
level-2 and profile windows: an anomalous batch just under the threshold would otherwise teach the
scales, and especially the profile directions, that its kind of change is normal. Accepted steps
(not flagged) update the threshold window. After ``rebaseline_after`` consecutive steps over the threshold the
scorer concludes that the regime has changed, forgets its baseline and warms up again.

**Spikes and shifts.** A flagged step leaves a signature: each term over the threshold, its sign, its
per-layer pattern (the layers' :math:`z` of a level term, the remainders of a profile term).
Flagged steps form a run; an accepted step keeps the run going only when a term of the run's
latest flag is still at least 1 (level-2 units) out the same way (a level that moved for good sits
there, noise carries some of its steps just under the threshold), else it ends the run, as the
clean steps between bad batches of one kind do. When ``shift_after`` flagged steps of a run within
the last ``2 (shift_after + 1)`` steps are followed by one more, and some term is over the threshold
with the same sign in all of them and with patterns alike from step to step (cosine over the layers
both measured at least ``shift_agreement``), the change has persisted: that step is a regime shift,
not flagged, reported as an event (``ScoreResult.events``), and the trends keep only their last rows
(the run's span, at least 5) so that they predict the new level at once; the clean residuals are re-centred
on 0 (a short trend does not lag as a long one does) and, when the loss took part, on linear scale its
residuals are scaled by the change of its level. Spreads, level 2, profile directions and threshold
stay: a shift moves levels, not the noise. A layer profile unusual step after step in other layers
each time shares no pattern from step to step, so for a profile term persistence alone confirms the
shift (layers drifting each at its own pace, which the shortened trends then follow); a second such
shift within ``4 (shift_after + 1)`` steps says the profile's noise grew, and that term's level-2 window
is re-centred on the lowest value of the run. Bad steps in a row that move different things stay flagged.

**Aftermath.** A batch that moves the gradients far moves the model too, and the optimizer's moments carry
its update for several more steps: the next clean batches' loss and gradients stay off the same way while
the model returns (or settles elsewhere). Within ``aftermath_steps`` steps of a flagged step, a step over the
threshold is that step's *aftermath*, an event (``"aftermath"``) and not a flag, when (1) every term over the
threshold was over it in the flagged step, the same way and at least as strongly, (2) the flagged step's
strongest term has fallen to at most half its strength there (a bad batch repeated moves it as far again),
and (3) no step between was back to normal (every term of the flagged step under 2 in its direction). It is
kept out of the windows like a flagged step and still joins the run of flags, so a change that lasts is
adopted as a shift as before. The price is a second bad batch of the same kind, no stronger, whose strongest
term is half the first's, right after it (docs/scoring.md measures the trade on the detection grid).

**Warm-up.** The first ``warmup_steps`` steps only fill the windows (score ``None``, not flagged);
the first few of them only start the trends. When warm-up ends, the warm-up steps' terms are computed
in-sample to start level 2 and the threshold window. A short warm-up leaves few values to estimate
from, and a scale estimated from three values is often several times too small: every later step
would look anomalous and, flagged, never teach the windows better. So while a window holds fewer
than 30 values (``n`` of them; or fewer than its capacity) its median and scale are shrunk toward a
wide prior with weight :math:`w = 1 - n/30`,
:math:`\sigma'^2 = (1 - w)\,\sigma^2 + w \max(\sigma, \sigma_0)^2` and (except the loss's)
:math:`\operatorname{med}' = (1 - w) \operatorname{med}`: :math:`\sigma_0` is, per layer, the median
scale of the same metric over the layers, for the loss 10 % of its level (0.1 on log scale), for a
level-2 term 1 (the spread of a single layer's z). Until the residual windows hold 30 clean steps,
every clean step rebuilds level 2, the profile directions and the threshold window in-sample as at
the end of warm-up (about 1.5 ms a step at 30 layers), so they stay consistent with the level-1
scales as those settle.

**Early margin.** The threshold of a young baseline is still too low: it extrapolates from a few dozen
scores, most of them computed in-sample, against the windows they built (a step scored out of sample
lies further out). Until the windows have taken :data:`_EARLY_UNTIL` (60) clean steps, warm-up
included (or ``window``, if fewer), a step is *flagged* only over the threshold raised by ``early_margin``
times the share of those steps still to come: ``threshold * (1 + early_margin * (1 - n / 60))``. A step
between the two thresholds is treated inside as a flagged one (kept out of the windows, counted in a run of
flags, a shift or an aftermath as before), but not reported: not flagged, no reasons, no aftermath event
(unless it restarts the baseline, see ``rebaseline_after``: that is reported). So the margin changes what is
flagged and nothing the scorer learns: every score, z and reason is what it would be without it.

A non-finite metric value or loss flags the step at once (also during warm-up), names the layers,
and is kept out of every window; its score is ``inf``. Absent layers or metrics are simply absent.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> scorer = BatchScorer(warmup_steps=20)
    >>> def step(shift=0.0):
    ...     return {
    ...         f"q_proj/layer_{i:02d}": {
    ...             "nuclear_norm": float(np.exp(rng.normal(0.0, 0.1))),
    ...             "effective_rank": float(np.exp(3.0 + shift + rng.normal(0.0, 0.1))),
    ...         }
    ...         for i in range(8)
    ...     }
    >>> results = [scorer.score(step(), loss=1.0) for _ in range(100)]
    >>> results[0].in_warmup, results[0].score, results[-1].in_warmup
    (True, None, False)
    >>> bad = scorer.score(step(shift=-0.5), loss=1.0)
    >>> bad.flagged, bad.reasons[0].startswith("effective_rank low in")
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from operator import itemgetter
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from gradspectra.scoring._baseline import Baseline, Block, Columns, Series, Signature, Sizes
from gradspectra.scoring._checks import check_bool, check_float, check_int, check_names
from gradspectra.scoring._window import FloatArray, ScalarWindow
from gradspectra.scoring.result import ScoreResult

#: Metrics that are positive by definition and scored on log scale unless ``log_metrics`` says otherwise.
POSITIVE_METRICS: tuple[str, ...] = (
    "nuclear_norm",
    "spectral_norm",
    "frobenius_norm",
    "stable_rank",
    "top_sv_ratio",
    "effective_rank",
    "participation_ratio",
    "effective_rank_coarse",  # the detection value (gradspectra.functional.DETECTION_METRIC)
)

LOSS_KEY = "loss"
PROFILE_SUFFIX = "_profile"
LossSide = Literal["high", "both"]
LOSS_SIDES: tuple[str, ...] = ("high", "both")
_IQR_PER_SIGMA = 1.3489795003921634  # 2 * Phi^{-1}(3/4)
_LOG_FLOOR = 1e-30  # log(0) for a zero gradient becomes log(1e-30): a huge "low", not a NaN
_MIN_AGGREGATE_SCALE = 0.05  # level 2: below this, a steady term would amplify rounding noise
_TAIL_QUANTILE = 0.9  # the threshold extrapolates from the median and this quantile of accepted scores
_CONTINUES = 1.0  # an accepted step this many robust deviations out keeps a run of flags going
_AFTERMATH_CONTINUES = 2.0  # ... and the aftermath of the latest flagged step
_AFTERMATH_FALL = 0.5  # ... and only once its strongest term has fallen to this fraction of what it was
_GUARD = 0.75  # steps scoring above this fraction of the threshold do not update the baseline windows
_Q_FLOOR = 1e-12  # log Q of a profile that matches its basis exactly
_PRIOR_UNTIL = 30  # windows with fewer clean values than this lean on a prior (see _robust_z)
_EARLY_UNTIL = 2 * _PRIOR_UNTIL  # the early margin fades over this many clean steps (see **Early margin**)
_LOSS_PRIOR_SCALE = 0.1  # the loss's prior spread: 10 % of its level (0.1 on log scale)
_LEVEL2_PRIOR_SCALE = 1.0  # level 2's prior scale: a term's clean spread when it is one layer's z
_PROFILE_TRIM = 0.25  # the common level a profile is taken from: the interquartile mean over layers
_MAX_LISTED_LAYERS = 5
_PROFILE_LISTED_LAYERS = 3
_STATE_VERSION = 2
_QUARTILES = (0.25, 0.5, 0.75)
_FLOAT_MAX = float(np.finfo(np.float64).max)


class BatchScorer:
    """Scores each step's per-layer gradient metrics (and loss) against a running robust baseline.

    Args:
        metrics: metric names to score; ``None`` scores every metric name seen.
        use_loss: also score the loss (a separate term, ``"loss"`` in ``z`` and the reasons).
        warmup_steps: steps that only build the baseline before the first score, in ``[5, window]``.
            A short one is safe: until the windows hold 30 clean steps their scales lean on wide
            priors (see **Warm-up** above).
        window: how many recent clean steps the robust scales (level 1), the level-2 baselines and
            the profile directions are computed from. In ``[10, 100000]``.
        trend_window: how many recent steps the robust local trend of every series is fitted to,
            in ``[4, 10000]``; shorter follows faster drift, longer is less noisy.
        false_flag_rate: target fraction of clean steps flagged, in ``(0, 0.05]``.
        min_threshold: the threshold never falls below this many robust standard deviations. 3.5: on the
            tuning half of the detection grid (docs/scoring.md), 3.0 flagged 1.9 % of the steps of clean
            runs with exact spectra, up to 7.7 % in one run, where the threshold sat on its floor.
        layer_threshold: a layer counts as "high"/"low" in the reasons when its own ``|z|`` exceeds this.
        layer_trim: fraction of layers cut from each end before averaging ``z`` across layers, in
            ``[0, 0.5)``; 0.25 averages the middle half.
        log_metrics: metrics scored on log scale; ``None`` = :data:`POSITIVE_METRICS`.
        log_loss: score ``log(loss)`` rather than the loss. Default False: late in a fine-tune the
            per-batch loss spreads over decades (0.1 vs 0.3 for clean batches), which log scale
            blows up, while a bad batch's loss (0.7 for text the model cannot read) stands out on
            linear scale. Linear scale also takes losses that can be <= 0.
        loss_side: ``"high"`` (default) scores only a loss above its trend, ``"both"`` either way.
        loss_trend: predict the loss from its local trend like every other series; by default (False)
            from the median of its last ``loss_window`` values. A falling loss then sits below the
            prediction, which a one-sided loss term ignores, while a run of bad batches cannot bend
            a trend line up to meet them (see docs/scoring.md for the measured difference).
        loss_window: how many recent losses predict the next (``None``: ``trend_window``).
        high_metrics: metrics whose level counts only when it is *higher* than usual. Default the
            norms (nuclear, Frobenius, spectral): both papers find larger gradients for worse data, and
            a batch with smaller gradients than usual (an easy batch) is not a bad one. Rank-type
            metrics stay two-sided: effective rank falls for a repeated sample and rises for noise.
        profile_metrics: metrics whose layer profile (shape across layers) is scored as well; empty
            for none. Default: the nuclear norm.
        profile_components: usual directions of profile change left out of the profile term, in ``[0, 10]``.
        min_scale: floor on a series' robust scale: absolute on log scale (``1e-3`` = 0.1 %), relative
            to the prediction on linear scale. In ``(0, 1]``.
        rebaseline_after: after this many consecutive steps over the threshold (flagged, or held by the early
            margin), forget the baseline and warm up again (a regime change); ``None`` never does. With
            ``shift_after`` a consistent change is adopted long before; this is the last resort for one that is
            not consistent.
        shift_after: how many flagged steps with the same signature in one run (see **Spikes and
            shifts** above) may be flagged before the next such step is taken as a regime shift
            (an event, not a flag; the trends adopt the new level). In ``[2, 1000]`` (the adopted trends
            keep at least 5 rows, of which the run must be the majority); ``None`` never.
        shift_agreement: how alike two steps' per-layer patterns must be to count as the same change:
            the cosine between their per-layer z (or profile remainders) over the layers both
            measured, in ``[-1, 1]``; a pattern of one shared layer is alike when its sign is, patterns of
            disjoint layers never are.
        threshold_window: how many recent accepted scores set the threshold, in
            ``[warmup_steps, 1000000]``.
        aftermath_steps: for how many steps after a flagged step a step over the threshold may be its aftermath
            (an event, not a flag; see **Aftermath** above), in ``[1, 1000]``; ``None``: never. 4: on the tuning
            half of the detection grid (docs/scoring.md) 2 flagged more clean batches and 8 the same as 4 (a step
            back to normal ends an aftermath, and a fourth flag in a row is a shift).
        early_margin: how much higher the threshold for a flag is while the baseline is young (see **Early
            margin** above), as a fraction of the threshold before any clean step (0.75 of it at the first scored
            step of the default warm-up), fading to none after 60 clean steps; ``0`` turns it off. In
            ``[0, 10]``. 0.5: on the tuning half of the detection grid (docs/scoring.md) 0.2 and 0.3 flagged more
            clean batches and 1.0 missed more bad ones.

    Raises:
        ValueError: an argument is out of range (the message names it, the range and the value).
    """

    def __init__(
        self,
        *,
        metrics: Sequence[str] | None = None,
        use_loss: bool = True,
        warmup_steps: int = 20,
        window: int = 100,
        trend_window: int = 32,
        false_flag_rate: float = 0.01,
        min_threshold: float = 3.5,
        layer_threshold: float = 3.0,
        layer_trim: float = 0.25,
        log_metrics: Sequence[str] | None = None,
        log_loss: bool = False,
        loss_side: LossSide = "high",
        loss_trend: bool = False,
        loss_window: int | None = 100,
        high_metrics: Sequence[str] = ("nuclear_norm", "frobenius_norm", "spectral_norm"),
        profile_metrics: Sequence[str] = ("nuclear_norm",),
        profile_components: int = 2,
        min_scale: float = 1e-3,
        rebaseline_after: int | None = 100,
        threshold_window: int = 1000,
        shift_after: int | None = 3,
        shift_agreement: float = 0.5,
        aftermath_steps: int | None = 4,
        early_margin: float = 0.5,
    ) -> None:
        self.window = check_int("window", window, 10, 100_000)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 5, self.window, f"window={self.window}")
        self.trend_window = check_int("trend_window", trend_window, 4, 10_000)
        self.threshold_window = check_int(
            "threshold_window",
            threshold_window,
            self.warmup_steps,
            1_000_000,
            low_text=f"warmup_steps={self.warmup_steps}",
        )
        self.false_flag_rate = check_float("false_flag_rate", false_flag_rate, 0.0, 0.05, low_open=True)
        self.min_threshold = check_float("min_threshold", min_threshold, 0.0, low_open=True)
        self.layer_threshold = check_float("layer_threshold", layer_threshold, 0.0, low_open=True)
        self.layer_trim = check_float("layer_trim", layer_trim, 0.0, 0.5, high_open=True)
        self.min_scale = check_float("min_scale", min_scale, 0.0, 1.0, low_open=True)
        self.use_loss = check_bool("use_loss", use_loss)
        self.log_loss = check_bool("log_loss", log_loss)
        if loss_side not in LOSS_SIDES:
            raise ValueError(f"`loss_side` can be {', '.join(LOSS_SIDES)}, got {loss_side!r}")
        self.loss_side: LossSide = loss_side
        self.loss_trend = check_bool("loss_trend", loss_trend)
        self.loss_window = (
            self.trend_window if loss_window is None else check_int("loss_window", loss_window, 4, 10_000)
        )
        self.profile_metrics = check_names("profile_metrics", profile_metrics, allow_empty=True)
        self.high_metrics = frozenset(check_names("high_metrics", high_metrics, allow_empty=True))
        self.profile_components = check_int("profile_components", profile_components, 0, 10)
        self.rebaseline_after = None if rebaseline_after is None else check_int("rebaseline_after", rebaseline_after, 1)
        self.shift_after = None if shift_after is None else check_int("shift_after", shift_after, 2, 1000)
        self.shift_agreement = check_float("shift_agreement", shift_agreement, -1.0, 1.0)
        self.aftermath_steps = (
            None if aftermath_steps is None else check_int("aftermath_steps", aftermath_steps, 1, 1000)
        )
        self.early_margin = check_float("early_margin", early_margin, 0.0, 10.0)
        self._fixed_metrics = metrics is not None
        fixed = check_names("metrics", metrics, allow_empty=False) if metrics is not None else ()
        self.log_metrics = frozenset(
            POSITIVE_METRICS if log_metrics is None else check_names("log_metrics", log_metrics, allow_empty=True)
        )
        # the threshold's exponential tail: from the median and 90th percentile to the 1 - alpha quantile
        self._tail_factor = math.log((1.0 - _TAIL_QUANTILE) / self.false_flag_rate) / math.log(
            (1.0 - 0.5) / (1.0 - _TAIL_QUANTILE)
        )
        # the first steps of a warm-up only start the trends; the rest also give residuals
        self._trend_start = max(2, min(5, self.warmup_steps // 4, self.trend_window))
        self._min_history = self.warmup_steps - self._trend_start

        self._sizes = Sizes(
            window=self.window,
            trend_window=self.trend_window,
            loss_window=self.loss_window,
            threshold_window=self.threshold_window,
            profile_components=self.profile_components,
        )
        self._base: Baseline  # everything learnt from past steps; replaced whole on a reset
        self._layers: list[str] = []
        self._layer_index: dict[str, int] = {}
        self._metrics: list[str] = []
        self._metric_index: dict[str, int] = {}
        self._log_mask = np.zeros(0, dtype=bool)
        self._names: list[str] | None = None  # caches, cleared when a metric is added
        self._one_sided_mask: NDArray[np.bool_] | None = None
        self._floor_cache: FloatArray | None = None
        self._floor_values_fixed = False
        self._all_log = True
        self._count_cache: dict[tuple[int, ...], tuple[bool, NDArray[np.bool_] | None]] = {}
        self._count_cache_of: object = None  # the window the count cache describes
        for name in fixed:
            self._add_metric(name)
        self._reset_baseline()
        self.steps = 0  # steps scored, warm-up included; also the time axis of the trends
        self.flagged_steps = 0
        self._held_at: float | None = None  # the latest step over the threshold left unflagged by the early margin

    # ------------------------------------------------------------------ public API

    @property
    def in_warmup(self) -> bool:
        """Whether the next step will still be part of the warm-up."""
        return self._base.accepted < self.warmup_steps

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names seen so far, in order of first appearance."""
        return tuple(self._layers)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Metric names scored (fixed by ``metrics=`` or as seen so far)."""
        return tuple(self._metrics)

    @property
    def threshold(self) -> float | None:
        """The threshold the next step's score must exceed to be flagged (with the early margin while the
        baseline is young); ``None`` during warm-up."""
        return None if self.in_warmup else self._threshold() * self._early_factor()

    def score(self, layer_metrics: Mapping[str, Mapping[str, float]], loss: float | None = None) -> ScoreResult:
        """Score one step, then update the baseline (see the module docstring for which windows).

        Args:
            layer_metrics: ``{layer name: {metric name: value}}``; values are floats (or 0-d
                tensors); NaN/inf values flag the step, absent layers or metrics are skipped.
            loss: the step's loss, or ``None``; ignored when ``use_loss=False``.

        Returns:
            The :class:`ScoreResult`. Never raises on non-finite values.
        """
        step = self._read_step(layer_metrics, loss)
        residuals = self._residuals(step)
        if self.in_warmup:
            result = self._warm_up(step, residuals)
        elif residuals is None:  # only after loading a state with shorter trends than this scorer needs
            result = self._follow_trends(step)
        else:
            result = self._judge(step, residuals)
        if result.flagged:
            self.flagged_steps += 1
        return result

    def forget_flag(self) -> None:
        """Forget the latest flagged step, so that the next steps are not taken as its aftermath.

        For a caller that knows the flagged batch moved nothing (its optimizer step was skipped) or that
        steps happened which this scorer did not see (the monitor's light steps between its full ones).
        """
        self._base.spike = None

    def state_dict(self) -> dict[str, Any]:
        """Picklable state (plain lists, floats and ints): every window oldest first, and counters.

        The windows are stored whole so that a reloaded scorer continues exactly: about
        ``layers * (metrics + profile metrics) * (window + trend_window)`` floats.
        """
        return {
            "version": _STATE_VERSION,
            "layers": list(self._layers),
            "metrics": list(self._metrics),
            "profile_metrics": list(self.profile_metrics),
            "steps": self.steps,
            "flagged_steps": self.flagged_steps,
            "held_at": self._held_at,
            **self._base.state(self._term_names()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; missing keys take defaults.

        Metrics are matched by name: with ``metrics=`` fixed, a stored metric outside that list is
        dropped and a listed metric the state lacks starts empty. A state written by an older version
        (another score) keeps its layer and metric names and counters, and the baseline warms up again.
        """
        layers = [str(n) for n in state.get("layers", [])]
        stored_metrics = [str(n) for n in state.get("metrics", [])]
        self._set_names(layers, list(self._metrics) if self._fixed_metrics else stored_metrics)
        self.steps = int(state.get("steps", 0))
        self.flagged_steps = int(state.get("flagged_steps", 0))
        held_at = state.get("held_at")  # absent from older states
        self._held_at = None if held_at is None else float(held_at)
        self._reset_baseline()
        if int(state.get("version", 1)) != _STATE_VERSION:
            return
        metrics = Columns(tuple(stored_metrics), tuple(self._metrics))
        stored_profile = tuple(str(n) for n in state.get("profile_metrics", []))
        profile = Columns(stored_profile, self.profile_metrics)
        self._base = Baseline.load(self._sizes, state, len(layers), metrics, profile)
        if metrics.stored != metrics.current or profile.stored != profile.current:
            self._base.clear_run()  # the run's marks name level-2 rows of the stored terms
            self._base.spike = None
            self._base.noise_shifts, self._base.noise_levels = {}, {}
        if not self.in_warmup and not self._base.load_level2(state, self._term_names()):
            self._start_scoring()  # a state without level 2: rebuild it as at the end of warm-up

    # ------------------------------------------------------------------ internals: one step

    def _read_step(self, layer_metrics: Mapping[str, Mapping[str, float]], loss: float | None) -> _Step:
        t = float(self.steps)
        self.steps += 1
        y, nonfinite_layers, nonfinite = self._read(layer_metrics)
        loss_y, loss_bad = self._read_loss(loss)
        problems: list[str] = []
        if nonfinite_layers:
            listed = ", ".join(nonfinite_layers[:_MAX_LISTED_LAYERS])
            more = ", ..." if len(nonfinite_layers) > _MAX_LISTED_LAYERS else ""
            noun = "layer" if len(nonfinite_layers) == 1 else "layers"
            problems.append(f"non-finite gradient in {len(nonfinite_layers)} {noun}: {listed}{more}")
        if loss_bad is not None:
            problems.append(f"non-finite loss ({loss_bad})")
        return _Step(t, {"values": y, "loss": np.array([loss_y])}, problems, nonfinite)

    def _warm_up(self, step: _Step, residuals: Series | None) -> ScoreResult:
        """A warm-up step only fills the windows; the last one also starts level 2 and the threshold."""
        if step.problems:
            return ScoreResult(None, True, step.problems, {}, in_warmup=True)
        if not step.measured:
            return ScoreResult(None, False, [], {}, in_warmup=True)
        self._base.push_trends(step.series, step.t, for_slope=True)
        if residuals is not None:
            self._base.push_clean(residuals)
        self._base.accepted += 1
        if not self.in_warmup:
            self._start_scoring()
        return ScoreResult(None, False, [], {}, in_warmup=True)

    def _follow_trends(self, step: _Step) -> ScoreResult:
        """No score until the trends are long enough again, but a measured step lengthens them."""
        if not step.problems and step.measured:
            self._base.push_trends(step.series, step.t, for_slope=True)
        nonfinite = bool(step.problems)
        threshold = self._threshold() * self._early_factor()
        return ScoreResult(math.inf if nonfinite else None, nonfinite, step.problems, {}, threshold=threshold)

    def _judge(self, step: _Step, residuals: Series) -> ScoreResult:
        """Score a step after warm-up, flag it or not, and let it teach the windows it may teach.

        ``threshold`` decides what the scorer learns from the step; ``flag_at`` (the same, or above it by the
        early margin while the baseline is young) what it reports.
        """
        quartiles = self._base.window.quantiles(_QUARTILES)  # before this step is pushed
        z = self._standardize_all(residuals, quartiles)
        terms, remainders = self._terms(z, residuals["profile"])
        z_terms = self._level2(terms, quartiles)
        strength = self._strength(z_terms)
        finite_strengths = [v for v in strength.tolist() if math.isfinite(v)]
        score: float | None = max(finite_strengths) if finite_strengths else None
        threshold = self._threshold()
        flag_at = threshold * self._early_factor()
        over = score is not None and score > threshold
        reported = score is not None and score > flag_at
        nonfinite = bool(step.problems)
        names = self._term_names()
        z_dict = {name: v for name, v in zip(names, z_terms.tolist()) if math.isfinite(v)}
        reasons = list(step.problems)
        if nonfinite or over:  # every term over the threshold, as without the margin
            reasons.extend(self._term_reasons(step, z["values"], remainders, z_terms, strength, threshold))
        if nonfinite:  # kept out of every window; it breaks a run of like flags (it says nothing of their change)
            self._base.clear_run()
            self._base.spike = None  # nor of what the flag before it moved
            return ScoreResult(math.inf, True, reasons, z_dict, in_warmup=False, threshold=flag_at)
        if score is None:  # nothing measured: keep the windows as they are rather than evict for nothing
            return ScoreResult(None, False, [], z_dict, in_warmup=False, threshold=flag_at)
        self._base.push_trends(step.series, step.t, for_slope=not over)
        if over:
            shift = None
            if self.shift_after is not None:
                signature = self._signature(z["values"], remainders, z_terms, strength, threshold)
                values = {k: float(terms[k]) for k in signature}
                shift = self._shift(signature, values, z["values"], z_terms, strength, step.t)
            if shift is not None:
                self._base.spike = None
                return ScoreResult(score, False, [], z_dict, in_warmup=False, threshold=flag_at, events=[shift])
            aftermath = self._aftermath(z_terms, strength, threshold, step.t)
            if aftermath is not None:  # part of the run of flags (a lasting change is still a shift), not flagged
                events = [aftermath] if reported else []  # under the early margin it would not have been flagged
                return ScoreResult(score, False, [], z_dict, in_warmup=False, threshold=flag_at, events=events)
            self._base.spike = (step.t, self._over(z_terms, strength, threshold))
            restarted = self._count_flag()
            if not reported and not restarted:  # under the early margin: a flag inside, not reported
                self._held_at = step.t
                return ScoreResult(score, False, [], z_dict, in_warmup=False, threshold=flag_at)
            reasons.extend(restarted)  # a restart is reported, under the margin or not
        else:
            self._continue_run(z_terms, strength)
            self._accept(score, threshold, residuals, terms, z["profile"])
        return ScoreResult(score, over, reasons, z_dict, in_warmup=False, threshold=flag_at)

    def _signature(
        self,
        z_values: FloatArray,
        remainders: FloatArray,
        z_terms: FloatArray,
        strength: FloatArray,
        threshold: float,
    ) -> Signature:
        """What a flagged step moved: each term over the threshold, its direction and its per-layer pattern.

        The pattern of a metric's level is its layers' z, of a profile its remainders, of the loss none.
        """
        n_profile = len(self.profile_metrics)
        out: Signature = {}
        for k, (sign, _) in self._over(z_terms, strength, threshold).items():
            pattern = None
            if 1 <= k <= n_profile:
                pattern = remainders[:, k - 1].copy()
            elif k > n_profile:
                pattern = z_values[:, k - 1 - n_profile].copy()
            out[k] = (sign, pattern)
        return out

    def _shift(
        self,
        signature: Signature,
        values: dict[int, float],
        z_values: FloatArray,
        z_terms: FloatArray,
        strength: FloatArray,
        t: float,
    ) -> dict[str, str] | None:
        """A flagged step that ends ``shift_after + 1`` flags with the same signature within a span is a shift.

        Returns the event (and adopts the new level) or ``None`` (the step stays flagged; its signature
        joins the run). The span is ``2 (shift_after + 1)`` steps: steps just under the threshold between
        the flags (a change persists but noise carries some steps below) do not hide it. Same signature:
        a term over the threshold in each of those steps, the same way, with per-layer patterns alike from
        step to step (cosine at least ``shift_agreement``). A layer profile's term needs persistence
        only: a profile unusual step after step, in other layers each time, is a change of the profile's
        noise (layers drifting each at its own pace, which shorter trends follow), not a bad batch repeated;
        a second such shift soon after says the noise itself changed (see :meth:`_noise_shift`).
        """
        assert self.shift_after is not None
        base = self._base
        base.extend_run(signature, values, t, 2 * (self.shift_after + 1))
        if len(base.flag_run) <= self.shift_after:
            return None
        steps = base.flag_run[-(self.shift_after + 1) :]  # the latest steps of the run are compared
        n_profile = len(self.profile_metrics)
        common = [k for k in steps[-1] if all(k in s and s[k][0] == steps[-1][k][0] for s in steps)]
        alike = {k for k in common if all(_alike(a[k][1], b[k][1], self.shift_agreement) for a, b in pairwise(steps))}
        common = [k for k in common if k in alike or 1 <= k <= n_profile]
        if not common:
            return None
        k = max(common, key=lambda j: float(strength[j]))
        names = self._term_names()
        direction = "high" if z_terms[k] > 0 else "low"
        if k == 0:
            what = f"{LOSS_KEY} {direction}"
        elif k <= n_profile:
            changed = "changed" if k in alike else "unusual in other layers each step"
            what = f"{self.profile_metrics[k - 1]} layer profile {changed}"
        else:
            col = z_values[:, k - 1 - n_profile]
            with np.errstate(invalid="ignore"):
                beyond = col > self.layer_threshold if z_terms[k] > 0 else col < -self.layer_threshold
            count, measured = int(np.count_nonzero(beyond)), int(np.count_nonzero(~np.isnan(col)))
            what = f"{names[k]} {direction} in {count}/{measured} layers"
        rows = len(steps)
        first = base.flag_times[-rows]
        old_loss = base.levels[1]
        base.adopt(since=first, minimum=self._trend_start)
        noise = self._noise_shift(k, t, rows) if 1 <= k <= n_profile and k not in alike else ""
        if 0 in common and self.use_loss and not self.log_loss:
            # the loss moved with the shift: on linear scale its spread follows its level
            new_loss = abs(float(self._base.trends["loss"].predict(t, slope=self.loss_trend)[0]))
            if math.isfinite(new_loss) and new_loss > 0 and math.isfinite(old_loss) and old_loss > 0:
                self._base.scale_loss_residuals(min(max(new_loss / old_loss, 1e-3), 1e3))
        base.clear_run()
        base.consecutive_flags = 0
        span = int(t - first) + 1
        when = f"{rows} steps in a row" if span == rows else f"{rows} of the last {span} steps"
        message = (
            f"shift: {what} for {when} (z={float(z_terms[k]):.1f}){noise}; "
            f"taken as the new normal from here (not flagged), the baseline follows the new level"
        )
        return {"kind": "shift", "message": message}

    def _noise_shift(self, k: int, t: float, rows: int) -> str:
        """A profile term's shift by persistence alone, at step ``t`` (the run's latest ``rows`` flags): when its
        previous one was at most ``4 (shift_after + 1)`` steps before, the shorter trends did not quiet it and
        the profile's noise has changed; its level-2 window is re-centred on the lowest value of the run (all
        of them over the threshold: a cautious guess of the new level). A single burst of bad batches with
        unusual profiles is one shift only, so it cannot make the term blind to the next ones. Returns what
        the message adds."""
        assert self.shift_after is not None
        base = self._base
        last = base.noise_shifts.get(k)
        base.noise_shifts[k] = t
        if last is None or t - last > 4 * (self.shift_after + 1):
            return ""
        values = [v[k] for v in base.flag_values[-rows:] if k in v and math.isfinite(v[k])]
        if not values:
            return ""
        base.recentre_term(k, min(values))
        return f"; the second in {int(t - last)} steps: its noise changed, its baseline moves up to the run's lowest"

    def _over(self, z_terms: FloatArray, strength: FloatArray, threshold: float) -> dict[int, tuple[float, float]]:
        """Each term over the threshold: its direction and strength."""
        over = np.flatnonzero(np.nan_to_num(strength, nan=-1.0) > threshold).tolist()
        return {k: (math.copysign(1.0, float(z_terms[k])), float(strength[k])) for k in over}

    def _aftermath(
        self, z_terms: FloatArray, strength: FloatArray, threshold: float, t: float
    ) -> dict[str, str] | None:
        """The event saying that a step over the threshold is the aftermath of a flagged step shortly before
        (see **Aftermath** above; the step is not flagged), else ``None``.

        The spike is the latest flagged step; :meth:`_continue_run` forgets it at a step back to normal.
        """
        spike = self._base.spike
        if self.aftermath_steps is None or spike is None:
            return None
        since, moved = spike
        after = int(t - since)
        if not 0 < after <= self.aftermath_steps:
            return None
        now = self._over(z_terms, strength, threshold)
        for k, (sign, value) in now.items():
            if k not in moved or moved[k][0] != sign or value > moved[k][1]:
                return None
        top = max(moved, key=lambda j: moved[j][1])
        fallen = moved[top][0] * float(z_terms[top])
        if not math.isfinite(fallen) or fallen > _AFTERMATH_FALL * moved[top][1]:
            return None  # (not measured now, such as a loss not given: nothing says it fell)
        n_profile = len(self.profile_metrics)
        names = [
            f"{name[: -len(PROFILE_SUFFIX)]} layer profile" if 1 <= j <= n_profile else name
            for j, name in enumerate(self._term_names())
        ]
        order = sorted(now, key=lambda j: -now[j][1])
        what = ", ".join(
            f"{names[j]} unusual" if 1 <= j <= n_profile else f"{names[j]} {'high' if now[j][0] > 0 else 'low'}"
            for j in order
        )
        k = order[0]
        steps = "step" if after == 1 else "steps"
        fell = (
            ""
            if top == k
            else f"; {names[top]} {float(z_terms[top]):.1f} now, {moved[top][0] * moved[top][1]:.1f} then"
        )
        # the step before may have been over the threshold only inside (under the early margin: not flagged)
        before = "a flagged batch" if since != self._held_at else "a batch over the threshold (not flagged then)"
        message = (
            f"aftermath: {what} {after} {steps} after {before} that moved {'it' if len(now) == 1 else 'them'} "
            f"at least as far ({names[k]} z={float(z_terms[k]):.1f} now, {moved[k][0] * moved[k][1]:.1f} then{fell}): "
            f"the model still moving from that batch's update, not a new bad batch; not flagged"
        )
        return {"kind": "aftermath", "message": message}

    def _continue_run(self, z_terms: FloatArray, strength: FloatArray) -> None:
        """An accepted step keeps a run of flags going only where the change goes on in it, under the threshold:
        a term of the run's latest flag at least ``_CONTINUES`` robust deviations out, the same way. A level
        that moved for good sits there at every step, while the clean steps between bad batches of one
        kind do not: these end the run (and the bad batches stay flagged). A step with every term of the latest
        flagged step under ``_AFTERMATH_CONTINUES`` in its direction ends that step's aftermath: a step over the
        threshold after it is judged on its own."""
        base = self._base
        if base.spike is not None and not any(
            strength[k] >= _AFTERMATH_CONTINUES and sign * z_terms[k] > 0 for k, (sign, _) in base.spike[1].items()
        ):
            base.spike = None
        if not base.flag_run:
            return
        latest = base.flag_run[-1]
        if not any(strength[k] >= _CONTINUES and sign * z_terms[k] > 0 for k, (sign, _) in latest.items()):
            base.clear_run()

    def _count_flag(self) -> list[str]:
        """A flagged step in a row; after ``rebaseline_after`` of them the regime has changed: start over."""
        self._base.consecutive_flags += 1
        flags = self._base.consecutive_flags
        if self.rebaseline_after is None or flags < self.rebaseline_after:
            return []
        self._reset_baseline()
        return [f"baseline restarted after {flags} consecutive steps over the threshold (regime change?)"]

    def _accept(
        self, score: float, threshold: float, residuals: Series, terms: FloatArray, z_profile: FloatArray
    ) -> None:
        """An accepted step sets the threshold; only a clean-looking one also teaches the scales and directions."""
        base = self._base
        base.consecutive_flags = 0
        assert base.scores is not None
        base.scores.push(score)
        young = self._young()
        if score <= _GUARD * threshold:
            base.push_clean(residuals, terms, z_profile)
            base.accepted += 1
            if young:  # level 2 and the threshold are rebuilt in-sample, as at the end of warm-up
                self._start_scoring(rebuild=True)
                if not self._young():
                    base.young_scores = []
        elif young:  # kept for the rebuilds, or they would forget it
            base.young_scores.append(float(np.float32(score)))

    # ------------------------------------------------------------------ internals: bookkeeping

    def _young(self) -> bool:
        """Whether the residual windows hold fewer clean steps than the priors fade over (see :func:`_robust_z`)."""
        window = self._base.window
        return window.pushes < min(_PRIOR_UNTIL, window.capacity)

    def _reset_baseline(self) -> None:
        self._base = Baseline(self._sizes, len(self._layers), len(self._metrics), len(self.profile_metrics))

    def _term_names(self) -> list[str]:
        """Level-2 rows: the loss, the profile terms (fixed), then one level term per metric (growing)."""
        if self._names is None:
            self._names = [LOSS_KEY, *(m + PROFILE_SUFFIX for m in self.profile_metrics), *self._metrics]
        return self._names

    def _set_names(self, layers: Sequence[str], metrics: Sequence[str]) -> None:
        self._layers, self._layer_index = [], {}
        self._metrics, self._metric_index, self._log_mask = [], {}, np.zeros(0, dtype=bool)
        self._all_log = True
        self._names, self._one_sided_mask, self._floor_cache = None, None, None
        for name in layers:
            self._add_layer(name)
        for name in metrics:
            self._add_metric(name)

    def _add_layer(self, name: str) -> None:
        self._layer_index[name] = len(self._layers)
        self._layers.append(name)

    def _add_metric(self, name: str) -> None:
        self._metric_index[name] = len(self._metrics)
        self._metrics.append(name)
        self._log_mask = np.append(self._log_mask, name in self.log_metrics)
        self._all_log = bool(self._log_mask.all())
        self._names = None
        self._one_sided_mask = None

    def _register(self, layer_metrics: Mapping[str, Mapping[str, float]], check_metrics: bool = True) -> None:
        """Give new layers (and, unless ``metrics=`` is fixed, new metrics) a row in every window.

        ``check_metrics=False`` looks for new layers only (:meth:`_read` looks for new metrics as it reads).
        """
        n_layers, n_metrics = len(self._layers), len(self._metrics)
        for layer in [name for name in layer_metrics if name not in self._layer_index]:
            self._add_layer(layer)
        if check_metrics and not self._fixed_metrics:
            known = self._metric_index.keys()
            for values in layer_metrics.values():
                if not known >= values.keys():
                    for name in values:
                        if name not in self._metric_index and name != LOSS_KEY:
                            self._add_metric(name)
        if (len(self._layers), len(self._metrics)) != (n_layers, n_metrics):
            self._base.grow(len(self._layers), len(self._metrics), len(self.profile_metrics))

    def _read(
        self, layer_metrics: Mapping[str, Mapping[str, float]]
    ) -> tuple[FloatArray, list[str], NDArray[np.bool_] | None]:
        """The step as a (layers, metrics) array on the scoring scale (NaN = absent or non-finite).

        Also the layers with a non-finite value and, if there are any, which entries those were.
        """
        self._register(layer_metrics, check_metrics=not self._metrics)
        metrics = self._metrics
        shape = (len(self._layers), len(metrics))
        nonfinite_layers: list[str] = []
        nonfinite: NDArray[np.bool_] | None = None
        if metrics and layer_metrics:
            get_all = itemgetter(*metrics) if len(metrics) > 1 else (lambda values: (values[metrics[0]],))
            n_metrics = len(metrics)
            # a layer whose dict holds all the known metrics and no more keys brings no new metric
            look = not self._fixed_metrics
            known = self._metric_index.keys()
            rows: list[tuple[Any, ...]] = []
            absent = [0] * len(layer_metrics)  # per given layer: how many of the metrics it lacks
            if n_metrics == 1 and not look:  # one fixed metric (the light scorer): every layer has it, usually
                try:
                    rows = [(values[metrics[0]],) for values in layer_metrics.values()]
                except KeyError:
                    rows = []
            for i, values in enumerate(layer_metrics.values() if not rows else ()):
                try:
                    rows.append(get_all(values))
                except KeyError:  # some metric absent on this layer
                    row = tuple(values.get(m) for m in metrics)
                    rows.append(row)
                    absent[i] = row.count(None)
                if (
                    look
                    and len(values) != n_metrics - absent[i]
                    and any(name not in known and name != LOSS_KEY for name in values)
                ):
                    self._register(layer_metrics)  # new metrics: give them rows, then read again
                    return self._read(layer_metrics)
            # None (absent) becomes NaN here; 0-d tensors and numpy scalars convert like floats
            array = np.array(rows, dtype=np.float64)
            finite = np.isfinite(array)
            if not finite.all():
                # more non-finite entries in a row than absent ones: a given value was NaN or inf
                suspects = np.flatnonzero(array.shape[1] - finite.sum(axis=1) > np.array(absent))
                if suspects.size:
                    names = list(layer_metrics)
                    cells = [
                        (self._layer_index[names[i]], j)
                        for i in suspects.tolist()
                        for j, v in enumerate(rows[i])
                        if v is not None and not finite[i, j]
                    ]
                    if cells:
                        nonfinite = np.zeros(shape, dtype=bool)
                        nonfinite[tuple(np.array(cells).T)] = True
                        nonfinite_layers = [self._layers[r] for r in np.flatnonzero(nonfinite.any(axis=1))]
                array[~finite] = np.nan
            if len(rows) == shape[0] and list(layer_metrics) == self._layers:  # every layer, in order
                x = array
            else:
                x = np.full(shape, np.nan)
                x[[self._layer_index[layer] for layer in layer_metrics]] = array
        else:
            x = np.full(shape, np.nan)
        if self._all_log:  # NaN stays NaN
            np.log(np.maximum(x, _LOG_FLOOR, out=x), out=x)
        elif self._log_mask.any():
            x[:, self._log_mask] = np.log(np.maximum(x[:, self._log_mask], _LOG_FLOOR))
        return x, nonfinite_layers, nonfinite

    def _read_loss(self, loss: float | None) -> tuple[float, str | None]:
        """The loss on the scoring scale (NaN = not given) and, if it was non-finite, its text."""
        if not self.use_loss or loss is None:
            return math.nan, None
        value = _as_float(loss)
        if not math.isfinite(value):
            return math.nan, repr(value)
        return (math.log(max(value, _LOG_FLOOR)) if self.log_loss else value), None

    def _profile_residuals(self, values: FloatArray) -> FloatArray:
        """(layers, profile metrics): each profile metric's residuals minus their interquartile mean over layers.

        The common shift of the step cancels; and as each layer is measured against its own trend, the
        result does not depend on which layers were measured (a profile taken from the values themselves
        would jump whenever a layer far from the others' level is absent).
        """
        out = np.full((len(self._layers), len(self.profile_metrics)), np.nan)
        for j, name in enumerate(self.profile_metrics):
            m = self._metric_index.get(name)
            if m is None:
                continue
            col = values[:, m]
            if col.size >= 2 and (not np.isnan(col).any() or np.count_nonzero(np.isfinite(col)) >= 2):
                out[:, j] = col - float(_trimmed_mean(col, _PROFILE_TRIM))
        return out

    # ------------------------------------------------------------------ internals: the math

    def _residuals(self, step: _Step) -> Series | None:
        """Each series minus its trend prediction; ``None`` while the trends are too short.

        Also keeps the predictions' magnitudes, the level that the linear-scale floor is relative to.
        """
        trends = self._base.trends
        if min(len(trends["values"]), len(trends["loss"])) < self._trend_start:
            return None
        values = trends["values"].predict(step.t)
        loss = trends["loss"].predict(step.t, slope=self.loss_trend)
        self._base.levels = (values, abs(float(loss[0])))  # the values' magnitudes only when a floor needs them
        residuals = step.series["values"] - values
        return {"values": residuals, "profile": self._profile_residuals(residuals), "loss": step.series["loss"] - loss}

    def _standardize_all(self, residuals: Series, quartiles: FloatArray) -> dict[Block, FloatArray]:
        """Level-1 z of each block's residuals (an extra last axis for histories) against the window's quartiles.

        The floor on a scale is ``min_scale`` on log scale and ``min_scale`` times the series' current
        prediction on linear scale (a metric that never moves does not turn rounding noise into a huge z).
        All blocks are standardised at once, as one flat vector laid out as the window.
        """
        base = self._base
        layout = base.layout
        n = layout.n_residuals
        extra = residuals["values"].shape[2:]
        r = np.concatenate(
            (
                residuals["values"].reshape(-1, *extra),
                residuals["profile"].reshape(-1, *extra),
                residuals["loss"].reshape(-1, *extra),
            )
        )
        q1, med, q3 = quartiles[0, :n], quartiles[1, :n], quartiles[2, :n]
        scale = (q3 - q1) / _IQR_PER_SIGMA
        count = base.window.count[:n]
        full = min(_PRIOR_UNTIL, base.window.capacity)
        young, scored = self._counted(slice(0, n))
        if young:
            med, scale = self._shrink_level1(med, scale, count, full)
        scale = np.maximum(scale, self._floors())
        if scored is not None:
            med = np.where(scored, med, np.nan)
        if extra:
            med, scale = med.reshape(-1, 1), scale.reshape(-1, 1)
        z = (r - med) / scale
        return {b: z[layout.slices[b]].reshape(*layout.shapes[b], *extra) for b in layout.slices}

    def _shrink_level1(
        self, med: FloatArray, scale: FloatArray, count: NDArray[np.int64], full: int
    ) -> tuple[FloatArray, FloatArray]:
        """Each block of a young window shrunk toward its prior (see :func:`_robust_z`), flat in, flat out."""
        layout = self._base.layout
        med, scale = med.copy(), scale.copy()
        level_loss = self._base.levels[1]
        priors: dict[Block, _Prior] = {
            "values": _POOLED,
            "profile": _POOLED,
            # no pool for one series, and no centring: a falling loss sits below its window median by design
            "loss": _Prior(np.array([_LOSS_PRIOR_SCALE * (1.0 if self.log_loss else level_loss)]), centred=False),
        }
        for b, sl in layout.slices.items():
            shape = layout.shapes[b]
            m, sc = _shrink(med[sl].reshape(shape), scale[sl].reshape(shape), count[sl].reshape(shape), full, priors[b])
            med[sl], scale[sl] = m.reshape(-1), sc.reshape(-1)
        return med, scale

    def _floors(self) -> FloatArray:
        """The flat floor of every level-1 scale (see :meth:`_standardize_all`)."""
        layout = self._base.layout
        level_values, level_loss = self._base.levels
        cached = self._floor_cache
        if cached is None or cached.shape[0] != layout.n_residuals:
            cached = np.empty(layout.n_residuals)
            cached[layout.slices["profile"]] = np.full(layout.shapes["profile"], self.min_scale).reshape(-1) + 1e-300
            self._floor_cache = cached
            self._floor_values_fixed = False
        out = cached
        if not (self._floor_values_fixed and self._log_mask.all()):
            values = np.where(self._log_mask, self.min_scale, self.min_scale * np.abs(level_values))
            # NaN prediction (an empty trend): the log-scale floor; + 1e-300: a zero prediction never divides by 0
            out[layout.slices["values"]] = (np.nan_to_num(values, nan=self.min_scale) + 1e-300).reshape(-1)
            self._floor_values_fixed = True
        loss = self.min_scale * (level_loss if not self.log_loss else 1.0)
        if not math.isfinite(loss):  # as numpy's nan_to_num
            loss = self.min_scale if math.isnan(loss) else math.copysign(_FLOAT_MAX, loss)
        out[layout.slices["loss"].start] = loss + 1e-300
        return out

    def _terms(self, z: Series, profile_residuals: FloatArray) -> tuple[FloatArray, FloatArray]:
        """The level-2 inputs (loss, profile terms, level terms) and the profile remainders (layers, profiles).

        ``z`` may carry an extra last axis (a history); the outputs then carry it too. A profile term is
        left out (NaN) while a layer with a profile residual has no baseline for it yet (a new layer): the
        profile of the other layers alone would lie in the directions their own profiles took, and such
        near-zero remainders would teach level 2 a spread that no later step has.
        """
        z_values, z_profile = z["values"], z["profile"]
        extra = z_values.shape[2:]
        n_profile = len(self.profile_metrics)
        terms = np.full((1 + n_profile + len(self._metrics), *extra), np.nan)
        terms[0] = z["loss"][0]
        remainders = np.full(z_profile.shape, np.nan)
        for j, basis in enumerate(self._base.bases):
            x = z_profile[:, j]
            if x.ndim == 1:
                rem = basis.residual(x)
            else:  # a history: one column per step
                rem = np.stack([basis.residual(x[:, k]) for k in range(x.shape[1])], axis=-1)
            remainders[:, j] = rem
            finite = np.isfinite(rem)
            if rem.ndim == 1 and finite.all():  # the usual step: every layer measured
                terms[1 + j] = np.log(np.sum(rem * rem) / rem.size + _Q_FLOOR) if rem.size >= 2 else np.nan
                continue
            count = np.sum(finite, axis=0)
            q = np.sum(np.where(finite, rem * rem, 0.0), axis=0) / np.maximum(count, 1)
            terms[1 + j] = np.where(count >= 2, np.log(q + _Q_FLOOR), np.nan)
            new = np.isnan(x) & np.isfinite(profile_residuals[:, j])
            if new.any():
                terms[1 + j] = np.where(new.any(axis=0), np.nan, terms[1 + j])
        terms[1 + n_profile :] = _trimmed_mean(z_values, self.layer_trim)
        return terms, remainders

    def _level2(self, terms: FloatArray, quartiles: FloatArray) -> FloatArray:
        """Level-2 z of each term against its window of clean values (the window's quartiles)."""
        window = self._base.window
        rows = self._base.layout.terms
        young, scored = self._counted(rows)
        return _robust_z(
            terms,
            quartiles[:, rows],
            window.count[rows],
            window.capacity,
            np.float64(_MIN_AGGREGATE_SCALE),
            _LEVEL2_PRIOR if young else None,
            scored,
        )

    def _counted(self, rows: slice) -> tuple[bool, NDArray[np.bool_] | None]:
        """For the window's series ``rows``: whether any is young (shrunk toward its prior), and which hold
        enough values to be scored (``None``: all). Cached until a count changes."""
        window = self._base.window
        if self._count_cache_of is not window:
            self._count_cache_of = window
            self._count_cache.clear()
        key = (window.version, rows.start, rows.stop)
        cached = self._count_cache.get(key)
        if cached is None:
            count = window.count[rows]
            young = bool(count.size) and int(count.min()) < min(_PRIOR_UNTIL, window.capacity)
            scored = count >= min(self._min_history, window.capacity)
            cached = (young, None if scored.all() else scored)
            if len(self._count_cache) > 8:
                self._count_cache.clear()
            self._count_cache[key] = cached
        return cached

    def _one_sided(self) -> NDArray[np.bool_]:
        """Level-2 rows that count only upwards: profiles, ``high_metrics``, the loss if ``loss_side="high"``."""
        if self._one_sided_mask is None:
            mask = np.zeros(len(self._term_names()), dtype=bool)
            mask[0] = self.loss_side == "high"
            mask[1 : 1 + len(self.profile_metrics)] = True
            start = 1 + len(self.profile_metrics)
            for k, name in enumerate(self._metrics):
                mask[start + k] = name in self.high_metrics
            self._one_sided_mask = mask
        return self._one_sided_mask

    def _strength(self, z_terms: FloatArray) -> FloatArray:
        """Each term's contribution to the score: ``max(Z, 0)`` for one-sided terms, ``|Z|`` otherwise."""
        one_sided = self._one_sided().reshape((-1,) + (1,) * (z_terms.ndim - 1))
        out: FloatArray = np.where(one_sided, np.maximum(z_terms, 0.0), np.abs(z_terms))
        if not self.use_loss:
            out[0] = np.nan
        return out

    def _threshold(self) -> float:
        scores = self._base.scores
        if scores is None or not len(scores):
            return self.min_threshold
        median, tail = scores.quantile_values((0.5, _TAIL_QUANTILE))
        return max(self.min_threshold, tail + (tail - median) * self._tail_factor)

    def _early_factor(self) -> float:
        """``1 + early_margin * (1 - n / 60)`` while the windows have taken ``n < 60`` clean steps (or fewer
        than ``window``), else 1 (see **Early margin** above)."""
        window = self._base.window  # a full window is all a restored one can say (it holds at most its capacity)
        left = 1.0 - window.pushes / min(_EARLY_UNTIL, window.capacity)
        return 1.0 + self.early_margin * left if left > 0.0 else 1.0

    def _start_scoring(self, rebuild: bool = False) -> None:
        """End of warm-up: level-2, profile and score windows from the warm-up steps, scored in-sample."""
        base = self._base
        if rebuild:  # the rows again, from the current scales; the last directions start the iteration
            base.bases = [basis.restarted() for basis in base.bases]
        history: Series = {block: base.history(block) for block in base.layout.slices}
        z = self._standardize_all(history, base.window.quantiles(_QUARTILES))
        z_profile = z["profile"]
        for k in range(z_profile.shape[-1]):
            for j, basis in enumerate(base.bases):
                basis.push(z_profile[:, j, k])
        terms, _ = self._terms(z, history["profile"])
        base.set_terms(terms)
        for k, level in list(base.noise_levels.items()):  # a rebuild of young windows keeps a noise shift's level
            base.recentre_term(k, level)
        strength = self._strength(self._level2(terms, base.window.quantiles(_QUARTILES)))
        finite = np.isfinite(strength)
        scores = np.where(finite.any(axis=0), np.max(np.where(finite, strength, -np.inf), axis=0), np.nan)
        if base.young_scores:  # accepted after warm-up but too close to the threshold to teach the windows
            scores = np.concatenate([scores, np.asarray(base.young_scores, dtype=np.float64)])
        base.scores = ScalarWindow.from_history(scores, self.threshold_window)

    def _term_reasons(
        self,
        step: _Step,
        z_values: FloatArray,
        remainders: FloatArray,
        z_terms: FloatArray,
        strength: FloatArray,
        threshold: float,
    ) -> list[str]:
        """One reason per term above the threshold, strongest first; each true as written.

        A level reason counts the layers past ``layer_threshold`` in the term's direction over the layers
        scored, and says how many of the watched layers were not measured (deferred, absent or non-finite)
        or not yet scored, whenever there were any. When the level moved in many layers together but no
        single layer crossed, it says so instead of a count of zero.
        """
        names = self._term_names()
        n_profile = len(self.profile_metrics)
        order = np.argsort(-np.nan_to_num(strength, nan=-1.0))
        reasons = []
        for k in order:
            if not (strength[k] > threshold):
                break
            value = float(z_terms[k])
            direction = "high" if value > 0 else "low"
            if k == 0:
                reasons.append(f"{LOSS_KEY} {direction} (z={value:.1f})")
            elif k <= n_profile:
                rem = remainders[:, k - 1]
                top = [int(i) for i in np.argsort(-np.nan_to_num(np.abs(rem), nan=-1.0))[:_PROFILE_LISTED_LAYERS]]
                listed = ", ".join(
                    f"{self._layers[i]} {'high' if rem[i] > 0 else 'low'}" for i in top if np.isfinite(rem[i])
                )
                metric = self.profile_metrics[k - 1]
                notes, _ = self._coverage(step, self._metric_index[metric], int(np.count_nonzero(np.isfinite(rem))))
                text = "; ".join([*notes, f"z={value:.1f}"])
                reasons.append(f"{metric} layer profile unusual ({text})" + (f": {listed}" if listed else ""))
            else:
                m = k - 1 - n_profile
                col = z_values[:, m]
                with np.errstate(invalid="ignore"):
                    beyond = col > self.layer_threshold if value > 0 else col < -self.layer_threshold
                scored = int(np.count_nonzero(~np.isnan(col)))
                count = int(np.count_nonzero(beyond))
                notes, noun = self._coverage(step, m, scored)
                text = "; ".join([*notes, f"z={value:.1f}"])
                if count:
                    reasons.append(f"{names[k]} {direction} in {count}/{scored} {noun} ({text})")
                elif scored == 1:
                    sign = "+" if value > 0 else "-"
                    reasons.append(
                        f"{names[k]} {direction} in 1 {noun[:-1]}, whose own z is under {sign}{self.layer_threshold:g}"
                        f" ({text})"
                    )
                else:  # the level moved in many layers together, none of them far enough to count alone
                    sign = "+" if value > 0 else "-"
                    reasons.append(
                        f"{names[k]} {direction} across {scored} {noun} together, "
                        f"no single layer past z={sign}{self.layer_threshold:g} ({text})"
                    )
        return reasons

    def _coverage(self, step: _Step, metric: int, scored: int) -> tuple[list[str], str]:
        """How many watched layers a term of ``metric`` saw this step, as notes, and what to call the ones it saw.

        No notes when every watched layer was scored; else the layers not measured this step (deferred or
        absent), with a non-finite value, or measured but without a baseline yet (a new layer).
        """
        total = len(self._layers)
        if scored == total:
            return [], "layers"
        absent = int(np.count_nonzero(np.isnan(step.series["values"][:, metric])))
        nonfinite = 0 if step.nonfinite is None else int(np.count_nonzero(step.nonfinite[:, metric]))
        unmeasured = absent - nonfinite
        unscored = total - scored - absent
        notes = []
        if unmeasured:
            notes.append(f"{unmeasured} of {total} not measured this step")
        if nonfinite:
            notes.append(f"{nonfinite} of {total} non-finite")
        if unscored:
            notes.append(f"{unscored} of {total} without a baseline yet")
        return notes, ("measured layers" if unscored == 0 and nonfinite == 0 else "scored layers")


@dataclass(frozen=True)
class _Prior:
    """What a young window's scale is shrunk toward (see :func:`_robust_z`).

    ``scale``: a fixed prior scale (broadcast against the window's); ``pooled``: also the median scale
    over the layers of the same column; ``centred``: shrink the median toward 0 as well.
    """

    scale: FloatArray | None = None
    pooled: bool = False
    centred: bool = True


_POOLED = _Prior(pooled=True)  # level 1, per layer: a layer's scale leans on its metric's other layers
_LEVEL2_PRIOR = _Prior(np.array(_LEVEL2_PRIOR_SCALE))  # level 2: the spread of one layer's z


@dataclass
class _Step:
    """One step on the scoring scale, with the non-finite values found while reading it (as reasons)."""

    t: float  # the step's position on the trends' time axis
    series: dict[Block, FloatArray]  # values (layers, metrics), profile (layers, profiles), loss (1,); NaN = absent
    problems: list[str]
    nonfinite: NDArray[np.bool_] | None = None  # (layers, metrics): given but non-finite; None if none was

    @property
    def measured(self) -> bool:
        """Whether anything finite was given; a step without is skipped rather than allowed to evict window values."""
        return bool(np.isfinite(self.series["values"]).any()) or bool(np.isfinite(self.series["loss"][0]))


def _robust_z(
    x: NDArray[np.floating[Any]],
    quartiles: FloatArray,
    count: NDArray[np.int64],
    capacity: int,
    floor: NDArray[np.floating[Any]],
    prior: _Prior | None = None,
    scored: NDArray[np.bool_] | None = None,
) -> FloatArray:
    """``(x - median) / max(IQR / 1.349, floor)`` against a window's ``quartiles`` (and ``count`` values of
    its ``capacity``), the one z that both levels use.

    The median and IQR are robust to the outliers the score is looking for; the floor keeps a series
    that never moves from turning rounding noise into a huge z. NaN where ``scored`` is False (a window
    without enough values yet; ``None``: every series is scored). ``x`` may carry extra last axes (a
    history of steps).

    With a ``prior``, a window of fewer than :data:`_PRIOR_UNTIL` values (or than its capacity) is
    shrunk toward it with weight ``w = 1 - count / min(_PRIOR_UNTIL, capacity)``: the variance toward
    the square of the larger of the window's own scale and the prior scale (and, if ``pooled``, the
    median scale of the column over the layers), the median (if ``centred``) toward 0. From a handful of
    values a quartile range is often several times too small, and a scale that is too small flags
    every later step (which, flagged, never teaches the window: it would stay too small).
    """
    q1, med, q3 = quartiles
    scale = (q3 - q1) / _IQR_PER_SIGMA
    if prior is not None:
        med, scale = _shrink(med, scale, count, min(_PRIOR_UNTIL, capacity), prior)
    scale = np.maximum(scale, floor)
    if scored is not None:
        med = np.where(scored, med, np.nan)
    shape = med.shape + (1,) * (x.ndim - med.ndim)
    z: FloatArray = (x - med.reshape(shape)) / scale.reshape(shape)
    return z


def _shrink(
    med: FloatArray, scale: FloatArray, count: NDArray[np.int64], full: int, prior: _Prior
) -> tuple[FloatArray, FloatArray]:
    """Median and scale of windows holding ``count`` of ``full`` values, shrunk toward ``prior`` (:func:`_robust_z`)."""
    weight = np.maximum(1.0 - count / full, 0.0)  # in [0, 1]: counts are >= 0
    if not weight.any():
        return med, scale
    target = scale if prior.scale is None else np.fmax(scale, prior.scale)
    if prior.pooled:  # the median scale of the same column over the layers that have a spread yet
        target = np.fmax(target, _median_axis0(np.where(count >= 2, scale, np.nan)))
    shrunk_med = (1.0 - weight) * med if prior.centred else med
    shrunk_scale: FloatArray = np.sqrt((1.0 - weight) * scale * scale + weight * target * target)
    return shrunk_med, shrunk_scale


def _median_axis0(x: FloatArray) -> FloatArray:
    """Median over axis 0 ignoring NaN (all-NaN columns give NaN)."""
    ordered = np.sort(x, axis=0)
    n = np.sum(~np.isnan(x), axis=0)
    if x.ndim == 2:
        columns = np.arange(x.shape[1])
        lo = ordered[np.maximum((n - 1) // 2, 0), columns]
        hi = ordered[np.maximum(n // 2, 0), columns]
    else:
        lo = np.take_along_axis(ordered, np.maximum((n - 1) // 2, 0)[None], axis=0)[0]
        hi = np.take_along_axis(ordered, np.maximum(n // 2, 0)[None], axis=0)[0]
    out: FloatArray = np.where(n > 0, 0.5 * (lo + hi), np.nan)
    return out


def _alike(a: FloatArray | None, b: FloatArray | None, agreement: float) -> bool:
    """Whether two per-layer patterns point the same way: cosine over the layers both have, >= ``agreement``.

    No pattern (the loss): alike (the direction was already checked). Layers are only ever appended,
    so patterns of different lengths (a layer seen for the first time) are compared on the layers both
    know. No shared measured layer: not alike (the change moved elsewhere). One: alike (the direction
    was already checked; a single anchor layer cannot say more).
    """
    if a is None or b is None:
        return True
    n = min(a.shape[0], b.shape[0])
    x, y = a[:n], b[:n]
    both = np.isfinite(x) & np.isfinite(y)
    shared = int(np.count_nonzero(both))
    if shared < 2:
        return shared == 1
    x, y = x[both], y[both]
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return norm > 0 and float(x @ y) / norm >= agreement


def _as_float(value: Any) -> float:
    """A metric value as a float; ``None`` (absent) as NaN."""
    return math.nan if value is None else float(value)


def _trimmed_mean(z: FloatArray, trim: float) -> FloatArray:
    """Mean over axis 0 of the values left after cutting ``floor(trim * n)`` from each end; NaN ignored.

    ``z`` is ``(layers, ...)``; the result has the remaining shape (NaN where no layer has a value).
    """
    s = np.sort(z, axis=0)  # NaN sorts last
    if s.shape[0] and not np.isnan(s[-1]).any():  # every layer has a value: one cut for all
        n_all = s.shape[0]
        cut = math.floor(trim * n_all)
        s[:cut] = 0.0
        s[n_all - cut :] = 0.0
        dense: FloatArray = s.sum(axis=0) / max(n_all - 2 * cut, 1)
        return dense
    n = np.count_nonzero(~np.isnan(z), axis=0)
    lo = np.floor(trim * n).astype(np.int64)
    hi = n - lo
    rank = np.arange(z.shape[0]).reshape((-1,) + (1,) * (z.ndim - 1))
    keep = (rank >= lo) & (rank < hi)
    total = np.where(keep, s, 0.0).sum(axis=0)
    out: FloatArray = np.where(n > 0, total / np.maximum(hi - lo, 1), np.nan)  # never divides by 0
    return out
