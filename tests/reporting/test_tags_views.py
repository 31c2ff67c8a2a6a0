"""Tags, the custom-scalars layout and the scalars built from a step; the TensorBoard views read back
from real event files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

from gradspectra.reporting import TensorBoardViews, ViewLayer
from gradspectra.reporting.tags import (
    SUMMARY_TAG,
    aggregate_tag,
    custom_scalars_layout,
    finite_only,
    heatmap_tag,
    layer_tag,
    mad_tag,
    profile_tag,
    status_scalars,
    status_tag,
)
from gradspectra.reporting.tags import layer_scalars as make_layer_scalars

METRICS = ("nuclear_norm", "effective_rank")
NAN = float("nan")


def patterns(layout: dict[str, dict[str, list[Any]]]) -> dict[tuple[str, str], str]:
    """``(category, chart) -> regex`` of every Multiline chart."""
    out = {}
    for category, charts in layout.items():
        for chart, (kind, regexes) in charts.items():
            assert kind == "Multiline" and len(regexes) == 1
            out[(category, chart)] = regexes[0]
    return out


# --------------------------------------------------------------------------- tags and layout


def test_layout_regexes_match_the_tags_they_chart() -> None:
    components = ["self_attn.q_proj", "mlp.down_proj", "fc", "lm_head"]
    charts = patterns(custom_scalars_layout(METRICS, components))
    for metric in METRICS:
        for component in components:
            regex = charts[(f"gradspectra: {metric}", component)]
            for index in (0, 7, 31):
                assert re.match(regex, layer_tag(metric, f"{component}/layer_{index:02d}"))
            assert re.match(regex, layer_tag(metric, component))  # a layer without an index
            # not another metric, not a component sharing a prefix, not a longer key
            other = "effective_rank" if metric == "nuclear_norm" else "nuclear_norm"
            assert not re.match(regex, layer_tag(other, f"{component}/layer_00"))
            assert not re.match(regex, layer_tag(metric, f"{component}2/layer_00"))
            assert not re.match(regex, layer_tag(metric, f"{component}/layer_00/extra"))
        aggregate = charts[(f"gradspectra: {metric}", "all layers: mean, min, max")]
        for stat in ("mean", "min", "max"):
            assert re.match(aggregate, aggregate_tag(metric, stat))
        assert not re.match(aggregate, aggregate_tag(metric, "median"))
    batches = {chart: regex for (category, chart), regex in charts.items() if category == "gradspectra: batches"}
    assert {name for name in ("score", "threshold") if re.match(batches["score and threshold"], status_tag(name))} == {
        "score",
        "threshold",
    }
    assert re.match(batches["flagged"], status_tag("flagged"))
    assert re.match(batches["flagged"], status_tag("flagged_total"))
    assert not re.match(batches["flagged"], status_tag("score"))
    assert re.match(batches["flagged"], status_tag("instability"))
    assert re.match(batches["stability (>= 1: a trend over its limit)"], status_tag("stability"))
    assert len(charts) == len(METRICS) * (len(components) + 1) + 3


@pytest.mark.parametrize("component", ["a.b(c)", "x+y", "p[0]", "q^r$", "s|t", "u*v?", "w{2}", "back\\slash"])
def test_layout_escapes_regex_metacharacters(component: str) -> None:
    regex = patterns(custom_scalars_layout(["nuclear_norm"], [component]))[("gradspectra: nuclear_norm", component)]
    assert re.match(regex, layer_tag("nuclear_norm", f"{component}/layer_03"))
    assert re.match(regex, layer_tag("nuclear_norm", component))
    # matches exactly what re.escape would: the component as a literal, nothing else
    literal = rf"^{re.escape(layer_tag('nuclear_norm', component))}(/layer_\d+)?$"
    for probe in (component, f"{component}/layer_12", "abc", "a.b(c", "aXb(c)", "xxy", "p0", component + "z"):
        tag = layer_tag("nuclear_norm", probe)
        assert bool(re.match(regex, tag)) == bool(re.match(literal, tag)), probe


def test_tag_families_do_not_overlap() -> None:
    tags = {
        layer_tag("nuclear_norm", "fc/layer_00"),
        aggregate_tag("nuclear_norm", "mean"),
        mad_tag("nuclear_norm", "fc"),
        profile_tag("nuclear_norm"),
        heatmap_tag("nuclear_norm"),
        status_tag("score"),
        SUMMARY_TAG,
    }
    assert len(tags) == 7
    assert len({tag.split("/")[0] for tag in tags}) == 6  # status and summary share the "gradspectra" root


# --------------------------------------------------------------------------- scalars

KEYS = ["fc/layer_00", "fc/layer_01", "fc/layer_02", "fc/layer_03", "head"]
COMPONENTS = {"fc": [0, 1, 2, 3]}


def test_layer_scalars_aggregates_and_mad_against_numpy() -> None:
    values = np.array([[4.0, 1.0], [1.0, 2.0], [3.5, 4.0], [2.0, 8.0], [10.0, 0.5]])
    scalars = make_layer_scalars(values, [0, 1, 2, 3, 4], METRICS, KEYS, COMPONENTS, per_layer=True)
    for j, metric in enumerate(METRICS):
        col = values[:, j]
        assert scalars[aggregate_tag(metric, "mean")] == pytest.approx(float(np.mean(col)), rel=1e-15)
        assert scalars[aggregate_tag(metric, "min")] == float(np.min(col))
        assert scalars[aggregate_tag(metric, "max")] == float(np.max(col))
        for i, key in enumerate(KEYS):
            assert scalars[layer_tag(metric, key)] == values[i, j]
        fc = values[COMPONENTS["fc"], j]
        assert scalars[mad_tag(metric, "fc")] == pytest.approx(float(np.mean(np.abs(np.diff(fc)))), rel=1e-15)
    assert len(scalars) == len(METRICS) * (3 + len(KEYS) + 1)


def test_layer_scalars_aggregates_only_over_every_present_layer() -> None:
    values = np.array(
        [
            [4.0, 1.0],
            [NAN, 2.0],  # a deferred spectrum (or a NaN gradient) in the first metric
            [3.5, 4.0],
            [2.0, 8.0],
            [NAN, NAN],  # absent layer (no gradient): not in `present`
        ]
    )
    present = [0, 1, 2, 3]
    scalars = make_layer_scalars(values, present, METRICS, KEYS, COMPONENTS, per_layer=True)
    # first metric: a present layer is NaN, so no aggregate at all (not a mean of the others)
    assert not any(tag.startswith("grad_spectrum_layers/nuclear_norm/") for tag in scalars)
    # second metric: the absent layer does not count; the present ones are all finite
    assert scalars[aggregate_tag("effective_rank", "mean")] == pytest.approx(np.mean([1.0, 2.0, 4.0, 8.0]))
    assert scalars[aggregate_tag("effective_rank", "max")] == 8.0
    # per-layer tags for present layers only; NaN ones are kept for the caller's filter
    assert layer_tag("nuclear_norm", "head") not in scalars
    assert np.isnan(scalars[layer_tag("nuclear_norm", "fc/layer_01")])
    assert np.isnan(scalars[mad_tag("nuclear_norm", "fc")])
    assert scalars[mad_tag("effective_rank", "fc")] == pytest.approx(np.mean(np.abs(np.diff([1.0, 2.0, 4.0, 8.0]))))
    finite = finite_only(scalars)
    assert all(np.isfinite(v) for v in finite.values())
    assert set(scalars) - set(finite) == {layer_tag("nuclear_norm", "fc/layer_01"), mad_tag("nuclear_norm", "fc")}

    quiet = make_layer_scalars(values, present, METRICS, KEYS, COMPONENTS, per_layer=False)
    assert set(quiet) == {aggregate_tag("effective_rank", stat) for stat in ("mean", "min", "max")}

    nothing = make_layer_scalars(values, [], METRICS, KEYS, COMPONENTS, per_layer=True)
    assert nothing == {}  # no layer had a gradient
    all_nan = np.full_like(values, NAN)
    deferred = make_layer_scalars(all_nan, present, METRICS, KEYS, COMPONENTS, per_layer=True)
    # every spectrum deferred: the layers' NaN tags only, no aggregate, no MAD
    assert set(deferred) == {layer_tag(m, KEYS[i]) for m in METRICS for i in present}
    assert all(np.isnan(v) for v in deferred.values())


def test_status_scalars_counts_and_worst_errors() -> None:
    record: dict[str, Any] = {
        "score": 3.25,
        "threshold": 4,
        "flagged": False,
        "nonfinite_layers": ["a"],
        "missing_layers": ["b", "c"],
        "loss": 0.5,
        "spectra": {"a": "exact", "d": "estimate", "e": "estimate", "f": "exact+audit", "j": "cheap"},
        "deferred_layers": ["g", "h", "i"],
        "estimate_error": {
            "d": {"nuclear_norm": 0.01, "effective_rank": 0.2},
            "e": {"nuclear_norm": 0.03},
            "j": {"spectral_norm": 0.002},
        },
        "audit_error": {"f": {"nuclear_norm": 0.004}},
        "detection": {"d": 10.0, "e": 30.0, "j": 20.0},
        "events": [{"kind": "shift", "message": "shift: ..."}, {"kind": "instability", "message": "instability: ..."}],
        "stability": 1.5,
    }
    scalars = status_scalars(record, flagged_total=7)
    assert scalars == {
        status_tag("score"): 3.25,
        status_tag("threshold"): 4.0,
        status_tag("flagged"): 0.0,
        status_tag("shift"): 1.0,
        status_tag("instability"): 1.0,
        status_tag("stability"): 1.5,
        status_tag("flagged_total"): 7.0,
        status_tag("nonfinite_layers"): 1.0,
        status_tag("missing_layers"): 2.0,
        status_tag("loss"): 0.5,
        status_tag("spectra/exact"): 2.0,  # exact and exact+audit
        status_tag("spectra/estimated"): 2.0,
        status_tag("spectra/cheap_only"): 1.0,
        status_tag("spectra/deferred"): 3.0,
        status_tag("estimate_error/nuclear_norm"): 0.03,  # the worst layer
        status_tag("estimate_error/effective_rank"): 0.2,
        status_tag("estimate_error/spectral_norm"): 0.002,
        status_tag("audit_error/nuclear_norm"): 0.004,
        status_tag("detection/effective_rank_coarse_median"): 20.0,  # one labelled series, not the metric's curve
    }
    plain = {**record, "score": None, "threshold": None, "loss": None, "flagged": True}
    for key in ("spectra", "deferred_layers", "estimate_error", "audit_error", "detection", "events", "stability"):
        del plain[key]
    assert status_scalars(plain, 1) == {
        status_tag("flagged"): 1.0,
        status_tag("shift"): 0.0,
        status_tag("instability"): 0.0,
        status_tag("flagged_total"): 1.0,
        status_tag("nonfinite_layers"): 1.0,
        status_tag("missing_layers"): 2.0,
    }


# --------------------------------------------------------------------------- TensorBoard views

LAYERS = [
    ViewLayer("fc/layer_00", "fc", 0),
    ViewLayer("fc/layer_01", "fc", 1),
    ViewLayer("head", "head", None),
]


def read_events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def step_values(measured: int) -> np.ndarray:
    values = np.arange(len(LAYERS) * len(METRICS), dtype=np.float64).reshape(len(LAYERS), len(METRICS)) + measured
    values[2, 1] = NAN if measured == 3 else values[2, 1]
    return values


def test_views_layout_once_figures_on_period_and_summary(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    views = TensorBoardViews(METRICS, LAYERS, figure_every_n_steps=2, heatmap_steps=10)
    assert views.figures_per_drawing == 2 * len(METRICS)
    drawn = []
    for measured in range(1, 6):
        step = 10 * measured
        views.observe(step, step_values(measured))
        seconds = views.update([writer], step, measured, period=2)
        drawn.append(seconds > 0)
    # figures when `period` measured steps have passed since the last drawing: at 2 and 4
    assert drawn == [False, True, False, True, False]
    views.finish([writer], 60, "gradspectra: 5 steps monitored\nsummary table")
    writer.close()

    acc = read_events(tmp_path)
    tags = acc.Tags()
    expected_images = {profile_tag(m) for m in METRICS} | {heatmap_tag(m) for m in METRICS}
    assert set(tags["images"]) == expected_images
    for tag in expected_images:
        assert [e.step for e in acc.Images(tag)] == [20, 40, 60]  # two drawings, one more at the end
    layout_events = acc.Tensors("custom_scalars__config__")
    assert len(layout_events) == 1  # the layout is written once
    layout = layout_pb2.Layout.FromString(layout_events[0].tensor_proto.string_val[0])
    want = custom_scalars_layout(METRICS, ["fc", "head"])
    assert [c.title for c in layout.category] == list(want)
    for category in layout.category:
        assert {ch.title: list(ch.multiline.tag) for ch in category.chart} == {
            chart: regexes for chart, (_, regexes) in want[category.title].items()
        }
    summary = acc.Tensors(f"{SUMMARY_TAG}/text_summary")
    assert [e.step for e in summary] == [60]
    text = summary[0].tensor_proto.string_val[0].decode()
    assert "5 steps monitored" in text and "summary table" in text


def test_views_without_figures_and_with_a_wider_period(tmp_path: Path) -> None:
    off_dir, wide_dir = tmp_path / "off", tmp_path / "wide"
    off_writer, wide_writer = SummaryWriter(log_dir=str(off_dir)), SummaryWriter(log_dir=str(wide_dir))
    off = TensorBoardViews(METRICS, LAYERS, figure_every_n_steps=0, heatmap_steps=10)
    wide = TensorBoardViews(METRICS[:1], LAYERS, figure_every_n_steps=1, heatmap_steps=10)
    wide_drawn = []
    for measured in range(1, 5):
        off.observe(measured, step_values(measured))
        assert off.update([off_writer], measured, measured, period=1) == 0.0
        wide.observe(measured, step_values(measured)[:, :1])
        # the budget spaced the figures further than figure_every_n_steps: every 3 measured steps
        wide_drawn.append(wide.update([wide_writer], measured, measured, period=3) > 0)
    assert wide_drawn == [False, False, True, False]
    assert off.update([], 5, 5, period=1) == 0.0  # no writer: nothing to do
    off.finish([off_writer], 9, "summary")
    for w in (off_writer, wide_writer):
        w.close()

    off_acc = read_events(off_dir)
    assert off_acc.Tags()["images"] == []
    assert f"{SUMMARY_TAG}/text_summary" in off_acc.Tags()["tensors"]
    assert len(off_acc.Tensors("custom_scalars__config__")) == 1
    wide_acc = read_events(wide_dir)
    assert [e.step for e in wide_acc.Images(heatmap_tag("nuclear_norm"))] == [3]
    assert [e.step for e in wide_acc.Images(profile_tag("nuclear_norm"))] == [3]


class _Recorder:
    """A SummaryWriter stand-in that counts calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def add_custom_scalars(self, layout: dict[str, dict[str, list[Any]]]) -> None:
        self.calls.append("layout")

    def add_figure(self, tag: str, figure: Any, global_step: int | None = None, close: bool = True) -> None:
        self.calls.append(tag)

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None:
        self.calls.append("text")

    def flush(self) -> None:
        self.calls.append("flush")


def test_views_serve_every_writer_and_throttle_flushes() -> None:
    first, second = _Recorder(), _Recorder()
    views = TensorBoardViews(METRICS, LAYERS, figure_every_n_steps=0, heatmap_steps=4, flush_seconds=3600.0)
    for measured in range(1, 4):
        views.observe(measured, step_values(measured))
        views.update([first, second], measured, measured, period=1)
    for rec in (first, second):
        assert rec.calls == ["layout", "flush"]  # one layout, one flush within the hour
    assert len(views.history) == 3 and views.history[-1][0] == 3
    for measured in range(4, 7):
        views.observe(measured, step_values(measured))
    assert [s for s, _ in views.history] == [3, 4, 5, 6]  # the heatmap keeps the last heatmap_steps steps
    views.finish([first], 7, "done")
    assert first.calls[-2:] == ["text", "flush"]
