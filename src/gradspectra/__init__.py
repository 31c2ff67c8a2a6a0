"""gradspectra: live spectra of layer-wise gradients for fine-tunes (Lightning, transformers Trainer, plain loops)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "GradientAnomalyError",
    "GradientSpectrumMonitor",
    "GradientSpectrumTracker",
    "InstabilityError",
    "__version__",
    "score_data",
]

if TYPE_CHECKING:
    from gradspectra.callbacks import GradientSpectrumMonitor
    from gradspectra.data_scoring import score_data
    from gradspectra.monitoring import GradientAnomalyError, InstabilityError
    from gradspectra.tracker import GradientSpectrumTracker


def __getattr__(name: str) -> Any:
    # the callback pulls in Lightning; `gradspectra.functional`, the engine and the plain-loop tracker do not
    if name == "GradientSpectrumMonitor":
        from gradspectra import callbacks

        return callbacks.GradientSpectrumMonitor
    if name in ("GradientAnomalyError", "InstabilityError"):
        from gradspectra import monitoring

        return getattr(monitoring, name)
    if name == "GradientSpectrumTracker":
        from gradspectra import tracker

        return tracker.GradientSpectrumTracker
    if name == "score_data":
        from gradspectra import data_scoring

        return data_scoring.score_data
    raise AttributeError(f"module 'gradspectra' has no attribute {name!r}")
