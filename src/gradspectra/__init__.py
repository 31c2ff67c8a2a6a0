"""gradspectra: live spectra of layer-wise gradients for PyTorch Lightning fine-tunes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["GradientAnomalyError", "GradientSpectrumMonitor", "__version__"]

if TYPE_CHECKING:
    from gradspectra.callbacks import GradientAnomalyError, GradientSpectrumMonitor


def __getattr__(name: str) -> Any:
    # the callback pulls in Lightning; `gradspectra.functional` alone should not
    if name in ("GradientSpectrumMonitor", "GradientAnomalyError"):
        from gradspectra import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'gradspectra' has no attribute {name!r}")
