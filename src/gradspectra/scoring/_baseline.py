"""Everything a :class:`~gradspectra.scoring.batch.BatchScorer` has learnt from past steps, kept in one object.

The baseline is a dozen windows and counters that only make sense together: the trend and the clean
residuals of three blocks of series (the metrics' values, the layer profiles, the loss), the profile
bases, the level-2 terms, the accepted scores and two counters. A reset, a new layer or metric, a
checkpoint and a restore must treat every one of them, or the windows fall out of step; so each of
those is written once here, as a loop over the declared blocks. The checkpoint keys and layout are
those of state version 2 and must stay so: old checkpoints have to load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gradspectra.scoring._profile import ProfileBasis
from gradspectra.scoring._trend import TrendWindow
from gradspectra.scoring._window import FloatArray, ScalarWindow, SortedWindow

Block = Literal["values", "profile", "loss"]
Series = Mapping[Block, FloatArray]


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


class Baseline:
    """The windows and counters of one scorer's baseline; a new one has seen nothing (warm-up starts).

    Attributes:
        trends: every step's series per block, for the robust trends.
        residuals: clean steps' residuals per block, for the level-1 scales.
        bases: clean steps' profile z per profile metric, for the usual directions of change.
        terms: clean steps' level-2 terms; ``None`` during warm-up.
        scores: accepted steps' scores, for the threshold; ``None`` during warm-up.
        accepted: steps that taught the residual windows (the warm-up counts these).
        consecutive_flags: flagged steps in a row (a regime change after ``rebaseline_after``).
        levels: the latest predictions' magnitudes, which linear-scale floors are relative to.
    """

    def __init__(self, sizes: Sizes, n_layers: int, n_metrics: int, n_profile: int) -> None:
        self.sizes = sizes
        shapes = _shapes(n_layers, n_metrics, n_profile)
        self.trends: dict[Block, TrendWindow] = {b: TrendWindow(shapes[b], self._trend_capacity(b)) for b in BLOCKS}
        self.residuals: dict[Block, SortedWindow | ScalarWindow] = {
            b: ScalarWindow(sizes.window) if b == "loss" else SortedWindow(shapes[b], sizes.window) for b in BLOCKS
        }
        self.bases = [ProfileBasis(n_layers, sizes.window, sizes.profile_components) for _ in range(n_profile)]
        self.terms: SortedWindow | None = None
        self.scores: ScalarWindow | None = None
        self.accepted = 0
        self.consecutive_flags = 0
        self.levels: tuple[FloatArray, float] = (np.ones((n_layers, n_metrics)), 1.0)

    def _trend_capacity(self, block: Block) -> int:
        return self.sizes.loss_window if block == "loss" else self.sizes.trend_window

    def grow(self, n_layers: int, n_metrics: int, n_profile: int) -> None:
        """Give new layers and metrics their (empty) series in every window; nothing shrinks."""
        shapes = _shapes(n_layers, n_metrics, n_profile)
        for b in BLOCKS:
            self.trends[b].grow(shapes[b])
            self.residuals[b].grow(shapes[b])
        for basis in self.bases:
            basis.grow(n_layers)
        if self.terms is not None:
            self.terms.grow((1 + n_profile + n_metrics,))

    def push_trends(self, series: Series, step: float, for_slope: bool) -> None:
        """Every measured step teaches the trends; a flagged one (``for_slope=False``) not their slopes."""
        for b, values in series.items():
            self.trends[b].push(values, step, for_slope)

    def push_residuals(self, residuals: Series) -> None:
        """Only clean-looking steps: an anomaly just under the threshold would widen the scales."""
        for b, values in residuals.items():
            self.residuals[b].push(values)

    def push_terms(self, terms: FloatArray, z_profile: FloatArray) -> None:
        """Clean-looking steps after warm-up, like :meth:`push_residuals`, so a bad profile never becomes usual."""
        assert self.terms is not None
        self.terms.push(terms)
        for j, basis in enumerate(self.bases):
            basis.push(z_profile[:, j])

    def state(self, term_names: list[str]) -> dict[str, Any]:
        """The checkpoint entries of the baseline, as plain lists (windows oldest first) and ints."""
        out: dict[str, Any] = {"accepted": self.accepted, "consecutive_flags": self.consecutive_flags}
        out.update({keys.trend: self.trends[b].state() for b, keys in BLOCKS.items()})
        out.update({keys.residuals: _history(self.residuals[b]) for b, keys in BLOCKS.items()})
        out["bases"] = [basis.state() for basis in self.bases]
        out["terms"] = None if self.terms is None else self.terms.history().tolist()
        out["term_names"] = None if self.terms is None else term_names
        out["scores"] = None if self.scores is None else self.scores.history()[0].tolist()
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
        shapes = _shapes(n_layers, len(metrics.current), len(profile.current))
        for b, keys in BLOCKS.items():
            trend = _trend_state(state.get(keys.trend), columns[b], n_layers)
            base.trends[b] = TrendWindow.from_state(shapes[b], base._trend_capacity(b), trend)
            base.residuals[b] = base._load_residuals(b, state, columns[b], n_layers)
        stored_bases = list(state.get("bases") or [])
        base.bases = [
            ProfileBasis.from_state(
                n_layers, sizes.window, sizes.profile_components, _stored_basis(stored_bases, profile, name)
            )
            for name in profile.current
        ]
        base.accepted = int(state.get("accepted", 0))
        base.consecutive_flags = int(state.get("consecutive_flags", 0))
        return base

    def _load_residuals(
        self, block: Block, state: Mapping[str, Any], columns: Columns, n_layers: int
    ) -> SortedWindow | ScalarWindow:
        keys = BLOCKS[block]
        stored = np.asarray(state.get(keys.residuals, []), dtype=np.float64)
        if block == "loss":
            return ScalarWindow.from_history(stored.reshape(1, -1), self.sizes.window)
        n_columns = len(columns.stored)
        if stored.size == 0:
            stored = np.full((n_layers, n_columns, 0), np.nan)
        if stored.ndim != 3 or stored.shape[:2] != (n_layers, n_columns):
            raise ValueError(
                f"`state['{keys.residuals}']` must be shaped (layers, {keys.columns}, steps) = "
                f"({n_layers}, {n_columns}, T), got {stored.shape}"
            )
        return SortedWindow.from_history(columns.remap(stored, n_layers), self.sizes.window)

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
        self.terms = SortedWindow.from_history(rows, self.sizes.window)
        stored_scores = np.asarray(scores, dtype=np.float64).reshape(1, -1)
        self.scores = ScalarWindow.from_history(stored_scores, self.sizes.threshold_window)
        return True


def _history(window: SortedWindow | ScalarWindow) -> list[Any]:
    """A residual window as stored: ``(layers, columns, T)`` nested lists, the loss's as one flat list."""
    history = window.history()
    out: list[Any] = (history[0] if isinstance(window, ScalarWindow) else history).tolist()
    return out


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
