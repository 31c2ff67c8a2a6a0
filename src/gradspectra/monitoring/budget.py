"""How much spectral work the monitor does on a step: exact, estimated or deferred, per layer, under a time budget.

The monitor's cost is dominated by the spectra (an ``m x n`` decomposition per layer); everything
else it does reads each gradient once. :class:`OverheadBudget` keeps that cost at about
``max_overhead`` times the training step:

- it learns the step time (without the monitor), the median of the last 15 measured, so that a
  pause between steps (validation, a checkpoint) earns nothing, and the monitor's fixed cost (norms,
  scoring, records, logging) as an exponential moving average of what it measured on earlier steps;
- it learns the cost of each kind of work per matrix shape, ``"exact"``, ``"estimate"`` and
  ``"cheap"``, from the measured time of the work done (priors from a flop count until a shape has
  been measured), and the time of the one ``"detect"`` call per step;
- each step it earns ``0.8 x max_overhead x step - fixed`` seconds; the detection value (a coarse
  effective rank, :func:`gradspectra.functional.coarse_effective_rank_many`) comes first, for a few
  *anchor* layers of the model's most common shape, the same every step (1 to :data:`DETECT_MAX`,
  their number following the call's measured time within half the earnings: :meth:`_plan_detect`);
  then the cheap tier (spectral norm, stable rank, participation ratio, three thin products per
  matrix): every layer when what is left covers it, else, after a floor for full spectra (every
  layer's within :data:`_FULL_CADENCE` steps), as many layers as three quarters of the rest cover,
  oldest first;
- what is left is credit (unspent credit carries
  over, up to a cap) for full spectra: exact spectra for every layer when the credit covers them;
  else estimates, for every layer when it can, else for the layers whose spectra are oldest
  (round-robin), the rest deferred to a later step (their Frobenius norm, which is exact and
  costs one read, is still measured);
- it plans to 80 % of ``max_overhead``: the rest is headroom for what the monitor cannot time
  (its hooks outside the optimizer-step callback, the caches it evicts by reading every gradient,
  the moving averages lagging a change), so that the step time measured from outside stays
  within ``max_overhead``;
- figures (TensorBoard images, which take seconds to draw) are spaced so that their cost, spread
  over the steps between them, is at most a quarter of the planned budget, and that share is
  taken off the spectral work (:meth:`OverheadBudget.figure_period`);
- on a step so fast that a full step's fixed work and one anchor's detection value do not fit (a small
  model's step of a few milliseconds), most steps are *light* (:meth:`OverheadBudget.full_step`): every
  layer's Frobenius norm, a score from them and the loss, the record; one step in :attr:`OverheadBudget.period`
  is full and gets what the light steps before it left of their shares (:attr:`OverheadBudget.planned`);
- a quarter of the credit goes to an audit fund: when the fund covers the next layer in
  round-robin order, that layer is computed both exactly and by the estimator, its exact values
  are used and the estimator's relative error is recorded (so the estimates stay honest).

Pure Python, no torch: the engine measures, the budget decides.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass, field

from gradspectra.monitoring.sources import SpectrumSource

EXACT = SpectrumSource.EXACT
ESTIMATE = SpectrumSource.ESTIMATE
CHEAP = SpectrumSource.CHEAP
#: The detection value's work (not a spectrum source: the value has a record key of its own).
DETECT = "detect"
_KINDS = (EXACT, ESTIMATE, CHEAP, DETECT)
#: The most anchor layers with a detection value per step. On the detection benchmark's kept records
#: (every layer's exact spectrum), the exact effective rank of 1 to 8 such layers gave macro AUROC
#: 0.969-0.990 against 0.980-0.984 with every layer's: a few layers carry the signal.
DETECT_MAX = 6
_DETECT_SHARE = 0.5  # share of a step's earnings the detection anchors may take (the rest: cheap tier, full spectra)
_DETECT_SETTLE = 20  # steps between two changes of the number of anchors
_CHEAP_SHARE = 0.75  # share of what is left for the cheap tier when it cannot cover every layer ...
_FULL_CADENCE = 200  # ... after a floor for full spectra: every layer's once in this many steps
_GOLDEN = (math.sqrt(5) - 1) / 2  # the anchors' low-discrepancy sequence
_CHEAP_COLUMNS = 64  # the cheap tier's column-passes over a matrix: 16 + 2 x 24 (rank 8 + 8 random, + 8 probes)
_DETECT_COLUMNS = 88  # the detection value's: 3 x 8 (range finder) + 8 Lanczos steps x 2 products x 4 probes
_EMA = 0.3  # weight of the newest measurement in the moving averages
_STEP_WINDOW = 15  # the step time is the median of this many recent measurements
_MIN_RATE_FLOPS = 1e7  # work smaller than this does not teach the seconds-per-flop prior
_AUDIT_SHARE = 0.25  # share of each step's credit that goes to the audit fund
_HEADROOM = 0.8  # the budget plans to this share of max_overhead (see the module docstring)
_FIGURE_SHARE = 0.25  # figures get at most this share of what the budget plans
_FIGURE_PRIOR = 0.5  # seconds per figure until a drawing has been measured
_LOG_SHARE = 0.25  # per-layer scalar logging gets at most this share of what the budget plans
#: The most training steps per full step (see :meth:`OverheadBudget.full_step`): on a step so fast that even
#: the light steps exceed the budget, the full steps are at least this frequent (and the message says so).
MAX_PERIOD = 64


@dataclass
class Plan:
    """One step's spectral work, as indices into the layers the budget was built with.

    ``exact`` and ``estimate`` are disjoint; ``audit`` is a subset of ``exact`` whose layers are
    also estimated (to measure the estimator's error); ``deferred`` layers get no full spectrum this
    step. ``cheap`` layers get the cheap tier, whether or not they also get a full spectrum; ``detect``
    layers (the anchors) the detection value.
    """

    exact: list[int] = field(default_factory=list)
    estimate: list[int] = field(default_factory=list)
    audit: list[int] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)
    cheap: list[int] = field(default_factory=list)
    detect: list[int] = field(default_factory=list)
    #: a light step (:meth:`OverheadBudget.full_step`): Frobenius norms and a score, nothing else
    light: bool = False

    def mapped(self, index: Sequence[int], keep: Collection[int] | None = None) -> Plan:
        """The same plan with each layer ``i`` renamed ``index[i]``, keeping only the names in ``keep``."""

        def names(idx: list[int]) -> list[int]:
            return [index[i] for i in idx if keep is None or index[i] in keep]

        return Plan(
            names(self.exact),
            names(self.estimate),
            names(self.audit),
            names(self.deferred),
            names(self.cheap),
            names(self.detect),
            self.light,
        )


def work_flops(kind: str, shape: tuple[int, int], rank: int = 32, passes: int = 200) -> float:
    """Counted flops of one ``kind`` of spectral work on an ``(m, n)`` matrix: the one cost model
    (the budget's priors and the split of layers across ranks both use it)."""
    m, n = shape
    small, large = min(m, n), max(m, n)
    if kind == EXACT:
        return 4.0 * large * small * small + 8.0 * small**3
    if kind == CHEAP:
        return 2.0 * m * n * _CHEAP_COLUMNS + 8.0 * large * _CHEAP_COLUMNS * _CHEAP_COLUMNS / 4
    if kind == DETECT:
        return 2.0 * m * n * _DETECT_COLUMNS + 4.0 * small * _DETECT_COLUMNS * _DETECT_COLUMNS
    return 2.0 * m * n * passes + 4.0 * large * rank * rank


def _golden(count: int, n: int, sort: bool = True) -> list[int]:
    """``count`` of ``range(n)`` along the golden-ratio sequence (low discrepancy), sorted unless ``sort=False``."""
    chosen: list[int] = []
    seen: set[int] = set()
    j = 0
    while len(chosen) < min(count, n):
        j += 1
        i = int(((j * _GOLDEN) % 1.0) * n)
        if i not in seen:
            seen.add(i)
            chosen.append(i)
    return sorted(chosen) if sort else chosen


def _anchor_pool(shapes: Sequence[tuple[int, int]]) -> list[int]:
    """The layers of the most common shape (the first of them on a tie): a model's repeated matrices (a
    transformer's attention projections), not its odd ones (a classifier head, an embedding)."""
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:  # in order: on a tie, max() keeps the shape seen first
        counts[shape] = counts.get(shape, 0) + 1
    if not counts:
        return []
    common = max(counts, key=lambda shape: counts[shape])
    return [i for i, shape in enumerate(shapes) if shape == common]


class OverheadBudget:
    """Per-step plans that keep the monitor's cost near ``max_overhead`` x the training step time.

    Args:
        shapes: each layer's matrix shape ``(m, n)`` (the key under which costs are learned).
        max_overhead: the target cost as a fraction of the training step time (``0.03`` = 3 %).
        estimate_rank: the estimator's subspace size (for the flop prior).
        estimate_passes: the estimator's column-passes over a matrix (for the flop prior).
        cheap: plan the detection value (anchor layers, every step) and the cheap tier (every layer, every
            step, when the budget covers it).
        light: allow light steps (:meth:`full_step`) when a full step's fixed work does not fit the budget;
            ``False`` keeps every step full (under DDP, where every rank must make the same steps).

    Example:
        >>> budget = OverheadBudget([(64, 64)] * 4, max_overhead=0.03)
        >>> budget.observe_step(1.0)       # the training step took 1 s without the monitor
        >>> plan = budget.plan()
        >>> sorted(plan.exact + plan.estimate + plan.deferred)
        [0, 1, 2, 3]
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        max_overhead: float,
        estimate_rank: int = 32,
        estimate_passes: int = 200,
        cheap: bool = False,
        light: bool = False,
    ) -> None:
        if isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)):
            raise TypeError(f"`max_overhead` must be a float, got {max_overhead!r}")
        if not (0.0 < float(max_overhead) <= 10.0) or math.isnan(max_overhead):
            raise ValueError(f"`max_overhead` must be in (0, 10], got {max_overhead!r}")
        self.shapes = [(int(m), int(n)) for m, n in shapes]
        self._pool = _anchor_pool(self.shapes)
        self.max_overhead = float(max_overhead)
        self.estimate_rank = estimate_rank
        self.estimate_passes = estimate_passes
        self.cheap = bool(cheap)
        self.step_seconds: float | None = None
        self._step_times: deque[float] = deque(maxlen=_STEP_WINDOW)
        self.fixed_seconds = 0.0
        self.credit = 0.0
        self.audit_fund = 0.0
        # seconds per (counted) flop by kind, learned from every measurement: the prediction for shapes
        # not measured yet. Starts at what one CPU core did (2e-11: 15 ms for a 384 x 384 float64 SVD)
        self._rate: dict[str, float] = {EXACT: 2e-11, ESTIMATE: 3e-11, CHEAP: 3e-11, DETECT: 3e-11}
        self._rate_measured: set[str] = set()
        self._cost: dict[tuple[str, Hashable], float] = {}
        self._next_estimate = 0
        self._next_audit = 0
        self._next_upgrade = 0
        self._next_cheap = 0
        self._cheap_credit = 0.0
        self.anchors: list[int] = []  # the layers with a detection value every step
        self._planned_audit = 0.0
        self._calibrating = False
        self._step = 0
        self.figure_seconds: float | None = None  # one drawing of all figures, measured
        self._figures_per_step = 0.0  # the figures' cost spread over the steps between drawings
        self.log_seconds: float | None = None  # one logging of the per-layer scalars, measured
        self._logging_per_step = 0.0
        self.detect_seconds: float | None = None  # the detection value's measured time per step (all anchors)
        self._detect_since = 0  # steps since the number of anchors last changed
        self._detect_calibrated = False  # the last step was the calibration (every anchor)
        self.light = bool(light)
        self.light_seconds: float | None = None  # a light step's whole cost, measured
        self.period = 1  # training steps per full step (the others light), chosen at each full step
        self._since_full = 0

    # ------------------------------------------------------------------ measurements

    def observe_step(self, seconds: float) -> None:
        """The last training step's wall time, without the monitor's own time."""
        if seconds > 0 and math.isfinite(seconds):
            # a median, not a moving average: a pause between steps (validation, a checkpoint, a data
            # loader stall) is not a training step, and must not earn the monitor seconds to spend
            self._step_times.append(seconds)
            self.step_seconds = statistics.median(self._step_times)

    def observe_fixed(self, seconds: float) -> None:
        """The monitor's cost on the last step outside the spectra (norms, scoring, records, logging)."""
        if seconds >= 0 and math.isfinite(seconds):
            self.fixed_seconds = (1 - _EMA) * self.fixed_seconds + _EMA * seconds

    def observe_light(self, seconds: float) -> None:
        """The monitor's whole cost on the last light step (norms, score, record)."""
        if seconds >= 0 and math.isfinite(seconds):
            t = self.light_seconds
            self.light_seconds = seconds if t is None else (1 - _EMA) * t + _EMA * seconds

    @property
    def planned(self) -> float:
        """Seconds the budget plans for one full step: its own share of ``max_overhead`` x the step time plus
        the shares of the light steps before the next full step, less what those light steps cost (at least
        its own share)."""
        if self.step_seconds is None:
            return 0.0
        each = _HEADROOM * self.max_overhead * self.step_seconds
        return max(each, self.period * each - (self.period - 1) * (self.light_seconds or 0.0))

    def full_step(self) -> bool:
        """Whether the next step is a full one (spectra, detection value, stability, scalars) or a light one
        (every layer's Frobenius norm, the score, the record: the least a step gets).

        Every step is full while a full step's fixed work and one anchor's detection value fit in the
        planned share of a step. When they do not (a small model's step of a few milliseconds), one step in
        :attr:`period` is full, the smallest period whose light steps leave the full step that much, at most
        :data:`MAX_PERIOD`; the period is chosen again at each full step.
        """
        if not self.light or self.step_seconds is None:
            return True
        self._since_full += 1
        if self._since_full < self.period:
            return False
        self._since_full = 0
        self.period = self._choose_period()
        return True

    def _choose_period(self) -> int:
        assert self.step_seconds is not None
        each = _HEADROOM * self.max_overhead * self.step_seconds
        need = self.fixed_seconds
        if self.cheap and self._pool:
            one = self.detect_seconds / max(1, len(self.anchors)) if self.detect_seconds is not None else None
            need += one if one is not None else self._rate[DETECT] * work_flops(DETECT, self.shapes[self._pool[0]])
        if need <= each:
            return 1
        light = self.light_seconds if self.light_seconds is not None else 0.0
        if light >= each:
            return MAX_PERIOD
        return min(MAX_PERIOD, math.ceil((need - light) / (each - light)))

    def observe_figures(self, seconds: float) -> None:
        """The wall time of one drawing of the figures."""
        if seconds >= 0 and math.isfinite(seconds):
            f = self.figure_seconds
            self.figure_seconds = seconds if f is None else (1 - _EMA) * f + _EMA * seconds

    def figure_period(self, min_steps: int, figures: int) -> int:
        """Full steps between two drawings of ``figures`` figures: at least ``min_steps``, and
        enough that drawing costs at most a quarter of the planned budget per step on average.

        The figures' cost per step at that spacing is taken off the spectral work from then on.
        """
        if min_steps < 1:
            raise ValueError(f"`min_steps` must be >= 1, got {min_steps!r}")
        if self.step_seconds is None:
            return min_steps
        cost = self.figure_seconds if self.figure_seconds is not None else _FIGURE_PRIOR * figures
        allowed = _FIGURE_SHARE * self.planned
        period = max(min_steps, math.ceil(cost / allowed)) if allowed > 0 else min_steps
        self._figures_per_step = cost / period
        return period

    def observe_logging(self, seconds: float) -> None:
        """The wall time of one logging of the per-layer scalars (to every logger)."""
        if seconds >= 0 and math.isfinite(seconds):
            t = self.log_seconds
            self.log_seconds = seconds if t is None else (1 - _EMA) * t + _EMA * seconds

    def log_period(self, min_steps: int) -> int:
        """Full steps between two loggings of the per-layer scalars: at least ``min_steps``, and enough
        that logging costs at most a quarter of the planned budget per step on average (on a fast step,
        hundreds of scalars cost more than the whole budget). Taken off the spectral work from then on."""
        if min_steps < 1:
            raise ValueError(f"`min_steps` must be >= 1, got {min_steps!r}")
        if self.step_seconds is None or self.log_seconds is None:
            return min_steps
        allowed = _LOG_SHARE * self.planned
        period = max(min_steps, math.ceil(self.log_seconds / allowed)) if allowed > 0 else min_steps
        self._logging_per_step = self.log_seconds / period
        return period

    def cost(self, kind: str, layer: int) -> float:
        """Predicted seconds for one layer's ``kind`` work."""
        shape = self.shapes[layer]
        known = self._cost.get((kind, shape))
        if known is not None:
            return known
        return self._rate[kind] * work_flops(kind, shape, self.estimate_rank, self.estimate_passes)

    def observe_work(self, kind: str, layers: Sequence[int], seconds: float) -> None:
        """``seconds`` spent on ``kind`` work for ``layers`` (shared out by predicted cost)."""
        if kind not in _KINDS:
            raise ValueError(f"`kind` must be one of {_KINDS}, got {kind!r}")
        if not layers or not (seconds >= 0 and math.isfinite(seconds)):
            return
        if kind == DETECT:
            d = self.detect_seconds
            # slower than the other averages: the number of anchors must not follow a busy machine's noise
            self.detect_seconds = seconds if d is None else (1 - _EMA / 3) * d + _EMA / 3 * seconds
        predicted = [self.cost(kind, i) for i in layers]
        total = sum(predicted) or 1.0
        flops = sum(work_flops(kind, self.shapes[i], self.estimate_rank, self.estimate_passes) for i in layers)
        if flops >= _MIN_RATE_FLOPS:
            # tiny matrices cost call overhead, not flops: they would price big shapes absurdly high
            rate = seconds / flops
            self._rate[kind] = rate if kind not in self._rate_measured else (1 - _EMA) * self._rate[kind] + _EMA * rate
            self._rate_measured.add(kind)
        by_shape: dict[tuple[int, int], list[float]] = {}
        for i, p in zip(layers, predicted):
            by_shape.setdefault(self.shapes[i], []).append(seconds * p / total)
        for shape, shares in by_shape.items():
            each = sum(shares) / len(shares)
            old = self._cost.get((kind, shape))
            # a cheaper measurement is believed fast, a dearer one slowly: a one-off stall (the first
            # call of a routine, a busy machine) must not price a shape out of the plan for long,
            # since a shape that is never planned is never measured again
            weight = 1 - _EMA if old is not None and each < old else _EMA
            self._cost[(kind, shape)] = each if old is None else (1 - weight) * old + weight * each

    # ------------------------------------------------------------------ planning

    @property
    def per_step(self) -> float:
        """Seconds of spectral work the budget allows per step (0 until a step time is known)."""
        if self.step_seconds is None:
            return 0.0
        return max(0.0, self.planned - self.fixed_seconds - self._figures_per_step - self._logging_per_step)

    def _plan_detect(self, plan: Plan, earned: float) -> float:
        """The detection value first, for the anchors: what is left of ``earned``.

        Their number follows the measured cost of the detection work (one call for all anchors: most of
        a call's time is its fixed part, so a per-layer price would keep the count too low): at most
        :data:`_DETECT_SHARE` of the earnings: after the calibration (every anchor) straight down to what
        fits; above the share by a quarter, down to what fits (at most every quarter of
        :data:`_DETECT_SETTLE` steps); one more anchor when the measured cost plus half the cost per
        anchor fits in 80 % of the share (at most every :data:`_DETECT_SETTLE` steps): a band and a slow
        average, so that a busy machine's noisy timings do not make the set flap. A larger set keeps the
        smaller one (:meth:`_choose_anchors`).
        """
        n = len(self.shapes)
        if not self.cheap or n == 0:
            return earned
        pool = self._pool
        top = min(DETECT_MAX, len(pool))
        if self.step_seconds is None:  # the first step: calibration with every anchor, not charged
            self._detect_calibrated = True
            self._choose_anchors(pool, top)
            plan.detect = list(self.anchors)
            return earned
        share = _DETECT_SHARE * max(0.0, earned)
        count = len(self.anchors)
        if not self.anchors:  # no calibration step: as many as the flop-count prior affords
            prior = self._rate[DETECT] * work_flops(DETECT, self.shapes[pool[0]])
            count = max(1, min(top, int(share / prior))) if prior > 0 else 1
            self._detect_calibrated = True  # a guess: corrected by its first measurement
        spent = self.detect_seconds if self.detect_seconds is not None else 0.0
        self._detect_since += 1
        if self._detect_calibrated and self.detect_seconds is not None and count > 0:
            self._detect_calibrated = False  # the calibration's cost is known: straight down to what fits
            count = max(1, min(count, int(share / (spent / count))))
        elif count > 0:
            each = spent / count
            if spent > 1.25 * share and count > 1 and self._detect_since >= _DETECT_SETTLE // 4:
                count = max(1, min(count - 1, int(share / each)))  # over budget: down soon, to what fits
            elif spent + 0.5 * each <= 0.8 * share and count < top and self._detect_since >= _DETECT_SETTLE:
                count += 1  # room: up slowly
        if count != len(self.anchors) or not self.anchors:
            self._choose_anchors(pool, max(1, count))
            self._detect_since = 0
        plan.detect = list(self.anchors)
        return earned - spent

    def _choose_anchors(self, pool: list[int], count: int) -> None:
        """``count`` anchors: the first ``count`` of a low-discrepancy (golden-ratio) sequence over ``pool``
        (spread over depth, never in step with a model's period of components per block), so that a larger
        set keeps the smaller one and the scorer's series go on."""
        self.anchors = sorted(pool[k] for k in _golden(count, len(pool), sort=False))

    def _plan_cheap(self, plan: Plan, earned: float) -> float:
        """The cheap tier: every layer when ``earned`` covers it (the rest is left for full spectra), else
        :data:`_CHEAP_SHARE` of what is left after a floor for full spectra (every layer's within
        :data:`_FULL_CADENCE` steps) buys it (with carry-over) for the layers in turn, oldest first. What is
        left of ``earned`` goes to full spectra."""
        n = len(self.shapes)
        if not self.cheap:
            return earned
        if self.step_seconds is None:
            plan.cheap = list(range(n))  # the first step: calibration, not charged
            return earned
        costs = [self.cost(CHEAP, i) for i in range(n)]
        if earned >= sum(costs):
            plan.cheap = list(range(n))
            self._cheap_credit = 0.0
            return earned - sum(costs)
        # full spectra keep a floor: enough for every layer's within _FULL_CADENCE steps, when it fits
        full = sum(min(self.cost(EXACT, i), self.cost(ESTIMATE, i)) for i in range(n)) * self.period / _FULL_CADENCE
        share = _CHEAP_SHARE * max(0.0, earned - full)
        self._cheap_credit = min(self._cheap_credit + share, 2 * share + max(costs))
        for k in range(n):
            i = (self._next_cheap + k) % n
            if costs[i] > self._cheap_credit:
                self._next_cheap = i
                break
            plan.cheap.append(i)
            self._cheap_credit -= costs[i]
        plan.cheap.sort()
        return earned - share

    def plan(self, count: bool = True) -> Plan:
        """Which layers get the cheap tier, exact spectra, estimates, audits, or nothing on this step.

        ``count=False``: a plan for a second measurement within the same step (another optimizer's), which
        neither counts as a step toward the next full one nor is light.
        """
        n = len(self.shapes)
        self._planned_audit = 0.0
        if count and not self.full_step():
            return Plan(deferred=list(range(n)), light=True)
        self._step += 1
        plan = Plan()
        if n == 0:
            return plan
        earned = self._plan_cheap(plan, self._plan_detect(plan, self.per_step))
        if self.step_seconds is not None and earned >= sum(self.cost(EXACT, i) for i in range(n)):
            plan.exact = list(range(n))
            self.credit = 0.0
            return plan
        # unspent credit carries over one step (plus one layer), so the work stays even, not bursty;
        # the audit fund saves up for the next audit
        largest_estimate = max(self.cost(ESTIMATE, i) for i in range(n))
        self.credit = min(self.credit + (1 - _AUDIT_SHARE) * earned, 2 * (1 - _AUDIT_SHARE) * earned + largest_estimate)
        audit = self._next_audit % n
        audit_cost = self.cost(EXACT, audit) + self.cost(ESTIMATE, audit)
        self.audit_fund = min(self.audit_fund + _AUDIT_SHARE * earned, audit_cost + _AUDIT_SHARE * earned)
        if self.step_seconds is not None and self.audit_fund >= audit_cost:
            plan.exact.append(audit)
            plan.audit.append(audit)
            self.audit_fund -= audit_cost
            self._planned_audit = audit_cost
            self._next_audit = audit + 1
        # estimates for the others, oldest first, as far as the credit goes
        available = self.credit
        seen_shapes: set[tuple[int, int]] = set()
        for i in ((self._next_estimate + k) % n for k in range(n)):
            if i in plan.audit:
                continue
            if self.step_seconds is None:
                # first step, no step time yet: one layer per shape, to learn what estimates cost
                # (a calibration, not charged: a first call can be slow, see spend)
                self._calibrating = True
                if self.shapes[i] in seen_shapes:
                    plan.deferred.append(i)
                else:
                    seen_shapes.add(self.shapes[i])
                    plan.estimate.append(i)
                continue
            c = self.cost(ESTIMATE, i)
            exact = self.cost(EXACT, i)
            if plan.deferred or min(c, exact) > available:
                # strictly oldest first: once a layer does not fit, the credit is saved for it (cheaper
                # layers after it would otherwise spend it, step after step, and a large layer would
                # never get a spectrum)
                plan.deferred.append(i)
                continue
            # where the exact route is no dearer (small matrices, few tokens), the exact spectrum
            if exact <= c:
                plan.exact.append(i)
                available -= exact
            else:
                plan.estimate.append(i)
                available -= c
        if plan.deferred:
            # the next step starts with the first layer this one could not reach
            self._next_estimate = plan.deferred[0]
        elif self.step_seconds is not None:
            # every layer estimated: what is left upgrades layers to exact, in turn
            for k in range(n):
                i = (self._next_upgrade + k) % n
                if i not in plan.estimate:
                    continue
                extra = self.cost(EXACT, i) - self.cost(ESTIMATE, i)
                if extra > available:
                    break
                plan.estimate.remove(i)
                plan.exact.append(i)
                available -= extra
                self._next_upgrade = i + 1
        plan.deferred.sort()
        return plan

    def spend(self, seconds: float) -> None:
        """Charge the full-spectrum work actually done on this step (the planned audit is paid by the audit
        fund; the cheap tier was paid for up front, at its learned cost)."""
        if self._calibrating:
            self._calibrating = False
            return
        if math.isfinite(seconds):
            self.credit -= max(0.0, seconds - self._planned_audit)

    def cheap_needs(self) -> float:
        """The ``max_overhead`` at which the cheap tier would cover every layer every step, next to the
        detection value on :data:`DETECT_MAX` anchors (as learned so far)."""
        if self.step_seconds is None or self.step_seconds <= 0:
            return math.nan
        n = len(self.shapes)
        cheap = sum(self.cost(CHEAP, i) for i in range(n))
        pool = self._pool
        cheap += min(DETECT_MAX, len(pool)) * self._rate[DETECT] * work_flops(DETECT, self.shapes[pool[0]])
        spent = cheap + self.fixed_seconds + self._figures_per_step + self._logging_per_step
        return spent / (_HEADROOM * self.step_seconds)

    def state(self) -> dict[str, float | None]:
        """What the budget has learned (for records and debugging)."""
        return {
            "step_seconds": self.step_seconds,
            "fixed_seconds": self.fixed_seconds,
            "spectra_seconds_per_step": self.per_step,
            "figure_seconds": self.figure_seconds,
            "log_seconds": self.log_seconds,
            "credit": self.credit,
        }
