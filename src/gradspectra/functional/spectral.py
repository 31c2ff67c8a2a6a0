r"""Spectral metrics of one gradient matrix (or a batch of them), all from one decomposition.

For ``G`` of shape ``m x n`` with singular values :math:`s_1 \ge \dots \ge s_r`, ``r = min(m, n)``.
Conventions where a ratio would be 0/0 (the zero matrix): every metric is 0. A matrix with a
non-finite entry gives NaN for every spectral metric and ``inf``/``nan`` Frobenius norm; nothing
raises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradspectra.functional.svd import Method, _check_matrix, _scaled_float64, check_method, singular_values

METRIC_NAMES: tuple[str, ...] = (
    "nuclear_norm",
    "spectral_norm",
    "frobenius_norm",
    "stable_rank",
    "top_sv_ratio",
    "effective_rank",
    "participation_ratio",
)
# metrics computed from the entries alone: measured on every step, even when a spectrum is deferred
ENTRY_METRICS: frozenset[str] = frozenset({"frobenius_norm"})


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0`` (NaN still propagates from NaN inputs)."""
    out = num / torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den == 0, torch.zeros_like(out), out)


def _frobenius_fast(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``(norm, trusted)``: the one-read norm and whether its range check passed, without a host sync.

    Float32 (and bf16/fp16, upcast) entries: each row's norm in float32 (a cascaded sum: relative
    error ~1e-7 at these lengths), the rows combined in float64; no float64 copy of the matrix
    (measured 15x faster on CPU). Float32 squares overflow past ~1e19 and lose digits below ~1e-19
    (subnormal), so a row norm outside [1e-15, 1e15] (a zero row included) is not trusted; float64
    entries are not trusted when the norm leaves (1e-140, 1e140). NaN rows stay NaN (trusted).
    """
    if matrix.dtype != torch.float64:
        rows = torch.linalg.vector_norm(matrix if matrix.dtype == torch.float32 else matrix.float(), dim=-1)
        fro: Tensor = rows.to(torch.float64).square().sum(-1).sqrt()
        trusted = (((rows >= 1e-15) & (rows <= 1e15)) | torch.isnan(rows)).all(-1)
        return fro, trusted
    fro = torch.linalg.vector_norm(matrix, dim=(-2, -1))
    return fro, torch.isnan(fro) | ((fro > 1e-140) & (fro < 1e140))


def _frobenius_rescaled(matrix: Tensor) -> Tensor:
    """The norm from a copy rescaled by the largest entry: any magnitude; non-finite entries say what they are."""
    a, scale, finite = _scaled_float64(matrix)
    scaled = torch.linalg.vector_norm(a, dim=(-2, -1)) * scale
    raw = torch.linalg.vector_norm(matrix.to(torch.float64), dim=(-2, -1))  # inf or nan, as the entries say
    return torch.where(finite, scaled, raw)


def _frobenius_from_entries(matrix: Tensor) -> Tensor:
    """``sqrt(sum of squares)`` in one read of the entries (see :func:`_frobenius_fast`), float64."""
    fro, trusted = _frobenius_fast(matrix)
    if bool(trusted.all()):
        return fro
    return _frobenius_rescaled(matrix)


_STACK_LIMIT = 1 << 16  # entries: matrices at most this large are stacked by shape (a copy costs less than a call)


def _small_groups(matrices: Sequence[Tensor]) -> list[list[int]]:
    """Indices grouped by shape, dtype and device for small matrices; one group per large matrix."""
    groups: dict[tuple[object, ...], list[int]] = {}
    singles: list[list[int]] = []
    for i, m in enumerate(matrices):
        if m.numel() <= _STACK_LIMIT and m.layout == torch.strided:
            groups.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
        else:
            singles.append([i])
    return [*groups.values(), *singles]


def _untrusted(norms: Tensor) -> Tensor:
    """Which float32 fused norms may be inexact: outside float32's safe range of squares (NaN passes: it is data,
    and compares false)."""
    return (norms <= 1e-10) | (norms >= 1e15)


def _plain_float32(matrix: object, device: torch.device) -> bool:
    """A strided float32 matrix on ``device``: the fused norm's case (anything else takes the checked routes)."""
    return (
        isinstance(matrix, Tensor)
        and not matrix.requires_grad  # (as before: such a norm keeps its graph, on the checked routes)
        and matrix.dtype == torch.float32
        and matrix.ndim == 2
        and matrix.layout == torch.strided
        and matrix.device == device
    )


def frobenius_norm_values(matrices: Sequence[Tensor]) -> list[float]:
    """:func:`frobenius_norms` as the host's floats (the same values), for a caller that needs them there.

    On a fast CPU step the common case (float32 matrices on the CPU) reads each norm straight to a float: no
    stacked tensor, no copy of it; elsewhere it is :func:`frobenius_norms` copied to the host once.

    Example:
        >>> frobenius_norm_values([torch.eye(4), torch.diag(torch.tensor([3.0, 4.0]))])
        [2.0, 5.0]
    """
    values = _fused_cpu_values(matrices)
    if values is not None and _in_range(values):
        return values
    return frobenius_norms(matrices).tolist()  # type: ignore[no-any-return]


def _fused_cpu_values(matrices: Sequence[Tensor]) -> list[float] | None:
    """The fused norms as floats when every matrix is a plain float32 one on the CPU (else ``None``): one call,
    each norm read straight to a float (on a step of milliseconds a stacked tensor and its copy cost more)."""
    if not matrices or not hasattr(torch, "_foreach_norm") or not isinstance(matrices[0], Tensor):
        return None
    device = matrices[0].device
    if device.type != "cpu" or not all(_plain_float32(m, device) for m in matrices):
        return None
    return [t.item() for t in torch._foreach_norm(list(matrices))]


def _in_range(values: list[float]) -> bool:
    """Whether every fused float32 norm is trusted: inside float32's safe range of squares (NaN passes: it is
    data; see :func:`_untrusted`)."""
    return all(1e-10 < v < 1e15 or v != v for v in values)


def frobenius_norms(matrices: Sequence[Tensor]) -> Tensor:
    """Frobenius norms of matrices of mixed shapes, ``(len,)`` float64 on the first one's device.

    Each matrix is read once; one host sync for all of them decides which (rare: extreme
    magnitudes, zero rows) need the rescaled route.

    Example:
        >>> frobenius_norms([torch.eye(4), torch.diag(torch.tensor([3.0, 4.0]))]).tolist()
        [2.0, 5.0]
    """
    if not matrices:
        return torch.zeros(0, dtype=torch.float64)
    device = matrices[0].device if isinstance(matrices[0], Tensor) else None
    fused = hasattr(torch, "_foreach_norm")
    fused_norms: Tensor | None = None
    values = _fused_cpu_values(matrices)
    if values is not None:
        # the common case on the CPU: one fused call, the range check on the host's floats (exact)
        fused_norms = torch.tensor(values, dtype=torch.float64)
        if _in_range(values):
            return fused_norms
    elif fused and device is not None and device.type != "cpu" and all(_plain_float32(m, device) for m in matrices):
        # the same on another device: one fused call, one range check, one host sync
        fused_norms = torch.stack(torch._foreach_norm(list(matrices))).to(torch.float64)
        if not bool(_untrusted(fused_norms).any()):
            return fused_norms
    for m in matrices:
        _check_matrix(m)
    assert device is not None
    plain = [i for i, m in enumerate(matrices) if fused and m.dtype == torch.float32 and m.device == device]
    out = torch.empty(len(matrices), dtype=torch.float64, device=device)
    trusted = torch.empty(len(matrices), dtype=torch.bool, device=device)
    if plain:
        # float32 matrices in one fused call (what torch's clip_grad_norm_ uses); trusted only well inside
        # float32's range of squares, the rest take the per-matrix routes below
        if fused_norms is not None:  # (every matrix was plain: the fused norms read above, in order)
            norms = fused_norms
        else:
            norms = torch.stack(list(torch._foreach_norm([matrices[i] for i in plain]))).to(torch.float64)
        ok = ~_untrusted(norms)
        if len(plain) == len(matrices) and bool(ok.all()):
            return norms  # the common case: every matrix float32 on one device, every norm trusted
        out[plain] = norms
        trusted[plain] = ok
    done = set(plain)
    rest = [i for i in range(len(matrices)) if i not in done]
    for group in _small_groups([matrices[i] for i in rest]):
        idx = [rest[k] for k in group]
        # small same-shaped matrices in one call: on a small model the per-call cost is most of the time
        batch = matrices[idx[0]][None] if len(idx) == 1 else torch.stack([matrices[i] for i in idx])
        fro, ok = _frobenius_fast(batch)
        out[idx] = fro.to(device)
        trusted[idx] = ok.to(device)
    if not bool(trusted.all()):
        for i in (~trusted).nonzero().flatten().tolist():
            out[i] = _frobenius_rescaled(matrices[i]).to(device)
    return out


def _nuclear(s: Tensor) -> Tensor:
    return s.sum(-1)


def _spectral(s: Tensor) -> Tensor:
    return s[..., 0] if s.shape[-1] > 0 else s.sum(-1)


def _stable_rank(s: Tensor, fro: Tensor) -> Tensor:
    # computed on s / s_1 so the squares cannot overflow or underflow
    return _safe_div(fro, _spectral(s)) ** 2


def _top_sv_ratio(s: Tensor) -> Tensor:
    return _safe_div(_spectral(s), _nuclear(s))


def _effective_rank(s: Tensor) -> Tensor:
    total = _nuclear(s)
    p = _safe_div(s, total[..., None])
    entropy = -torch.special.xlogy(p, p).sum(-1)  # xlogy(0, 0) == 0: zero terms dropped
    return torch.where(total == 0, torch.zeros_like(total), torch.exp(entropy))


def _participation_ratio(s: Tensor) -> Tensor:
    # on s / s_1, so that the fourth powers cannot overflow or underflow
    r = _safe_div(s, _spectral(s)[..., None])
    return _safe_div(r.square().sum(-1).square(), r.pow(4).sum(-1))


def participation_ratio(matrix: Tensor, method: Method = "auto") -> Tensor:
    r"""Participation ratio :math:`(\sum_i s_i^2)^2 / \sum_i s_i^4 = \|G\|_F^4 / \|G^\top G\|_F^2`, float64.

    The effective number of directions weighted by energy (:math:`s^2`): a Renyi-2 effective rank of
    :math:`s_i^2 / \sum s^2`, in ``[1, rank]`` (0 for the zero matrix). It needs no decomposition
    (:math:`\sum s^4` is the squared Frobenius norm of the Gram matrix), which makes it cheap to
    estimate; the papers' :func:`effective_rank` weighs singular values by :math:`s`, not :math:`s^2`, and
    so counts the small ones (the tail) far more.
    """
    return _participation_ratio(singular_values(matrix, method))


def nuclear_norm(matrix: Tensor, method: Method = "auto") -> Tensor:
    r"""Nuclear norm :math:`\sum_i s_i` (paper 1's ``S_sum``), float64, shape ``matrix.shape[:-2]``.

    Example:
        >>> nuclear_norm(torch.diag(torch.tensor([3.0, 4.0]))).item()
        7.0
    """
    return _nuclear(singular_values(matrix, method))


def spectral_norm(matrix: Tensor, method: Method = "auto") -> Tensor:
    r"""Spectral norm :math:`s_1`, float64.

    Example:
        >>> spectral_norm(torch.diag(torch.tensor([3.0, 4.0]))).item()
        4.0
    """
    return _spectral(singular_values(matrix, method))


def frobenius_norm(matrix: Tensor) -> Tensor:
    r"""Frobenius norm :math:`\sqrt{\sum_i s_i^2}`, exact from the entries (no decomposition).

    Example:
        >>> frobenius_norm(torch.diag(torch.tensor([3.0, 4.0]))).item()
        5.0
    """
    _check_matrix(matrix)
    return _frobenius_from_entries(matrix)


def stable_rank(matrix: Tensor, method: Method = "auto") -> Tensor:
    r"""Stable rank :math:`\sum_i s_i^2 / s_1^2`, in ``[1, r]``; 0 for the zero matrix.

    Example:
        >>> stable_rank(torch.diag(torch.tensor([3.0, 4.0]))).item()
        1.5625
    """
    return _stable_rank(singular_values(matrix, method), frobenius_norm(matrix))


def top_sv_ratio(matrix: Tensor, method: Method = "auto") -> Tensor:
    r"""Share of the largest singular value :math:`s_1 / \sum_i s_i` (paper 1's ``S_ratio``), in ``[1/r, 1]``.

    Example:
        >>> top_sv_ratio(torch.diag(torch.tensor([1.0, 3.0]))).item()
        0.75
    """
    return _top_sv_ratio(singular_values(matrix, method))


def effective_rank(matrix: Tensor, method: Method = "auto") -> Tensor:
    r"""Effective rank (Roy & Vetterli 2007), as paper 2 computes it.

    .. math:: p_i = s_i / \sum_j s_j, \qquad \operatorname{erank} = \exp\Big(-\sum_{p_i > 0} p_i \ln p_i\Big)

    In ``[1, r]``; 0 for the zero matrix.

    Example:
        >>> round(effective_rank(torch.eye(4)).item(), 12)
        4.0
    """
    return _effective_rank(singular_values(matrix, method))


def metrics_from_singular_values(
    s: Tensor, frobenius: Tensor | None = None, metrics: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Every requested metric from already computed singular values ``s`` (``(..., r)``, descending).

    ``frobenius`` (from the entries) is used when given, else ``sqrt(sum s_i^2)``.
    """
    names = check_metric_names(metrics)
    s = s.to(torch.float64)
    if frobenius is None:
        top = _spectral(s)
        frobenius = top * torch.linalg.vector_norm(_safe_div(s, top[..., None]), dim=-1)
    out: dict[str, Tensor] = {}
    for name in names:
        if name == "nuclear_norm":
            out[name] = _nuclear(s)
        elif name == "spectral_norm":
            out[name] = _spectral(s)
        elif name == "frobenius_norm":
            out[name] = frobenius
        elif name == "stable_rank":
            out[name] = _stable_rank(s, frobenius)
        elif name == "top_sv_ratio":
            out[name] = _top_sv_ratio(s)
        elif name == "participation_ratio":
            out[name] = _participation_ratio(s)
        else:
            out[name] = _effective_rank(s)
    # a non-finite matrix gives non-finite metrics, whatever the ratio conventions say
    nonfinite = ~torch.isfinite(s).all(-1)
    if bool(nonfinite.any()):
        for name in names:
            if name not in ENTRY_METRICS:
                out[name] = torch.where(nonfinite, torch.full_like(out[name], float("nan")), out[name])
    return out


def check_metric_names(metrics: Sequence[str] | None) -> tuple[str, ...]:
    """``metrics`` as a tuple (``None``: all of :data:`METRIC_NAMES`), or a ``ValueError`` naming the unknown ones."""
    if metrics is None:
        return METRIC_NAMES
    if isinstance(metrics, str):
        metrics = (metrics,)
    names = tuple(metrics)
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown or not names:
        raise ValueError(f"`metrics` can be any of {', '.join(METRIC_NAMES)}, got {list(names)!r}")
    return names


def needs_spectrum(metrics: Sequence[str] | None) -> bool:
    """Whether any of ``metrics`` needs singular values (only ``frobenius_norm`` does not)."""
    return any(m not in ENTRY_METRICS for m in check_metric_names(metrics))


def spectral_metrics(
    matrix: Tensor, metrics: Sequence[str] | None = None, method: Method = "auto"
) -> dict[str, Tensor]:
    """Every requested metric of ``matrix`` (``(..., m, n)``) from one decomposition.

    Args:
        matrix: real tensor ``(..., m, n)``; leading dimensions are a batch of matrices.
        metrics: names from :data:`METRIC_NAMES`; ``None`` means all.
        method: singular value route, see :func:`singular_values`.

    Returns:
        ``{name: float64 tensor of shape matrix.shape[:-2]}``.

    Raises:
        TypeError: if ``matrix`` is not a real floating point tensor.
        ValueError: for an unknown metric name or ``method``, or ``matrix`` with fewer than 2 dimensions.

    Example:
        >>> out = spectral_metrics(torch.diag(torch.tensor([4.0, 3.0])))
        >>> {k: round(v.item(), 4) for k, v in out.items() if k in ("nuclear_norm", "spectral_norm", "stable_rank")}
        {'nuclear_norm': 7.0, 'spectral_norm': 4.0, 'stable_rank': 1.5625}
        >>> round(out["participation_ratio"].item(), 4)  # 25^2 / (4^4 + 3^4)
        1.8546
        >>> round(out["top_sv_ratio"].item(), 4)
        0.5714
    """
    names = check_metric_names(metrics)
    _check_matrix(matrix)
    # checked here too: a Frobenius-only request never reaches singular_values
    check_method(method)
    fro = _frobenius_from_entries(matrix)
    if not needs_spectrum(names):
        return {"frobenius_norm": fro}
    s = singular_values(matrix, method)
    return metrics_from_singular_values(s, fro, names)
