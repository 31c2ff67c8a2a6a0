"""Pure tensor math: singular values, spectral metrics and cross-layer statistics. No state, no Lightning."""

from gradspectra.functional.batched import spectral_metrics_many
from gradspectra.functional.detect import DETECTION_METRIC, coarse_effective_rank_many
from gradspectra.functional.estimate import SpectralEstimate, estimate_spectral_metrics_many
from gradspectra.functional.layers import adjacent_cosine, layer_mad, paper_segments
from gradspectra.functional.per_sample import (
    carrying_tokens,
    compact_tokens,
    per_sample_cosines,
    per_sample_inner_products,
    per_sample_metrics,
    per_sample_singular_values,
    per_sample_sketches,
    per_sample_token_similarity,
    sketch_projections,
)
from gradspectra.functional.reshape import as_matrix, is_conv1d
from gradspectra.functional.sketch import CHEAP_METRICS, CheapSpectra, cheap_spectral_metrics_many
from gradspectra.functional.spectral import (
    ENTRY_METRICS,
    METRIC_NAMES,
    check_metric_names,
    effective_rank,
    frobenius_norm,
    frobenius_norm_values,
    frobenius_norms,
    metrics_from_singular_values,
    needs_spectrum,
    nuclear_norm,
    participation_ratio,
    spectral_metrics,
    spectral_norm,
    stable_rank,
    top_sv_ratio,
)
from gradspectra.functional.svd import METHODS, Method, check_method, factored_singular_values, singular_values

__all__ = [
    "CHEAP_METRICS",
    "DETECTION_METRIC",
    "ENTRY_METRICS",
    "METHODS",
    "METRIC_NAMES",
    "CheapSpectra",
    "Method",
    "SpectralEstimate",
    "adjacent_cosine",
    "as_matrix",
    "carrying_tokens",
    "cheap_spectral_metrics_many",
    "check_method",
    "check_metric_names",
    "coarse_effective_rank_many",
    "compact_tokens",
    "effective_rank",
    "estimate_spectral_metrics_many",
    "factored_singular_values",
    "frobenius_norm",
    "frobenius_norm_values",
    "frobenius_norms",
    "is_conv1d",
    "layer_mad",
    "metrics_from_singular_values",
    "needs_spectrum",
    "nuclear_norm",
    "paper_segments",
    "participation_ratio",
    "per_sample_cosines",
    "per_sample_inner_products",
    "per_sample_metrics",
    "per_sample_singular_values",
    "per_sample_sketches",
    "per_sample_token_similarity",
    "singular_values",
    "sketch_projections",
    "spectral_metrics",
    "spectral_metrics_many",
    "spectral_norm",
    "stable_rank",
    "top_sv_ratio",
]
