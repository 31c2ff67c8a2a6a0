"""The engine's per-sample stage: per-sample spectra of the watched linear layers from the factors the hooks
kept, checked against the gradient, scored against the batch and the running baseline."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from gradspectra.capture import SampleCapture, WatchedParameter
from gradspectra.functional import (
    carrying_tokens,
    compact_tokens,
    factored_singular_values,
    metrics_from_singular_values,
    per_sample_sketches,
    per_sample_token_similarity,
    sketch_projections,
)
from gradspectra.scoring import SAMPLE_METRICS, SampleScorer

PerSample = Literal["flagged", "always"]
PER_SAMPLE: tuple[str, ...] = get_args(PerSample)
_AGREE, _LOW_AGREE = 1e-2, 5e-2  # how far a layer's multiple may be from the others' (float32, bf16/fp16)
_LOW = (torch.bfloat16, torch.float16)
SKETCH_SIZE = 16  # per-sample gradient sketches (16 x 16) for the cosines between samples


@dataclass
class SampleResult:
    """The stage's output: the record's ``samples`` (``None`` when nothing could be measured), what went wrong."""

    entries: list[dict[str, Any]] | None
    note: str | None
    seconds: float


class SampleStage:
    """Per-sample gradient spectra for one process: hooks on the watched ``nn.Linear`` layers, a scorer."""

    def __init__(self, watched: Sequence[WatchedParameter], metrics: Sequence[str], scorer: SampleScorer) -> None:
        self.capture = SampleCapture(watched)
        self.watched = list(watched)
        self.metrics = tuple(dict.fromkeys([*SAMPLE_METRICS, *metrics]))
        self.scorer = scorer
        # measured on every step of a rotation: the first watched layer, whose inputs give the token-wise
        # similarity of the samples
        self._fixed_rows = self.capture.layers[:1]
        self._layer_seconds: float | None = None  # learned cost of one layer's per-sample spectra
        self._cursor = 0  # where the rotation over layers goes on next step
        self._projections: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer, drawn once
        #: the gradient each layer's factors are checked against (default ``grad_matrix()``; the engine gives
        #: frozen layers' implied gradient ``D^T X`` here)
        self.gradient: Callable[[int], Tensor | None] = lambda row: self.watched[row].grad_matrix()

    def rows_for(self, allowance: float | None) -> list[int]:
        """The layers measured this step: all of them, or when ``allowance`` (seconds) does not cover all, the
        first watched layer plus the next ones in rotation, as many as the allowance buys."""
        rows = self.capture.layers
        if allowance is None or self._layer_seconds is None or self._layer_seconds * len(rows) <= allowance:
            return rows
        extra = max(0, int(allowance / self._layer_seconds) - len(self._fixed_rows))
        others = [r for r in rows if r not in self._fixed_rows]
        chosen = [others[(self._cursor + k) % len(others)] for k in range(min(extra, len(others)))] if others else []
        self._cursor = (self._cursor + len(chosen)) % max(1, len(others))
        return sorted(set(self._fixed_rows) | set(chosen))

    @property
    def layers(self) -> list[int]:
        return self.capture.layers

    def measure(
        self,
        ids: Sequence[Any],
        loss_scale: float | None,
        allowance: float | None = None,
        scope: Collection[int] | None = None,
    ) -> SampleResult:
        """Per-sample metrics of the hooked layers (:meth:`rows_for`, within ``scope`` when given) whose factors
        add up to their gradient, then the scores.

        Each layer's gradient must be one common multiple ``c`` of its factors' sum (1 normally; the clipping
        factor under gradient clipping, ``1 / scale`` under an AMP loss scale): the samples' shares of the
        gradient the optimizer sees are ``c Delta_i^T X_i``. Layers with another multiple, or none, are left
        out and ``note`` says which and why.
        """
        started = time.perf_counter()
        rows = [r for r in self.rows_for(allowance) if scope is None or r in scope]
        gen = torch.Generator().manual_seed(0)
        checked: list[tuple[int, Tensor, Tensor, float]] = []
        unexplained: list[str] = []
        sizes: list[int] = []
        for row in rows:
            grad = self.gradient(row)
            parts = self.capture.factors(row)
            if grad is None or not parts:
                continue
            c = self.capture.check(row, grad, gen)
            if c is None:
                unexplained.append(self.watched[row].key)
                continue
            delta, x = _stack([d for d, _ in parts]), _stack([x for _, x in parts])
            checked.append((row, delta, x, c))
            sizes.append(int(delta.shape[0]))
        known = [c for *_, c in checked if math.isfinite(c)]
        # one multiple for the whole model (clipping and loss scales are global); a non-finite gradient has none
        common = statistics.median(known) if known else (1.0 / loss_scale if loss_scale else 1.0)
        batch = statistics.mode(sizes) if sizes else None
        other_scale = [
            self.watched[r].key
            for r, d, _, c in checked
            # under bf16 autocast the layers' multiples differ from their median by up to 0.4 %, the 2 x 32 head of
            # a tiny BERT by 0.9 % (measured, GradScaler on CPU): 5 % leaves room, a per-layer scale is far off
            if math.isfinite(c) and abs(c / common - 1) > (_LOW_AGREE if d.dtype in _LOW else _AGREE)
        ]
        other_size = [self.watched[r].key for r, d, _, _ in checked if d.shape[0] != batch]
        per_layer: dict[str, dict[str, np.ndarray]] = {}
        sketches: list[Tensor] = []
        similar: np.ndarray | None = None
        tokens: np.ndarray | None = None
        for row, delta, x, _ in checked:
            key = self.watched[row].key
            if key in other_scale or key in other_size:
                continue
            # padding (and tokens after the last one in the loss) dropped first, in the factors' own dtype
            carries = carrying_tokens(delta)
            carried = carries.sum(1).cpu().numpy()
            tokens = carried if tokens is None else np.maximum(tokens, carried)
            if similar is None and row == self.capture.layers[0]:
                # the first watched layer's inputs: closest to the text, and dropout leaves copies alike
                similar = per_sample_token_similarity(x, carries).cpu().numpy()
            delta, x = compact_tokens(delta, x, carries)
            if common != 1.0:
                delta = delta * common
            # already compacted: straight to the T x T cores (per_sample_metrics would look for padding again)
            values = metrics_from_singular_values(factored_singular_values(delta, x), None, self.metrics)
            per_layer[key] = {k: v.cpu().numpy() for k, v in values.items()}
            if row not in self._projections:
                m, n = int(delta.shape[-1]), int(x.shape[-1])
                self._projections[row] = sketch_projections(m, n, SKETCH_SIZE, seed=row)
            sketches.append(per_sample_sketches(delta, x, self._projections[row]))
        note = _note(unexplained, other_scale, other_size, batch)
        if not per_layer:
            return SampleResult(None, note or "no watched linear layer kept its factors", time.perf_counter() - started)
        pull, output_key = self._output_pull(batch, common)
        if pull is None:
            # the score falls back on the whole gradient's norm: say so, the step's scores mean something else
            missing = "no output gradient of the layer closest to the loss: the whole gradient's norm is scored"
            note = f"{note}; {missing}" if note else missing
        cos = _mean_cosines(sketches)
        sample_ids = list(ids) if ids and len(ids) == batch else None
        entries = self.scorer.score(
            per_layer,
            cos,
            sample_ids,
            None if tokens is None else tokens.tolist(),
            input_similarity=similar,
            output_gradient=pull,
            output_layer=output_key,
        )
        seconds = time.perf_counter() - started
        each = seconds / len(per_layer)
        self._layer_seconds = each if self._layer_seconds is None else 0.8 * self._layer_seconds + 0.2 * each
        return SampleResult(entries, note, seconds)

    def _output_pull(self, batch: int | None, common: float) -> tuple[np.ndarray | None, str | None]:
        """Each sample's output gradient at the hooked layer closest to the loss (the first whose output gradient
        arrived in the backward; a cross-entropy head's is ``p - y``), as the root mean square over the tokens
        that carry gradient (a token-level head's sum would grow with the text's length), times the step's
        common multiple like every per-sample value (an AMP loss scale divided out, the clipping factor in);
        read from the kept rows whether or not the layer's spectra are measured this step (no spectrum; low
        precision rows are summed in float32). ``(None, None)`` when that layer's rows are incomplete.

        Under a mean-reduced loss each row carries the loss's ``1 / N`` (its micro-batch's samples or tokens): the
        samples of one micro-batch compare as they are; across micro-batches, and against recent samples, pulls
        differ by the ratio of those counts where they differ (a token-level head's micro-batches of other
        lengths)."""
        row = self.capture.output_layer
        if row is None or not self.capture.delivered(row):
            return None, None
        parts = self.capture.factors(row)
        if not parts or batch is None or sum(int(d.shape[0]) for d, _ in parts) != batch:
            return None, None
        pulls = []
        for d, _ in parts:
            # per token in float32 (a scaled fp16 gradient's squares overflow fp16), then per sample
            wide = torch.float32 if d.dtype in _LOW else None
            tokens = torch.linalg.vector_norm(d.detach(), dim=-1, dtype=wide).double()
            carried = (tokens != 0).sum(1).clamp_min(1)  # (NaN counts as carrying: the sample's pull is NaN)
            pulls.append((tokens.square().sum(1) / carried).sqrt())
        pull = torch.cat(pulls).cpu().numpy()
        if math.isfinite(common) and common != 0.0:
            pull = pull * abs(common)
        return pull, self.watched[row].key

    def clear(self) -> None:
        self.capture.clear()

    def close(self) -> None:
        self.capture.close()


def _note(unexplained: list[str], other_scale: list[str], other_size: list[str], batch: int | None) -> str | None:
    """Why layers were left out, in words, or ``None``."""
    parts = []
    if unexplained:
        parts.append(
            f"{len(unexplained)} layers whose gradient is not a multiple of their kept factors' sum (e.g. "
            f"{unexplained[0]}: a gradient hook, activation checkpointing, or samples not along dimension 0)"
        )
    if other_scale:
        parts.append(
            f"{len(other_scale)} layers whose gradient is another multiple of their factors than the others' "
            f"(e.g. {other_scale[0]}: clipping or scaling per layer)"
        )
    if other_size:
        parts.append(f"{len(other_size)} layers with another number of samples than {batch} (e.g. {other_size[0]})")
    return "per-sample values left out for " + "; ".join(parts) if parts else None


def _mean_cosines(sketches: list[torch.Tensor]) -> np.ndarray | None:
    """The samples' gradient cosines after removing the batch's mean gradient direction, averaged over layers
    (each layer counts once). Early in training most samples' gradients point the same way (cosines near 1 for all
    pairs); what sets a repeated sample apart is that its deviation from the batch is its twin's."""
    if not sketches:
        return None
    total = None
    tiny = torch.finfo(torch.float64).tiny
    for sk in sketches:
        # directions first, then the batch's mean direction removed: a mean of the raw gradients would be one
        # large sample's (a flipped label's), and every other sample would look alike once it is removed
        unit = sk / sk.norm(dim=1, keepdim=True).clamp_min(tiny)
        centred = unit - unit.mean(dim=0, keepdim=True)
        unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(tiny)
        cos = unit @ unit.mT
        total = cos if total is None else total + cos
    assert total is not None
    out: np.ndarray = (total / len(sketches)).cpu().numpy()
    return out


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """Micro-batches' factors as one batch of samples, padded with zero tokens where their lengths differ."""
    if len(parts) == 1:
        return parts[0]
    t = max(p.shape[1] for p in parts)
    padded = [torch.nn.functional.pad(p, (0, 0, 0, t - p.shape[1])) if p.shape[1] < t else p for p in parts]
    return torch.cat(padded, dim=0)
