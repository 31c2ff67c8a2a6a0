r"""Warnings before a fine-tune breaks: trends of the per-layer gradient series, not single outliers.

The batch scorer asks "is this batch unlike the last few?"; this detector asks "is the run going
somewhere bad?". It keeps, per layer, the log of each series it watches and compares the recent level
(the median of the last ``recent`` values) with a reference level (the median of the values from
``reference`` steps before the recent window up to ``gap`` steps before it). Per family, over the
layers whose series have enough values in both windows (rotating values that reach a layer every
~100 steps never do; the always-on values do):

- ``collapse``: the median over layers of the fall of the rank-like values (the detection value
  ``effective_rank_coarse``, ``effective_rank``, ``participation_ratio``, ``stable_rank``): the
  gradient collapsing onto a few directions, what precedes a break at a too-high learning rate while
  the loss still falls (Wortsman et al. 2023; measured in ``benchmarks/stability.py``);
- ``concentration``: the median rise of ``top_sv_ratio``;
- ``growth``: the median rise of the gradient norms (``frobenius_norm``);
- ``divergence``: layers moving apart, the spread (90th minus 10th percentile over layers, nearest
  rank) of the
  per-layer log change of ``frobenius_norm``: some layers' gradients growing while others stay;
- ``nonfinite``: steps with a non-finite gradient or loss among the last ``recent``.

Rising gradient norms are also what a model does while it learns fast: a new head starts with small
weights, so the gradients reaching the pretrained layers grow several-fold as it learns, while the loss
falls. ``growth`` and ``divergence`` therefore do not count while the loss has fallen by ``loss_fall`` or
more between the reference window and the recent one (the medians of the losses given); before a break
at a too-high learning rate the loss has stopped falling. Nor do they count after one batch far out of
line (a single step's loss ``knock`` times the reference median or more, since the reference window) while
the recent median is back under twice the reference: that batch moved the model, and the gradients stay
large for 10-20 steps while it returns (a corrupted batch in a small causal LM); a run that breaks keeps
its loss up. ``collapse`` and ``concentration`` count
whatever the loss does: the gradient collapsing onto few directions precedes a break while the loss still
falls.

Each family's value divided by its limit is its severity; the step's stability score is the
largest severity (``>= 1``: over a limit). A warning (an ``instability`` event) needs a score over 1
on ``persist`` consecutive steps (non-finite steps: at once); after one, the detector is quiet until
the score has stayed below 1 for ``rearm`` steps. Nothing resets it: a shift the batch scorer adopts
is a new normal for single batches, not for the trend.

>>> import math
>>> det = StabilityDetector(recent=3, gap=2, reference=8, persist=2, warmup_steps=0)
>>> healthy = {f"attn/layer_0{i}": {"effective_rank_coarse": 20.0, "frobenius_norm": 1.0} for i in range(4)}
>>> [det.update(healthy).events for _ in range(12)][-1]
[]
>>> collapsed = {k: {"effective_rank_coarse": 4.0, "frobenius_norm": 1.0} for k in healthy}
>>> events = [det.update(collapsed).events for _ in range(3)]
>>> events[:2], events[2][0]["kind"]  # the recent median moves on the 2nd step, persists on the 3rd
([[], []], 'instability')
>>> print(events[2][0]["message"])  # doctest: +NORMALIZE_WHITESPACE
instability: the gradient is collapsing onto few directions: effective rank (detection value) down 5.0x
in 5 steps (median of 4 layers: attn layers 0-3; 20 -> 4). A run at too high a learning rate does this
before its loss breaks: lower the learning rate, or stop and resume from an earlier checkpoint.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from gradspectra.scoring._checks import check_float, check_int

#: family -> (metrics, +1 when a rise is bad / -1 when a fall is bad)
FAMILIES: dict[str, tuple[tuple[str, ...], int]] = {
    "collapse": (("effective_rank_coarse", "effective_rank", "participation_ratio", "stable_rank"), -1),
    "concentration": (("top_sv_ratio",), 1),
    "growth": (("frobenius_norm",), 1),
}
_LABELS = {
    "effective_rank_coarse": "effective rank (detection value)",
    "effective_rank": "effective rank",
    "participation_ratio": "participation ratio",
    "stable_rank": "stable rank",
    "top_sv_ratio": "top singular value ratio",
    "frobenius_norm": "gradient norm",
}
_WATCHED = tuple(m for metrics, _ in FAMILIES.values() for m in metrics)
_KNOCK_BACK = 2.0  # the recent loss back under this many times the reference: the run is returning from a knock


@dataclass
class StabilityResult:
    """One step's stability verdict.

    Attributes:
        score: the largest family severity (module docstring; ``>= 1``: a family over its limit), ``None``
            until the detector has a reference.
        events: ``[{"kind": "instability", "message": ...}]`` on the step a warning is given, else empty.
        severities: each family's severity this step (those it could compute).
    """

    score: float | None
    events: list[dict[str, str]] = field(default_factory=list)
    severities: dict[str, float] = field(default_factory=dict)


@dataclass
class _Finding:
    family: str
    severity: float
    text: Callable[[], str]  # built only for a warning


@dataclass
class _Changes:
    """One metric's per-layer change between the windows: the layers' columns, log change, levels (log)."""

    name: str
    columns: np.ndarray
    log: np.ndarray
    before: np.ndarray
    now: np.ndarray


class StabilityDetector:
    """Watches the per-layer series of a run for trends that precede a break (module docstring).

    Args:
        recent: values in the recent level (a median), ``>= 1``.
        gap: steps between the recent window and the reference window, ``>= 0``.
        reference: steps in the reference window, ``>= 2``.
        collapse: the fall (a factor ``> 1``) of the rank-like values that is over the limit.
        concentration: the rise (factor) of ``top_sv_ratio`` over the limit.
        growth: the rise (factor) of the gradient norms over the limit.
        divergence: the spread (factor) of the layers' norm changes over the limit.
        nonfinite: non-finite steps among the last ``recent`` over the limit (``>= 1``).
        persist: consecutive steps over a limit before a warning, ``>= 1``.
        rearm: steps under every limit before the next warning, ``>= 1``.
        min_layers: layers with enough values for a family to count, ``>= 1``.
        warmup_steps: steps before a trend can give a warning (non-finite steps warn from the start), ``>= 0``.
        loss_fall: the fall (a factor ``> 1``) of the loss between the windows over which ``growth`` and
            ``divergence`` do not count: the model is learning (module docstring). Applies only where losses
            are given and positive.
        knock: the loss of one step, as a factor (``> 2``, the level a run returns under) of the reference
            window's median, that makes a batch far out of line: while exactly one such step lies in the recent
            window or the gap and the recent median is back under ``2x`` the reference, ``growth`` and
            ``divergence`` do not count (the model knocked by one bad batch, returning; module docstring). Two
            or more such steps are spikes of a run in trouble, not one knock. ``None``: never.

    Raises:
        ValueError: an argument is out of range (the message names it and the value).
    """

    def __init__(
        self,
        *,
        recent: int = 3,
        gap: int = 8,
        reference: int = 30,
        collapse: float = 3.5,
        concentration: float = 2.0,
        growth: float = 4.0,
        divergence: float = 16.0,
        nonfinite: int = 2,
        persist: int = 2,
        rearm: int = 20,
        min_layers: int = 1,
        warmup_steps: int = 40,
        loss_fall: float = 1.25,
        knock: float | None = 10.0,
    ) -> None:
        self.recent = check_int("recent", recent, 1)
        self.gap = check_int("gap", gap, 0)
        self.reference = check_int("reference", reference, 2)
        self.limits = {
            "collapse": check_float("collapse", collapse, 1.0, low_open=True),
            "concentration": check_float("concentration", concentration, 1.0, low_open=True),
            "growth": check_float("growth", growth, 1.0, low_open=True),
            "divergence": check_float("divergence", divergence, 1.0, low_open=True),
        }
        self.nonfinite = check_int("nonfinite", nonfinite, 1, self.recent, f"recent={self.recent}")
        self.persist = check_int("persist", persist, 1)
        self.rearm = check_int("rearm", rearm, 1)
        self.min_layers = check_int("min_layers", min_layers, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.loss_fall = check_float("loss_fall", loss_fall, 1.0, low_open=True)
        self.knock = None if knock is None else check_float("knock", knock, _KNOCK_BACK, low_open=True)
        self._span = self.recent + self.gap + self.reference
        # per watched metric, a ring of the last `_span` steps' log values, (span, layers), NaN where none
        self._columns: dict[str, int] = {}
        self._layers: list[str] = []
        self._values: dict[str, np.ndarray] = {}
        self._row_step = np.full(self._span, -1, dtype=np.int64)  # which step each row holds
        self._loss = np.full(self._span, np.nan)  # each row's loss (NaN: none, or not finite)
        self._bad_steps: deque[int] = deque()
        self._step = 0
        self._last_put: dict[str, int] = {}  # the last step each watched value was stored (skip the absent)
        self._over = 0  # consecutive steps over a limit
        self._under = self.rearm  # consecutive steps under every limit (armed when >= rearm)

    # ------------------------------------------------------------------ per step

    def update(
        self,
        metrics: Mapping[str, Mapping[str, float]],
        detection: Mapping[str, float] | None = None,
        loss: float | None = None,
    ) -> StabilityResult:
        """Take one optimizer step's per-layer values (and detection values, loss); the step's verdict."""
        step, self._step = self._step, self._step + 1
        row = step % self._span
        self._row_step[row] = step
        for values in self._values.values():
            values[row] = np.nan
        loss_value = math.nan if loss is None else float(loss)
        bad = loss is not None and not math.isfinite(loss_value)
        self._loss[row] = loss_value if math.isfinite(loss_value) else math.nan
        columns = [self._column(layer) for layer in metrics]
        names = set().union(*metrics.values())
        for name in (n for n in _WATCHED if n in names):
            given = [(c, values[name]) for c, values in zip(columns, metrics.values()) if name in values]
            if given:
                bad = self._put(name, row, given) or bad
        if detection:
            given = [(self._column(layer), value) for layer, value in detection.items()]
            bad = self._put("effective_rank_coarse", row, given) or bad
        while self._bad_steps and self._bad_steps[0] <= step - self.recent:
            self._bad_steps.popleft()
        if bad:
            self._bad_steps.append(step)
        findings = self._findings(step)
        if len(self._bad_steps) >= self.nonfinite:
            text = f"non-finite gradients or loss in {len(self._bad_steps)} of the last {self.recent} steps"
            findings.append(_Finding("nonfinite", len(self._bad_steps) / self.nonfinite, lambda: text))
        if not findings:
            self._count(False)
            return StabilityResult(None if not self._has_reference(step) else 0.0)
        severities = {f.family: f.severity for f in findings}
        score = max(severities.values())
        # non-finite steps are already a count over the recent window: no need to persist further
        immediate = severities.get("nonfinite", 0.0) >= 1.0
        # the first steps of a fine-tune (a learning-rate warm-up, the model leaving its starting point) move
        # every series: trends count from `warmup_steps` on, non-finite steps at once
        warn = self._count(score >= 1.0 and (step >= self.warmup_steps or immediate), immediate=immediate)
        events = []
        if warn:
            worst = [f for f in sorted(findings, key=lambda f: -f.severity) if f.severity >= 1.0]
            events.append({"kind": "instability", "message": _message([f.text() for f in worst])})
        return StabilityResult(score, events, severities)

    def _count(self, over: bool, immediate: bool = False) -> bool:
        """Track consecutive steps over/under the limits; whether this step gives a warning."""
        if not over:
            self._over = 0
            self._under += 1
            return False
        self._over += 1
        if (self._over >= self.persist or immediate) and self._under >= self.rearm:
            self._under = 0
            return True
        if self._under < self.rearm:
            self._under = 0  # still in the episode that was warned about: stay quiet
        return False

    def _column(self, layer: str) -> int:
        column = self._columns.get(layer)
        if column is None:
            column = self._columns[layer] = len(self._layers)
            self._layers.append(layer)
            for name, values in self._values.items():
                if values.shape[1] <= column:
                    grown = np.full((self._span, max(8, 2 * values.shape[1])), np.nan)
                    grown[:, : values.shape[1]] = values
                    self._values[name] = grown
        return column

    def _put(self, name: str, row: int, given: list[tuple[int, Any]]) -> bool:
        """Store ``log(value)`` of each ``(column, value)`` of the step; whether a value was non-finite."""
        values = [float(v) for _, v in given]
        bad = not all(map(math.isfinite, values))
        kept = [(c, math.log(v)) for (c, _), v in zip(given, values) if 0 < v < math.inf]  # finite and positive
        if kept:
            columns, logs = zip(*kept)
            block = self._values.get(name)
            if block is None:
                block = self._values[name] = np.full((self._span, max(8, len(self._layers))), np.nan)
            block[row, list(columns)] = logs
            self._last_put[name] = self._step - 1  # (the step being taken)
        return bad

    def _has_reference(self, step: int) -> bool:
        return step + 1 >= self._span - self.reference + max(2, self.reference // 3)

    def _windows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows of the recent window and of the reference window that hold their steps."""
        recent = np.arange(step - self.recent + 1, step + 1)
        end = step - self.recent - self.gap
        reference = np.arange(end - self.reference + 1, end + 1)
        recent, reference = recent[recent >= 0], reference[reference >= 0]
        recent = recent[self._row_step[recent % self._span] == recent] % self._span
        reference = reference[self._row_step[reference % self._span] == reference] % self._span
        return recent, reference

    def _changes(self, name: str, recent: np.ndarray, reference: np.ndarray) -> _Changes | None:
        """Per layer with enough values in both windows: the change of the median log value."""
        values = self._values.get(name)
        if values is None or len(recent) == 0 or len(reference) == 0:
            return None
        n = len(self._layers)
        newer = values[recent, :n]
        # the few recent rows first: a value absent from them (a light step's spectra) is done here, cheaply
        ok = np.count_nonzero(~np.isnan(newer), axis=0) >= max(1, (self.recent + 1) // 2)
        if np.count_nonzero(ok) < self.min_layers:
            return None
        older = values[reference, :n]
        ok &= np.count_nonzero(~np.isnan(older), axis=0) >= max(2, self.reference // 3)
        columns = np.flatnonzero(ok)
        if len(columns) < self.min_layers:
            return None
        if len(columns) < n:
            newer, older = newer[:, columns], older[:, columns]
        now, _ = _nanmedian(newer)
        before, _ = _nanmedian(older)
        return _Changes(name, columns, now - before, before, now)

    def _learning(self, recent: np.ndarray, reference: np.ndarray) -> bool:
        """Whether the loss fell by ``loss_fall`` or more from the reference window to the recent one."""
        # (a few dozen floats: Python's sort is several times cheaper than numpy's calls on a fast step)
        now: list[float] = [v for v in self._loss[recent].tolist() if v == v]
        before: list[float] = [v for v in self._loss[reference].tolist() if v == v]
        if not now or len(before) < 2:
            return False
        level_now, level_before = statistics.median(now), statistics.median(before)
        return bool(level_before > 0.0 and level_now > 0.0 and level_now * self.loss_fall <= level_before)

    def _knocked(self, step: int, recent: np.ndarray, reference: np.ndarray) -> bool:
        """Whether exactly one step's loss since the reference window reached ``knock`` x its median and the
        recent median is back under ``_KNOCK_BACK`` x: a batch far out of line whose aftermath is under way."""
        if self.knock is None:
            return False
        since = np.arange(step - self.recent - self.gap + 1, step + 1)
        since = since[since >= 0]
        since = since[self._row_step[since % self._span] == since] % self._span
        before: list[float] = [v for v in self._loss[reference].tolist() if v == v]
        peak: list[float] = [v for v in self._loss[since].tolist() if v == v]
        now: list[float] = [v for v in self._loss[recent].tolist() if v == v]
        if len(before) < 2 or not peak or not now:
            return False
        level = statistics.median(before)
        if level <= 0.0 or statistics.median(now) > _KNOCK_BACK * level:
            return False
        return sum(v >= self.knock * level for v in peak) == 1  # one knock; spikes again and again are no knock

    def _findings(self, step: int) -> list[_Finding]:
        findings: list[_Finding] = []
        recent, reference = self._windows(step)
        steps = self.recent + self.gap
        learning = self._learning(recent, reference) or self._knocked(step, recent, reference)
        for family, (names, sign) in FAMILIES.items():
            if family == "growth" and learning:
                # (and divergence, measured with it): gradients grow while the model learns fast, and while it
                # returns from the knock of one bad batch
                continue
            best: _Finding | None = None
            for name in names:
                if self._last_put.get(name, -1) <= step - self.recent:
                    continue  # no value in the recent window (a light step's spectra): no change to measure
                changes = self._changes(name, recent, reference)
                if changes is None:
                    continue
                ordered = np.sort(changes.log)
                k = len(ordered)
                median = float(ordered[k // 2]) if k % 2 else 0.5 * float(ordered[k // 2 - 1] + ordered[k // 2])
                severity = max(median * sign, 0.0) / math.log(self.limits[family])
                if best is None or severity > best.severity:
                    text = partial(_describe, family, sign, changes, self._layers, steps)
                    best = _Finding(family, severity, text)
                if family == "growth" and k >= 4:
                    # nearest-rank 90th and 10th percentiles
                    spread = float(ordered[math.ceil(0.9 * k) - 1] - ordered[math.ceil(0.1 * k) - 1])
                    sev = spread / math.log(self.limits["divergence"])
                    findings.append(
                        _Finding("divergence", sev, partial(_describe_divergence, changes, self._layers, steps))
                    )
            if best is not None:
                findings.append(best)
        return findings

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (checkpointed with the monitor)."""
        n = len(self._layers)
        return {
            "step": self._step,
            "over": self._over,
            "under": self._under,
            "bad_steps": list(self._bad_steps),
            "layers": list(self._layers),
            "row_step": self._row_step.tolist(),
            "loss": self._loss.tolist(),
            "values": {name: values[:, :n].tolist() for name, values in self._values.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._step = int(state.get("step", 0))
        self._over = int(state.get("over", 0))
        self._under = int(state.get("under", self.rearm))
        self._bad_steps = deque(int(s) for s in state.get("bad_steps", []))
        self._layers = [str(layer) for layer in state.get("layers", [])]
        self._columns = {layer: i for i, layer in enumerate(self._layers)}
        row_step = np.asarray(state.get("row_step", []), dtype=np.int64)
        self._row_step = np.full(self._span, -1, dtype=np.int64)
        self._values = {}
        self._last_put = {}
        self._loss = np.full(self._span, np.nan)
        if len(row_step) != self._span:  # another window: start the series afresh
            return
        self._row_step = row_step
        losses = np.asarray(state.get("loss", []), dtype=float)
        if len(losses) == self._span:
            self._loss = losses
        for name, values in (state.get("values") or {}).items():
            array = np.full((self._span, max(8, len(self._layers))), np.nan)
            array[:, : len(self._layers)] = np.asarray(values, dtype=float).reshape(self._span, len(self._layers))
            self._values[str(name)] = array
            held = self._row_step[~np.isnan(array).all(axis=1)]
            if held.size:
                self._last_put[str(name)] = int(held.max())


def _nanmedian(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's median over its non-NaN entries (NaN where none) and their count; vectorised."""
    ordered = np.sort(block, axis=0)  # NaN last
    rows = block.shape[0]
    if rows and not np.isnan(ordered[-1]).any():  # every entry present (NaN sorts last): the plain median
        return 0.5 * (ordered[(rows - 1) // 2] + ordered[rows // 2]), np.full(block.shape[1], rows)
    count = np.count_nonzero(~np.isnan(block), axis=0)
    columns = np.arange(block.shape[1])
    low = ordered[np.maximum(count - 1, 0) // 2, columns]
    high = ordered[np.maximum(count, 1) // 2 - (count == 0), columns]
    median = np.where(count > 0, 0.5 * (low + high), np.nan)
    return median, count


# ---------------------------------------------------------------------------------------------- messages


def _layer_groups(layers: Sequence[str]) -> str:
    """``attn/layer_03``, ``attn/layer_04``, ``head`` -> ``"attn layers 3-4, head"``."""
    by_component: dict[str, list[int]] = {}
    plain: list[str] = []
    for key in layers:
        component, sep, index = key.rpartition("/layer_")
        if sep and index.isdigit():
            by_component.setdefault(component, []).append(int(index))
        else:
            plain.append(key)
    parts = []
    for component, indices in by_component.items():
        indices = sorted(set(indices))
        runs, start = [], indices[0]
        for a, b in zip(indices, [*indices[1:], None]):
            if b is None or b != a + 1:
                runs.append(str(start) if start == a else f"{start}-{a}")
                start = b if b is not None else start
        parts.append(f"{component} layer{'s' if len(indices) > 1 else ''} {', '.join(runs)}")
    parts += plain
    if len(parts) > 4:
        parts = [*parts[:4], f"{len(parts) - 4} more"]
    return ", ".join(parts)


def _describe(family: str, sign: int, changes: _Changes, layers: Sequence[str], steps: int) -> str:
    logs = changes.log * sign
    median = float(np.median(logs))
    moved = [layers[c] for c, v in zip(changes.columns.tolist(), logs.tolist()) if v >= median]
    before = math.exp(float(np.median(changes.before)))
    now = math.exp(float(np.median(changes.now)))
    count = len(changes.columns)
    where = f"median of {count} layer{'s' if count > 1 else ''}: {_layer_groups(sorted(moved))}"
    what = {
        "collapse": "the gradient is collapsing onto few directions",
        "concentration": "the gradient is concentrating in its top direction",
        "growth": "the gradients are growing",
    }[family]
    direction = "down" if sign < 0 else "up"
    factor = math.exp(abs(median))
    label = _LABELS[changes.name]
    return f"{what}: {label} {direction} {factor:.1f}x in {steps} steps ({where}; {before:.3g} -> {now:.3g})"


def _describe_divergence(changes: _Changes, layers: Sequence[str], steps: int) -> str:
    order = np.argsort(-changes.log)
    top = order[: max(1, len(order) // 10)]
    factor = math.exp(float(np.median(changes.log[top])) - float(np.median(changes.log)))
    names = sorted(layers[c] for c in changes.columns[top].tolist())
    return (
        f"layers are moving apart: the gradient norms of {_layer_groups(names)} grew {factor:.1f}x more "
        f"than the median layer's in {steps} steps"
    )


def _message(texts: Sequence[str]) -> str:
    body = "; ".join(texts)
    return (
        f"instability: {body}. A run at too high a learning rate does this before its loss breaks: lower the "
        "learning rate, or stop and resume from an earlier checkpoint."
    )
