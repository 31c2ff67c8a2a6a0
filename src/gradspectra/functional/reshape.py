"""How a parameter's gradient becomes the matrix whose spectrum is measured."""

from __future__ import annotations

import sys

from torch import Tensor, nn


def is_conv1d(module: nn.Module | None) -> bool:
    """True for GPT-2 style ``transformers`` ``Conv1D`` (weight stored ``in x out``)."""
    if module is None:
        return False
    tf = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(tf, "Conv1D", None) if tf is not None else None
    if conv1d is not None and isinstance(module, conv1d):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def as_matrix(grad: Tensor, module: nn.Module | None = None, include_embeddings: bool = False) -> Tensor | None:
    """The gradient of a weight as an ``out x in`` matrix, or ``None`` when it is not measured.

    - ``nn.Linear`` (and any 2-D weight): as is, ``out x in``.
    - Convolutions (``nn.ConvNd``, ``nn.ConvTransposeNd``): ``out x (in/groups * k1 * k2 ...)``
      (``groups = 1`` unless the layer is grouped); transposed convolutions are stored
      ``in x out/groups x k...`` and are permuted group by group to put ``out`` first, so both
      kinds give the same layout.
    - GPT-2 style ``Conv1D`` (stored ``in x out``): transposed to ``out x in``.
    - 1-D parameters (biases, norms) and 0-D parameters: ``None``.
    - ``nn.Embedding`` / ``nn.EmbeddingBag``: ``None`` unless ``include_embeddings`` (their gradient
      touches only the rows of the tokens seen, so its spectrum says more about the batch's
      vocabulary than about learning).

    Example:
        >>> import torch
        >>> conv = nn.Conv2d(3, 8, 5)
        >>> tuple(as_matrix(torch.zeros_like(conv.weight), conv).shape)
        (8, 75)
    """
    if grad.ndim < 2:
        return None
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and not include_embeddings:
        return None
    if is_conv1d(module):
        return grad.mT
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        groups = module.groups
        # (in, out/g, k...) -> (g, in/g, out/g, k...) -> (g, out/g, in/g, k...) -> (out, in/g * k...)
        per_group = grad.reshape(groups, grad.shape[0] // groups, *grad.shape[1:]).transpose(1, 2)
        return per_group.flatten(0, 1).flatten(1)
    if grad.ndim == 2:
        return grad
    return grad.flatten(1)
