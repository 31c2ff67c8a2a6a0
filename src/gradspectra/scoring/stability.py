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
- ``divergence``: layers moving apart, the spread (90th minus 10th percentile over layers) of the
  per-layer log change of ``frobenius_norm``: some layers' gradients growing while others stay;
- ``nonfinite``: steps with a non-finite gradient or loss among the last ``recent``.

Each family's value divided by its limit is its severity; the step's stability score is the
largest severity (``>= 1``: over a limit). A warning (an ``instability`` event) needs a score over 1
on ``persist`` consecutive steps (non-finite steps: at once); after one, the detector is quiet until
the score has stayed below 1 for ``rearm`` steps. Nothing resets it: a shift the batch scorer adopts
is a new normal for single batches, not for the trend.

>>> import math
>>> det = StabilityDetector(recent=3, gap=2, reference=8, persist=2)
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
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    text: str


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

    Raises:
        ValueError: an argument is out of range (the message names it and the value).
    """

    def __init__(
        self,
        *,
        recent: int = 3,
        gap: int = 8,
        reference: int = 30,
        collapse: float = 2.5,
        concentration: float = 2.0,
        growth: float = 8.0,
        divergence: float = 8.0,
        nonfinite: int = 2,
        persist: int = 2,
        rearm: int = 20,
        min_layers: int = 1,
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
        self._span = self.recent + self.gap + self.reference
        self._series: dict[tuple[str, str], deque[tuple[int, float]]] = {}
        self._bad_steps: deque[int] = deque()
        self._step = 0
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
        bad = loss is not None and not math.isfinite(float(loss))
        for layer, values in metrics.items():
            for name in _WATCHED:
                if name in values:
                    v = float(values[name])
                    bad = bad or not math.isfinite(v)
                    self._push(layer, name, v, step)
        for layer, value in (detection or {}).items():
            v = float(value)
            bad = bad or not math.isfinite(v)
            self._push(layer, "effective_rank_coarse", v, step)
        while self._bad_steps and self._bad_steps[0] <= step - self.recent:
            self._bad_steps.popleft()
        if bad:
            self._bad_steps.append(step)
        findings = self._findings(step)
        if not findings and len(self._bad_steps) < self.nonfinite:
            self._count(False)
            return StabilityResult(None if not self._has_reference(step) else 0.0)
        if len(self._bad_steps) >= self.nonfinite:
            findings.append(
                _Finding(
                    "nonfinite",
                    len(self._bad_steps) / self.nonfinite,
                    f"non-finite gradients or loss in {len(self._bad_steps)} of the last {self.recent} steps",
                )
            )
        severities = {f.family: f.severity for f in findings}
        score = max(severities.values())
        # non-finite steps are already a count over the recent window: no need to persist further
        warn = self._count(score >= 1.0, immediate="nonfinite" in severities)
        events = []
        if warn:
            worst = [f for f in sorted(findings, key=lambda f: -f.severity) if f.severity >= 1.0]
            events.append({"kind": "instability", "message": _message(worst)})
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

    def _push(self, layer: str, name: str, value: float, step: int) -> None:
        if not (math.isfinite(value) and value > 0):
            return
        series = self._series.get((layer, name))
        if series is None:
            series = self._series[(layer, name)] = deque()
        series.append((step, math.log(value)))
        while series and series[0][0] <= step - self._span:
            series.popleft()

    def _has_reference(self, step: int) -> bool:
        return step + 1 >= self._span - self.reference + max(2, self.reference // 3)

    def _changes(self, name: str, step: int) -> dict[str, tuple[float, float, float, int]]:
        """Per layer with enough values: (log change, reference level, recent level, steps between)."""
        out = {}
        recent_from = step - self.recent + 1
        reference_to = recent_from - self.gap - 1
        need_recent = max(1, (self.recent + 1) // 2)
        need_reference = max(2, self.reference // 3)
        for (layer, metric), series in self._series.items():
            if metric != name:
                continue
            recent = [v for s, v in series if s >= recent_from]
            reference = [v for s, v in series if s <= reference_to]
            if len(recent) >= need_recent and len(reference) >= need_reference:
                now, before = float(np.median(recent)), float(np.median(reference))
                out[layer] = (now - before, before, now, self.recent + self.gap)
        return out

    def _findings(self, step: int) -> list[_Finding]:
        findings = []
        for family, (names, sign) in FAMILIES.items():
            best: _Finding | None = None
            for name in names:
                changes = self._changes(name, step)
                if len(changes) < self.min_layers:
                    continue
                logs = np.array([c[0] for c in changes.values()])
                change = float(np.median(logs)) * sign
                severity = max(change, 0.0) / math.log(self.limits[family])
                if best is None or severity > best.severity:
                    best = _Finding(family, severity, _describe(family, name, sign, changes))
                if family == "growth" and len(changes) >= 4:
                    spread = float(np.percentile(logs, 90) - np.percentile(logs, 10))
                    sev = spread / math.log(self.limits["divergence"])
                    findings.append(_Finding("divergence", sev, _describe_divergence(changes)))
            if best is not None:
                findings.append(best)
        return findings

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and ints (checkpointed with the monitor)."""
        return {
            "step": self._step,
            "over": self._over,
            "under": self._under,
            "bad_steps": list(self._bad_steps),
            "series": [[layer, name, [list(p) for p in series]] for (layer, name), series in self._series.items()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._step = int(state.get("step", 0))
        self._over = int(state.get("over", 0))
        self._under = int(state.get("under", self.rearm))
        self._bad_steps = deque(int(s) for s in state.get("bad_steps", []))
        self._series = {
            (str(layer), str(name)): deque((int(s), float(v)) for s, v in points)
            for layer, name, points in state.get("series", [])
        }


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


def _describe(family: str, name: str, sign: int, changes: Mapping[str, tuple[float, float, float, int]]) -> str:
    logs = {k: c[0] * sign for k, c in changes.items()}
    median = float(np.median(list(logs.values())))
    moved = sorted((k for k, v in logs.items() if v >= median), key=lambda k: -logs[k]) or list(changes)
    before = float(np.exp(np.median([changes[k][1] for k in changes])))
    now = float(np.exp(np.median([changes[k][2] for k in changes])))
    steps = next(iter(changes.values()))[3]
    factor = math.exp(abs(median))
    where = f"median of {len(changes)} layer{'s' if len(changes) > 1 else ''}: {_layer_groups(sorted(moved))}"
    what = {
        "collapse": "the gradient is collapsing onto few directions",
        "concentration": "the gradient is concentrating in its top direction",
        "growth": "the gradients are growing",
    }[family]
    direction = "down" if sign < 0 else "up"
    return f"{what}: {_LABELS[name]} {direction} {factor:.1f}x in {steps} steps ({where}; {before:.3g} -> {now:.3g})"


def _describe_divergence(changes: Mapping[str, tuple[float, float, float, int]]) -> str:
    logs = {k: c[0] for k, c in changes.items()}
    order = sorted(logs, key=lambda k: -logs[k])
    top = order[: max(1, len(order) // 10)]
    rest = float(np.median(list(logs.values())))
    steps = next(iter(changes.values()))[3]
    factor = math.exp(float(np.median([logs[k] for k in top])) - rest)
    return (
        f"layers are moving apart: the gradient norms of {_layer_groups(sorted(top))} grew {factor:.1f}x more "
        f"than the median layer's in {steps} steps"
    )


def _message(findings: Sequence[_Finding]) -> str:
    body = "; ".join(f.text for f in findings)
    return (
        f"instability: {body}. A run at too high a learning rate does this before its loss breaks: lower the "
        "learning rate, or stop and resume from an earlier checkpoint."
    )
