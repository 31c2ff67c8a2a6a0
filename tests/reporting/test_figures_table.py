"""The end-of-training table (non-finite steps first, skips shown) and the figures (integer layer ticks,
titles that name the steps shown, log colour where a metric spans decades, one figure reused per view)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.colors import LogNorm

from gradspectra.reporting import (
    RecordWriter,
    TensorBoardViews,
    ViewLayer,
    flagged_table,
    heatmap_figure,
    layer_profile_figure,
    read_records,
)
from gradspectra.reporting.tags import heatmap_tag, profile_tag

# --------------------------------------------------------------------------- the table


def record(step: int, score: float | None, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "step": step,
        "epoch": 0,
        "batch_idx": step,
        "score": score,
        "flagged": False,
        "reasons": [],
        "sample_ids": None,
        "nonfinite_layers": [],
    }
    base.update(extra)
    return base


def nan_run() -> list[dict[str, Any]]:
    """As in the issue: NaN batches in warm-up (score None) and after it (score inf), two clean scored steps."""
    records = [record(s, None) for s in range(3)]
    for step, score in [(3, None), (4, None), (12, math.inf), (13, math.inf)]:
        layers = ["fc/layer_00", "fc/layer_01"]
        reason = "non-finite gradient in 2 layers: fc/layer_00, fc/layer_01"
        records.append(record(step, score, flagged=True, reasons=[reason], nonfinite_layers=layers))
    records += [record(20, 2.5), record(21, 1.0)]
    return records


def table_rows(table: str) -> list[list[str]]:
    lines = table.splitlines()
    return [line.split() for line in lines[2:] if not line.startswith("(")]


@pytest.mark.parametrize("source", ["memory", "file"])
def test_nonfinite_steps_head_the_table_with_their_reasons(tmp_path: Path, source: str) -> None:
    records = nan_run()
    if source == "file":  # inf is written as null: the file's scores are None
        writer = RecordWriter(tmp_path / "batches.jsonl")
        for r in records:
            writer.write(r)
        writer.close()
        records = read_records(tmp_path / "batches.jsonl")
        assert records[6]["score"] is None
    table = flagged_table(records, top=10)
    rows = table_rows(table)
    assert [r[0] for r in rows] == ["3", "4", "12", "13", "20", "21"]
    for row in rows[:4]:
        assert row[3:6] == ["NaN/Inf", "yes", "no"]
        assert " ".join(row[6:]) == "non-finite gradient in 2 layers: fc/layer_00, fc/layer_01"
    assert rows[4][3] == "2.50"


def test_more_nonfinite_steps_than_rows_are_counted() -> None:
    table = flagged_table(nan_run(), top=3)
    assert [r[0] for r in table_rows(table)] == ["3", "4", "12"]
    assert table.splitlines()[-1] == "(+1 more steps with non-finite gradients or loss: 13)"


def test_nonfinite_without_a_scorer_names_the_layers() -> None:
    # scoring=False: no score, no flag, no reasons; the record's own list of layers says why
    table = flagged_table([record(0, None, nonfinite_layers=["head"]), record(1, None)])
    rows = table_rows(table)
    assert len(rows) == 1 and rows[0][:1] == ["0"] and rows[0][4] == "no"
    assert "non-finite gradient in 1 layer: head" in table


def test_skipped_steps_are_marked() -> None:
    records = [
        record(5, 7.0, flagged=True, skipped=True, reasons=["stable_rank high in 3/4 layers (z=5.0)"]),
        record(6, 1.0),
    ]
    lines = flagged_table(records).splitlines()
    assert lines[0].split()[:6] == ["step", "epoch", "batch", "score", "flag", "skip"]
    assert table_rows("\n".join(lines))[0][3:6] == ["7.00", "yes", "yes"]
    assert table_rows("\n".join(lines))[1][3:6] == ["1.00", "no", "no"]
    assert "(no records yet)" in flagged_table([])


# --------------------------------------------------------------------------- figures


def visible_ticks(axis: Any, lo: float, hi: float) -> list[float]:
    return [t for t in axis.get_majorticklocs() if lo - 1e-9 <= t <= hi + 1e-9]


@pytest.mark.parametrize("n_layers", [2, 3, 7])
def test_layer_profile_ticks_are_integers(n_layers: int) -> None:
    curves = {"fc": [(i, 1.0 + i) for i in range(n_layers)], "attn": [(i, 2.0) for i in range(n_layers)]}
    fig = layer_profile_figure("nuclear_norm", curves)
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = visible_ticks(ax.xaxis, lo, hi)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_layer_profile_title_names_the_window() -> None:
    curves = {"fc": [(0, 1.0), (1, 2.0)]}
    assert layer_profile_figure("m", curves, window=(20, 29)).axes[0].get_title() == "m by layer, mean over steps 20-29"
    assert layer_profile_figure("m", curves, 29).axes[0].get_title() == "m by layer, step 29"


class TitleRecorder:
    """A writer that keeps, for every figure handed to it, the tag, step and titles at that moment."""

    def __init__(self) -> None:
        self.figures: list[tuple[str, int | None, list[str], Any]] = []

    def add_custom_scalars(self, layout: Any) -> None:
        pass

    def add_figure(self, tag: str, figure: Any, global_step: int | None = None, close: bool = True) -> None:
        assert close is False
        self.figures.append((tag, global_step, [ax.get_title() for ax in figure.axes], figure))

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None:
        pass

    def flush(self) -> None:
        pass


LAYERS = [ViewLayer(f"fc/layer_{i:02d}", "fc", i) for i in range(4)] + [ViewLayer("head", "head", None)]


def test_titles_name_the_steps_shown_not_the_step_handed_in() -> None:
    # Lightning's global_step at on_train_end is one past the last step: the titles say what is drawn
    views = TensorBoardViews(["nuclear_norm"], LAYERS, figure_every_n_steps=10, heatmap_steps=100)
    for step in range(30):
        views.observe(step, np.full((len(LAYERS), 1), 1.0 + step))
    writer = TitleRecorder()
    views.finish([writer], 30, "summary")
    titles = {tag: t[0] for tag, _, t, _ in writer.figures}
    assert titles[profile_tag("nuclear_norm")] == "nuclear_norm by layer, mean over steps 20-29"
    assert titles[heatmap_tag("nuclear_norm")] == "nuclear_norm per layer, steps 0-29"
    assert all("30" not in title for title in titles.values())


def test_heatmap_colour_is_log_where_values_span_decades() -> None:
    keys = [layer.key for layer in LAYERS]
    steps = list(range(6))
    wide = np.geomspace(1e-3, 1e2, len(keys) * len(steps)).reshape(len(keys), len(steps))
    wide[0, 0] = 0.0  # a layer whose gradient was zero: black, not the end of a linear scale
    wide[1, 1] = np.nan  # not measured: blank
    fig = heatmap_figure("frobenius_norm", keys, steps, wide)
    image = fig.axes[0].images[0]
    assert isinstance(image.norm, LogNorm)
    assert image.norm.vmin == pytest.approx(wide[wide > 0].min()) and image.norm.vmax == pytest.approx(1e2)
    assert fig.axes[1].get_ylabel() == "frobenius_norm (log scale; black: 0)"
    rgba = image.to_rgba(image.get_array())
    assert tuple(rgba[0, 0]) == (0.0, 0.0, 0.0, 1.0) and rgba[1, 1, 3] == 0.0
    # within 1.5 decades a linear scale reads better
    narrow = np.linspace(2.0, 40.0, len(keys) * len(steps)).reshape(len(keys), len(steps))
    fig = heatmap_figure("stable_rank", keys, steps, narrow)
    assert not isinstance(fig.axes[0].images[0].norm, LogNorm)
    assert fig.axes[1].get_ylabel() == "stable_rank"
    # step ticks are integers too
    lo, hi = fig.axes[0].get_xlim()
    assert all(float(t).is_integer() for t in visible_ticks(fig.axes[0].xaxis, lo, hi))


def test_heatmap_rows_name_each_component_once() -> None:
    keys = [layer.key for layer in LAYERS]
    fig = heatmap_figure("m", keys, [0, 1], np.ones((len(keys), 2)))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["00", "01", "02", "03", "head"]
    assert [t.get_text() for t in ax.texts] == ["fc"]


def test_views_reuse_one_figure_per_view_and_no_pyplot_figures() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    metrics = ["nuclear_norm", "frobenius_norm"]
    views = TensorBoardViews(metrics, LAYERS, figure_every_n_steps=2, heatmap_steps=50)
    writer = TitleRecorder()
    for step in range(6):
        views.observe(step, np.exp(np.arange(len(LAYERS) * 2, dtype=float).reshape(len(LAYERS), 2) + step))
        views.update([writer], step, step + 1, period=2)
    drawings = [(tag, step) for tag, step, _, _ in writer.figures]
    assert [s for t, s in drawings if t == heatmap_tag("nuclear_norm")] == [1, 3, 5]
    for tag in {t for t, _ in drawings}:
        assert len({id(fig) for t, _, _, fig in writer.figures if t == tag}) == 1  # drawn again, not rebuilt
    # the titles follow the data of each drawing
    profile_titles = [titles[0] for t, _, titles, _ in writer.figures if t == profile_tag("frobenius_norm")]
    assert profile_titles == [f"frobenius_norm by layer, mean over steps {s - 1}-{s}" for s in (1, 3, 5)]
    assert plt.get_fignums() == before
