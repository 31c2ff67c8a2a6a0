"""Every TensorBoard/logger tag the monitor writes, and the custom-scalars layout that groups them.

Tags and the layout's regular expressions live together so that they cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

TAG_ROOT = "grad_spectrum"
STATUS_ROOT = "gradspectra"
SUMMARY_TAG = f"{STATUS_ROOT}/summary"
EVENTS_TAG = f"{STATUS_ROOT}/events"  # text: what happened to the baseline (a shift adopted), with the step


def layer_tag(metric: str, key: str) -> str:
    """``grad_spectrum/<metric>/<component>/layer_<NN>`` for a layer key ``<component>/layer_<NN>``."""
    return f"{TAG_ROOT}/{metric}/{key}"


def aggregate_tag(metric: str, stat: str) -> str:
    """A cross-layer ``mean``, ``min`` or ``max`` of ``metric``."""
    return f"{TAG_ROOT}_layers/{metric}/{stat}"


def mad_tag(metric: str, component: str) -> str:
    """The cross-layer mean absolute difference of ``metric`` along one component's layers."""
    return f"{TAG_ROOT}_mad/{metric}/{component}"


def profile_tag(metric: str) -> str:
    return f"{TAG_ROOT}_profile/{metric}"


def heatmap_tag(metric: str) -> str:
    return f"{TAG_ROOT}_heatmap/{metric}"


def status_tag(name: str) -> str:
    """``gradspectra/<name>``: score, threshold, flagged, counts, spectra kinds, estimator errors."""
    return f"{STATUS_ROOT}/{name}"


def custom_scalars_layout(metrics: Sequence[str], components: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """One TensorBoard custom-scalars category per metric, one multiline chart per component.

    Each chart gathers every layer of the component (``.../<component>/layer_\\d+``), so the layers
    of one projection can be compared in one plot.
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    for metric in metrics:
        charts: dict[str, list[Any]] = {}
        for component in components:
            charts[component] = ["Multiline", [rf"^{layer_tag(metric, _re_escape(component))}(/layer_\d+)?$"]]
        charts["all layers: mean, min, max"] = ["Multiline", [rf"^{aggregate_tag(metric, '(mean|min|max)')}$"]]
        layout[f"gradspectra: {metric}"] = charts
    layout["gradspectra: batches"] = {
        "score and threshold": ["Multiline", [rf"^{status_tag('(score|threshold)')}$"]],
        "flagged": [
            "Multiline",
            [rf"^{status_tag('(flagged|flagged_total|skipped|skipped_total|shift|instability)')}$"],
        ],
        "stability (>= 1: a trend over its limit)": ["Multiline", [rf"^{status_tag('stability')}$"]],
    }
    return layout


def _re_escape(text: str) -> str:
    return "".join("\\" + c if c in ".^$*+?{}[]\\|()" else c for c in text)


def status_scalars(record: Mapping[str, Any], flagged_total: int, optimizer: int | None = None) -> dict[str, float]:
    """The batch's own scalars: score, threshold, flags, counts, and how its spectra were obtained.

    With several optimizers each has its own series, ``gradspectra/optimizer_<k>/<name>``.
    """
    scalars: dict[str, float] = {}
    if optimizer is not None:
        return {
            tag.replace(f"{STATUS_ROOT}/", f"{STATUS_ROOT}/optimizer_{optimizer}/", 1): value
            for tag, value in status_scalars(record, flagged_total).items()
        }
    if record["score"] is not None:
        scalars[status_tag("score")] = record["score"]
    if record["threshold"] is not None:
        scalars[status_tag("threshold")] = float(record["threshold"])
    scalars[status_tag("flagged")] = float(record["flagged"])
    scalars[status_tag("shift")] = float(sum(e.get("kind") == "shift" for e in record.get("events", [])))
    scalars[status_tag("instability")] = float(sum(e.get("kind") == "instability" for e in record.get("events", [])))
    if record.get("stability") is not None:
        scalars[status_tag("stability")] = float(record["stability"])
    scalars[status_tag("flagged_total")] = float(flagged_total)
    scalars[status_tag("nonfinite_layers")] = float(len(record["nonfinite_layers"]))
    scalars[status_tag("missing_layers")] = float(len(record["missing_layers"]))
    if record["loss"] is not None:
        scalars[status_tag("loss")] = record["loss"]
    if "spectra" in record:
        kinds = list(record["spectra"].values())
        scalars[status_tag("spectra/exact")] = float(sum(k in ("exact", "exact+audit") for k in kinds))
        scalars[status_tag("spectra/estimated")] = float(kinds.count("estimate"))
        scalars[status_tag("spectra/cheap_only")] = float(kinds.count("cheap"))
        scalars[status_tag("spectra/deferred")] = float(len(record["deferred_layers"]))
        for key in ("estimate_error", "audit_error"):
            by_metric: dict[str, list[float]] = {}
            for errs in record.get(key, {}).values():
                for metric, err in errs.items():
                    by_metric.setdefault(metric, []).append(err)
            for metric, errs in by_metric.items():
                # the worst layer: an audit shows what the estimator really got wrong
                scalars[status_tag(f"{key}/{metric}")] = max(errs)
    detection = record.get("detection")
    if detection:
        # the detection value is coarse and biased: one series per step (its median over layers), labelled
        # as what it is, never drawn among the metric curves
        scalars[status_tag("detection/effective_rank_coarse_median")] = float(np.median(list(detection.values())))
    return scalars


def skip_scalars(record: Mapping[str, Any], skipped_total: int) -> dict[str, float]:
    """With ``action="skip"``: whether this step's optimizer step was dropped, and how many so far."""
    skipped = float(bool(record.get("skipped")))
    return {status_tag("skipped"): skipped, status_tag("skipped_total"): float(skipped_total)}


def layer_scalars(
    values: np.ndarray,
    present: Sequence[int],
    metric_names: Sequence[str],
    layer_keys: Sequence[str],
    component_rows: Mapping[str, Sequence[int]],
    per_layer: bool,
) -> dict[str, float]:
    """Cross-layer aggregates always; per-layer values and per-component MAD when ``per_layer``.

    ``values`` is ``(layers, metrics)``; ``present`` the rows that had a gradient this step.
    """
    # imported here: `gradspectra report` reads this module and should start without loading torch
    import torch

    from gradspectra.functional import layer_mad

    scalars: dict[str, float] = {}
    rows = sorted(present)
    for j, metric in enumerate(metric_names):
        col = values[rows, j] if rows else np.zeros(0)
        finite = col[np.isfinite(col)]
        # over every present layer or not at all: a mean over the few layers whose spectra the
        # budget afforded this step would jump with the choice of layers
        if finite.size and finite.size == col.size:
            scalars[aggregate_tag(metric, "mean")] = float(finite.mean())
            scalars[aggregate_tag(metric, "min")] = float(finite.min())
            scalars[aggregate_tag(metric, "max")] = float(finite.max())
        if not per_layer:
            continue
        for i in rows:
            scalars[layer_tag(metric, layer_keys[i])] = float(values[i, j])
        if not finite.size:
            continue  # nothing measured for this metric this step (spectra deferred)
        for component, order in component_rows.items():
            # a component with a missing or non-finite layer gets a NaN MAD, dropped by the caller
            curve = torch.from_numpy(values[list(order), j])
            scalars[mad_tag(metric, component)] = float(layer_mad(curve))
    return scalars


def finite_only(scalars: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in scalars.items() if math.isfinite(v)}


def layer_run_name(index: int, width: int = 2) -> str:
    """The TensorBoard run of one layer index (``layer_runs=True``): ``layer_03``."""
    return f"layer_{index:0{width}d}"


def layer_run_scalars(
    values: np.ndarray,
    present: Sequence[int],
    metric_names: Sequence[str],
    layers: Sequence[tuple[str, int | None]],
    width: int = 2,
) -> dict[str, dict[str, float]]:
    """``{run: {grad_spectrum/<metric>/<component>: value}}``: each indexed layer in a run of its own, so that
    TensorBoard draws the layers of one component in one chart, each in its own colour.

    ``layers`` holds each row's ``(component, index)``; rows without an index have no run.
    """
    runs: dict[str, dict[str, float]] = {}
    for i in sorted(present):
        component, index = layers[i]
        if index is None:
            continue
        run = runs.setdefault(layer_run_name(index, width), {})
        for j, metric in enumerate(metric_names):
            if math.isfinite(float(values[i, j])):
                run[layer_tag(metric, component)] = float(values[i, j])
    return runs
