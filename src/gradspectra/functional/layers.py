r"""Statistics across layers: how uneven a per-layer curve is, and how alike adjacent layers' gradients are."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Depth segments used by paper 1 ("fast vs slow thinking") for the model sizes it studies.
_PAPER_SEGMENTS: dict[int, tuple[tuple[int, int], ...]] = {
    26: ((0, 7), (7, 20), (20, 26)),
    28: ((0, 7), (7, 21), (21, 28)),
    32: ((0, 10), (10, 20), (20, 32)),
    42: ((0, 12), (12, 30), (30, 42)),
}


def paper_segments(num_layers: int) -> tuple[tuple[int, int], ...]:
    """Early / middle / late depth segments as ``(start, stop)`` pairs.

    The exact splits of paper 1 for 26, 28, 32 and 42 layers; otherwise thirds (rounded).

    Example:
        >>> paper_segments(32)
        ((0, 10), (10, 20), (20, 32))
        >>> paper_segments(12)
        ((0, 4), (4, 8), (8, 12))
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"`num_layers` must be a positive int, got {num_layers!r}")
    if num_layers in _PAPER_SEGMENTS:
        return _PAPER_SEGMENTS[num_layers]
    a, b = round(num_layers / 3), round(2 * num_layers / 3)
    return ((0, a), (a, b), (b, num_layers))


def layer_mad(values: Tensor | Sequence[float], segments: Sequence[tuple[int, int]] | None = None) -> Tensor:
    r"""Mean absolute difference between adjacent layers (paper 1's MAD).

    .. math:: \operatorname{MAD}(x) = \frac{1}{L - 1} \sum_{i=0}^{L-2} |x_{i+1} - x_i|

    Args:
        values: per-layer curve, shape ``(..., L)`` (layer index last).
        segments: optional ``(start, stop)`` layer ranges; the MAD is then taken inside each.

    Returns:
        float64, shape ``values.shape[:-1]`` without ``segments``, else ``(..., len(segments))``.
        A curve (or segment) of fewer than two layers has MAD 0; NaN values propagate.

    Example:
        >>> layer_mad(torch.tensor([1.0, 3.0, 2.0])).item()
        1.5
        >>> layer_mad(torch.tensor([1.0, 3.0, 2.0, 6.0]), segments=[(0, 2), (2, 4)]).tolist()
        [2.0, 4.0]
    """
    # a list of Python floats must not pass through float32 (torch's default dtype) on its way to float64
    x = values.to(torch.float64) if isinstance(values, Tensor) else torch.as_tensor(values, dtype=torch.float64)
    if x.ndim == 0:
        raise ValueError(f"`values` must have a layer dimension, got a scalar {x.item()!r}")
    if segments is None:
        return _mad(x)
    length = x.shape[-1]
    outs = []
    for seg in segments:
        if len(seg) != 2:
            raise ValueError(f"`segments` entries must be (start, stop) pairs, got {seg!r}")
        start, stop = seg
        if not (0 <= start <= stop <= length):
            raise ValueError(f"`segments` entries must satisfy 0 <= start <= stop <= {length}, got {seg!r}")
        outs.append(_mad(x[..., start:stop]))
    return torch.stack(outs, -1) if outs else x.new_zeros((*x.shape[:-1], 0))


def _mad(x: Tensor) -> Tensor:
    if x.shape[-1] < 2:
        return x.new_zeros(x.shape[:-1])
    return (x[..., 1:] - x[..., :-1]).abs().mean(-1)


def adjacent_cosine(grads: Tensor | Sequence[Tensor]) -> Tensor:
    r"""Cosine similarity of one component's gradient between adjacent layers (paper 2).

    .. math:: c_i = \frac{\langle \operatorname{vec} G_i, \operatorname{vec} G_{i+1} \rangle}{\|G_i\|_F \|G_{i+1}\|_F}

    Args:
        grads: ``L`` same-shaped gradients, as a sequence or stacked ``(L, ...)``.

    Returns:
        float64 tensor of shape ``(L - 1,)``; 0 where either gradient is zero.

    Example:
        >>> adjacent_cosine([torch.ones(2, 2), torch.ones(2, 2), -torch.ones(2, 2)]).tolist()
        [1.0, -1.0]
    """
    if not isinstance(grads, Tensor):
        grads = list(grads)
        if not all(isinstance(g, Tensor) for g in grads):
            raise TypeError(f"`grads` must hold torch.Tensor gradients, got {[type(g).__name__ for g in grads]}")
        shapes = {tuple(g.shape) for g in grads}
        if len(shapes) > 1:
            raise ValueError(f"`grads` must all have the same shape, got shapes {sorted(shapes)}")
        if not grads:
            raise ValueError("`grads` must hold at least one gradient, got an empty sequence")
        grads = torch.stack([g.detach() for g in grads])
    if grads.ndim == 0:
        raise ValueError("`grads` must be stacked (L, ...) with a layer dimension, got a scalar")
    # reshape, not flatten(1): a stack of scalar gradients (L,) is valid too
    flat = grads.to(torch.float64).reshape(grads.shape[0], -1)
    # normalise first so the dot products cannot overflow or underflow
    scale = flat.abs().amax(-1, keepdim=True)
    flat = flat / torch.where(scale > 0, scale, torch.ones_like(scale))
    norms = torch.linalg.vector_norm(flat, dim=-1)
    dots = (flat[1:] * flat[:-1]).sum(-1)
    den = norms[1:] * norms[:-1]
    return torch.where(den == 0, torch.zeros_like(dots), dots / torch.where(den == 0, torch.ones_like(den), den))
