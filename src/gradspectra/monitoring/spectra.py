"""The spectral stage of a monitored step: per layer, the cheap tier, exact (from the matrix or its ``T x T`` factors),
estimated, audited or deferred, returned as a value."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from gradspectra.functional import (
    CHEAP_METRICS,
    ENTRY_METRICS,
    Method,
    cheap_spectral_metrics_many,
    coarse_effective_rank_many,
    estimate_spectral_metrics_many,
    factored_singular_values,
    frobenius_norm,
    frobenius_norms,
    metrics_from_singular_values,
    needs_spectrum,
    spectral_metrics_many,
)
from gradspectra.monitoring.budget import DETECT, Plan
from gradspectra.monitoring.sources import SpectrumSource

_CHEAP_TOLERANCE = 0.02  # two sketches in a row whose error estimate exceeds this send a layer to the Gram route ...
_GRAM_STEPS = 20  # ... for this many steps, then the sketch is tried again
_GRAM_COST = 4  # ... where the Gram route costs at most this many times the sketch (min(m, n) <= 256)


class FactorSource(Protocol):
    """Where the ``T x T`` route gets a layer's factors: :class:`gradspectra.capture.FactorCapture` (checked
    against the gradient) or :class:`gradspectra.capture.ImpliedGradients` (the gradient by construction)."""

    def factors(self, i: int, grad: Tensor) -> tuple[Tensor, Tensor] | None: ...


@dataclass
class SpectraResult:
    """One rank's share of a step's table.

    ``values`` and ``errors`` are ``(layers, metrics)`` float64 with zeros outside this rank's rows (so
    that a sum over ranks assembles the table); ``codes`` ``(layers,)`` the :attr:`SpectrumSource.code`
    of each row. ``errors`` holds the estimator's own relative error estimate for estimated rows and the
    realised relative error (estimate vs exact) for audited rows. ``work`` lists ``(kind, rows, seconds)``
    of the timed work, for the budget to learn from. ``detection`` ``(layers,)``: the detection
    value (a coarse effective rank, on the anchor layers) where ``detected`` is 1, zeros elsewhere (so that
    ranks sum).
    """

    values: Tensor
    codes: Tensor
    errors: Tensor
    detection: Tensor
    detected: Tensor
    computed: int = 0  # layers given a full spectrum here (counted on the host, no device sync)
    factored_rows: list[int] = field(default_factory=list)
    work: list[tuple[str, list[int], float]] = field(default_factory=list)  # kind: a SpectrumSource or DETECT
    seconds: float = 0.0  # full-spectrum work of this step (the Frobenius norms and the cheap tier excluded)
    cheap_seconds: float = 0.0  # the cheap tier's and the detection value's work (paid for up front by the budget)


def source_columns(metric_names: Sequence[str], device: torch.device) -> Tensor:
    """``(sources, metrics)`` bool: which metric columns a layer has, by the :attr:`SpectrumSource.code` of
    how it was measured (the entry metrics always; the cheap tier's three with ``CHEAP``; all with a
    full spectrum)."""
    entry = [name in ENTRY_METRICS for name in metric_names]
    cheap = [name in ENTRY_METRICS or name in CHEAP_METRICS for name in metric_names]
    rows = {
        SpectrumSource.DEFERRED: entry,
        SpectrumSource.CHEAP: cheap,
    }
    table = [rows.get(source, [True] * len(metric_names)) for source in SpectrumSource]
    return torch.tensor(table, dtype=torch.bool, device=device)


class SpectraRunner:
    """Computes spectral metrics of a step's matrices by a plan; keeps only the estimator's warm starts.

    Args:
        metric_names: the metric columns.
        method: exact singular value route.
        cpu_threads: intra-op threads for this work on CPU tensors (restored after), ``None`` to keep torch's.
        factors: hooks holding each linear layer's inputs and output gradients, for the ``T x T`` route.
    """

    def __init__(
        self,
        metric_names: Sequence[str],
        method: Method = "auto",
        cpu_threads: int | None = 1,
        factors: FactorSource | None = None,
    ) -> None:
        self.metric_names = tuple(metric_names)
        self.method: Method = method
        self.cpu_threads = cpu_threads
        self.factors = factors
        self.bases: dict[int, Tensor] = {}
        self.cheap_bases: dict[int, Tensor | None] = {}
        # layers whose spectrum is too flat for the sketch (its error estimate above _CHEAP_TOLERANCE): the
        # steps they stay on the Gram route before the sketch is tried again
        self.gram_steps: dict[int, int] = {}
        self._pending_routes: tuple[list[int], Tensor] | None = None
        self._over: dict[int, bool] = {}  # the layer's last sketch was above the tolerance
        self._cheap_calls = 0

    @contextmanager
    def threads(self, device: torch.device) -> Iterator[None]:
        if self.cpu_threads is None or device.type != "cpu":
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(self.cpu_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def empty(self, n_layers: int, device: torch.device) -> SpectraResult:
        shape = (n_layers, len(self.metric_names))
        zeros = torch.zeros(shape, dtype=torch.float64, device=device)
        codes = torch.full((n_layers,), SpectrumSource.DEFERRED.code, dtype=torch.float64, device=device)
        flat = torch.zeros(n_layers, dtype=torch.float64, device=device)
        return SpectraResult(zeros, codes, torch.zeros_like(zeros), flat, flat.clone())

    def run(
        self, matrices: list[Tensor], rows: list[int], n_layers: int, device: torch.device, plan: Plan | None, seed: int
    ) -> SpectraResult:
        """Metrics of ``matrices`` (the layers ``rows``): every one exact when ``plan`` is ``None``."""
        out = self.empty(n_layers, device)
        if not rows:
            return out
        if plan is None or not needs_spectrum(self.metric_names):
            self._exact_rows(out, rows, matrices)
            return out
        at = {row: k for k, row in enumerate(rows)}
        fro = [j for j, name in enumerate(self.metric_names) if name in ENTRY_METRICS]
        norms: Tensor | None = None
        if fro or plan.cheap:
            with self.threads(device):
                # every layer's exact norm, one read each and one host sync for all of them
                norms = frobenius_norms(matrices).to(device)
            if fro:
                out.values[rows, fro[0]] = norms
        cheap_rows = [r for r in plan.cheap if r in at]
        if cheap_rows and norms is not None:
            self._cheap_rows(out, cheap_rows, [matrices[at[r]] for r in cheap_rows], norms[[at[r] for r in cheap_rows]])
        detect_rows = [r for r in plan.detect if r in at]
        if detect_rows:
            self._detect_rows(out, detect_rows, [matrices[at[r]] for r in detect_rows])
        exact_rows = [r for r in plan.exact if r in at]
        estimate_rows = [r for r in plan.estimate + plan.audit if r in at]
        out.computed = len(exact_rows) + len([r for r in plan.estimate if r in at])
        if exact_rows:
            self._exact_rows(out, exact_rows, [matrices[at[r]] for r in exact_rows])
        if estimate_rows:
            self._estimate_rows(out, estimate_rows, [matrices[at[r]] for r in estimate_rows], set(plan.audit), seed)
        return out

    def _cheap_rows(self, out: SpectraResult, rows: list[int], matrices: list[Tensor], norms: Tensor) -> None:
        device = out.values.device
        t0 = time.perf_counter()
        self._cheap_calls += 1  # fresh random directions each step (the probes stay the same)
        self._settle_routes()
        gram = [self.gram_steps.get(r, 0) > 0 for r in rows]
        with self.threads(device):
            cheap = cheap_spectral_metrics_many(
                matrices,
                norms,
                warm_start=[self.cheap_bases.get(r) for r in rows],
                seed=self._cheap_calls,
                gram=gram,
            )
        seconds = time.perf_counter() - t0
        out.work.append((SpectrumSource.CHEAP, list(rows), seconds))
        out.cheap_seconds += seconds
        for k, r in enumerate(rows):
            self.cheap_bases[r] = cheap.bases[k]
            if gram[k]:
                self.gram_steps[r] -= 1
        # which sketched layers go to the Gram route is read at the next step (no wait for the device now);
        # only where it costs at most _GRAM_COST times the sketch: 2 m n min(m, n) against 2 m n 64 flops
        sketched = [k for k, on_gram in enumerate(gram) if not on_gram and min(matrices[k].shape) <= 64 * _GRAM_COST]
        self._pending_routes = ([rows[k] for k in sketched], cheap.rel_error[sketched].amax(-1))
        cols = [j for j, name in enumerate(self.metric_names) if name in CHEAP_METRICS]
        if cols:
            src = [CHEAP_METRICS.index(self.metric_names[j]) for j in cols]
            cells = (torch.tensor(rows, device=device)[:, None], torch.tensor(cols, device=device))
            out.values[cells] = cheap.values[:, src].to(device)
            out.errors[cells] = cheap.rel_error[:, src].to(device)
        out.codes[rows] = SpectrumSource.CHEAP.code

    def _detect_rows(self, out: SpectraResult, rows: list[int], matrices: list[Tensor]) -> None:
        """The detection value (a coarse effective rank, steady from step to step) of the anchor layers."""
        device = out.values.device
        t0 = time.perf_counter()
        with self.threads(device):
            value = coarse_effective_rank_many(matrices)
        seconds = time.perf_counter() - t0
        out.work.append((DETECT, list(rows), seconds))
        out.cheap_seconds += seconds
        out.detection[rows] = value.to(device)
        out.detected[rows] = 1.0

    def _settle_routes(self) -> None:
        """The last step's sketch errors (long computed by now): a layer above the tolerance takes the Gram route."""
        if self._pending_routes is None:
            return
        rows, worst = self._pending_routes
        self._pending_routes = None
        for r, err in zip(rows, worst.tolist()):
            # twice in a row: a flat spectrum, not one unlucky step (the Gram route costs min(m, n) / 32
            # times the sketch; an occasional estimate above the tolerance is not worth it)
            if err > _CHEAP_TOLERANCE and self._over.get(r):
                self.gram_steps[r] = _GRAM_STEPS
            self._over[r] = err > _CHEAP_TOLERANCE

    def _exact_rows(self, out: SpectraResult, rows: list[int], matrices: list[Tensor]) -> None:
        t0 = time.perf_counter()
        out.values[rows] = self.exact(rows, matrices, out.factored_rows).to(out.values.device)
        out.errors[rows] = 0.0  # the cheap tier's error estimates, where it ran, no longer apply
        out.codes[rows] = SpectrumSource.EXACT.code
        seconds = time.perf_counter() - t0
        out.computed = max(out.computed, len(rows))
        out.work.append((SpectrumSource.EXACT, list(rows), seconds))
        out.seconds += seconds

    def _estimate_rows(
        self, out: SpectraResult, rows: list[int], matrices: list[Tensor], audit: set[int], seed: int
    ) -> None:
        device = out.values.device
        t0 = time.perf_counter()
        with self.threads(device):
            est = estimate_spectral_metrics_many(
                matrices, self.metric_names, warm_start=[self.bases.get(r) for r in rows], seed=seed
            )
        seconds = time.perf_counter() - t0
        out.work.append((SpectrumSource.ESTIMATE, list(rows), seconds))
        out.seconds += seconds
        for k, r in enumerate(rows):
            self.bases[r] = est.bases[k]
        values = est.values.to(device)
        # positions in rows, from host lists (no device round trip)
        plain_k = [k for k, r in enumerate(rows) if r not in audit]
        audit_k = [k for k, r in enumerate(rows) if r in audit]
        plain = [rows[k] for k in plain_k]
        if plain:
            out.values[plain] = values[plain_k]
            out.errors[plain] = est.rel_error.to(device)[plain_k]
            out.codes[plain] = SpectrumSource.ESTIMATE.code
        audited = [rows[k] for k in audit_k]
        if audited:
            exact = out.values[audited]
            out.errors[audited] = (values[audit_k] - exact).abs() / exact.abs().clamp_min(torch.finfo(exact.dtype).tiny)
            out.codes[audited] = SpectrumSource.AUDIT.code

    def exact(self, rows: list[int], matrices: list[Tensor], factored_rows: list[int]) -> Tensor:
        """Exact metrics of the layers ``rows``: from the ``T x T`` factored problem where the hooks kept
        factors that reproduce the gradient (those rows are appended to ``factored_rows``), else from the matrix."""
        out = torch.empty((len(rows), len(self.metric_names)), dtype=torch.float64, device=matrices[0].device)
        plain = list(range(len(rows)))
        with self.threads(matrices[0].device):
            if self.factors is not None and needs_spectrum(self.metric_names):
                plain = []
                for k, (row, matrix) in enumerate(zip(rows, matrices)):
                    factors = self.factors.factors(row, matrix)
                    if factors is None:
                        plain.append(k)
                        continue
                    s = factored_singular_values(*factors)
                    values = metrics_from_singular_values(s, frobenius_norm(matrix), self.metric_names)
                    out[k] = torch.stack([values[n] for n in self.metric_names]).to(out.device)
                    factored_rows.append(row)
            if plain:
                computed = spectral_metrics_many([matrices[k] for k in plain], self.metric_names, self.method)
                out[plain] = computed.to(out.device)
        return out
