"""Which layers get which spectrum on a step, under the time budget of ``spectra="auto"``."""

from __future__ import annotations

from collections.abc import Sequence

from gradspectra.monitoring.budget import OverheadBudget, Plan
from gradspectra.monitoring.config import Spectra
from gradspectra.monitoring.spectra import SpectraResult


class Planner:
    """Turns the mode (``spectra``) and, under ``"auto"``, the :class:`OverheadBudget` into per-step plans.

    The budget covers the layers this rank measures, and is built once those are known (the first
    measured step). Under ``"auto"`` a step's plan is made at its first micro-batch (:meth:`begin`),
    so that the factor hooks know which layers to keep, and used when the step is measured.

    Args:
        spectra: ``"auto"``, ``"exact"`` or ``"estimate"``.
        max_overhead: the budget's target, a fraction of the training step time.
        shapes: every watched layer's ``(m, n)``.
        cheap: under ``"auto"``, plan the cheap tier (:func:`gradspectra.functional.cheap_spectral_metrics_many`).
        light: under ``"auto"``, allow light steps where a full step does not fit the budget
            (:meth:`OverheadBudget.full_step`); ``False`` under DDP, where every rank must make the same steps.
    """

    def __init__(
        self,
        spectra: Spectra,
        max_overhead: float,
        shapes: Sequence[tuple[int, int]],
        cheap: bool = False,
        light: bool = False,
    ) -> None:
        self.spectra = spectra
        self.cheap = cheap
        self.light = light
        self.max_overhead = max_overhead
        self.shapes = list(shapes)
        self.budget: OverheadBudget | None = None
        self.rows: list[int] = []  # watched-layer index of each budget layer
        self.pending: Plan | None = None
        self._last_end: tuple[float, int] | None = None

    def restart(self, light: bool | None = None) -> None:
        """A new fit of the same layers: forget the last step's end (its step count and time are another run's);
        ``light``: whether this fit may have light steps (e.g. not a fit under DDP after a one-process one)."""
        self._last_end = None
        self.pending = None
        if light is not None:
            self.light = light
            if self.budget is not None:
                self.budget.light = light
                if not light:
                    self.budget.period = 1

    def begin(self) -> Plan | None:
        """A measured step starts: its plan under the budget (``None`` before the budget exists)."""
        self.pending = None
        if self.spectra == "auto" and self.budget is not None:
            self.pending = self.budget.plan().mapped(self.rows)
        return self.pending

    def plan(self, rows: Sequence[int]) -> Plan | None:
        """This step's plan over ``rows`` (this rank's present layers); ``None`` means every one exact."""
        if self.spectra == "exact":
            return None
        if self.spectra == "estimate":
            return Plan(estimate=list(rows))
        pending, self.pending = self.pending, None
        wanted = set(rows)
        if pending is not None and self.budget is not None and wanted <= set(self.rows):
            return Plan(
                exact=[r for r in pending.exact if r in wanted],
                estimate=[r for r in pending.estimate if r in wanted],
                audit=[r for r in pending.audit if r in wanted],
                deferred=[r for r in pending.deferred if r in wanted],
                cheap=[r for r in pending.cheap if r in wanted],
                detect=[r for r in pending.detect if r in wanted],
            )
        if self.budget is None or not wanted <= set(self.rows):
            self.rows = sorted(set(self.rows) | wanted)
            self.budget = OverheadBudget(
                [self.shapes[r] for r in self.rows], self.max_overhead, cheap=self.cheap, light=self.light
            )
        # no plan from begin() for this measurement (the first step, or another optimizer's within the step)
        return self.budget.plan(count=False).mapped(self.rows, keep=wanted)

    def learn(self, result: SpectraResult, planned: bool) -> None:
        """Teach the budget what the work of a planned step cost, and charge it."""
        if self.budget is None or not planned:
            return
        index = {row: k for k, row in enumerate(self.rows)}
        # one observation per kind and step (the budget averages each as a step's whole work of that kind): under
        # sharding a kind's work comes in two parts (the gathered layers', the blocks')
        merged: dict[str, tuple[list[int], float]] = {}
        for kind, rows, seconds in result.work:
            done, spent = merged.get(kind, ([], 0.0))
            merged[kind] = (done + list(rows), spent + seconds)
        for kind, (rows, seconds) in merged.items():
            self.budget.observe_work(kind, [index[r] for r in rows], seconds)
        self.budget.spend(result.seconds)

    def step_started(self, now: float, step: int) -> None:
        """The wall time since the monitor last finished: the training steps in between, without the monitor."""
        if self.budget is not None and self._last_end is not None and step > self._last_end[1]:
            self.budget.observe_step((now - self._last_end[0]) / (step - self._last_end[1]))

    def step_ended(self, now: float, step: int, fixed_seconds: float | None, light: bool = False) -> None:
        """The monitor's work on a step is done: its fixed part (a light step's: all of it) teaches the budget
        (``None``: told later, :meth:`observe_light`)."""
        if self.budget is not None and fixed_seconds is not None:
            if light:
                self.budget.observe_light(max(0.0, fixed_seconds))
            else:
                self.budget.observe_fixed(max(0.0, fixed_seconds))
        self._last_end = (now, step)

    def observe_light(self, seconds: float) -> None:
        """A light step's whole cost, told when its record was made."""
        if self.budget is not None:
            self.budget.observe_light(seconds)

    def figure_period(self, min_steps: int, figures: int) -> int:
        """Full steps between drawings: ``min_steps``, spaced further by the budget under ``"auto"``."""
        return min_steps if self.budget is None else self.budget.figure_period(min_steps, figures)

    def observe_figures(self, seconds: float) -> None:
        if self.budget is not None and seconds > 0:
            self.budget.observe_figures(seconds)

    def log_period(self, min_steps: int) -> int:
        """Full steps between loggings of the per-layer scalars (spaced by the budget under ``"auto"``)."""
        return min_steps if self.budget is None else self.budget.log_period(min_steps)

    def observe_logging(self, seconds: float) -> None:
        if self.budget is not None:
            self.budget.observe_logging(seconds)

    def affords(
        self, n_layers: int, spectra_per_step: float, log_period: int, cheap_per_step: float = 0.0
    ) -> str | None:
        """In words, what the budget affords once it has learned the step (``None`` before)."""
        b = self.budget
        if b is None or b.step_seconds is None:
            return None
        step_ms = 1000 * b.step_seconds
        cheap = ""
        if self.cheap:
            share = cheap_per_step / max(1, n_layers)
            anchors = len(b.anchors)
            cheap = (
                f"gives {anchors} anchor layer{'s' if anchors != 1 else ''} the detection value every step, "
                if anchors
                else "affords no detection value (pass a larger max_overhead), "
            )
            cheap += (
                "gives every layer the cheap tier (spectral norm, stable rank, participation ratio) every step, "
                if share >= 0.999
                else f"gives {100 * share:.0f}% of the layers the cheap tier each step (every layer would "
                f"take max_overhead={b.cheap_needs():.2f}), "
            )
        spectra = (
            f"gives each layer a full spectrum every ~{max(1, round(n_layers / spectra_per_step))} steps"
            if spectra_per_step > 0
            else "affords no full spectra (only Frobenius norms; pass spectra='exact' or a larger max_overhead)"
        )
        logged = log_period * b.period
        every = "every step" if logged == 1 else f"every {_ordinal(logged)} step"
        logging = f"logs per-layer scalars {every}"
        if b.period == 1:
            fixed = 1000 * b.fixed_seconds
            over = (
                f"; its fixed work alone (records, scoring) takes {fixed:.1f} ms, more than the budget"
                if b.fixed_seconds > b.max_overhead * b.step_seconds
                else ""
            )
            return (
                f"gradspectra: at {100 * b.max_overhead:g}% of a {step_ms:.0f} ms step the monitor {logging}, "
                f"{cheap}and {spectra}{over}"
            )
        # light steps: what every step gets, then what one step in `period` gets (from the budget: the first
        # steps, which calibrate every kind of work, say nothing of the steady state)
        light_ms = 1000 * (b.light_seconds or 0.0)
        over = (
            f"; even a light step takes {light_ms:.1f} ms, more than the budget (pass a larger max_overhead, "
            f"or every_n_steps)"
            if (b.light_seconds or 0.0) > b.max_overhead * b.step_seconds
            else ""
        )
        anchors = len(b.anchors)
        detect = f"the detection value of {anchors} anchor layer{'s' if anchors != 1 else ''}" if anchors else ""
        spectra = (
            "spectra in turn with what the light steps left"
            if b.per_step > 0
            else "no spectra (nothing is left of the budget; pass a larger max_overhead, or spectra='exact')"
        )
        full = f"{detect}, then {spectra}" if detect else spectra
        return (
            f"gradspectra: at {100 * b.max_overhead:g}% of a {step_ms:.0f} ms step the monitor scores every step "
            f"from the layers' Frobenius norms and the loss (light steps, {light_ms:.1f} ms each); every "
            f"{_ordinal(b.period)} step is full: {full}; it {logging}{over}"
        )


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
