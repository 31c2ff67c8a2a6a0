"""Lightning callbacks."""

from gradspectra.callbacks.monitor import ACTIONS, GradientAnomalyError, GradientSpectrumMonitor

__all__ = ["ACTIONS", "GradientAnomalyError", "GradientSpectrumMonitor"]
