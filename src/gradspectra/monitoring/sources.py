"""How a layer got its spectrum on a step: one vocabulary for the plan, the all-reduce, the record and the logs."""

from __future__ import annotations

from enum import Enum


class SpectrumSource(str, Enum):
    """The member values are the strings of the record's ``spectra`` map and of the budget's kinds.

    ``DEFERRED``: no spectrum this step (only the metrics from the entries, the Frobenius norm).
    ``EXACT``: an exact decomposition. ``ESTIMATE``: the bounded-error estimator.
    ``AUDIT``: exact values, also estimated to measure the estimator's real error.
    ``CHEAP``: no full spectrum, the cheap tier only (spectral norm, stable rank, participation ratio,
    :func:`gradspectra.functional.cheap_spectral_metrics_many`).
    """

    DEFERRED = "deferred"
    EXACT = "exact"
    ESTIMATE = "estimate"
    AUDIT = "exact+audit"
    CHEAP = "cheap"

    @property
    def code(self) -> float:
        """A number for this source in the table that travels in the one all-reduce (only the owner adds it)."""
        return float(_ORDER.index(self))

    @classmethod
    def from_code(cls, code: float) -> SpectrumSource:
        return _ORDER[int(code)]

    @property
    def is_full(self) -> bool:
        """A full spectrum (every metric), exact or estimated."""
        return self in (SpectrumSource.EXACT, SpectrumSource.ESTIMATE, SpectrumSource.AUDIT)

    @property
    def is_exact(self) -> bool:
        return self in (SpectrumSource.EXACT, SpectrumSource.AUDIT)

    def __str__(self) -> str:
        return self.value


_ORDER: tuple[SpectrumSource, ...] = tuple(SpectrumSource)
