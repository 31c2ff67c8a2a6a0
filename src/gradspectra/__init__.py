"""gradspectra: live spectra of layer-wise gradients for PyTorch Lightning fine-tunes."""

__version__ = "0.1.0"

__all__ = ["__version__"]
