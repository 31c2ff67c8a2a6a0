"""torchmetrics ``Metric`` classes that keep streaming statistics of gradient spectral metrics across steps.

The math lives in :mod:`gradspectra.functional`; these classes only hold state and call it.
"""

from gradspectra.metrics.layerwise import LayerwiseSpectrum
from gradspectra.metrics.spectrum import (
    EffectiveRank,
    FrobeniusNorm,
    GradientSpectrum,
    NuclearNorm,
    SpectralNorm,
    StableRank,
    TopSVRatio,
)

__all__ = [
    "EffectiveRank",
    "FrobeniusNorm",
    "GradientSpectrum",
    "LayerwiseSpectrum",
    "NuclearNorm",
    "SpectralNorm",
    "StableRank",
    "TopSVRatio",
]
