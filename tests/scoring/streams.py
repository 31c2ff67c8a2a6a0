"""Synthetic per-layer metric streams for the scoring tests.

Each step draws every (layer, metric) value as ``exp(base + noise)``: a fixed per-layer level, i.i.d.
normal noise of ``sigma`` (lognormal values), plus a smaller noise term shared by all layers (a
batch effect). Shifts are expressed in units of the per-layer noise ``sigma``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from gradspectra.functional import METRIC_NAMES

# the six metrics the streams were written with: the first six names (metrics added later come after
# them, and must not change the random streams that the scoring tests' expectations were measured on)
METRICS: tuple[str, ...] = METRIC_NAMES[:6]


class SyntheticRun:
    """A reproducible stream of ``{layer: {metric: value}}`` steps (and a loss)."""

    def __init__(
        self, seed: int, n_layers: int = 12, sigma: float = 0.1, common: float = 0.03, loss_sigma: float = 0.1
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.n_layers = n_layers
        self.sigma = sigma
        self.common = common
        self.loss_sigma = loss_sigma
        self.base = self.rng.normal(0.0, 1.0, size=(n_layers, len(METRICS)))
        self.layer_names = [f"self_attn.q_proj/layer_{i:02d}" for i in range(n_layers)]

    def log_values(self) -> np.ndarray:
        noise = self.rng.normal(0.0, self.sigma, size=self.base.shape)
        shared = self.rng.normal(0.0, self.common, size=(1, len(METRICS)))
        return self.base + noise + shared

    def step(
        self,
        shift: Mapping[str, float] | None = None,
        layers: np.ndarray | None = None,
        offset: Mapping[str, float] | None = None,
    ) -> dict[str, dict[str, float]]:
        """One step; ``shift`` adds ``k * sigma`` (log scale) to a metric in ``layers`` (default all);
        ``offset`` adds a raw log-scale amount to a metric in every layer (drift)."""
        y = self.log_values()
        for name, k in (shift or {}).items():
            rows = slice(None) if layers is None else layers
            y[rows, METRICS.index(name)] += k * self.sigma
        for name, amount in (offset or {}).items():
            y[:, METRICS.index(name)] += amount
        x = np.exp(y)
        return {layer: {m: float(x[i, j]) for j, m in enumerate(METRICS)} for i, layer in enumerate(self.layer_names)}

    def loss(self, factor: float = 1.0) -> float:
        return float(0.7 * factor * np.exp(self.rng.normal(0.0, self.loss_sigma)))


def finetune_drift(t: int, fall: float = 10.0, tau: float = 15.0) -> tuple[dict[str, float], float]:
    """Log-scale offsets of a fast-settling fine-tune at step ``t``, and the loss factor.

    The gradient norms fall by ``fall`` with time constant ``tau`` steps (most of it within the first
    few dozen steps, as measured on MiniLM-L6), the shape metrics move a little, the loss halves.
    """
    settled = 1.0 - math.exp(-t / tau)
    drop = -math.log(fall) * settled
    offsets = {"nuclear_norm": drop, "spectral_norm": drop, "frobenius_norm": drop, "effective_rank": -0.2 * settled}
    return offsets, math.exp(-math.log(2.0) * settled)
