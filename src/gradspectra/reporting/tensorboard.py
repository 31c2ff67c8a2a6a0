"""TensorBoard views of layer-wise spectra: the layout (once), layer-profile figures, layer x step heatmaps,
the flush cadence and the end-of-training summary text.

Figures are built with matplotlib's Agg backend (imported lazily) and handed to TensorBoard
``SummaryWriter`` objects; nothing here touches Lightning or transformers.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gradspectra.reporting.tags import SUMMARY_TAG, custom_scalars_layout, heatmap_tag, profile_tag

if TYPE_CHECKING:
    from matplotlib.figure import Figure

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def layer_profile_figure(
    metric: str, curves: Mapping[str, Sequence[tuple[int, float]]], step: int | None = None
) -> Figure:
    """The papers' figure: ``metric`` against layer index, one curve per component."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=100)
    for component, points in sorted(curves.items()):
        if not points:
            continue
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=component)
    ax.set_xlabel("layer index")
    ax.set_ylabel(metric)
    title = f"{metric} by layer"
    ax.set_title(title if step is None else f"{title} (step {step})")
    if curves:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig  # type: ignore[no-any-return]


def heatmap_figure(metric: str, layer_keys: Sequence[str], steps: Sequence[int], values: np.ndarray) -> Figure:
    """A layer x step heatmap of ``metric`` (``values`` shaped ``(len(layer_keys), len(steps))``).

    Colour is log10 of the value for positive metrics, so layers of different scale stay readable;
    non-finite cells are left blank.
    """
    plt = _pyplot()
    data = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(data)
    positive = bool(finite.any()) and bool((data[finite] > 0).all())
    shown = np.where(finite & (data > 0), np.log10(np.where(data > 0, data, 1.0)), np.nan) if positive else data
    height = max(3.0, min(12.0, 0.18 * len(layer_keys) + 1.5))
    fig, ax = plt.subplots(figsize=(8.0, height), dpi=100)
    extent = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5, len(layer_keys) - 0.5, -0.5) if steps else None
    image = ax.imshow(
        np.ma.masked_invalid(shown), aspect="auto", interpolation="nearest", cmap="viridis", extent=extent
    )
    ax.set_yticks(range(len(layer_keys)))
    ax.set_yticklabels(layer_keys, fontsize=6)
    ax.set_xlabel("step")
    ax.set_title(f"{metric} per layer and step")
    fig.colorbar(image, ax=ax, label=f"log10 {metric}" if positive else metric)
    fig.tight_layout()
    return fig  # type: ignore[no-any-return]


def _cell(value: Any) -> str:
    """A table cell; a front door that does not know a field (a batch index, an epoch) leaves ``-``."""
    return "-" if value is None else str(value)


def flagged_table(records: Sequence[Mapping[str, Any]], top: int = 10) -> str:
    """A plain-text table of the ``top`` highest-scoring records (flagged or not), highest first."""
    scored = [r for r in records if isinstance(r.get("score"), (int, float)) and np.isfinite(r["score"])]
    scored.sort(key=lambda r: -float(r["score"]))
    rows = scored[:top]
    header = f"{'step':>6} {'epoch':>5} {'batch':>6} {'score':>8} {'flag':>4}  reasons"
    lines = [header, "-" * len(header)]
    for r in rows:
        reasons = "; ".join(r.get("reasons") or []) or "-"
        ids = r.get("sample_ids")
        if ids:
            shown = ", ".join(str(i) for i in list(ids)[:6]) + (" ..." if len(ids) > 6 else "")
            reasons += f"  [samples: {shown}]"
        lines.append(
            f"{_cell(r.get('step')):>6} {_cell(r.get('epoch')):>5} {_cell(r.get('batch_idx')):>6} "
            f"{float(r['score']):>8.2f} {'yes' if r.get('flagged') else 'no':>4}  {reasons}"
        )
    if not rows:
        lines.append("(no scored steps yet: still in warm-up)")
    return "\n".join(lines)


class SummaryWriterLike(Protocol):
    """What the views need of ``torch.utils.tensorboard.SummaryWriter`` (Lightning's ``logger.experiment``)."""

    def add_custom_scalars(self, layout: dict[str, dict[str, list[Any]]]) -> None: ...

    def add_figure(self, tag: str, figure: Any, global_step: int | None = None, close: bool = True) -> None: ...

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True)
class ViewLayer:
    """One watched layer as the views see it: its key, component and layer index."""

    key: str
    component: str
    index: int | None


class TensorBoardViews:
    """The TensorBoard-only views of one run, kept by rank 0: layout, figures, heatmaps, flushes, summary.

    Args:
        metric_names: the metrics, in the column order of the values handed to :meth:`observe`.
        layers: the watched layers, in row order.
        figure_every_n_steps: shortest spacing of the figures in measured steps; ``0`` disables them.
        heatmap_steps: how many recent measured steps the heatmaps show.
        flush_seconds: event files are flushed at most this often (and at the end): live enough for
            a person watching, where a flush per step cost ~0.3 ms per tag file.
    """

    def __init__(
        self,
        metric_names: Sequence[str],
        layers: Sequence[ViewLayer],
        figure_every_n_steps: int,
        heatmap_steps: int,
        flush_seconds: float = 2.0,
    ) -> None:
        self.metric_names = tuple(metric_names)
        self.layers = list(layers)
        self.figure_every_n_steps = figure_every_n_steps
        self.flush_seconds = flush_seconds
        self.history: deque[tuple[int, np.ndarray]] = deque(maxlen=heatmap_steps)
        self._layout_written = False
        self._last_flush = -float("inf")
        self._last_figures = 0  # measured steps when the figures were last drawn

    @property
    def figures_per_drawing(self) -> int:
        return 2 * len(self.metric_names)

    def observe(self, step: int, values: np.ndarray) -> None:
        """Keep a step's ``(layers, metrics)`` values for the heatmaps."""
        self.history.append((step, values.copy()))

    def update(self, writers: Sequence[SummaryWriterLike], step: int, measured: int, period: int) -> float:
        """After a measured step: the layout once, figures when ``period`` measured steps have passed,
        a flush when due. Returns the seconds spent drawing figures (0 when none were drawn)."""
        if not writers:
            return 0.0
        if not self._layout_written:
            components = sorted({layer.component for layer in self.layers})
            for writer in writers:
                writer.add_custom_scalars(custom_scalars_layout(self.metric_names, components))
            self._layout_written = True
        seconds = 0.0
        if self.figure_every_n_steps and measured - self._last_figures >= period:
            t0 = time.perf_counter()
            self.draw(writers, step)
            seconds = time.perf_counter() - t0
            self._last_figures = measured
        now = time.perf_counter()
        if now - self._last_flush >= self.flush_seconds:
            for writer in writers:
                writer.flush()
            self._last_flush = now
        return seconds

    def finish(self, writers: Sequence[SummaryWriterLike], step: int, summary: str) -> None:
        """At the end of training: a last drawing of the figures and the summary table as text."""
        if self.figure_every_n_steps:
            self.draw(writers, step)
        for writer in writers:
            writer.add_text(SUMMARY_TAG, "```\n" + summary + "\n```", global_step=step)
            writer.flush()

    def draw(self, writers: Sequence[SummaryWriterLike], step: int) -> None:
        """Layer-profile figures (the mean over the figure window) and heatmaps of every metric."""
        if not self.history or not writers:
            return
        plt = _pyplot()
        steps = [s for s, _ in self.history]
        stack = np.stack([v for _, v in self.history], axis=-1)  # layers x metrics x steps
        window = stack[..., -max(1, min(self.figure_every_n_steps, stack.shape[-1])) :]
        finite = np.isfinite(window)
        count = finite.sum(axis=-1)
        # the mean of each layer's measured values in the window (NaN where none was measured)
        recent = np.where(count > 0, np.where(finite, window, 0.0).sum(axis=-1) / np.maximum(count, 1), np.nan)
        keys = [layer.key for layer in self.layers]
        for j, metric in enumerate(self.metric_names):
            curves: dict[str, list[tuple[int, float]]] = {}
            for i, layer in enumerate(self.layers):
                if layer.index is not None and np.isfinite(recent[i, j]):
                    curves.setdefault(layer.component, []).append((layer.index, float(recent[i, j])))
            figures = []
            if curves:
                figures.append((profile_tag(metric), layer_profile_figure(metric, curves, step)))
            figures.append((heatmap_tag(metric), heatmap_figure(metric, keys, steps, stack[:, j, :])))
            for tag, fig in figures:
                for writer in writers:
                    writer.add_figure(tag, fig, global_step=step, close=False)
                plt.close(fig)


class LayerRuns:
    """One ``SummaryWriter`` per layer index under ``base`` (``base/layer_03``), created at first use."""

    def __init__(self, base: str | os.PathLike[str]) -> None:
        self.base = Path(base)
        self._writers: dict[str, Any] = {}

    def log(self, runs: dict[str, dict[str, float]], step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        for run, scalars in runs.items():
            if run not in self._writers:
                self._writers[run] = SummaryWriter(log_dir=str(self.base / run))
            for tag, value in scalars.items():
                self._writers[run].add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
