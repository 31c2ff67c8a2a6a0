r"""Bounded-error estimates of the spectral metrics, for matrices too large to decompose every step.

Deflated stochastic Lanczos quadrature (SLQ) on a gradient matrix ``G`` (``m x n``) with singular
values :math:`s_1 \ge \dots \ge s_r`:

1. **Top.** A randomized range finder (subspace iteration, warm-startable from the previous step's
   basis) gives an orthonormal ``V`` (``n x k``); Rayleigh-Ritz gives the top values exactly for
   that subspace: the singular values :math:`\sigma_i` of :math:`G V`. The last iteration passes
   through ``Q = orth(G V_prev)`` and sets ``V = orth(G^T Q)``, so that the tail below has no part
   in span ``Q``: the split of ``G`` into ``G V`` and the tail is then only second order inexact.
2. **Tail.** :math:`Y = G (I - V V^\top)`: the traces :math:`\sum_j f(t_j)` over its singular
   values for :math:`f_1(t) = t` and :math:`f_2(t) = t \ln t`, by Hutchinson's estimator with
   Rademacher probes and Lanczos quadrature (Golub-Kahan bidiagonalisation, fully
   reorthogonalised). Gauss quadrature overestimates :math:`\sum t_j` and Gauss-Radau with a node
   at 0 underestimates it (Golub & Meurant): the estimate is their midpoint.
3. **Metrics.** :math:`S = \sum_i \sigma_i + \sum_j t_j` (nuclear norm),
   :math:`\operatorname{erank} = \exp(\ln S - \frac{1}{S}(\sum_i \sigma_i \ln \sigma_i +
   \sum_j t_j \ln t_j))`, spectral norm :math:`\sigma_1`, stable rank
   :math:`\|G\|_F^2 / \sigma_1^2` with the Frobenius norm exact from the entries, top share
   :math:`\sigma_1 / S`, participation ratio :math:`\|G\|_F^4 / (\sum_i \sigma_i^4 + \sum_j t_j^4)`
   (the tail's :math:`\sum t^4` by the same quadrature of :math:`\lambda^2`, exact for a polynomial of
   degree 2 in the eigenvalues; its error adds the split's bias on the top's fourth powers).

``rel_error`` adds, per value: the Hutchinson standard error (for the effective rank by the delta
method on :math:`H = \ln S - T / S`), half the Gauss / Gauss-Radau bracket, a bound on the split's
bias (:math:`\tfrac12 t_1 \sum_i \sin^2\theta_i`, :math:`\theta_i` the angle between the i-th
left Ritz vector and span ``Q``; weighted by :math:`1 + \ln(S / \operatorname{erank} / t_1)`
for the effective rank, whose bias it mostly is) and the rounding of the work precision.

Why the defaults (``rank=96, power_iters=2, probes=8, lanczos_steps=12``), measured on fine-tuning
gradients of MiniLM-L6 (``benchmarks/accuracy.py``): those gradients have a long tail of small
singular values and a null space (their rank is bounded by the tokens), where the quadrature of
:math:`\sqrt\lambda` converges only like ``1 / lanczos_steps``. That bias, not the probe variance,
dominates (48 probes instead of 8 barely change the errors), so deflating more of the top pays
most: with ``rank=32, power_iters=1`` the median errors are 2-3% (nuclear norm) and 7-9%
(effective rank), with the defaults 0.3% and 1.5-2%. One power iteration leaves a split bias of
~0.5% on the nuclear norm; two make it negligible. A warm start recovers a third to a half of a
missing power iteration on 384 x 384 and 1536 x 384 gradients (hardly any on 384 x 1536):
consecutive batches share only part of their top subspace. Broad spectra (effective rank in the
thousands) need more: on 4096 x 4096 synthetic matrices (a 1/i spectrum; a product of two random
factors over 2048 tokens) the defaults give ~2% and ~11%, and ``rel_error`` says so;
``rank=128, lanczos_steps=48`` give ~0.8% and ~3% on the second (1.9 s, exact: 23 s).

Cost: ``2 * power_iters + 1`` products with ``k`` columns and ``2 * lanczos_steps`` with ``probes``
columns, plus QR factorisations of ``n x k`` / ``m x k``: linear in ``m * n``, where an exact SVD
costs ``m * n * min(m, n)``. On one CPU thread it is ~33x faster than float64 ``svdvals`` at 4096 x
4096 (0.8 s against 26 s) but only 1.6-1.8x at 384 x 384 and 1536 x 384: below ``min(m, n)`` of
about 500 the exact route is the better choice. Matrices with ``min(m, n) <= rank`` are computed
exactly (no tail), up to float32 rounding, at about 2-3x the cost of the exact route.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradspectra.functional.rounds import Started, sum_in_rounds
from gradspectra.functional.spectral import _safe_div, check_metric_names
from gradspectra.functional.svd import _check_matrix

if TYPE_CHECKING:
    from gradspectra.functional.sketch import MatrixBlock

# Matrices of one shape are stacked this many at a time, and at most _MAX_STACK_BYTES of them (one
# matrix at least): a bounded extra copy, and batched matmuls.
_MAX_BATCH = 8
_MAX_STACK_BYTES = 1 << 28


@dataclass(frozen=True)
class SpectralEstimate:
    """Result of :func:`estimate_spectral_metrics_many`.

    Attributes:
        values: float64 ``(len(matrices), len(metrics))`` on the first matrix's device, metrics in
            the order asked for.
        rel_error: same shape: the estimated relative error of each value (about one standard
            error plus the deterministic error bounds; 0.0 for values computed exactly, such as
            ``frobenius_norm``; NaN where the value is NaN).
        bases: per matrix, an orthonormal basis ``(n, k)`` of the estimated top right singular
            subspace (``k = min(rank, m, n)``); pass the list as ``warm_start`` on the next call.
    """

    values: Tensor
    rel_error: Tensor
    bases: list[Tensor]


@dataclass(frozen=True)
class _Options:
    rank: int
    power_iters: int
    probes: int
    lanczos_steps: int


def _options(rank: int, power_iters: int, probes: int, lanczos_steps: int) -> _Options:
    return _Options(
        rank=_check_positive(rank, "rank", 1),
        power_iters=_check_positive(power_iters, "power_iters", 1),
        probes=_check_positive(probes, "probes", 2),
        lanczos_steps=_check_positive(lanczos_steps, "lanczos_steps", 1),
    )


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # half precision is never computed in: bf16/fp16 (and fp32) work in fp32, fp64 stays fp64
    return torch.float64 if dtype == torch.float64 else torch.float32


def _orth(y: Tensor) -> Tensor:
    q: Tensor = torch.linalg.qr(y).Q
    return q


def _check_positive(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


#: One product the estimator asks for, ``(kind, x)``: ``kind`` is ``"a@x"``, ``"aT@x"``, ``"x@a"`` or ``"x@aT"``
#: for the stacked (scaled) matrices ``a`` (``(b, m, n)``); whoever answers it (the matrices themselves, or
#: processes holding blocks of them) gives the same values.
Product = tuple[str, Tensor]


def _answer(a: Tensor, kind: str, x: Tensor) -> Tensor:
    """A :data:`Product` computed with the whole stack ``a``."""
    if kind == "a@x":
        return a @ x
    if kind == "aT@x":
        return a.mT @ x
    if kind == "x@a":
        return x @ a
    return x @ a.mT


def _range_finder(omega: Tensor, power_iters: int) -> Generator[Product, Tensor, tuple[Tensor, Tensor]]:
    r"""Orthonormal bases ``V`` (``(b, n, k)``) of the estimated top right singular subspace and ``Q`` (``(b, m, k)``).

    Subspace iteration :math:`V \leftarrow \operatorname{orth}(a^\top a V)`, one QR per iteration
    (squaring the condition of ``a V`` loses nothing that matters in float32: directions below
    ``sqrt(eps) s_1`` are tail anyway), the last one through ``Q = orth(a V_prev)``: then
    :math:`Q^\top a (I - V V^\top) = 0`, so the tail has no part in span ``Q``.
    """
    v = omega
    for _ in range(power_iters - 1):
        av = yield ("a@x", v)
        v = _orth((yield ("aT@x", av)))
    q = _orth((yield ("a@x", v)))
    return _orth((yield ("aT@x", q))), q


@dataclass
class _Tail:
    """Per probe ``(b, p)`` float64: Gauss and Gauss-Radau values of ``z^T f(A_t) z`` for both functions."""

    gauss1: Tensor
    radau1: Tensor
    gauss2: Tensor
    radau2: Tensor
    lam_max: Tensor  # (b,) largest Ritz value seen: about the tail's top eigenvalue (a lower bound)
    square: Tensor  # (b, p) Gauss value of z^T A_t^2 z (exact for two or more steps: a polynomial of degree 2)


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``x`` normalised (zero rows stay zero) and their norms."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    nonzero = norm > 0
    return torch.where(nonzero, x / torch.where(nonzero, norm, torch.ones_like(norm)), torch.zeros_like(x)), norm


def _reorth(x: Tensor, basis: Tensor, history: Tensor) -> Tensor:
    """``x`` (rows ``(b, p, dim)``) made orthogonal to the columns of ``basis`` and to each probe's earlier vectors.

    The history (``(b, p, j, dim)``) is done elementwise: faster than ``b * p`` tiny batched matmuls.
    """
    x = x - (x @ basis) @ basis.mT
    if history.shape[2] > 0:
        x = x - ((history * x[:, :, None, :]).sum(-1)[..., None] * history).sum(-2)
    return x


def _tail_quadrature(
    shape: tuple[int, int, int], v: Tensor, q_left: Tensor, z: Tensor, steps: int
) -> Generator[Product, Tensor, _Tail]:
    r"""Stochastic Lanczos quadrature of :math:`z^\top f(Y^\top Y) z` for every probe ``z`` (rows of ``(b, p, d)``).

    The tail is :math:`Y = (I - Q Q^\top) a (I - V V^\top)`, taken from its smaller side ``d``
    (:math:`Y^\top Y` for ``m >= n``, :math:`Y Y^\top` otherwise: the same nonzero eigenvalues).
    The Lanczos tridiagonal comes from Golub-Kahan bidiagonalisation, :math:`T = B^\top B` formed in
    float64: each float32 product is then accurate to about ``eps * s_1`` on singular values, where
    float32 products with :math:`a^\top a` would bury any tail below ``sqrt(eps) * s_1`` in rounding.
    Both sequences are fully reorthogonalised, and projected against ``V`` and ``Q`` on their
    sides at every step: with ``V = orth(a^T Q)``, :math:`Q^\top a (I - V V^\top) = 0` in exact
    arithmetic, but a tail far below ``s_1`` needs both projections, or rounding along the top
    directions, amplified by ``s_1`` at each product, swamps it.
    """
    b, m, n = shape
    p = z.shape[1]
    f64 = torch.float64
    tall = m >= n
    # the small side holds the probes: kept out of span V (tall) or span Q (wide: the null space of
    # Y Y^T, so the quadrature sees fewer zero eigenvalues)
    side, other = (v, q_left) if tall else (q_left, v)
    big = m if tall else n

    out = "x@aT" if tall else "x@a"  # small side -> other side
    back = "x@a" if tall else "x@aT"  # other side -> small side
    x = z - (z @ side) @ side.mT
    norm2 = x.to(f64).pow(2).sum(-1)
    x, _ = _unit(x)
    xs = x.new_zeros((b, p, steps, x.shape[-1]))
    ys = x.new_zeros((b, p, steps, big))
    alpha = norm2.new_zeros((b, p, steps))
    beta = norm2.new_zeros((b, p, steps))
    y_prev = x.new_zeros((b, p, big))
    beta_prev = x.new_zeros((b, p, 1))
    for j in range(steps):
        xs[:, :, j] = x
        y, a_j = _unit(_reorth((yield (out, x)) - beta_prev * y_prev, other, ys[:, :, :j]))
        ys[:, :, j] = y
        x, b_j = _unit(_reorth((yield (back, y)) - a_j * x, side, xs[:, :, : j + 1]))
        alpha[..., j] = a_j[..., 0].to(f64)
        beta[..., j] = b_j[..., 0].to(f64)
        y_prev, beta_prev = y, b_j
    # T = B^T B for the upper bidiagonal B (alpha on the diagonal, beta above it)
    diag = alpha.pow(2) + torch.nn.functional.pad(beta[..., :-1], (1, 0)).pow(2)
    off = alpha * beta  # T[j, j + 1]; the last one extends T for Gauss-Radau
    tri = torch.diag_embed(diag) + torch.diag_embed(off[..., :-1], 1) + torch.diag_embed(off[..., :-1], -1)
    theta, vecs = torch.linalg.eigh(tri)
    gauss1, gauss2 = _quadrature(theta, vecs, norm2)
    # Gauss-Radau with a node fixed at 0, the bottom of the spectrum (Golub & Meurant): extend T by
    # its next off-diagonal and the diagonal entry that makes 0 an eigenvalue. For sqrt it bounds
    # the value from below where Gauss bounds it from above.
    tiny = (theta.amax(-1, keepdim=True) * 1e-14).clamp_min(torch.finfo(f64).tiny)
    last = off[..., -1]
    # term by term, so that a zero last entry (an exhausted Krylov space) gives 0, never 0 * inf
    extra = ((last[..., None] * vecs[..., -1, :]).pow(2) / theta.maximum(tiny)).sum(-1)
    ext = torch.nn.functional.pad(tri, (0, 1, 0, 1))
    ext[..., steps - 1, steps] = last
    ext[..., steps, steps - 1] = last
    ext[..., steps, steps] = extra
    theta_r, vecs_r = torch.linalg.eigh(ext)
    radau1, radau2 = _quadrature(theta_r, vecs_r, norm2)
    square = (vecs[..., 0, :].pow(2) * norm2[..., None] * theta.square()).sum(-1)
    return _Tail(gauss1, radau1, gauss2, radau2, theta.amax((-1, -2)), square)


def _quadrature(theta: Tensor, vecs: Tensor, norm2: Tensor) -> tuple[Tensor, Tensor]:
    r"""Quadrature sums of :math:`\sqrt\lambda` and :math:`\sqrt\lambda \ln\sqrt\lambda` from tridiagonal eigenpairs."""
    weights = vecs[..., 0, :].pow(2) * norm2[..., None]
    s = theta.clamp_min(0.0).sqrt()
    return (weights * s).sum(-1), (weights * torch.special.xlogy(s, s)).sum(-1)


def _estimate_chunk(
    raw: Tensor, warm: Sequence[Tensor | None], opts: _Options, generator: torch.Generator | None
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Values and relative errors ``{name: (b,)}`` and bases ``(b, n, k)`` of a stack ``(b, m, n)`` of one shape.

    ``raw`` is a fresh copy in the work dtype; it is scaled in place.
    """
    f64 = torch.float64
    wd, dev = raw.dtype, raw.device
    b, m, n = raw.shape
    # max |entry| (NaN if any entry is NaN, inf if any is inf): amax and amin, far faster than an
    # inf-norm on CPU. Non-finite matrices are zeroed (their values become NaN at the end), the rest
    # scaled to max |entry| = 1 (at most finfo.max / 4 as the factor: a subnormal max stays finite)
    peak = torch.maximum(raw.amax((-2, -1)), -raw.amin((-2, -1)))
    finite = torch.isfinite(peak)
    usable = finite & (peak > 0)
    inv = (1 / torch.where(usable, peak, torch.ones_like(peak))).clamp_max(torch.finfo(wd).max / 4)
    inv = torch.where(usable, inv, torch.zeros_like(inv))
    a = raw.nan_to_num_(0.0, 0.0, 0.0).mul_(inv[:, None, None])
    scale64 = torch.where(usable, 1 / inv.to(f64), torch.ones_like(peak, dtype=f64))
    # Frobenius norm from the entries: row norms in the work dtype (nothing over- or underflows that
    # matters, with max |entry| <= 1), combined in float64; inf or NaN as the entries say
    fro_scaled = torch.linalg.vector_norm(a, dim=-1).to(f64).square().sum(-1).sqrt()
    fro = torch.where(finite, fro_scaled * scale64, peak.to(f64))
    steps = _estimate_steps((b, m, n), wd, dev, warm, opts, generator, _Scaled(finite, scale64, fro_scaled, fro))
    request = next(steps)
    while True:
        try:
            request = steps.send(_answer(a, *request))
        except StopIteration as done:
            result: tuple[dict[str, Tensor], dict[str, Tensor], Tensor] = done.value
            return result


@dataclass(frozen=True)
class _Scaled:
    """How a stack of matrices was scaled: per matrix whether it is finite, the factor back, its Frobenius norm
    scaled and not."""

    finite: Tensor
    scale64: Tensor
    fro_scaled: Tensor
    fro: Tensor


def _estimate_steps(
    shape: tuple[int, int, int],
    wd: torch.dtype,
    dev: torch.device,
    warm: Sequence[Tensor | None],
    opts: _Options,
    generator: torch.Generator | None,
    scaled: _Scaled,
) -> Generator[Product, Tensor, tuple[dict[str, Tensor], dict[str, Tensor], Tensor]]:
    """The estimator on a stack of scaled matrices, reading them only through the products it yields."""
    f64 = torch.float64
    b, m, n = shape
    d = min(m, n)
    k = min(opts.rank, d)
    finite, scale64, fro_scaled, fro = scaled.finite, scaled.scale64, scaled.fro_scaled, scaled.fro
    omega = torch.randn((b, n, k), generator=generator, device=dev, dtype=wd)
    for i, w in enumerate(warm):
        if w is not None and tuple(w.shape) == (n, k):
            w = w.detach().to(device=dev, dtype=wd)
            omega[i] = torch.where(torch.isfinite(w).all(), w, omega[i])
    v, q = yield from _range_finder(omega, opts.power_iters)

    # Rayleigh-Ritz: singular values sigma_i of B = a V from its float64 Gram matrix (k x k), with
    # the right Ritz vectors W, so that the left ones are u_i = B w_i / sigma_i
    ritz = yield ("a@x", v)
    ritz64 = ritz.to(f64)
    lam, w_ritz = torch.linalg.eigh(ritz64.mT @ ritz64)
    top = lam.flip(-1).clamp_min(0.0).sqrt()  # (b, k), descending
    w_ritz = w_ritz.flip(-1)
    s_top = top.sum(-1)
    t_top = torch.special.xlogy(top, top).sum(-1)
    s1 = top[:, 0]
    # sin^2 of the angle between each left Ritz vector and span Q: what leaks of the top into the
    # tail's column space, the cause of the split's bias
    proj = (q.mT @ ritz).to(f64) @ w_ritz
    safe_top = torch.where(top > 0, top, torch.ones_like(top))
    sin2 = (1 - proj.pow(2).sum(-2) / safe_top.pow(2)).clamp(0.0, 1.0)
    sin2 = torch.where(top > torch.finfo(wd).eps ** 0.5 * s1[:, None], sin2, torch.zeros_like(sin2))

    steps = min(opts.lanczos_steps, d - k)
    p = opts.probes
    if steps > 0:
        signs = torch.randint(0, 2, (b, p, d), generator=generator, device=dev)
        tail = yield from _tail_quadrature((b, m, n), v, q, (signs * 2 - 1).to(wd), steps)
        t1 = (tail.gauss1 + tail.radau1) / 2
        t2 = (tail.gauss2 + tail.radau2) / 2
        gap1 = (tail.gauss1 - tail.radau1).mean(-1)
        gap2 = (tail.gauss2 - tail.radau2).mean(-1)
        d_max = tail.lam_max.clamp_min(0.0).sqrt()
        t4 = tail.square
    else:
        t1 = t2 = t4 = top.new_zeros((b, p))
        gap1 = gap2 = d_max = top.new_zeros(b)
    per_s = s_top[:, None] + t1
    per_t = t_top[:, None] + t2
    total = per_s.mean(-1)
    ent_sum = per_t.mean(-1)
    zero = total <= 0
    safe_total = torch.where(zero, torch.ones_like(total), total)
    entropy = (safe_total.log() - ent_sum / safe_total).clamp(0.0, math.log(d))
    erank = torch.where(zero, torch.zeros_like(total), entropy.exp())

    # errors: Hutchinson standard error (the effective rank's by the delta method on
    # H = ln S - T / S), half the Gauss / Gauss-Radau bracket, the split's bias, float rounding
    root_p = math.sqrt(p)
    slope = (1 + ent_sum / safe_total) / safe_total  # dH/dS; dH/dT = -1 / S
    se_s = per_s.std(-1) / root_p
    se_h = (slope[:, None] * per_s - per_t / safe_total[:, None]).std(-1) / root_p
    quad_s = gap1.abs() / 2
    quad_h = (slope * gap1 - gap2 / safe_total).abs() / 2
    bias_s = d_max / 2 * sin2.sum(-1)
    # the bias moves mass from the top to the tail near d_max: in H it weighs 1 + ln(S / erank / d)
    leaked = bias_s > 0
    typical = safe_total / torch.where(zero, torch.ones_like(erank), erank)
    weight = 1 + (typical / torch.where(leaked, d_max / 2, typical)).log().clamp_min(0.0)
    bias_h = torch.where(leaked, bias_s / safe_total * weight, torch.zeros_like(bias_s))
    # rounding: each product in the work dtype errs by about eps * ||a||_F, which is the floor of
    # every computed singular value (d of them), weighted in H like the smallest values
    noise = torch.finfo(wd).eps * fro_scaled
    round_s = d * noise / safe_total
    safe_noise = torch.where(noise > 0, noise, torch.ones_like(noise))
    round_h = round_s * (1 + (typical / safe_noise).log().clamp_min(0.0))
    safe_s1 = torch.where(s1 > 0, s1, torch.ones_like(s1))
    err_s = (se_s + quad_s + bias_s) / safe_total + round_s
    err_h = torch.expm1(se_h + quad_h + bias_h + round_h)
    # the top Ritz value is a lower bound on s_1; the coupling of its vector with the tail bounds the rest
    err_1 = sin2[:, 0] * d_max.pow(2) / (2 * safe_s1.pow(2)) + noise / safe_s1

    # participation ratio: sum s^4 = the top's + the tail's (Hutchinson over z^T A_t^2 z), on the scaled matrix
    per_4 = top.pow(4).sum(-1)[:, None] + t4
    s4 = per_4.mean(-1)
    pr = _safe_div(fro_scaled.pow(2).pow(2), s4)
    # the split's bias: each top value is low by about sin^2 d_max^2 / (2 sigma), its fourth power by 4x that share
    bias_4 = (2 * top.pow(2) * sin2 * d_max[:, None].pow(2)).sum(-1)
    err_pr = _safe_div(per_4.std(-1) / root_p + bias_4, s4) + round_s

    values = {
        "nuclear_norm": total * scale64,
        "spectral_norm": s1 * scale64,
        "stable_rank": _safe_div(fro_scaled, s1).pow(2),
        "top_sv_ratio": _safe_div(s1, total),
        "effective_rank": erank,
        "participation_ratio": pr,
    }
    errors = {
        "nuclear_norm": err_s,
        "spectral_norm": err_1,
        "stable_rank": 2 * err_1,
        "top_sv_ratio": err_1 + err_s,
        "effective_rank": err_h,
        "participation_ratio": err_pr,
    }
    nan = torch.full_like(total, math.nan)
    for name in values:
        # a zero matrix is exactly zero; a non-finite one is NaN, with a NaN error
        errors[name] = torch.where(zero, torch.zeros_like(total), errors[name])
        values[name] = torch.where(finite, values[name], nan)
        errors[name] = torch.where(finite, errors[name], nan)
    values["frobenius_norm"] = fro
    errors["frobenius_norm"] = torch.zeros_like(fro)
    # the basis handed back for warm starts: the Ritz vectors, strongest first
    return values, errors, v @ w_ritz.to(wd)


def estimate_spectral_metrics_many(
    matrices: Sequence[Tensor],
    metrics: Sequence[str] | None = None,
    *,
    warm_start: Sequence[Tensor | None] | None = None,
    rank: int = 96,
    power_iters: int = 2,
    probes: int = 8,
    lanczos_steps: int = 12,
    seed: int | None = 0,
) -> SpectralEstimate:
    r"""Estimates of spectral metrics of many matrices, with an estimated relative error for each.

    Deflated stochastic Lanczos quadrature, see the module docstring for the method and the
    measured accuracy. Same-shaped matrices are stacked (8 at a time, 256 MiB at most) and go through batched
    matrix products in float32 (float64 for float64 input; bf16/fp16 are upcast, never computed
    in), each rescaled by its largest entry; the small projected problems are float64. Everything
    stays on the matrices' device, with no host synchronisation.

    Conventions as in :func:`~gradspectra.functional.spectral_metrics`: a zero matrix has every
    spectral metric 0 (error 0); a matrix with a non-finite entry gets NaN for every metric but
    ``frobenius_norm`` (which is inf or NaN, as the entries say), and NaN errors.

    Args:
        matrices: 2-D real tensors, any shapes, any floating dtype, any device.
        metrics: names from :data:`~gradspectra.functional.METRIC_NAMES`; ``None`` means all.
        warm_start: per matrix, the basis this function returned for it on the previous call (or
            None); a basis whose shape is not ``(n, min(rank, m, n))`` is ignored.
        rank: size ``k`` of the deflated top subspace, clipped to ``min(m, n)``; with
            ``min(m, n) <= rank`` there is no tail and the values are exact up to rounding.
        power_iters: subspace iterations of the range finder (at least 1).
        probes: Rademacher probes of the tail trace (at least 2, for a standard error).
        lanczos_steps: Lanczos (Golub-Kahan) steps per probe, clipped to the tail's dimension.
        seed: seeds the Gaussian start and the probes, for reproducible results; None draws from
            torch's global generator.

    Returns:
        :class:`SpectralEstimate` with ``values`` and ``rel_error`` of shape
        ``(len(matrices), len(metrics))`` (float64, on the first matrix's device) and the bases.

    Raises:
        TypeError: if a matrix is not a real floating point tensor, or a warm start is not a tensor.
        ValueError: for an unknown metric name, a matrix that is not 2-D, an integer argument below
            its minimum, or ``warm_start`` of the wrong length.

    Example:
        >>> from gradspectra.functional import spectral_metrics_many
        >>> gen = torch.Generator().manual_seed(0)
        >>> u, _ = torch.linalg.qr(torch.randn(600, 600, generator=gen, dtype=torch.float64))
        >>> v, _ = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=torch.float64))
        >>> s = 1 / (1 + torch.arange(300, dtype=torch.float64))
        >>> g = ((u[:, :300] * s) @ v.mT).float()
        >>> est = estimate_spectral_metrics_many([g], ["nuclear_norm", "effective_rank"])
        >>> exact = spectral_metrics_many([g], ["nuclear_norm", "effective_rank"])
        >>> err = (est.values - exact).abs() / exact
        >>> bool((err < 0.03).all()), bool((err <= 3 * est.rel_error).all())
        (True, True)
        >>> est.bases[0].shape
        torch.Size([300, 96])
    """
    names = check_metric_names(metrics)
    opts = _options(rank, power_iters, probes, lanczos_steps)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"`seed` must be an integer or None, got {seed!r}")
    for i, matrix in enumerate(matrices):
        _check_matrix(matrix, f"matrices[{i}]")
        if matrix.ndim != 2:
            raise ValueError(f"`matrices[{i}]` must be 2-D (m, n), got shape {tuple(matrix.shape)}")
    if warm_start is not None:
        if len(warm_start) != len(matrices):
            raise ValueError(
                f"`warm_start` must have one entry (a basis or None) per matrix, "
                f"got {len(warm_start)} for {len(matrices)} matrices"
            )
        for i, basis in enumerate(warm_start):
            if basis is not None and not isinstance(basis, Tensor):
                raise TypeError(f"`warm_start[{i}]` must be a torch.Tensor or None, got {type(basis).__name__}")
    if not matrices:
        empty = torch.zeros((0, len(names)), dtype=torch.float64)
        return SpectralEstimate(empty, empty.clone(), [])
    device = matrices[0].device
    values = torch.zeros((len(matrices), len(names)), dtype=torch.float64, device=device)
    errors = torch.zeros_like(values)
    bases: list[Tensor | None] = [None] * len(matrices)
    generators: dict[torch.device, torch.Generator | None] = {}
    groups: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[int]] = defaultdict(list)
    for i, matrix in enumerate(matrices):
        groups[(tuple(matrix.shape), _work_dtype(matrix.dtype), matrix.device)].append(i)
    for (shape, wd, dev), idx in groups.items():
        if dev not in generators:
            generators[dev] = None if seed is None else torch.Generator(device=dev).manual_seed(seed)
        itemsize = torch.finfo(wd).bits // 8
        per_chunk = max(1, min(_MAX_BATCH, _MAX_STACK_BYTES // max(1, math.prod(shape) * itemsize)))
        for start in range(0, len(idx), per_chunk):
            chunk = idx[start : start + per_chunk]
            if min(shape) == 0:  # no entries: a zero matrix
                for i in chunk:
                    bases[i] = torch.zeros((shape[1], 0), dtype=wd, device=dev)
                chunk_values = {name: torch.zeros(len(chunk), dtype=torch.float64, device=dev) for name in names}
                chunk_errors = {name: torch.zeros_like(chunk_values[name]) for name in names}
            else:
                raw = torch.empty((len(chunk), *shape), dtype=wd, device=dev)
                for j, i in enumerate(chunk):
                    raw[j].copy_(matrices[i].detach())
                warm = [None if warm_start is None else warm_start[i] for i in chunk]
                chunk_values, chunk_errors, v = _estimate_chunk(raw, warm, opts, generators[dev])
                for j, i in enumerate(chunk):
                    bases[i] = v[j]
            rows = torch.tensor(chunk, device=device)
            values[rows] = torch.stack([chunk_values[name] for name in names], -1).to(device)
            errors[rows] = torch.stack([chunk_errors[name] for name in names], -1).to(device)
    return SpectralEstimate(values, errors, [basis for basis in bases if basis is not None])


def estimate_spectral_metrics_blocks(
    blocks: Sequence[MatrixBlock],
    frobenius: Tensor,
    reduce_sum: Callable[[Tensor], Tensor],
    metrics: Sequence[str] | None = None,
    *,
    rank: int = 96,
    power_iters: int = 2,
    probes: int = 8,
    lanczos_steps: int = 12,
    seed: int = 0,
) -> SpectralEstimate:
    """:func:`estimate_spectral_metrics_many` of matrices held in blocks across processes, none of them gathered.

    The estimator reads its matrices only through products with thin blocks (``a @ x``, ``a^T @ x``, ``x @ a``,
    ``x @ a^T``): each process computes its block's share (zeros elsewhere) and ``reduce_sum`` (a sum over the
    processes) assembles the answer, one call per product (per dtype) for every matrix at once. Every process
    calls this with the same shapes, norms and seed, in the same order, and gets the same values. The matrices
    are scaled by their Frobenius norm (not their largest entry, which no process sees whole): the values equal
    :func:`estimate_spectral_metrics_many`'s up to float32 rounding and the random start (drawn per group of
    matrices of one shape and block axis). A process whose work fails (out of memory) joins every sum with zeros
    and raises after the last, so the others never wait. No warm starts: ``bases`` is empty.

    Args:
        blocks: this process's block of each matrix (:class:`~gradspectra.functional.sketch.MatrixBlock`);
            the matrices of one shape and axis must have their blocks at the same rows (columns) on a process,
            as DTensor shards do.
        frobenius: the whole matrices' Frobenius norms ``(len,)``.
        reduce_sum: a sum over the processes.
        metrics, rank, power_iters, probes, lanczos_steps, seed: as in :func:`estimate_spectral_metrics_many`.
    """
    names = check_metric_names(metrics)
    opts = _options(rank, power_iters, probes, lanczos_steps)
    if len(frobenius) != len(blocks):
        raise ValueError(f"`frobenius` must have one entry per block ({len(blocks)}), got {len(frobenius)}")
    device = blocks[0].local.device if blocks else torch.device("cpu")
    values = torch.zeros((len(blocks), len(names)), dtype=torch.float64, device=device)
    errors = torch.zeros_like(values)
    fro_all = frobenius.to(device=device, dtype=torch.float64)
    groups: dict[tuple[int, int, torch.dtype, int], list[int]] = defaultdict(list)
    for i, blk in enumerate(blocks):
        groups[(blk.shape[0], blk.shape[1], _work_dtype(blk.local.dtype), blk.axis)].append(i)
    # every product's size, known before anything that may fail here (the same on every process)
    plans = [(key[2], _schedule(key[0], key[1], len(idx), opts)) for key, idx in groups.items()]
    generator = torch.Generator(device=device).manual_seed(seed)

    def start() -> list[Started]:
        started: list[Started] = []
        for (m, n, wd, axis), idx in groups.items():
            first = blocks[idx[0]]
            if any(blocks[i].start != first.start or blocks[i].local.shape != first.local.shape for i in idx):
                raise ValueError(f"the {m} x {n} blocks of this process do not all hold the same rows or columns")
            fro = fro_all[idx]
            finite = torch.isfinite(fro)
            usable = finite & (fro > 0)
            # scaled by the Frobenius norm, the factor capped as for whole matrices (a tiny norm stays finite)
            inv = torch.where(usable, 1 / torch.where(usable, fro, torch.ones_like(fro)), torch.zeros_like(fro))
            inv = inv.clamp_max(torch.finfo(wd).max / 4)
            local = torch.stack([blocks[i].local.detach().to(wd) for i in idx]).nan_to_num_(0.0, 0.0, 0.0)
            local.mul_(inv.to(wd)[:, None, None])
            scale64 = torch.where(usable, 1 / torch.where(usable, inv, torch.ones_like(inv)), torch.ones_like(fro))
            scaled = _Scaled(finite, scale64, torch.where(usable, fro * inv, torch.zeros_like(fro)), fro)
            steps = _estimate_steps((len(idx), m, n), wd, device, [None] * len(idx), opts, generator, scaled)
            started.append((steps, partial(_block_answer, local, axis=axis, start=first.start, m=m, n=n)))
        return started

    results = dict(zip(groups, sum_in_rounds(plans, start, reduce_sum, device)))
    for key, idx in groups.items():
        chunk_values, chunk_errors, _ = results[key]
        rows = torch.tensor(idx, device=device)
        values[rows] = torch.stack([chunk_values[name] for name in names], -1).to(device)
        errors[rows] = torch.stack([chunk_errors[name] for name in names], -1).to(device)
    return SpectralEstimate(values, errors, [])


def _schedule(m: int, n: int, count: int, opts: _Options) -> list[int]:
    """The sizes of the answers :func:`_estimate_steps` asks for, in order, for ``count`` ``m x n`` matrices."""
    d = min(m, n)
    k = min(opts.rank, d)
    sizes = [count * m * k, count * n * k] * (opts.power_iters - 1)
    sizes += [count * m * k, count * n * k, count * m * k]  # Q = orth(a V), V = orth(a^T Q), the Ritz block a V
    steps = min(opts.lanczos_steps, d - k)
    big, small = (m, n) if m >= n else (n, m)
    sizes += [count * opts.probes * big, count * opts.probes * small] * max(steps, 0)
    return sizes


def _block_answer(local: Tensor, request: Product, *, axis: int, start: int, m: int, n: int) -> Tensor:
    """This process's share of a :data:`Product` from its blocks ``local`` (rows ``start..`` of each ``m x n``
    matrix for ``axis=0``, columns for ``axis=1``): its part of the answer, zeros elsewhere."""
    kind, x = request
    size = local.shape[1 + axis]
    span = slice(start, start + size)
    b = local.shape[0]
    if kind == "a@x":  # (b, n, k) -> (b, m, k)
        if axis == 0:
            out = x.new_zeros((b, m, x.shape[-1]))
            out[:, span] = local @ x
            return out
        return local @ x[:, span]
    if kind == "aT@x":  # (b, m, k) -> (b, n, k)
        if axis == 0:
            return local.mT @ x[:, span]
        out = x.new_zeros((b, n, x.shape[-1]))
        out[:, span] = local.mT @ x
        return out
    if kind == "x@a":  # (b, p, m) -> (b, p, n)
        if axis == 0:
            return x[..., span] @ local
        out = x.new_zeros((b, x.shape[1], n))
        out[..., span] = x @ local
        return out
    # x@aT: (b, p, n) -> (b, p, m)
    if axis == 0:
        out = x.new_zeros((b, x.shape[1], m))
        out[..., span] = x @ local.mT
        return out
    return x[..., span] @ local.mT
