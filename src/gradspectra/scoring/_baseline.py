"""Everything a :class:`~gradspectra.scoring.batch.BatchScorer` has learnt from past steps, kept in one object.

The baseline is a dozen windows and counters that only make sense together: the trends of the
metrics' values and of the loss, the clean residuals of three blocks of series (the values, the
layer profiles, the loss) and the level-2 terms (one flat window), the profile bases, the accepted
scores and counters. A reset, a new layer or metric, a checkpoint and a restore must treat every one
of them, or the windows fall out of step; so each of those is written once here, as a loop over the
declared blocks. The checkpoint keys and layout are
those of state version 2 and must stay so: old checkpoints have to load (``young_scores``,
``flag_run``, ``flag_times`` and ``spike``, added since, are optional; a run without its steps starts over).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gradspectra.scoring._profile import ProfileBasis
from gradspectra.scoring._trend import TrendWindow
from gradspectra.scoring._window import FloatArray, ScalarWindow, SortedWindow

Block = Literal["values", "profile", "loss"]
Series = Mapping[Block, FloatArray]
#: What a flagged step moved: level-2 row -> (direction, per-layer pattern or None).
Signature = dict[int, tuple[float, FloatArray | None]]
#: A flagged step, for telling its aftermath: (its step, level-2 row -> (direction, strength)) of each term over
#: the threshold.
Spike = tuple[float, dict[int, tuple[float, float]]]


@dataclass(frozen=True)
class _Keys:
    """Where a block lives in a checkpoint, and what its columns are called in an error about it."""

    trend: str
    residuals: str
    columns: str


#: The blocks of series, in the order a checkpoint lists them (all trends first, then all residuals).
#: ``values`` is ``(layers, metrics)``, ``profile`` ``(layers, profile metrics)``, ``loss`` ``(1,)``.
BLOCKS: dict[Block, _Keys] = {
    "values": _Keys("trend_values", "residuals", "metrics"),
    "profile": _Keys("trend_profile", "profile_residuals", "profile metrics"),
    "loss": _Keys("trend_loss", "loss_residuals", "loss"),
}


#: The blocks with a trend of their own. The profile's residuals are taken from the values' residuals
#: (``trend_profile``, the trend of earlier versions, is written as None and ignored on loading).
TRENDED: tuple[Block, ...] = ("values", "loss")


@dataclass(frozen=True)
class Sizes:
    """The window lengths, fixed by the scorer's arguments."""

    window: int
    trend_window: int
    loss_window: int
    threshold_window: int
    profile_components: int


@dataclass(frozen=True)
class Columns:
    """A block's column names in a checkpoint and in the scorer: a restore matches them by name, so that
    a scorer with other ``metrics=`` or ``profile_metrics=`` can still continue from it."""

    stored: tuple[str, ...]
    current: tuple[str, ...]

    def remap(self, block: FloatArray, n_layers: int) -> FloatArray:
        """``(layers, stored, ...)`` as ``(layers, current, ...)``, NaN for a column the checkpoint lacks."""
        if self.stored == self.current:
            return block
        out = np.full((n_layers, len(self.current), *block.shape[2:]), np.nan)
        for j, name in enumerate(self.current):
            if name in self.stored:
                k = self.stored.index(name)
                if block.ndim >= 2 and block.shape[1] > k:
                    out[:, j] = block[:, k]
        return out


_LOSS_COLUMNS = Columns(("loss",), ("loss",))  # one column under one name in every checkpoint: never remapped


def _shapes(n_layers: int, n_metrics: int, n_profile: int) -> dict[Block, tuple[int, ...]]:
    return {"values": (n_layers, n_metrics), "profile": (n_layers, n_profile), "loss": (1,)}


class Layout:
    """Where each block's series and the level-2 terms sit in the one flat window of clean values.

    ``[values (layers x metrics, row-major) | profile (layers x profile metrics) | loss | terms]``, the
    terms being the loss, the profile terms, then one level term per metric.
    """

    def __init__(self, n_layers: int, n_metrics: int, n_profile: int) -> None:
        self.shapes = _shapes(n_layers, n_metrics, n_profile)
        self.n_terms = 1 + n_profile + n_metrics
        self.slices: dict[Block, slice] = {}
        start = 0
        for b in BLOCKS:
            size = math.prod(self.shapes[b])
            self.slices[b] = slice(start, start + size)
            start += size
        self.n_residuals = start
        self.terms = slice(start, start + self.n_terms)
        self.size = start + self.n_terms


class Baseline:
    """The windows and counters of one scorer's baseline; a new one has seen nothing (warm-up starts).

    Attributes:
        trends: every step's values and loss, for the robust trends.
        window: clean steps' residuals of every block and their level-2 terms, one flat series each
            (see :class:`Layout`), for the level-1 scales and the level-2 baselines: one push and one
            read of the quartiles a step. Terms are absent (NaN) until level 2 starts.
        level2: whether level 2 has started (the end of warm-up).
        bases: clean steps' profile z per profile metric, for the usual directions of change.
        scores: accepted steps' scores, for the threshold; ``None`` during warm-up.
        accepted: steps that taught the residual windows (the warm-up counts these).
        consecutive_flags: flagged steps in a row (a regime change after ``rebaseline_after``).
        flag_run: the signatures of the latest flagged steps (what moved, which way, in which layers),
            for telling a shift from a spike; ``flag_times`` their steps. A signature leaves the run when
            it is older than the span a shift is confirmed in (see :meth:`extend_run`); an accepted step
            where the change does not go on, a non-finite step, a shift or a new baseline empty it.
        young_scores: scores accepted while the windows are young that did not teach them (above the
            guard); the in-sample rebuilds of the score window keep them. Empty once the windows are grown.
        levels: the latest prediction of the values and the magnitude of the loss's, which linear-scale
            floors are relative to.
    """

    def __init__(self, sizes: Sizes, n_layers: int, n_metrics: int, n_profile: int) -> None:
        self.sizes = sizes
        self.layout = Layout(n_layers, n_metrics, n_profile)
        shapes = self.layout.shapes
        self.trends: dict[Block, TrendWindow] = {b: TrendWindow(shapes[b], self._trend_capacity(b)) for b in TRENDED}
        self.window = SortedWindow((self.layout.size,), sizes.window)
        self.level2 = False
        self.bases = [ProfileBasis(n_layers, sizes.window, sizes.profile_components) for _ in range(n_profile)]
        self.scores: ScalarWindow | None = None
        self.accepted = 0
        self.consecutive_flags = 0
        self.flag_run: list[Signature] = []
        self.flag_times: list[float] = []
        self.flag_values: list[dict[int, float]] = []  # per flag: each marked term's value (the level-2 input)
        self.noise_shifts: dict[int, float] = {}  # profile term -> step of its latest shift by persistence alone
        self.noise_levels: dict[int, float] = {}  # profile term -> the level its window was re-centred on
        self.spike: Spike | None = None  # the latest flagged step: its step and each term over the threshold
        self.young_scores: list[float] = []
        self.levels: tuple[FloatArray, float] = (np.ones((n_layers, n_metrics)), 1.0)
        self._no_terms = np.full(self.layout.n_terms, np.nan)

    def _trend_capacity(self, block: Block) -> int:
        return self.sizes.loss_window if block == "loss" else self.sizes.trend_window

    def history(self, block: Block) -> FloatArray:
        """A block's clean residuals, ``shape + (T,)`` oldest first, as float64 (NaN = absent)."""
        rows = self.window.history()[self.layout.slices[block]].astype(np.float64)
        out: FloatArray = rows.reshape(*self.layout.shapes[block], rows.shape[-1])
        return out

    def terms_history(self) -> FloatArray:
        """The level-2 terms of the clean steps, ``(terms, T)`` oldest first."""
        out: FloatArray = self.window.history()[self.layout.terms].astype(np.float64)
        return out

    def grow(self, n_layers: int, n_metrics: int, n_profile: int) -> None:
        """Give new layers and metrics their (empty) series in every window; nothing shrinks."""
        old = self.layout
        history = self.window.history()
        self.layout = Layout(n_layers, n_metrics, n_profile)
        shapes = self.layout.shapes
        t = history.shape[-1]
        grown = np.full((self.layout.size, t), np.nan, dtype=history.dtype)
        for b in BLOCKS:
            if b in self.trends:
                self.trends[b].grow(shapes[b])
            block = np.full((*shapes[b], t), np.nan, dtype=history.dtype)
            block[tuple(slice(0, s) for s in old.shapes[b])] = history[old.slices[b]].reshape(*old.shapes[b], t)
            grown[self.layout.slices[b]] = block.reshape(math.prod(shapes[b]), t)
        grown[self.layout.terms][: old.n_terms] = history[old.terms]  # new metrics' terms come last
        self.window = SortedWindow.from_history(grown, self.sizes.window)
        self._no_terms = np.full(self.layout.n_terms, np.nan)
        for basis in self.bases:
            basis.grow(n_layers)

    def push_trends(self, series: Series, step: float, for_slope: bool) -> None:
        """Every measured step teaches the trends; a flagged one (``for_slope=False``) not their slopes."""
        for b, values in series.items():
            self.trends[b].push(values, step, for_slope)

    def extend_run(self, signature: Signature, values: dict[int, float], t: float, span: int) -> None:
        """A flagged step's signature (and its terms' ``values``) joins the run; those of steps ``span`` or more
        steps before ``t`` leave it."""
        self.flag_run.append(signature)
        self.flag_values.append(values)
        self.flag_times.append(t)
        keep = [i for i, old in enumerate(self.flag_times) if t - old < span]
        self.flag_run = [self.flag_run[i] for i in keep]
        self.flag_values = [self.flag_values[i] for i in keep]
        self.flag_times = [self.flag_times[i] for i in keep]

    def clear_run(self) -> None:
        self.flag_run = []
        self.flag_values = []
        self.flag_times = []

    def recentre_term(self, k: int, level: float) -> None:
        """Level-2 term ``k``'s clean values moved so that their median is ``level`` (their spread stays)."""
        row = slice(self.layout.terms.start + k, self.layout.terms.start + k + 1)
        history = self.window.history()[row].astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row stays as it is
            median = float(np.nanmedian(history))
        if math.isfinite(median) and math.isfinite(level):
            self.window.set_rows(row, history - median + level)
            self.noise_levels[k] = level

    def adopt(self, since: float, minimum: int) -> None:
        """A regime shift: the trends keep only their rows from step ``since`` on (at least ``minimum``), so they
        predict the new level.

        A trend of a few rows does not lag as a full one does (a falling loss sits below the median of
        its last 100 values; a new, short trend sits on it): the clean residuals of every block are
        re-centred on 0 so that their offset matches, and they relearn the lag as the trends refill.
        """
        for trend in self.trends.values():
            trend.keep_last(max(trend.rows_since(since), minimum))
        history = self.window.history().astype(np.float64)
        for b in BLOCKS:
            rows_b = history[self.layout.slices[b]]
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN series stays NaN
                self.window.set_rows(self.layout.slices[b], rows_b - np.nanmedian(rows_b, axis=-1, keepdims=True))

    def scale_loss_residuals(self, factor: float) -> None:
        """The loss's level moved by ``factor`` in a shift: on linear scale its clean spread moves with it."""
        rows = self.layout.slices["loss"]
        self.window.set_rows(rows, self.window.history()[rows].astype(np.float64) * factor)

    def push_clean(
        self, residuals: Series, terms: FloatArray | None = None, z_profile: FloatArray | None = None
    ) -> None:
        """A clean-looking step's residuals and (after warm-up) terms and profile z; see :meth:`flat`.

        Only clean-looking steps: an anomaly just under the threshold would widen the scales, and a bad
        profile would become usual.
        """
        self.window.push(self.flat(residuals, self._no_terms if terms is None else terms))
        if z_profile is not None:
            for j, basis in enumerate(self.bases):
                basis.push(z_profile[:, j])

    def flat(self, residuals: Series, terms: FloatArray) -> FloatArray:
        """One step's residuals and terms laid out as the window's series."""
        out: FloatArray = np.concatenate(
            (residuals["values"].reshape(-1), residuals["profile"].reshape(-1), residuals["loss"].reshape(-1), terms)
        )
        return out

    def set_terms(self, terms: FloatArray) -> None:
        """Start (or restart) level 2 with these terms of the clean steps in the window, ``(terms, T)``."""
        self.window.set_rows(self.layout.terms, terms)
        self.level2 = True

    def state(self, term_names: list[str]) -> dict[str, Any]:
        """The checkpoint entries of the baseline, as plain lists (windows oldest first) and ints."""
        out: dict[str, Any] = {"accepted": self.accepted, "consecutive_flags": self.consecutive_flags}
        out.update({keys.trend: self.trends[b].state() if b in self.trends else None for b, keys in BLOCKS.items()})
        history = self.window.history()
        for b, keys in BLOCKS.items():
            rows = history[self.layout.slices[b]]
            rows = rows[0] if b == "loss" else rows.reshape(*self.layout.shapes[b], rows.shape[-1])
            out[keys.residuals] = rows.tolist()
        out["bases"] = [basis.state() for basis in self.bases]
        out["terms"] = history[self.layout.terms].tolist() if self.level2 else None
        out["term_names"] = term_names if self.level2 else None
        out["scores"] = None if self.scores is None else self.scores.history()[0].tolist()
        out["young_scores"] = list(self.young_scores)
        out["flag_run"] = [
            {str(k): [sign, None if pattern is None else pattern.tolist()] for k, (sign, pattern) in sig.items()}
            for sig in self.flag_run
        ]
        out["flag_times"] = list(self.flag_times)
        out["flag_values"] = [{str(k): v for k, v in values.items()} for values in self.flag_values]
        out["noise_shifts"] = {str(k): t for k, t in self.noise_shifts.items()}
        out["noise_levels"] = {str(k): v for k, v in self.noise_levels.items()}
        out["spike"] = (
            None
            if self.spike is None
            else {"t": self.spike[0], "terms": {str(k): [sign, v] for k, (sign, v) in self.spike[1].items()}}
        )
        return out

    @classmethod
    def load(
        cls, sizes: Sizes, state: Mapping[str, Any], n_layers: int, metrics: Columns, profile: Columns
    ) -> Baseline:
        """The windows and counters of a version-2 checkpoint; level 2 is :meth:`load_level2`'s.

        Raises:
            ValueError: a residual window's shape does not match the stored layers and columns.
        """
        columns: dict[Block, Columns] = {"values": metrics, "profile": profile, "loss": _LOSS_COLUMNS}
        base = cls(sizes, n_layers, len(metrics.current), len(profile.current))
        shapes = base.layout.shapes
        blocks = []
        for b, keys in BLOCKS.items():
            if b in TRENDED:
                trend = _trend_state(state.get(keys.trend), columns[b], n_layers)
                base.trends[b] = TrendWindow.from_state(shapes[b], base._trend_capacity(b), trend)
            blocks.append(base._load_residuals(b, state, columns[b], n_layers))
        t = max(block.shape[-1] for block in blocks)
        rows = np.full((base.layout.size, t), np.nan)
        for b, block in zip(BLOCKS, blocks):
            if block.size:  # a shorter history (a block the checkpoint lacks) is absent at the oldest end
                rows[base.layout.slices[b], t - block.shape[-1] :] = block
        base.window = SortedWindow.from_history(rows, sizes.window)
        stored_bases = list(state.get("bases") or [])
        base.bases = [
            ProfileBasis.from_state(
                n_layers, sizes.window, sizes.profile_components, _stored_basis(stored_bases, profile, name)
            )
            for name in profile.current
        ]
        base.accepted = int(state.get("accepted", 0))
        base.consecutive_flags = int(state.get("consecutive_flags", 0))
        base.young_scores = [float(v) for v in state.get("young_scores") or []]
        base.flag_run = [
            {
                int(k): (float(sign), None if pattern is None else np.asarray(pattern, dtype=np.float64))
                for k, (sign, pattern) in sig.items()
            }
            for sig in state.get("flag_run") or []
        ]
        base.flag_times = [float(t) for t in state.get("flag_times") or []]
        base.flag_values = [
            {int(k): math.nan if v is None else float(v) for k, v in values.items()}
            for values in state.get("flag_values") or []
        ]
        if not len(base.flag_times) == len(base.flag_values) == len(base.flag_run):  # an older checkpoint
            base.clear_run()
        base.noise_shifts = {int(k): float(t) for k, t in (state.get("noise_shifts") or {}).items()}
        base.noise_levels = {int(k): float(v) for k, v in (state.get("noise_levels") or {}).items()}
        spike = state.get("spike")
        if isinstance(spike, Mapping) and "t" in spike:
            terms = {int(k): (float(sign), float(v)) for k, (sign, v) in (spike.get("terms") or {}).items()}
            base.spike = (float(spike["t"]), terms)
        return base

    def _load_residuals(self, block: Block, state: Mapping[str, Any], columns: Columns, n_layers: int) -> FloatArray:
        """A block's stored residuals as ``(series, T)``, its columns remapped to the scorer's."""
        keys = BLOCKS[block]
        stored = np.asarray(state.get(keys.residuals, []), dtype=np.float64)
        if block == "loss":
            out: FloatArray = stored.reshape(1, -1)
            return out
        n_columns = len(columns.stored)
        if stored.size == 0:
            stored = np.full((n_layers, n_columns, 0), np.nan)
        if stored.ndim != 3 or stored.shape[:2] != (n_layers, n_columns):
            raise ValueError(
                f"`state['{keys.residuals}']` must be shaped (layers, {keys.columns}, steps) = "
                f"({n_layers}, {n_columns}, T), got {stored.shape}"
            )
        remapped: FloatArray = columns.remap(stored, n_layers)
        return remapped.reshape(n_layers * len(columns.current), stored.shape[-1])

    def load_level2(self, state: Mapping[str, Any], term_names: list[str]) -> bool:
        """Restore the level-2 terms (matched by name) and the accepted scores; False if the checkpoint has none."""
        stored_terms, names, scores = state.get("terms"), state.get("term_names"), state.get("scores")
        if stored_terms is None or names is None or scores is None:
            return False
        terms = np.asarray(stored_terms, dtype=np.float64)
        width = terms.shape[-1] if terms.ndim == 2 else 0
        rows = np.full((len(term_names), width), np.nan)
        for k, name in enumerate(term_names):
            if name in names and width:
                rows[k] = terms[list(names).index(name)]
        self.set_terms(rows)
        stored_scores = np.asarray(scores, dtype=np.float64).reshape(1, -1)
        self.scores = ScalarWindow.from_history(stored_scores, self.sizes.threshold_window)
        return True


def _trend_state(stored: Any, columns: Columns, n_layers: int) -> dict[str, Any]:
    """A stored trend, its rows remapped to the scorer's columns if they differ.

    A remap drops the cached slopes, which no longer line up with the columns; they are refitted.
    """
    trend = dict(stored or {})
    if columns.stored == columns.current:
        return trend
    return {
        "values": [columns.remap(np.asarray(r), n_layers) for r in trend.get("values", [])],
        "steps": trend.get("steps"),
    }


def _stored_basis(stored: list[Any], profile: Columns, name: str) -> Any:
    """The stored basis state of profile metric ``name``, or ``None`` (the basis then starts empty)."""
    if name not in profile.stored:
        return None
    k = profile.stored.index(name)
    return stored[k] if k < len(stored) else None
