r"""Per-sample gradient spectra of a linear layer from its factors, without forming any gradient.

The weight gradient of sample :math:`i` is :math:`G_i = \Delta_i^\top X_i`: its output gradients
:math:`\Delta_i` (``T_i x m``) and inputs :math:`X_i` (``T_i x n``), one row per token. Its nonzero
singular values are those of a ``T_i x T_i`` core (:func:`gradspectra.functional.factored_singular_values`),
so a whole batch's per-sample spectra cost :math:`O(B\,T^2 (m + n) + B\,T^3)` from tensors the forward
and backward already made, where the papers' method runs one backward and one ``m x n`` SVD per sample.
Inner products between samples' gradients come the same way,
:math:`\langle G_i, G_j \rangle_F = \sum_{t \in i, u \in j} (\delta_t \cdot \delta_u)(x_t \cdot x_u)`
(the Frobenius case is the "ghost norm" of differentially private training).

Tokens whose output gradient is zero (padding; in a causal LM, tokens after the last one in the loss; in the
top layers, tokens no loss position reads) change nothing: their
rows are dropped from the spectrum by zeroing them (a zero row adds only zero singular values).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradspectra.functional.spectral import check_metric_names, metrics_from_singular_values
from gradspectra.functional.svd import _check_matrix, factored_singular_values


def sample_rows(tensor: Tensor, name: str) -> Tensor:
    """``tensor`` as ``(B, T, features)``: dimension 0 is the sample, the middle ones are its tokens.

    A 2-D input ``(B, features)`` is one token per sample; ``(B, H, W, features)`` has ``H * W`` tokens.
    """
    _check_matrix(tensor, name)
    if tensor.ndim == 2:
        return tensor[:, None, :]
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])


def _check_pair(delta: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
    d = sample_rows(delta, "delta")
    x = sample_rows(inputs, "inputs")
    if d.shape[:2] != x.shape[:2]:
        raise ValueError(
            "`delta` and `inputs` must have the same samples and tokens, got shapes "
            f"{tuple(delta.shape)} and {tuple(inputs.shape)}"
        )
    return d, x


def carrying_tokens(delta: Tensor) -> Tensor:
    """``(B, T)`` bool: the tokens of each sample whose output gradient is not zero (NaN counts as carrying)."""
    d = sample_rows(delta, "delta")
    return ~(d == 0).all(-1)


def per_sample_singular_values(delta: Tensor, inputs: Tensor) -> Tensor:
    r"""Singular values of every sample's gradient :math:`G_i = \Delta_i^\top X_i`, exact, in float64.

    Args:
        delta: output gradients, ``(B, T, m)`` (or ``(B, m)``, or ``(B, ..., m)``), sample first.
        inputs: the layer's inputs, same leading shape, ``(..., n)``.

    Returns:
        ``(B, min(m, n))`` float64, descending, zero past each sample's rank; a row of NaN for a
        sample whose factors hold NaN or Inf.

    Example:
        >>> d, x = torch.randn(3, 5, 6), torch.randn(3, 5, 4)
        >>> s = per_sample_singular_values(d, x)
        >>> ref = torch.linalg.svdvals(torch.einsum("btm,btn->bmn", d.double(), x.double()))
        >>> bool(torch.allclose(s, ref))
        True
    """
    d, x = _check_pair(delta, inputs)
    return factored_singular_values(*compact_tokens(d, x))


def compact_tokens(delta: Tensor, inputs: Tensor, carries: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(B, T', .)`` factors with each sample's carrying tokens first and ``T'`` their largest count.

    The ``T x T`` cores cost :math:`O(T^2)` per feature: padding to a fixed length would be paid for in every
    layer. (Prompt tokens do carry gradient below the last layer: the loss positions attend to them.) The
    spectrum is unchanged (only zero rows are dropped).
    ``carries``: :func:`carrying_tokens` of ``delta`` when the caller has it already.
    """
    if carries is None:
        carries = carrying_tokens(delta)
    t = delta.shape[1]
    keep = int(carries.sum(1).max()) if carries.numel() else 0
    if keep >= t:
        return delta, inputs
    keep = max(keep, 1)
    # a stable sort of "does not carry" puts each sample's carrying tokens first, in their order
    order = torch.sort((~carries).to(torch.uint8), dim=1, stable=True).indices[:, :keep]
    d = torch.gather(delta, 1, order[..., None].expand(-1, -1, delta.shape[-1]))
    x = torch.gather(inputs, 1, order[..., None].expand(-1, -1, inputs.shape[-1]))
    # rows kept only to fill a shorter sample's T' carry no gradient: zero their inputs too
    return d, torch.where(torch.gather(carries, 1, order)[..., None], x, torch.zeros((), dtype=x.dtype))


def per_sample_metrics(delta: Tensor, inputs: Tensor, metrics: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Every requested metric of every sample's gradient (``{name: (B,) float64}``), from one ``T x T`` core each.

    Same definitions as :func:`gradspectra.functional.spectral_metrics` (a zero gradient: nuclear norm 0,
    effective rank 0; a non-finite one: NaN).
    """
    names = check_metric_names(metrics)
    s = per_sample_singular_values(delta, inputs)
    return metrics_from_singular_values(s, None, names)


def per_sample_inner_products(delta: Tensor, inputs: Tensor) -> Tensor:
    r"""The ``(B, B)`` Gram matrix :math:`\langle G_i, G_j \rangle_F` of the samples' gradients, float64.

    Computed as :math:`\sum_{t \in i,\, u \in j} (\Delta \Delta^\top)_{tu} (X X^\top)_{tu}` over the tokens
    that carry gradient: :math:`O((B T)^2 (m + n))`, no gradient formed. The diagonal is each sample's
    squared Frobenius norm.

    Example:
        >>> d, x = torch.randn(3, 4, 5), torch.randn(3, 4, 6)
        >>> g = torch.einsum("btm,btn->bmn", d.double(), x.double()).flatten(1)
        >>> bool(torch.allclose(per_sample_inner_products(d, x), g @ g.T))
        True
    """
    d, x = _check_pair(delta, inputs)
    b, t = d.shape[:2]
    keep = carrying_tokens(d).flatten()
    d = d.reshape(b * t, -1)[keep].to(torch.float64)
    x = x.reshape(b * t, -1)[keep].to(torch.float64)
    owner = torch.arange(b, device=d.device).repeat_interleave(t)[keep]
    # scale each factor to unit max so that products of huge or tiny entries stay representable
    sd = d.abs().amax().clamp_min(torch.finfo(torch.float64).tiny) if d.numel() else d.new_ones(())
    sx = x.abs().amax().clamp_min(torch.finfo(torch.float64).tiny) if x.numel() else x.new_ones(())
    pair = ((d / sd) @ (d / sd).mT) * ((x / sx) @ (x / sx).mT)
    one_hot = torch.zeros(b, owner.shape[0], dtype=torch.float64, device=d.device)
    one_hot[owner, torch.arange(owner.shape[0], device=d.device)] = 1.0
    return (one_hot @ pair @ one_hot.mT) * (sd * sx) ** 2


def sketch_projections(m: int, n: int, size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The Gaussian ``(m, size)`` and ``(n, size)`` projections of :func:`per_sample_sketches`, variance ``1 / size``,
    float64, drawn from ``seed`` (the same for the same arguments)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"`size` must be a positive int, got {size!r}")
    gen = torch.Generator().manual_seed(seed)
    psi = torch.randn(m, size, generator=gen, dtype=torch.float64) / size**0.5
    omega = torch.randn(n, size, generator=gen, dtype=torch.float64) / size**0.5
    return psi, omega


def per_sample_sketches(delta: Tensor, inputs: Tensor, projections: tuple[Tensor, Tensor]) -> Tensor:
    r"""A random sketch :math:`S_i = \Psi^\top G_i \Omega` of every sample's gradient, flattened.

    With the Gaussian projections of :func:`sketch_projections` (fixed: sketches of different steps are
    comparable), :math:`E \langle S_i, S_j \rangle = \langle G_i, G_j \rangle`. It costs
    :math:`O(B T (m + n)\,size)` from the factors, about ``B`` times less than the exact inner products,
    and two identical gradients have identical sketches (cosine exactly 1).

    Returns:
        ``(B, size * size)`` float64 (computed in float32 unless a factor is float64).
    """
    d, x = _check_pair(delta, inputs)
    psi, omega = projections
    if psi.shape[0] != d.shape[-1] or omega.shape[0] != x.shape[-1]:
        raise ValueError(
            f"`projections` must be ({d.shape[-1]}, k) and ({x.shape[-1]}, k), "
            f"got {tuple(psi.shape)} and {tuple(omega.shape)}"
        )
    # float32 products unless the factors are float64: a sketch is an estimate to start with, and two
    # identical gradients still give identical sketches
    dtype = torch.float64 if torch.float64 in (d.dtype, x.dtype) else torch.float32
    left = d.to(dtype) @ psi.to(d.device, dtype)  # (B, T, size)
    right = x.to(dtype) @ omega.to(x.device, dtype)
    return (left.mT @ right).flatten(1).to(torch.float64)


def per_sample_token_similarity(inputs: Tensor, carries: Tensor) -> Tensor:
    """``(B, B)`` token-by-token similarity of the samples' inputs to a layer, in ``[-1, 1]``, float64.

    Each token's input, less the batch's mean input at that position (the position's common part), is
    scaled to unit length; samples ``i`` and ``j`` score the sum over positions both carry of the cosines,
    over the larger of their token counts. Two copies of one text score about 1 whatever the dropout (most
    entries of each token survive), two texts that share only a template score low, and texts of
    different lengths are penalised by the length ratio.

    Args:
        inputs: ``(B, T, n)`` inputs of one layer, sample first.
        carries: ``(B, T)`` bool, the tokens that carry gradient (:func:`carrying_tokens`).
    """
    x = sample_rows(inputs, "inputs").to(torch.float64)
    if carries.shape != x.shape[:2]:
        raise ValueError(f"`carries` must have shape {tuple(x.shape[:2])}, got {tuple(carries.shape)}")
    mask = carries.to(torch.float64)[..., None]
    count = mask.sum(0).clamp_min(1.0)
    centred = (x - (x * mask).sum(0) / count) * mask
    unit = centred / centred.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    # (T, B, n) @ (T, n, B): the cosines at each position, summed over positions
    total = (unit.transpose(0, 1) @ unit.permute(1, 2, 0)).sum(0)
    lengths = carries.sum(1).to(torch.float64)
    longer = torch.maximum(lengths[:, None], lengths[None, :]).clamp_min(1.0)
    out: Tensor = total / longer
    return out


def per_sample_cosines(delta: Tensor, inputs: Tensor) -> Tensor:
    """``(B, B)`` cosine similarities of the samples' gradients (0 where either gradient is zero), float64."""
    gram = per_sample_inner_products(delta, inputs)
    norms = gram.diagonal().clamp_min(0).sqrt()
    den = norms[:, None] * norms[None, :]
    return torch.where(den > 0, gram / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(gram))
