"""TensorBoard views of layer-wise spectra: the layout (once), layer-profile figures, layer x step heatmaps,
the flush cadence and the end-of-training summary text.

Figures are plain matplotlib ``Figure`` objects (no pyplot, so no backend is switched and no global figure
list grows), imported lazily and handed to TensorBoard ``SummaryWriter`` objects; nothing here touches
Lightning or transformers. :class:`TensorBoardViews` keeps one figure per metric and view and only
changes its data at each drawing: building a figure and fitting its layout cost as much as rendering it.
"""

from __future__ import annotations

import math
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

#: a colour scale is logarithmic where the positive values span more than this many decades
LOG_SCALE_DECADES = 1.5
#: resolution of the figures (a 7 x 4 inch profile is 700 x 400 pixels)
FIGURE_DPI = 100
# average glyph width as a fraction of the font size (DejaVu Sans), to size margins without a layout pass
_CHAR_EM = 0.55


def _figure(width: float, height: float) -> Figure:
    """A figure outside pyplot: nothing to close, no backend switched, no global list of open figures."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=FIGURE_DPI)


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _plain_log_ticks(axis: Any) -> None:
    """Decade ticks of a log axis written ``0.01``, ``100``, ``1e+06`` (the default ``10^k`` labels go through
    mathtext, whose parser made up a third of a drawing), and no minor ticks."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    axis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    axis.set_minor_locator(NullLocator())  # nine minor ticks a decade: as many artists as the rest


def _fixed_xlabel(ax: Any, figure: Figure) -> None:
    """The x label at a fixed distance below the axes (tick labels are one line of 10 points): matplotlib
    otherwise measures every tick label of the figure at each drawing to place it."""
    height = (figure.subplotpars.top - figure.subplotpars.bottom) * figure.get_figheight() * 72.0
    ax.xaxis.set_label_coords(0.5, -20.0 / height)


def _release_canvas(figure: Figure) -> None:
    """Drop the pixel buffer a writer's renderer left on a kept figure (~2 MB each; the next writer
    renders on a canvas of its own anyway)."""
    from matplotlib.backend_bases import FigureCanvasBase

    FigureCanvasBase(figure)


def _log_scale(values: np.ndarray) -> bool:
    """Whether ``values`` want a log scale: none negative, and the positive ones span more than
    :data:`LOG_SCALE_DECADES` decades (non-finite values ignored)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or bool((finite < 0).any()):
        return False
    positive = finite[finite > 0]
    if positive.size < 2:
        return False
    return bool(math.log10(float(positive.max()) / float(positive.min())) > LOG_SCALE_DECADES)


def _window_text(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"


def _profile_title(metric: str, window: tuple[int, int]) -> str:
    """``nuclear_norm by layer, mean over steps 20-29`` (or ``, step 29`` for a window of one step)."""
    mean = "mean over " if window[0] != window[1] else ""
    return f"{metric} by layer, {mean}{_window_text(*window)}"


class _ProfileFigure:
    """One layer-profile figure for a fixed set of components; each drawing only replaces the curves."""

    def __init__(self, components: Sequence[str]) -> None:
        self.figure = _figure(7.0, 4.0)
        # fixed margins instead of tight_layout (a layout pass cost as much as the rendering)
        self.figure.subplots_adjust(left=0.12, right=0.98, bottom=0.12, top=0.91)
        self.ax = self.figure.add_subplot()
        self.lines = {
            c: self.ax.plot([], [], marker="o", markersize=3, linewidth=1.2, label=c)[0] for c in sorted(components)
        }
        self.ax.set_xlabel("layer index")
        _fixed_xlabel(self.ax, self.figure)
        _integer_ticks(self.ax.xaxis)  # layers are counted: no tick at 0.2 or 2.5
        self.ax.grid(alpha=0.3)
        if self.lines:
            self.ax.legend(fontsize=7, loc="best")
        self.log = False

    def draw(self, metric: str, curves: Mapping[str, Sequence[tuple[int, float]]], title: str) -> Figure:
        xs_all: list[float] = []
        ys_all: list[float] = []
        for component, line in self.lines.items():
            points = sorted(curves.get(component) or ())
            xs = [float(x) for x, _ in points]
            ys = [float(y) for _, y in points]
            line.set_data(xs, ys)
            xs_all += xs
            ys_all += ys
        log = _log_scale(np.asarray(ys_all, dtype=np.float64))
        if log != self.log:  # setting the scale resets the ticks: only when it changes
            self.ax.set_yscale("log" if log else "linear")
            if log:
                _plain_log_ticks(self.ax.yaxis)
            self.log = log
        self.ax.set_ylabel(f"{metric} (log scale)" if log else metric)
        self.ax.relim()
        self.ax.autoscale_view()
        if xs_all:
            self.ax.set_xlim(min(xs_all) - 0.5, max(xs_all) + 0.5)
        self.ax.set_title(title, fontsize=10, y=1.0)  # a fixed y skips matplotlib's search for a free spot
        return self.figure


def _row_labels(layer_keys: Sequence[str]) -> tuple[list[str], list[tuple[str, int, int]]]:
    """Each heatmap row's tick label and the runs of rows of one component.

    A key ``component/layer_07`` is labelled ``07`` and its component is written once beside its run of
    rows (fewer glyphs to render and easier to read than the key on every row); any other key is its
    own label.
    """
    labels: list[str] = []
    runs: list[tuple[str, int, int]] = []
    for row, key in enumerate(layer_keys):
        component, sep, index = key.rpartition("/layer_")
        if sep and index.isdigit() and component:
            labels.append(index)
            if runs and runs[-1][0] == component and runs[-1][2] == row:
                runs[-1] = (component, runs[-1][1], row + 1)
            else:
                runs.append((component, row, row + 1))
        else:
            labels.append(key)
    return labels, runs


class _HeatmapFigure:
    """One layer x step heatmap for a fixed list of layers; each drawing only replaces the image data."""

    WIDTH = 8.0
    TICK_FONT = 6.0
    GROUP_FONT = 7.0

    def __init__(self, layer_keys: Sequence[str]) -> None:
        import matplotlib
        from matplotlib.colors import Normalize

        self.n_rows = n = len(layer_keys)
        height = max(3.0, min(12.0, 0.18 * n + 1.5))
        labels, runs = _row_labels(layer_keys)
        # margins from the label lengths, not from a layout pass
        tick_width = max((len(s) for s in labels), default=1) * self.TICK_FONT * _CHAR_EM + 8.0  # points
        group_width = max((len(c) for c, _, _ in runs), default=0) * self.GROUP_FONT * _CHAR_EM
        left = (tick_width + (group_width + 6.0 if runs else 0.0) + 6.0) / 72.0 / self.WIDTH
        self.figure = _figure(self.WIDTH, height)
        self.figure.subplots_adjust(
            left=min(max(left, 0.06), 0.6),
            right=1.0 - 0.85 / self.WIDTH,  # the colourbar, its ticks and label
            bottom=0.7 / height,
            top=1.0 - 0.45 / height,
        )
        self.ax = self.figure.add_subplot()
        # cells <= 0 on a log scale are drawn in the "under" colour; unmeasured cells stay blank
        cmap = matplotlib.colormaps["viridis"].with_extremes(under="black")
        self.image = self.ax.imshow(
            np.full((max(n, 1), 1), np.nan), aspect="auto", interpolation="nearest", cmap=cmap, norm=Normalize(0, 1)
        )
        # the labels: every row while they fit (7 points a row), else every k-th
        every = max(1, math.ceil(n * 7.0 / (72.0 * height * (self.figure.subplotpars.top - 0.1))))
        rows = list(range(0, n, every))
        self.ax.set_yticks(rows)
        self.ax.set_yticklabels([labels[i] for i in rows], fontsize=self.TICK_FONT)
        for component, start, stop in runs:
            self.ax.annotate(
                component,
                xy=(0.0, (start + stop - 1) / 2.0),
                xycoords=("axes fraction", "data"),
                xytext=(-tick_width, 0.0),
                textcoords="offset points",
                ha="right",
                va="center",
                fontsize=self.GROUP_FONT,
                annotation_clip=False,
            )
            if start > 0:
                self.ax.axhline(start - 0.5, color="white", linewidth=0.8)
        self.ax.set_xlabel("step")
        _fixed_xlabel(self.ax, self.figure)
        self.ax.yaxis.set_label_coords(0.0, 0.5)  # no y label: skip placing it
        _integer_ticks(self.ax.xaxis)
        self.colorbar = self.figure.colorbar(self.image, ax=self.ax, pad=0.02, fraction=0.05)
        self.log = False

    def draw(self, metric: str, steps: Sequence[int], values: np.ndarray) -> Figure:
        from matplotlib.colors import LogNorm, Normalize

        data = np.asarray(values, dtype=np.float64).reshape(self.n_rows, len(steps))
        if data.size == 0:
            data = np.full((max(self.n_rows, 1), 1), np.nan)
        finite = data[np.isfinite(data)]
        log = _log_scale(data)
        label = metric
        if log:
            positive = finite[finite > 0]
            lo, hi = float(positive.min()), float(positive.max())
            if bool((finite <= 0).any()):
                data = np.where(np.isfinite(data) & (data <= 0), lo / 10.0, data)  # below vmin: "under"
                label = f"{metric} (log scale; black: 0)"
            else:
                label = f"{metric} (log scale)"
        else:
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            lo, hi = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
        self.image.set_data(np.ma.masked_invalid(data))
        if log != self.log:
            # a new norm resets the colourbar's ticks: only when the scale changes, else new limits
            self.image.set_norm(LogNorm(lo, hi) if log else Normalize(lo, hi))
            if log:
                _plain_log_ticks(self.colorbar.ax.yaxis)
                self.colorbar.minorticks_off()
            self.log = log
        else:
            self.image.set_clim(lo, hi)
        first, last = (float(steps[0]), float(steps[-1])) if len(steps) else (0.0, 0.0)
        self.image.set_extent((first - 0.5, last + 0.5, max(self.n_rows, 1) - 0.5, -0.5))
        self.ax.set_xlim(first - 0.5, last + 0.5)
        self.ax.set_ylim(max(self.n_rows, 1) - 0.5, -0.5)
        self.colorbar.set_label(label)
        window = f", {_window_text(int(steps[0]), int(steps[-1]))}" if len(steps) else ""
        self.ax.set_title(f"{metric} per layer{window}", fontsize=10, y=1.0)
        return self.figure


def layer_profile_figure(
    metric: str,
    curves: Mapping[str, Sequence[tuple[int, float]]],
    step: int | None = None,
    *,
    window: tuple[int, int] | None = None,
) -> Figure:
    """The papers' figure: ``metric`` against layer index, one curve per component.

    The title names what the curves show: the mean over the steps ``window`` (first, last), or the one
    ``step``. Layer ticks are integers; the y axis is logarithmic where the values span more than
    :data:`LOG_SCALE_DECADES` decades.
    """
    if window is not None:
        title = _profile_title(metric, window)
    else:
        title = f"{metric} by layer" if step is None else _profile_title(metric, (step, step))
    return _ProfileFigure(list(curves)).draw(metric, curves, title)


def heatmap_figure(metric: str, layer_keys: Sequence[str], steps: Sequence[int], values: np.ndarray) -> Figure:
    """A layer x step heatmap of ``metric`` (``values`` shaped ``(len(layer_keys), len(steps))``).

    The colour scale is logarithmic where the values span more than :data:`LOG_SCALE_DECADES` decades
    and none is negative (cells at 0 are then black), linear otherwise; the colourbar says which.
    Non-finite (unmeasured) cells are left blank.
    """
    return _HeatmapFigure(layer_keys).draw(metric, steps, values)


# ---------------------------------------------------------------------------------------------- the table


def _cell(value: Any) -> str:
    """A table cell; a front door that does not know a field (a batch index, an epoch) leaves ``-``."""
    return "-" if value is None else str(value)


def is_nonfinite_record(record: Mapping[str, Any]) -> bool:
    """A step with NaN/Inf gradients or loss: non-finite layers, or flagged without a finite score
    (``inf`` in memory, ``null`` once written as JSON, ``None`` during warm-up)."""
    if record.get("nonfinite_layers"):
        return True
    score = record.get("score")
    finite = isinstance(score, (int, float)) and math.isfinite(score)
    return bool(record.get("flagged")) and not finite


def _finite_score(record: Mapping[str, Any]) -> bool:
    score = record.get("score")
    return isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)


def table_records(records: Sequence[Mapping[str, Any]], top: int = 10) -> list[Mapping[str, Any]]:
    """The rows of :func:`flagged_table`, in order: steps with non-finite gradients or loss first (by step),
    then the highest finite scores; ``top`` rows at most."""
    nonfinite = [r for r in records if is_nonfinite_record(r)]
    scored = [r for r in records if not is_nonfinite_record(r) and _finite_score(r)]
    scored.sort(key=lambda r: -float(r["score"]))
    return (nonfinite + scored)[: max(0, top)]


def instability_lines(records: Sequence[Mapping[str, Any]], limit: int = 5) -> list[str]:
    """``"step S: message"`` of each stability warning in ``records`` (the first ``limit``, then a count):
    rare (one per episode) and not tied to a high batch score, so listed apart from the table."""
    found = [
        f"step {r.get('step')}: {e.get('message', '')}"
        for r in records
        for e in r.get("events") or []
        if e.get("kind") == "instability"
    ]
    more = [f"... and {len(found) - limit} more (see the records' events)"] if len(found) > limit else []
    return found[:limit] + more


def _reasons(record: Mapping[str, Any]) -> str:
    reasons = list(record.get("reasons") or [])
    layers = list(record.get("nonfinite_layers") or [])
    if layers and not any("non-finite" in str(r) for r in reasons):
        # no scorer said it (scoring off): the record's own list of layers does
        listed = ", ".join(str(k) for k in layers[:3]) + (", ..." if len(layers) > 3 else "")
        reasons.insert(0, f"non-finite gradient in {len(layers)} layer{'s' if len(layers) > 1 else ''}: {listed}")
    # a step taken as a shift is scored high but not flagged: say why instead of leaving the reasons empty
    reasons += [str(e.get("message", e.get("kind", ""))) for e in record.get("events") or []]
    text = "; ".join(str(r) for r in reasons) or "-"
    ids = record.get("sample_ids")
    if ids:
        ids = list(ids)
        shown = ", ".join(str(i) for i in ids[:6]) + (f", ... (+{len(ids) - 6})" if len(ids) > 6 else "")
        text += f"  [samples: {shown}]"
    return text


def _score_cell(record: Mapping[str, Any]) -> str:
    if is_nonfinite_record(record):
        return "NaN/Inf"
    return f"{float(record['score']):.2f}" if _finite_score(record) else "-"


def flagged_table(records: Sequence[Mapping[str, Any]], top: int = 10) -> str:
    """A plain-text table of ``top`` records: steps with non-finite gradients or loss first (score
    ``NaN/Inf``, with their reasons), then the highest-scoring steps (flagged or not). The ``skip`` column
    says whether the optimizer step was dropped (``action="skip"``)."""
    rows = table_records(records, top)
    header = f"{'step':>6} {'epoch':>5} {'batch':>6} {'score':>8} {'flag':>4} {'skip':>4}  reasons"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{_cell(r.get('step')):>6} {_cell(r.get('epoch')):>5} {_cell(r.get('batch_idx')):>6} "
            f"{_score_cell(r):>8} {'yes' if r.get('flagged') else 'no':>4} {'yes' if r.get('skipped') else 'no':>4}"
            f"  {_reasons(r)}"
        )
    nonfinite = [r for r in records if is_nonfinite_record(r)]
    hidden = nonfinite[len([r for r in rows if is_nonfinite_record(r)]) :]
    if hidden:
        steps = ", ".join(_cell(r.get("step")) for r in hidden[:10]) + (", ..." if len(hidden) > 10 else "")
        lines.append(f"(+{len(hidden)} more steps with non-finite gradients or loss: {steps})")
    if not rows:
        lines.append("(no records yet)" if not records else "(no scored steps yet: still in warm-up)")
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
        self._drawn_through: int | None = None  # the last step in the history at the last drawing
        # one figure per metric and view, built at the first drawing; later drawings change only the data
        self._profiles: dict[str, _ProfileFigure] = {}
        self._heatmaps: dict[str, _HeatmapFigure] = {}

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
        # a drawing of the last step is already there when the last update drew: no second one (seconds)
        if self.figure_every_n_steps and self.history and self._drawn_through != self.history[-1][0]:
            self.draw(writers, step)
        for writer in writers:
            writer.add_text(SUMMARY_TAG, "```\n" + summary + "\n```", global_step=step)
            writer.flush()

    def draw(self, writers: Sequence[SummaryWriterLike], step: int) -> None:
        """Layer-profile figures (the mean over the figure window) and heatmaps of every metric.

        ``step`` is the TensorBoard step the images are logged at; the titles name the steps the
        figures show (the window of the profile, the span of the heatmap), taken from the history.
        """
        if not self.history or not writers:
            return
        steps = [s for s, _ in self.history]
        self._drawn_through = steps[-1]
        stack = np.stack([v for _, v in self.history], axis=-1)  # layers x metrics x steps
        width = max(1, min(self.figure_every_n_steps, stack.shape[-1]))
        window = stack[..., -width:]
        shown = (steps[-width], steps[-1])
        finite = np.isfinite(window)
        count = finite.sum(axis=-1)
        # the mean of each layer's measured values in the window (NaN where none was measured)
        recent = np.where(count > 0, np.where(finite, window, 0.0).sum(axis=-1) / np.maximum(count, 1), np.nan)
        keys = [layer.key for layer in self.layers]
        components = sorted({layer.component for layer in self.layers if layer.index is not None})
        for j, metric in enumerate(self.metric_names):
            curves: dict[str, list[tuple[int, float]]] = {}
            for i, layer in enumerate(self.layers):
                if layer.index is not None and np.isfinite(recent[i, j]):
                    curves.setdefault(layer.component, []).append((layer.index, float(recent[i, j])))
            figures = []
            if curves:
                profile = self._profiles.get(metric)
                if profile is None:
                    profile = self._profiles[metric] = _ProfileFigure(components)
                figures.append((profile_tag(metric), profile.draw(metric, curves, _profile_title(metric, shown))))
            heatmap = self._heatmaps.get(metric)
            if heatmap is None:
                heatmap = self._heatmaps[metric] = _HeatmapFigure(keys)
            figures.append((heatmap_tag(metric), heatmap.draw(metric, steps, stack[:, j, :])))
            for tag, fig in figures:
                for writer in writers:
                    # rendered now; close=False since the figure is drawn again at the next drawing
                    writer.add_figure(tag, fig, global_step=step, close=False)
                _release_canvas(fig)


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
