r"""One anomaly score per optimizer step from per-layer gradient metrics (and the loss), against a robust baseline.

A bad batch does not move one number in one layer: it shifts a metric in the same direction in many
layers at once (effective rank up for flipped labels, down for one sample repeated; nuclear norm up
for noise text). The score therefore measures, per metric, how far the typical layer is from its own
recent past, in units that mean the same for every metric, and flags the step when the largest such
shift is rarer than the target false-flag rate allows.

**Level 1: per layer.** Each metric value :math:`x_{l,m,t}` of layer :math:`l`, metric :math:`m`,
step :math:`t` is put on log scale when the metric is positive (all spectral metrics and, by
default, the loss): :math:`y = \log \max(x, 10^{-30})`. Against the window :math:`W_{l,m}` of its
last :math:`N` accepted values (``window``):

.. math::

    z_{l,m,t} = \frac{y_{l,m,t} - \operatorname{med} W_{l,m}}{\sigma_{l,m}}, \qquad
    \sigma_{l,m} = \max\!\left(\frac{Q_{3}(W_{l,m}) - Q_{1}(W_{l,m})}{2\,\Phi^{-1}(3/4)},\ \epsilon_m\right),

where :math:`Q_1, Q_3` are the quartiles (IQR / 1.349 equals the standard deviation for normal
data), and the floor :math:`\epsilon_m` is ``min_scale`` on log scale (a relative change of 0.1 % by
default) or ``min_scale`` :math:`\cdot |\operatorname{med}|` on linear scale. The window holds the
layer's values from the last :math:`N` accepted steps (a step where the layer was absent leaves a
gap), and a series needs ``warmup_steps`` values before it gets a :math:`z`.

**Across layers.** Per metric, the interquartile mean (the mean of the middle half, ``layer_trim`` =
0.25 cut from each end) of the available layers' :math:`z`:

.. math::

    A_{m,t} = \operatorname{trim}_{\tau}\{z_{l,m,t}\}_{l}, \qquad A_{\mathrm{loss},t} = z_{\mathrm{loss},t}.

A shift shared by most layers moves :math:`A` fully; one wild layer (or up to a quarter of them)
cannot. The interquartile mean rather than the median: it is nearly as robust, less noisy for
normal data (efficiency about 0.84 against 0.64), and it still moves when a shift hits half to
three quarters of the layers, where the median barely does. How much :math:`A` varies on clean
steps depends on how correlated the layers are, which is not known in advance.

**Level 2: per metric.** So each aggregate is standardised once more, against the window :math:`V_m`
of its own last :math:`N` accepted values, with the same median and IQR:

.. math::

    Z_{m,t} = \frac{A_{m,t} - \operatorname{med} V_m}{\max(\operatorname{IQR}(V_m) / 1.349,\ 0.05)}.

This makes every :math:`Z_m` a robust z on the same scale, whatever the number of layers, their
correlation, or a constant lag of level 1 behind a drifting metric (that lag is shared by the
recent :math:`A_m` and cancels). The step's score is the largest two-sided deviation:

.. math::

    S_t = \max_m |Z_{m,t}|.

**Threshold.** :math:`S` is compared with a threshold set from the window :math:`U` of the last
``threshold_window`` accepted scores (1000 by default: :math:`S` is already standardised, so a long
window is safe and steadies the tail estimate). The :math:`(1-\alpha)` quantile of :math:`U` itself
cannot be used: flagged steps never enter :math:`U`, so its upper tail is cut at the threshold and
that quantile would ratchet down step after step. Nor can all scores be used: real bad batches
(often more than :math:`\alpha` of them) would set the threshold. So the threshold extrapolates from
the median and the 90th percentile of :math:`U`, which the cut (about :math:`\alpha` of the steps)
barely moves, with an exponential tail:

.. math::

    \theta = \max\!\left(\theta_{\min},\ q_{0.9}(U) + \bigl(q_{0.9}(U) - q_{0.5}(U)\bigr)
        \frac{\ln(0.1/\alpha)}{\ln 5}\right),

with :math:`\alpha` = ``false_flag_rate`` and :math:`\theta_{\min}` = ``min_threshold`` (so that a
perfectly steady run does not flag its rounding noise). This is a fixed point that does not drift:
censoring 1 % of the steps moves :math:`q_{0.5}` and :math:`q_{0.9}` by a fraction of a percentile.
For Gaussian :math:`Z` it is conservative (0.2-0.8 % of clean steps flagged at
:math:`\alpha = 1\%` on the synthetic lognormal streams of the tests); where the step-to-step
variation itself is heavy-tailed (a Student-t batch effect with 3 degrees of freedom) the tail
above :math:`q_{0.9}` is heavier than exponential and 3-4 % are flagged: the part of a tail that is
never observed cannot be calibrated.

**Baseline updates.** After scoring, a step that was neither flagged nor non-finite appends its
:math:`y`, :math:`A` and :math:`S` to the windows (evicting the oldest), so the baseline follows slow
drift with a lag of about :math:`N/2` steps, and flagged steps never poison it. After
``rebaseline_after`` consecutive flagged steps the scorer concludes that the regime has changed
(a new learning-rate phase, unfrozen layers), forgets its baseline and warms up again.

**Warm-up.** The first ``warmup_steps`` accepted steps only fill the windows (score ``None``, not
flagged). When warm-up ends, :math:`A` and :math:`S` of the warm-up steps are computed in-sample
against the warm-up windows, to start :math:`V` and :math:`U`; until the windows fill, the
estimates are rougher (about 1.5-2 % of clean steps flagged over the first 30 scored steps in the
synthetic tests, under 1 % afterwards).

A non-finite metric value or loss flags the step at once (also during warm-up), names the layers,
and keeps the step out of the baseline; its score is ``inf``. Absent layers or metrics are simply
absent: nothing is flagged for them.

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
from operator import itemgetter
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gradspectra.scoring._checks import check_bool, check_float, check_int, check_names
from gradspectra.scoring._window import FloatArray, ScalarWindow, SortedWindow
from gradspectra.scoring.result import ScoreResult

#: Metrics that are positive by definition and scored on log scale unless ``log_metrics`` says otherwise.
POSITIVE_METRICS: tuple[str, ...] = (
    "nuclear_norm",
    "spectral_norm",
    "frobenius_norm",
    "stable_rank",
    "top_sv_ratio",
    "effective_rank",
)

LOSS_KEY = "loss"
_IQR_PER_SIGMA = 1.3489795003921634  # 2 * Phi^{-1}(3/4)
_LOG_FLOOR = 1e-30  # log(0) for a zero gradient becomes log(1e-30): a huge "low", not a NaN
_MIN_AGGREGATE_SCALE = 0.05  # level 2: below this, a steady aggregate would amplify rounding noise
_TAIL_QUANTILE = 0.9  # the threshold extrapolates from the median and this quantile of accepted scores
_MAX_LISTED_LAYERS = 5
_STATE_VERSION = 1


class BatchScorer:
    """Scores each step's per-layer gradient metrics (and loss) against a running robust baseline.

    Args:
        metrics: metric names to score; ``None`` scores every metric name seen.
        use_loss: also score the loss (a separate term, ``"loss"`` in ``z`` and the reasons).
        warmup_steps: accepted steps that only build the baseline; also the least history a
            layer's metric (or an aggregate) needs before it is scored. In ``[5, window]``.
        window: how many recent accepted steps the baseline (median and quartiles, at both levels) is
            computed from. In ``[10, 100000]``.
        false_flag_rate: target fraction of clean steps flagged, in ``(0, 0.05]``.
        min_threshold: the threshold never falls below this many robust standard deviations.
        layer_threshold: a layer counts as "high"/"low" in the reasons when its own ``|z|`` exceeds this.
        layer_trim: fraction of layers cut from each end before averaging ``z`` across layers, in
            ``[0, 0.5)``; 0.25 averages the middle half.
        log_metrics: metrics scored on log scale; ``None`` = :data:`POSITIVE_METRICS`.
        log_loss: score ``log(loss)`` rather than the loss (set False for a loss that can be <= 0).
        min_scale: floor on a series' robust scale: absolute on log scale (``1e-3`` = 0.1 %), relative
            to the median on linear scale. In ``(0, 1]``.
        rebaseline_after: after this many consecutive flagged steps, forget the baseline and warm up
            again (a regime change); ``None`` never does.
        threshold_window: how many recent accepted scores set the threshold, in
            ``[warmup_steps, 1000000]``.

    Raises:
        ValueError: an argument is out of range (the message names it, the range and the value).
    """

    def __init__(
        self,
        *,
        metrics: Sequence[str] | None = None,
        use_loss: bool = True,
        warmup_steps: int = 20,
        window: int = 200,
        false_flag_rate: float = 0.01,
        min_threshold: float = 3.0,
        layer_threshold: float = 3.0,
        layer_trim: float = 0.25,
        log_metrics: Sequence[str] | None = None,
        log_loss: bool = True,
        min_scale: float = 1e-3,
        rebaseline_after: int | None = 100,
        threshold_window: int = 1000,
    ) -> None:
        self.window = check_int("window", window, 10, 100_000)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 5, self.window, f"window={self.window}")
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
        self.rebaseline_after = None if rebaseline_after is None else check_int("rebaseline_after", rebaseline_after, 1)
        self._fixed_metrics = metrics is not None
        fixed = check_names("metrics", metrics, allow_empty=False) if metrics is not None else ()
        self.log_metrics = frozenset(
            POSITIVE_METRICS if log_metrics is None else check_names("log_metrics", log_metrics, allow_empty=True)
        )
        # the threshold's exponential tail: from the median and 90th percentile to the 1 - alpha quantile
        self._tail_factor = math.log((1.0 - _TAIL_QUANTILE) / self.false_flag_rate) / math.log(
            (1.0 - 0.5) / (1.0 - _TAIL_QUANTILE)
        )

        self._values: SortedWindow  # level 1, (layers, metrics)
        self._loss: ScalarWindow  # level 1 for the loss
        self._aggregates: SortedWindow | None  # level 2, rows: loss, then metrics; None during warm-up
        self._scores: ScalarWindow | None  # accepted scores; None during warm-up
        self._accepted = 0
        self._consecutive_flags = 0
        self._layers: list[str] = []
        self._layer_index: dict[str, int] = {}
        self._metrics: list[str] = []
        self._metric_index: dict[str, int] = {}
        self._log_mask = np.zeros(0, dtype=bool)
        for name in fixed:
            self._add_metric(name)
        self._reset_baseline()
        self.steps = 0  # steps scored, warm-up included
        self.flagged_steps = 0

    # ------------------------------------------------------------------ public API

    @property
    def in_warmup(self) -> bool:
        """Whether the next step will still be part of the warm-up."""
        return self._accepted < self.warmup_steps

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
        """The threshold the next step's score will be compared with; ``None`` during warm-up."""
        return None if self.in_warmup else self._threshold()

    def score(self, layer_metrics: Mapping[str, Mapping[str, float]], loss: float | None = None) -> ScoreResult:
        """Score one step, then (unless it was flagged or non-finite) add it to the baseline.

        Args:
            layer_metrics: ``{layer name: {metric name: value}}``; values are floats (or 0-d
                tensors); NaN/inf values flag the step, absent layers or metrics are skipped.
            loss: the step's loss, or ``None``; ignored when ``use_loss=False``.

        Returns:
            The :class:`ScoreResult`. Never raises on non-finite values.
        """
        self.steps += 1
        y, nonfinite_layers = self._read(layer_metrics)
        loss_y, loss_bad = self._read_loss(loss)
        reasons: list[str] = []
        if nonfinite_layers:
            listed = ", ".join(nonfinite_layers[:_MAX_LISTED_LAYERS])
            more = ", ..." if len(nonfinite_layers) > _MAX_LISTED_LAYERS else ""
            noun = "layer" if len(nonfinite_layers) == 1 else "layers"
            reasons.append(f"non-finite gradient in {len(nonfinite_layers)} {noun}: {listed}{more}")
        if loss_bad is not None:
            reasons.append(f"non-finite loss ({loss_bad})")
        nonfinite = bool(reasons)

        if self.in_warmup:
            if nonfinite:
                self.flagged_steps += 1
                return ScoreResult(None, True, reasons, {}, in_warmup=True)
            self._accept(y, loss_y, None, None)
            if not self.in_warmup:
                self._start_scoring()
            return ScoreResult(None, False, [], {}, in_warmup=True)

        z_layers, aggregates = self._aggregate(y, loss_y)
        z_agg = self._level2(aggregates)
        finite = np.isfinite(z_agg)
        score: float | None = float(np.max(np.abs(z_agg[finite]))) if finite.any() else None
        threshold = self._threshold()
        over = score is not None and score > threshold
        flagged = nonfinite or over
        z_dict = {name: float(z_agg[k]) for k, name in enumerate(self._agg_names()) if finite[k]}
        if flagged:
            reasons.extend(self._metric_reasons(z_layers, z_agg, threshold))
        if nonfinite:
            score = math.inf
            self.flagged_steps += 1
        elif over:
            self.flagged_steps += 1
            self._consecutive_flags += 1
            if self.rebaseline_after is not None and self._consecutive_flags >= self.rebaseline_after:
                reasons.append(
                    f"baseline restarted after {self._consecutive_flags} consecutive flagged steps (regime change?)"
                )
                self._reset_baseline()
        else:
            self._consecutive_flags = 0
            self._accept(y, loss_y, aggregates, score)
        return ScoreResult(score, flagged, reasons, z_dict, in_warmup=False, threshold=threshold)

    def state_dict(self) -> dict[str, Any]:
        """Picklable state (plain lists, floats and ints): the windows oldest first, and counters.

        The windows are stored whole so that a reloaded scorer continues exactly: about
        ``layers * metrics * window`` floats (240k, ~2 MB pickled, for 200 layers, 6 metrics, window 200).
        """
        return {
            "version": _STATE_VERSION,
            "layers": list(self._layers),
            "metrics": list(self._metrics),
            "steps": self.steps,
            "flagged_steps": self.flagged_steps,
            "accepted": self._accepted,
            "consecutive_flags": self._consecutive_flags,
            "values": self._values.history().tolist(),
            "loss": self._loss.history()[0].tolist(),
            "aggregates": None if self._aggregates is None else self._aggregates.history().tolist(),
            "aggregate_names": None if self._aggregates is None else self._agg_names(),
            "scores": None if self._scores is None else self._scores.history()[0].tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; missing keys take defaults, so older states still load.

        Metrics are matched by name: with ``metrics=`` fixed, a stored metric outside that list is
        dropped and a listed metric the state lacks starts empty. Windows longer than ``window`` keep
        their newest values.
        """
        layers = [str(n) for n in state.get("layers", [])]
        stored_metrics = [str(n) for n in state.get("metrics", [])]
        values = np.asarray(state.get("values", []), dtype=np.float64)
        if values.size == 0:
            values = np.full((len(layers), len(stored_metrics), 0), np.nan)
        if values.ndim != 3 or values.shape[:2] != (len(layers), len(stored_metrics)):
            raise ValueError(
                f"`state['values']` must be shaped (layers, metrics, steps) = ({len(layers)}, "
                f"{len(stored_metrics)}, T), got {values.shape}"
            )
        metrics = list(self._metrics) if self._fixed_metrics else stored_metrics
        self._layers, self._layer_index = [], {}
        self._metrics, self._metric_index, self._log_mask = [], {}, np.zeros(0, dtype=bool)
        for name in layers:
            self._add_layer(name)
        for name in metrics:
            self._add_metric(name)
        steps_stored = values.shape[2]
        mapped = np.full((len(layers), len(metrics), steps_stored), np.nan)
        for j, name in enumerate(metrics):
            if name in stored_metrics:
                mapped[:, j] = values[:, stored_metrics.index(name)]
        self._values = SortedWindow.from_history(mapped, self.window)
        loss = np.asarray(state.get("loss", []), dtype=np.float64).reshape(1, -1)
        self._loss = ScalarWindow.from_history(loss, self.window)
        self.steps = int(state.get("steps", 0))
        self.flagged_steps = int(state.get("flagged_steps", 0))
        self._accepted = int(state.get("accepted", steps_stored))
        self._consecutive_flags = int(state.get("consecutive_flags", 0))
        self._aggregates, self._scores = None, None
        if self.in_warmup:
            return
        aggregates = state.get("aggregates")
        names = state.get("aggregate_names")
        scores = state.get("scores")
        if aggregates is None or names is None or scores is None:
            self._start_scoring()  # a state without level 2: rebuild it as at the end of warm-up
            return
        stored = np.asarray(aggregates, dtype=np.float64)
        agg = np.full((1 + len(metrics), stored.shape[-1] if stored.ndim == 2 else 0), np.nan)
        for k, name in enumerate(self._agg_names()):
            if name in names and stored.ndim == 2:
                agg[k] = stored[list(names).index(name)]
        self._aggregates = SortedWindow.from_history(agg, self.window)
        self._scores = ScalarWindow.from_history(
            np.asarray(scores, dtype=np.float64).reshape(1, -1), self.threshold_window
        )

    # ------------------------------------------------------------------ internals

    def _reset_baseline(self) -> None:
        self._values = SortedWindow((len(self._layers), len(self._metrics)), self.window)
        self._loss = ScalarWindow(self.window)
        self._aggregates = None
        self._scores = None
        self._accepted = 0
        self._consecutive_flags = 0

    def _agg_names(self) -> list[str]:
        return [LOSS_KEY, *self._metrics]

    def _add_layer(self, name: str) -> None:
        self._layer_index[name] = len(self._layers)
        self._layers.append(name)

    def _add_metric(self, name: str) -> None:
        self._metric_index[name] = len(self._metrics)
        self._metrics.append(name)
        self._log_mask = np.append(self._log_mask, name in self.log_metrics)

    def _register(self, layer_metrics: Mapping[str, Mapping[str, float]]) -> None:
        """Give new layers (and, unless ``metrics=`` is fixed, new metrics) a row in every window."""
        n_layers, n_metrics = len(self._layers), len(self._metrics)
        for layer in [name for name in layer_metrics if name not in self._layer_index]:
            self._add_layer(layer)
        if not self._fixed_metrics:
            known = self._metric_index.keys()
            for values in layer_metrics.values():
                if not known >= values.keys():
                    for name in values:
                        if name not in self._metric_index and name != LOSS_KEY:
                            self._add_metric(name)
        if (len(self._layers), len(self._metrics)) != (n_layers, n_metrics):
            self._values.grow((len(self._layers), len(self._metrics)))
            if self._aggregates is not None:
                self._aggregates.grow((1 + len(self._metrics),))

    def _read(self, layer_metrics: Mapping[str, Mapping[str, float]]) -> tuple[FloatArray, list[str]]:
        """The step as a (layers, metrics) array on the scoring scale (NaN = absent or non-finite)."""
        self._register(layer_metrics)
        metrics = self._metrics
        x = np.full((len(self._layers), len(metrics)), np.nan)
        if metrics and layer_metrics:
            get_all = itemgetter(*metrics) if len(metrics) > 1 else (lambda values: (values[metrics[0]],))
            rows = []
            for values in layer_metrics.values():
                try:
                    rows.append(get_all(values))
                except KeyError:  # some metric absent on this layer
                    rows.append(tuple(values.get(m) for m in metrics))
            # None (absent) becomes NaN here; 0-d tensors and numpy scalars convert like floats
            x[[self._layer_index[layer] for layer in layer_metrics]] = np.array(rows, dtype=np.float64)
        bad = ~np.isfinite(x)
        nonfinite_layers: list[str] = []
        if bad.any():
            # NaN also marks absent entries: look up which of the flagged rows really carry a bad value
            for row in np.flatnonzero(bad.any(axis=1)):
                given = layer_metrics.get(self._layers[row])
                if given is None:
                    continue
                if any(given.get(metrics[j]) is not None for j in np.flatnonzero(bad[row])):
                    nonfinite_layers.append(self._layers[row])
            x[bad] = np.nan
        if self._log_mask.any():
            with np.errstate(invalid="ignore"):  # NaN stays NaN
                x[:, self._log_mask] = np.log(np.maximum(x[:, self._log_mask], _LOG_FLOOR))
        return x, nonfinite_layers

    def _read_loss(self, loss: float | None) -> tuple[float, str | None]:
        """The loss on the scoring scale (NaN = not given) and, if it was non-finite, its text."""
        if not self.use_loss or loss is None:
            return math.nan, None
        value = _as_float(loss)
        if not math.isfinite(value):
            return math.nan, repr(value)
        return (math.log(max(value, _LOG_FLOOR)) if self.log_loss else value), None

    def _accept(self, y: FloatArray, loss_y: float, aggregates: FloatArray | None, score: float | None) -> None:
        if not np.isfinite(y).any() and not math.isfinite(loss_y):
            return  # nothing measured: keep the windows as they are rather than evict for nothing
        self._values.push(y)
        self._loss.push(loss_y)
        if self._aggregates is not None and aggregates is not None:
            self._aggregates.push(aggregates)
        if self._scores is not None and score is not None:
            self._scores.push(score)
        self._accepted += 1

    @staticmethod
    def _robust(window: SortedWindow | ScalarWindow) -> tuple[FloatArray, FloatArray]:
        """Median and IQR-based scale (before flooring) of every series in ``window``."""
        q1, med, q3 = window.quantiles((0.25, 0.5, 0.75))
        return med, (q3 - q1) / _IQR_PER_SIGMA

    def _standardize(
        self,
        y: NDArray[np.floating[Any]],
        window: SortedWindow | ScalarWindow,
        log_mask: NDArray[np.bool_],
    ) -> FloatArray:
        """Level-1 robust z of ``y`` (last axis extra for histories) against ``window``."""
        med, scale = self._robust(window)
        # the floor: absolute on log scale, relative to the median on linear scale
        scale = np.maximum(scale, np.where(log_mask, self.min_scale, self.min_scale * np.abs(med)) + 1e-300)
        usable = window.count >= self.warmup_steps
        med = np.where(usable, med, np.nan)
        extra = y.ndim - med.ndim
        shape = med.shape + (1,) * extra
        z: FloatArray = (y - med.reshape(shape)) / scale.reshape(shape)
        return z

    def _aggregate(self, y: FloatArray, loss_y: float) -> tuple[FloatArray, FloatArray]:
        """Per-layer z (layers, metrics) and the aggregates (loss first, then one per metric)."""
        z = self._standardize(y, self._values, self._log_mask)
        z_loss = self._standardize(np.array([loss_y]), self._loss, np.array([self.log_loss]))[0]
        agg = np.empty(1 + len(self._metrics))
        agg[0] = z_loss
        agg[1:] = _trimmed_mean(z, self.layer_trim)
        return z, agg

    def _level2(self, aggregates: FloatArray) -> FloatArray:
        assert self._aggregates is not None
        med, scale = self._robust(self._aggregates)
        usable = self._aggregates.count >= self.warmup_steps
        scale = np.maximum(scale, _MIN_AGGREGATE_SCALE)
        extra = aggregates.ndim - med.ndim
        shape = med.shape + (1,) * extra
        out: FloatArray = (aggregates - np.where(usable, med, np.nan).reshape(shape)) / scale.reshape(shape)
        return out

    def _threshold(self) -> float:
        if self._scores is None or self._scores.count[0] == 0:
            return self.min_threshold
        median, tail = (float(q) for q in self._scores.quantiles((0.5, _TAIL_QUANTILE))[:, 0])
        return max(self.min_threshold, tail + (tail - median) * self._tail_factor)

    def _start_scoring(self) -> None:
        """End of warm-up: level-2 and score windows from the warm-up steps, scored in-sample."""
        history = self._values.history()  # (layers, metrics, T)
        z = self._standardize(history, self._values, self._log_mask)
        z_loss = self._standardize(self._loss.history(), self._loss, np.array([self.log_loss]))  # (1, T)
        agg = np.empty((1 + len(self._metrics), history.shape[-1]))
        agg[0] = z_loss[0]
        agg[1:] = _trimmed_mean(z, self.layer_trim)
        self._aggregates = SortedWindow.from_history(agg, self.window)
        z_agg = np.abs(self._level2(agg))
        finite = np.isfinite(z_agg)
        scores = np.where(finite.any(axis=0), np.max(np.where(finite, z_agg, -np.inf), axis=0), np.nan)
        self._scores = ScalarWindow.from_history(scores, self.threshold_window)

    def _metric_reasons(self, z_layers: FloatArray, z_agg: FloatArray, threshold: float) -> list[str]:
        names = self._agg_names()
        order = np.argsort(-np.nan_to_num(np.abs(z_agg), nan=-1.0))
        reasons = []
        for k in order:
            value = float(z_agg[k])
            if not (abs(value) > threshold):
                break
            direction = "high" if value > 0 else "low"
            if k == 0:
                reasons.append(f"{LOSS_KEY} {direction} (z={value:.1f})")
                continue
            col = z_layers[:, k - 1]
            with np.errstate(invalid="ignore"):
                beyond = col > self.layer_threshold if value > 0 else col < -self.layer_threshold
            n_layers = int(np.count_nonzero(~np.isnan(col)))
            count = int(np.count_nonzero(beyond))
            reasons.append(f"{names[k]} {direction} in {count}/{n_layers} layers (z={value:.1f})")
        return reasons


def _as_float(value: Any) -> float:
    """A metric value as a float; ``None`` (absent) as NaN."""
    return math.nan if value is None else float(value)


def _trimmed_mean(z: FloatArray, trim: float) -> FloatArray:
    """Mean over axis 0 of the values left after cutting ``floor(trim * n)`` from each end; NaN ignored.

    ``z`` is ``(layers, ...)``; the result has the remaining shape (NaN where no layer has a value).
    """
    s = np.sort(z, axis=0)  # NaN sorts last
    n = np.count_nonzero(~np.isnan(z), axis=0)
    lo = np.floor(trim * n).astype(np.int64)
    hi = n - lo
    rank = np.arange(z.shape[0]).reshape((-1,) + (1,) * (z.ndim - 1))
    keep = (rank >= lo) & (rank < hi)
    total = np.where(keep, s, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: FloatArray = np.where(n > 0, total / np.maximum(hi - lo, 1), np.nan)
    return out
