"""The batch record, defined once: its keys (a TypedDict) and how a step's host table becomes one."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np

from gradspectra.functional import DETECTION_METRIC, ENTRY_METRICS
from gradspectra.monitoring.sources import SpectrumSource
from gradspectra.scoring import ScoreResult


class _Required(TypedDict):
    step: int
    epoch: int | None
    batch_idx: int | None
    score: float | None
    flagged: bool
    reasons: list[str]
    loss: float | None
    metrics: dict[str, dict[str, float]]
    sample_ids: list[Any] | None
    z: dict[str, float]
    threshold: float | None
    nonfinite_layers: list[str]
    missing_layers: list[str]
    events: list[dict[str, str]]


class BatchRecord(_Required, total=False):
    """One line of ``batches.jsonl``. The keys of :class:`_Required` are on every record (``events``: what
    happened at this step besides a flag: ``"shift"`` (a change adopted by the scorer), ``"aftermath"`` (not flagged:
    the fading aftermath of a flagged step), ``"instability"`` (a stability warning), each
    ``{"kind": ..., "message": ...}``; usually empty); the others:

    ``spectra``, ``deferred_layers``, ``estimate_error`` (and ``audit_error`` when a layer was audited):
    how each layer got its spectrum, unless ``spectra="exact"``. ``layers_per_rank``: layers measured by
    each rank (DDP). ``factored_layers``: exact spectra from the ``T x T`` factors. ``error``: why the
    step could not be measured. ``monitor_ms``: the monitor's cost up to the record. ``loss_seen``:
    ``False`` where the front door has no loss (a transformers model that returns none; the score then
    rests on the gradients alone).
    ``stability``: the stability score of :class:`gradspectra.scoring.StabilityDetector` (``>= 1``: a
    trend over its limit; absent until it has a reference). ``skipped``: the optimizer step was dropped
    (``action="skip"``). ``optimizer``: which of several optimizers stepped (only its layers are measured;
    it has its own baseline). ``detection``: per anchor layer (a few, the same every step), the detection
    value (a coarse, steady estimate of the effective rank by low-order Lanczos quadrature that the scorer
    watches as ``effective_rank_coarse``; biased, not the metric: the curves use ``metrics``).
    ``implied_layers``: the frozen layers measured by their implied full-weight gradient ``D^T X``
    (``gradients=``), each with the adapter that wraps it (``None``: a frozen layer without adapter);
    ``unmeasured_layers``: those of them not measured this step (under ``spectra="auto"`` forming ``D^T X``
    takes turns within the budget; not missing, no values this step).
    ``samples`` (with ``per_sample=``): one entry per sample of the batch, ``{"index", "id", "score",
    "reasons", "metrics", "tokens"}`` (:class:`gradspectra.scoring.SampleScorer`), ``None`` when no layer
    could be measured; ``samples_note``: why some or all layers were left out (or that no output gradient was
    read, so the whole gradient's norm is scored); ``samples_ms``: its cost.
    ``light``: a light step (``spectra="auto"`` on a step too fast for a full one: every layer's Frobenius norm,
    the light scorer's score and the stability detector, nothing else; see docs/cost.md); absent on full steps.
    ``sharded`` (FSDP2 / tensor parallel): what the step moved between
    ranks, ``{"gathered_layers": [...], "gathered": entries of those layers, "sent": numbers each rank put into
    the sums of the Frobenius norms and of the cheap tier on the blocks}`` (docs/distributed.md).
    """

    spectra: dict[str, str]
    deferred_layers: list[str]
    estimate_error: dict[str, dict[str, float]]
    audit_error: dict[str, dict[str, float]]
    layers_per_rank: list[int]
    factored_layers: list[str]
    error: str
    monitor_ms: float
    loss_seen: bool
    skipped: bool
    optimizer: int
    detection: dict[str, float]
    stability: float
    implied_layers: dict[str, str | None]
    unmeasured_layers: list[str]
    samples: list[dict[str, Any]] | None
    samples_note: str
    samples_ms: float
    light: bool
    sharded: dict[str, Any]


@dataclass
class HostTable:
    """A measured step on the host: ``(layers, metrics)`` values, validity and errors, each row's source."""

    values: np.ndarray
    valid: np.ndarray
    errors: np.ndarray
    sources: list[SpectrumSource]
    present: list[int]
    layers_per_rank: list[int] | None = None
    loss: float | None = None
    detection: np.ndarray | None = None  # (layers,) the detection value (anchor layers), NaN where not computed

    @classmethod
    def unmeasured(cls, n_layers: int, n_metrics: int, present: list[int]) -> HostTable:
        nan = np.full((n_layers, n_metrics), np.nan)
        sources = [SpectrumSource.DEFERRED] * n_layers
        return cls(nan, np.zeros(nan.shape, dtype=bool), np.zeros(nan.shape), sources, present)

    def layer_metrics(self, keys: Sequence[str], metric_names: Sequence[str]) -> dict[str, dict[str, float]]:
        """``{layer key: {metric: value}}`` of the present layers' measured values."""
        # only the columns measured in some layer (a light step: one), as plain lists: no numpy scalar per value
        columns = np.flatnonzero(self.valid.any(axis=0)).tolist()
        named = [(j, metric_names[j]) for j in columns]
        values, valid = self.values[:, columns].tolist(), self.valid[:, columns].tolist()
        return {
            keys[i]: {name: values[i][c] for c, (_, name) in enumerate(named) if valid[i][c]}
            for i in sorted(self.present)
        }

    def detection_values(self, keys: Sequence[str]) -> dict[str, float]:
        """``{layer key: detection value}`` of the present layers that have one."""
        if self.detection is None:
            return {}
        present = set(self.present)
        return {keys[i]: float(v) for i, v in enumerate(self.detection.tolist()) if i in present and math.isfinite(v)}

    def scored_metrics(self, keys: Sequence[str], metric_names: Sequence[str]) -> dict[str, dict[str, float]]:
        """What the scorer sees: :meth:`layer_metrics` plus each layer's detection value."""
        out = self.layer_metrics(keys, metric_names)
        for key, value in self.detection_values(keys).items():
            out.setdefault(key, {})[DETECTION_METRIC] = value
        return out

    def source_fields(self, keys: Sequence[str], metric_names: Sequence[str]) -> dict[str, Any]:
        """``spectra``, ``deferred_layers``, ``estimate_error`` and (when any) ``audit_error``."""
        if all(source is SpectrumSource.DEFERRED for source in self.sources):  # a light step: no spectrum
            return {"spectra": {}, "deferred_layers": [keys[i] for i in sorted(self.present)], "estimate_error": {}}
        spectra = {keys[i]: s.value for i, s in enumerate(self.sources) if s is not SpectrumSource.DEFERRED}
        errors: dict[SpectrumSource, dict[str, dict[str, float]]] = {
            SpectrumSource.ESTIMATE: {},
            SpectrumSource.AUDIT: {},
        }
        for i, source in enumerate(self.sources):
            if source is SpectrumSource.DEFERRED:
                continue  # (every layer of a light step)
            # the cheap tier's values are estimates too: their errors go with the estimator's
            kind = SpectrumSource.ESTIMATE if source is SpectrumSource.CHEAP else source
            if kind in errors:
                errors[kind][keys[i]] = {
                    name: float(self.errors[i, j])
                    for j, name in enumerate(metric_names)
                    if name not in ENTRY_METRICS and self.valid[i, j] and math.isfinite(float(self.errors[i, j]))
                }
        fields: dict[str, Any] = {
            "spectra": spectra,
            "deferred_layers": [keys[i] for i in sorted(self.present) if keys[i] not in spectra],
            "estimate_error": errors[SpectrumSource.ESTIMATE],
        }
        if errors[SpectrumSource.AUDIT]:
            fields["audit_error"] = errors[SpectrumSource.AUDIT]
        return fields


def assemble_record(
    *,
    step: int,
    epoch: int | None,
    batch_idx: int | None,
    table: HostTable,
    keys: Sequence[str],
    metric_names: Sequence[str],
    result: ScoreResult | None,
    sample_ids: list[Any],
    with_sources: bool,
    factored_rows: Sequence[int] = (),
    error: str | None = None,
    loss_seen: bool = True,
    scope: Collection[int] | None = None,
    layer_metrics: dict[str, dict[str, float]] | None = None,
) -> BatchRecord:
    """The record of a measured step (``monitor_ms`` is added by the caller, once everything before it is done).

    ``layer_metrics``: ``table.layer_metrics(keys, metric_names)`` where the caller has made it already."""
    if layer_metrics is None:
        layer_metrics = table.layer_metrics(keys, metric_names)
    present = set(table.present)
    finite = all(math.isfinite(v) for values in layer_metrics.values() for v in values.values())
    record: BatchRecord = {
        "step": step,
        "epoch": epoch,
        "batch_idx": batch_idx,
        "score": None if result is None or result.score is None else float(result.score),
        "flagged": bool(result.flagged) if result is not None else False,
        "reasons": [] if result is None else list(result.reasons),
        "loss": table.loss,
        "metrics": layer_metrics,
        "sample_ids": sample_ids or None,
        "z": {} if result is None else dict(result.z),
        "threshold": None if result is None else getattr(result, "threshold", None),
        "nonfinite_layers": []
        if finite
        else [k for k, mv in layer_metrics.items() if not all(math.isfinite(v) for v in mv.values())],
        "missing_layers": [keys[i] for i in range(len(keys)) if i not in present and (scope is None or i in scope)],
        "events": [] if result is None else [dict(e) for e in getattr(result, "events", [])],
    }
    if with_sources:
        # which layers got which spectrum; deferred layers only have their Frobenius norm this step
        record.update(table.source_fields(keys, metric_names))  # type: ignore[typeddict-item]
    detection = table.detection_values(keys)
    if detection:
        record["detection"] = detection
    if table.layers_per_rank is not None:
        record["layers_per_rank"] = table.layers_per_rank
    if factored_rows:
        record["factored_layers"] = [keys[i] for i in sorted(factored_rows)]
    if error is not None:
        record["error"] = error
    if not loss_seen:
        record["loss_seen"] = False
    return record
