r"""The cheap spectral tier: values that three thin products with a gradient give, for every layer on every step.

For ``G`` (``m x n``) with singular values :math:`s_1 \ge \dots \ge s_r`, the *block side* is the
smaller one (``d = min(m, n)``) and the *other side* the larger (``e``); :math:`A = G G^\top` on the
other side (``G^T G``'s nonzero eigenvalues, :math:`s_i^2`). With ``b1 = rank + extra`` and
``b2 = b1 + probes``:

- **product 1, a range finder.** The block ``B`` (``d x b1``) holds the layer's previous top
  directions (``rank`` of them: a warm start, since a gradient's top directions persist in part
  from step to step) and ``extra`` fresh random directions (to catch directions that rose into the
  top since); ``Q = orth(G B)`` spans this step's top on the other side.
- **products 2 and 3.** ``Z = G^T X`` and ``A X = G Z`` for ``X = [Q, P w]``, with ``probes``
  fixed Rademacher vectors ``w`` projected off ``Q`` (:math:`P = I - Q Q^\top`). Matrices of one
  shape share their small ``b1 x b1`` linear algebra (batched).
- **spectral norm** :math:`s_1`: Rayleigh-Ritz on span ``Q`` (:math:`Q^\top A Q = Z_Q^\top Z_Q`);
  :math:`\lambda_{\max}(Q^\top A^2 Q)^{1/2}` is a lower bound of :math:`s_1^2` at least as tight as
  the Ritz value (one power step ahead of it). Its error estimate comes from the top Ritz pair's
  residual :math:`r` (``A Q`` is known): :math:`s_1^2 \le \theta_1 + \min(\|r\|, \|r\|^2 / (\theta_1 -
  \theta_2))` (Kato-Temple with the Ritz gap).
- **stable rank** :math:`\|G\|_F^2 / s_1^2`, the Frobenius norm exact from the entries.
- **participation ratio** :math:`(\sum s_i^2)^2 / \sum s_i^4`, with :math:`\sum s_i^4 = \|A\|_F^2 =
  \|A Q\|_F^2 + \operatorname{tr}(P A^2 P)` (Hutch++, Meyer et al. 2021): the first term exactly, the
  second by Hutchinson's estimator :math:`\tfrac1p \sum_j \|A P w_j\|^2`, whose standard error is
  the error estimate.
- the next step's warm start: the block side's top ``rank`` directions, ``Z_Q`` rotated by the top
  Ritz vectors.

Routes besides the sketch: matrices with ``d <= 2 b2`` (48 at the defaults) and entries so large or
small that float32 products would overflow or lose digits are exact (float64 singular values, no
error); the **Gram route** (``gram=``, chosen by the caller for spectra too flat for the sketch, ``d <=
1024``): ``A`` formed by one GEMM, :math:`\sum s^4 = \|A\|_F^2` exactly, :math:`s_1` by block Krylov on
``A``. A first call without a warm start uses a random block. Non-finite matrices give NaN values
(their warm start is kept); the zero matrix gives zeros.

Cost of the sketch: ``2 m n (b1 + 2 b2)`` flops (``2 m n x 64`` at the defaults) and three reads of
each matrix, against ``2 m n d`` for the Gram route and ``~4 m n d`` for an SVD.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from gradspectra.functional.rounds import Started, sum_in_rounds
from gradspectra.functional.spectral import _safe_div, frobenius_norms
from gradspectra.functional.svd import _check_matrix, singular_values

#: Metrics of the cheap tier, in the order of :attr:`CheapSpectra.values`.
CHEAP_METRICS: tuple[str, ...] = ("spectral_norm", "stable_rank", "participation_ratio")
_SAFE_LOW, _SAFE_HIGH = 1e-15, 1e15  # Frobenius norms inside this range are safe for float32 products
_GRAM_MAX = 1024  # the Gram route's largest small side
_GRAM_KRYLOV = 8  # block Krylov depth on the Gram route (8 blocks of ``rank`` vectors)


@dataclass(frozen=True)
class CheapSpectra:
    """Result of :func:`cheap_spectral_metrics_many`.

    Attributes:
        values: float64 ``(len(matrices), 3)``: :data:`CHEAP_METRICS` (spectral norm, stable rank,
            participation ratio), on the first matrix's device.
        rel_error: same shape, the estimated relative error of each value (0 on the exact route).
        exact: bool ``(len(matrices),)``, the values came from the exact route.
        bases: per matrix, the warm start for the next call (``None`` on the exact route).
    """

    values: Tensor
    rel_error: Tensor
    exact: Tensor
    bases: list[Tensor | None]


def _positive(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


def cheap_spectral_metrics_many(
    matrices: Sequence[Tensor],
    frobenius: Tensor | None = None,
    warm_start: Sequence[Tensor | None] | None = None,
    rank: int = 8,
    extra: int = 8,
    probes: int = 8,
    seed: int = 0,
    gram: Sequence[bool] | None = None,
) -> CheapSpectra:
    """The cheap tier (module docstring) of each matrix.

    Args:
        matrices: 2-D gradient matrices of any shapes (float32 is read as is; bf16/fp16 are upcast).
        frobenius: their Frobenius norms (``(len,)``), if already computed; else computed here.
        warm_start: per matrix, the ``bases`` entry of the previous call (or ``None``).
        rank: ``k``, the warm-started directions of the block.
        extra: ``r``, random directions added to the block (fresh each call), to find directions
            that rise into the top between steps.
        probes: ``p``, the Hutchinson probes (at least 2, for a standard error); the same ones on
            every call.
        seed: seeds the random directions.
        gram: per matrix, take the Gram route instead: the ``d x d`` Gram matrix (one GEMM,
            ``2 m n d`` flops) and its eigen-decomposition, exact up to float32 rounding of the Gram
            (``d <= 1024`` only; larger ones stay on the sketch). For layers whose spectrum is too
            flat for the sketch (its error estimate says so): the caller decides.

    Example:
        >>> g = torch.diag(torch.tensor([4.0, 2.0, 1.0])) @ torch.randn(3, 64)
        >>> out = cheap_spectral_metrics_many([g])
        >>> round(out.values[0, 0].item(), 4) == round(torch.linalg.svdvals(g)[0].item(), 4)
        True
    """
    _positive(rank, "rank", 1)
    _positive(extra, "extra", 0)
    _positive(probes, "probes", 2)
    n_mat = len(matrices)
    if warm_start is not None and len(warm_start) != n_mat:
        raise ValueError(f"`warm_start` must have one entry per matrix ({n_mat}), got {len(warm_start)}")
    if gram is not None and len(gram) != n_mat:
        raise ValueError(f"`gram` must have one entry per matrix ({n_mat}), got {len(gram)}")
    if n_mat == 0:
        empty = torch.zeros((0, len(CHEAP_METRICS)), dtype=torch.float64)
        return CheapSpectra(empty, empty.clone(), torch.zeros(0, dtype=torch.bool), [])
    for g in matrices:
        _check_matrix(g)
    device = matrices[0].device
    fro = frobenius_norms(matrices) if frobenius is None else frobenius.to(device=device, dtype=torch.float64)
    values = torch.zeros((n_mat, len(CHEAP_METRICS)), dtype=torch.float64, device=device)
    errors = torch.zeros_like(values)
    exact = torch.zeros(n_mat, dtype=torch.bool, device=device)
    bases: list[Tensor | None] = [None] * n_mat
    fro_host = fro.tolist()  # the one host sync: which matrices are safe for float32 products
    groups: dict[tuple[int, int, torch.dtype, bool], list[int]] = defaultdict(list)
    slow: list[int] = []
    by_gram: list[int] = []
    for i, g in enumerate(matrices):
        f = fro_host[i]
        if not math.isfinite(f):
            values[i] = errors[i] = float("nan")
            bases[i] = None if warm_start is None else warm_start[i]
            continue
        if f == 0.0:
            exact[i] = True
            bases[i] = None if warm_start is None else warm_start[i]
            continue
        m, n = g.shape
        d = min(m, n)
        if d <= 2 * (rank + extra + probes) or not (_SAFE_LOW < f < _SAFE_HIGH):
            slow.append(i)
            continue
        work = torch.float64 if g.dtype == torch.float64 else torch.float32
        if gram is not None and gram[i] and d <= _GRAM_MAX:
            by_gram.append(i)
            continue
        basis = None if warm_start is None else warm_start[i]
        usable = basis is not None and tuple(basis.shape) == (min(rank, d), d) and basis.dtype == work
        groups[(m, n, work, usable and basis is not None and basis.device == device)].append(i)
    if slow:
        _exact_route(matrices, slow, fro, values, exact)
    for i in by_gram:
        start = None if warm_start is None else warm_start[i]
        k = min(rank, min(matrices[i].shape))
        bases[i] = _gram_route(matrices[i], fro[i], start, k, values, errors, i)
    for (_, _, work, warm_ok), idx in groups.items():
        warm = warm_start if warm_ok else None
        _sketch_group(matrices, idx, fro, warm, work, (rank, extra, probes, seed), values, errors, bases)
    return CheapSpectra(values, errors, exact, bases)


@dataclass(frozen=True)
class MatrixBlock:
    """This process's block of a matrix held across processes (a sharded gradient).

    Attributes:
        local: the block: rows ``start .. start + local.shape[0]`` of the whole matrix (``axis=0``), or
            its columns ``start .. start + local.shape[1]`` (``axis=1``); possibly empty.
        shape: the whole matrix's ``(m, n)``.
        axis: 0 for a block of rows, 1 for a block of columns.
        start: the block's first row (or column) in the whole matrix.
    """

    local: Tensor
    shape: tuple[int, int]
    axis: int
    start: int

    def __post_init__(self) -> None:
        if self.axis not in (0, 1):
            raise ValueError(f"`axis` must be 0 (rows) or 1 (columns), got {self.axis!r}")
        size, other = (self.local.shape[0], self.local.shape[1]) if self.axis == 0 else self.local.shape[::-1]
        whole, across = self.shape if self.axis == 0 else self.shape[::-1]
        if self.local.ndim != 2 or other != across or not 0 <= self.start <= self.start + size <= whole:
            raise ValueError(
                f"a block of shape {tuple(self.local.shape)} at {self.start} along axis {self.axis} does not fit "
                f"in a matrix of shape {self.shape}"
            )


def sketchable(shape: tuple[int, int], frobenius: float, rank: int = 8, extra: int = 8, probes: int = 8) -> bool:
    """Whether :func:`cheap_spectral_metrics_blocks` takes a matrix of this shape and Frobenius norm: its small
    side above ``2 (rank + extra + probes)`` and its norm safe for float32 products (the others take the exact
    route, which needs the whole matrix). A zero or non-finite matrix is taken (zeros or NaN, no products)."""
    if not math.isfinite(frobenius) or frobenius == 0.0:
        return True
    return min(shape) > 2 * (rank + extra + probes) and _SAFE_LOW < frobenius < _SAFE_HIGH


def cheap_block_numbers(shape: tuple[int, int], rank: int = 8, extra: int = 8, probes: int = 8) -> int:
    """Numbers one process puts into the sums of :func:`cheap_spectral_metrics_blocks` for an ``m x n`` matrix:
    ``b0 e + b2 (d + e)`` (``d``, ``e`` its small and large side, ``b0 = min(rank, d) + extra``, ``b2`` the
    rows of ``Q`` plus the probes). Against ``m n`` to gather it: the blocks pay once ``d`` is above about 64."""
    d, e = min(shape), max(shape)
    b0 = min(rank, d) + extra
    b2 = min(b0, e) + probes
    return b0 * e + b2 * (d + e)


def cheap_spectral_metrics_blocks(
    blocks: Sequence[MatrixBlock],
    frobenius: Tensor,
    reduce_sum: Callable[[Tensor], Tensor],
    warm_start: Sequence[Tensor | None] | None = None,
    rank: int = 8,
    extra: int = 8,
    probes: int = 8,
    seed: int = 0,
) -> CheapSpectra:
    """The cheap tier (module docstring) of matrices held in blocks across processes, none of them gathered.

    The sketch reads a matrix only through its three products ``rows @ G`` and ``rows @ G^T`` with thin
    blocks ``rows``: each process multiplies its own block of rows or columns (the rest of the answer is
    zero), and ``reduce_sum`` (a sum over the processes, e.g. an all-reduce) assembles the answer, for every
    matrix at once: three calls in all, of ``(b1 + 2 b2) (m + n)`` numbers a matrix at most, against ``m n`` to
    gather it. Every process calls this with the same shapes, norms, warm starts and seed, in the same order,
    and gets the same values (the small linear algebra runs on each, on the summed products).

    Args:
        blocks: this process's block of each matrix (:class:`MatrixBlock`).
        frobenius: the whole matrices' Frobenius norms ``(len,)`` (from the blocks' sums of squares, summed).
        reduce_sum: a sum over the processes that hold the blocks, in place or returned.
        warm_start, rank, extra, probes, seed: as in :func:`cheap_spectral_metrics_many`.

    Raises:
        ValueError: a matrix the sketch does not take (:func:`sketchable`): gather it and use
            :func:`cheap_spectral_metrics_many`.
    """
    _positive(rank, "rank", 1)
    _positive(extra, "extra", 0)
    _positive(probes, "probes", 2)
    n_mat = len(blocks)
    if len(frobenius) != n_mat or (warm_start is not None and len(warm_start) != n_mat):
        raise ValueError(f"`frobenius` and `warm_start` must have one entry per block ({n_mat})")
    device = blocks[0].local.device if blocks else torch.device("cpu")
    fro = frobenius.to(device=device, dtype=torch.float64)
    values = torch.zeros((n_mat, len(CHEAP_METRICS)), dtype=torch.float64, device=device)
    errors = torch.zeros_like(values)
    exact = torch.zeros(n_mat, dtype=torch.bool, device=device)
    bases: list[Tensor | None] = [None] * n_mat
    groups: dict[tuple[int, int, torch.dtype, bool], list[int]] = defaultdict(list)
    for i, (blk, f) in enumerate(zip(blocks, fro.tolist())):
        if not sketchable(blk.shape, f, rank, extra, probes):
            raise ValueError(
                f"block {i} (a {blk.shape[0]} x {blk.shape[1]} matrix, Frobenius norm {f:.3g}) takes the exact "
                "route: gather it"
            )
        if not math.isfinite(f) or f == 0.0:
            values[i] = float("nan") if not math.isfinite(f) else 0.0
            errors[i] = float("nan") if not math.isfinite(f) else 0.0
            exact[i] = math.isfinite(f)
            bases[i] = None if warm_start is None else warm_start[i]
            continue
        work = torch.float64 if blk.local.dtype == torch.float64 else torch.float32
        d = min(blk.shape)
        basis = None if warm_start is None else warm_start[i]
        usable = basis is not None and tuple(basis.shape) == (min(rank, d), d) and basis.dtype == work
        groups[(blk.shape[0], blk.shape[1], work, usable)].append(i)
    # each group's three answers' sizes, known before anything that may fail (the same on every process)
    plans: list[tuple[torch.dtype, list[int]]] = []
    for (m, n, work, _), idx in groups.items():
        d, e = min(m, n), max(m, n)
        b0 = min(rank, d) + extra
        b1 = min(b0, e)  # the rows of Q (the range finder's answer, orthonormalised)
        plans.append((work, [len(idx) * count for count in (b0 * e, (b1 + probes) * d, (b1 + probes) * e)]))

    def start() -> list[Started]:
        started: list[Started] = []
        for (m, n, work, warm_ok), idx in groups.items():
            local = [blocks[i] for i in idx]
            local = [
                b if b.local.dtype == work else MatrixBlock(b.local.to(work), b.shape, b.axis, b.start) for b in local
            ]
            warm = warm_start if warm_ok else None
            steps = _sketch_steps(
                (m, n), device, idx, fro, warm, work, (rank, extra, probes, seed), values, errors, bases
            )
            started.append((steps, partial(_share, local)))
        return started

    sum_in_rounds(plans, start, reduce_sum, device)  # (the sketches write values, errors and bases)
    return CheapSpectra(values, errors, exact, bases)


def _share(blocks: Sequence[MatrixBlock], request: Request) -> Tensor:
    return _block_product(blocks, *request)


def _block_product(blocks: Sequence[MatrixBlock], rows: Tensor, right: bool, out_side: int) -> Tensor:
    """This process's share of :func:`_product` for each matrix of a group: its block's product, zeros elsewhere."""
    out = torch.zeros((rows.shape[0], rows.shape[1], out_side), dtype=rows.dtype, device=rows.device)
    for j, blk in enumerate(blocks):
        local, r = blk.local, rows[j]
        size = local.shape[blk.axis]
        span = slice(blk.start, blk.start + size)
        if size == 0:
            continue
        if right:  # rows (b, n) @ G^T (n, m)
            if blk.axis == 0:
                out[j][:, span] = r @ local.T
            else:
                out[j] = r[:, span] @ local.T
        elif blk.axis == 0:  # rows (b, m) @ G (m, n)
            out[j] = r[:, span] @ local
        else:
            out[j][:, span] = r @ local
    return out


def _gram_route(
    matrix: Tensor,
    fro: Tensor,
    warm: Tensor | None,
    k: int,
    values: Tensor,
    errors: Tensor,
    row: int,
) -> Tensor:
    """The Gram matrix ``A`` of the small side (one GEMM): ``sum s^4 = ||A||_F^2`` exactly, ``s_1`` by block
    Krylov on ``A`` (warm-started, ``_GRAM_KRYLOV`` blocks: accurate on flat spectra, where a power step
    converges slowly). Returns the next warm start (``k`` directions)."""
    g = matrix.detach()
    work = torch.float64 if g.dtype == torch.float64 else torch.float32
    g = g if g.dtype == work else g.to(work)
    tall = g.shape[0] >= g.shape[1]
    a = (g.T @ g) if tall else (g @ g.T)
    d = a.shape[0]
    f2 = fro.to(torch.float64).square()
    s4 = torch.linalg.matrix_norm(a.to(torch.float64)).square()
    if warm is None or tuple(warm.shape) != (k, d):
        warm = torch.randn((k, d), generator=torch.Generator().manual_seed(d), dtype=work).to(a.device)
    blocks = [_orth_rows(warm)]
    for _ in range(min(_GRAM_KRYLOV, d // k) - 1):
        blocks.append(blocks[-1] @ a)  # A is symmetric: rows times A
    q = _orth_rows(torch.cat(blocks))
    t = (q @ a @ q.T).to(torch.float64)
    theta, c = torch.linalg.eigh(0.5 * (t + t.T))
    theta, c = theta.flip(-1).clamp_min(0.0), c.flip(-1)
    lam = theta[0]
    # the top Ritz pair's residual (A q^T c - theta q^T c), for the error estimate
    y = c[:, 0].to(work) @ q
    res = (y @ a - lam.to(work) * y).to(torch.float64).norm()
    gap = (theta[0] - theta[1]).clamp_min(torch.finfo(torch.float64).tiny) if len(theta) > 1 else lam
    eps = 8 * float(torch.finfo(work).eps)
    s1_err = 0.5 * _safe_div(torch.minimum(res, res.square() / gap), lam) + eps * _safe_div(f2, lam)
    values[row] = torch.stack([lam.sqrt(), _safe_div(f2, lam), _safe_div(f2.square(), s4)]).to(values.device)
    errors[row] = torch.stack([s1_err, 2 * s1_err, torch.full_like(s1_err, eps)]).to(errors.device)
    basis: Tensor = (c[:, :k].T.to(work) @ q).contiguous()
    return basis


def _exact_route(matrices: Sequence[Tensor], idx: list[int], fro: Tensor, values: Tensor, exact: Tensor) -> None:
    """Small matrices (and extreme magnitudes): exact, from the singular values."""
    for i in idx:
        s = singular_values(matrices[i].detach())  # float64, rescaled for extreme magnitudes
        values[i] = _exact_values(s, fro[i]).to(values.device)
        exact[i] = True


def _exact_values(s: Tensor, fro: Tensor) -> Tensor:
    """The three cheap metrics from exact singular values (scaled by ``s_1`` so no power overflows)."""
    top = s[0] if s.numel() else torch.zeros((), dtype=s.dtype)
    r = _safe_div(s, top)
    fro = fro.to(s.device, s.dtype)
    ratio = _safe_div(fro, top)
    pr = _safe_div(r.square().sum() ** 2, r.pow(4).sum())
    return torch.stack([top, ratio.square(), pr])


def _probes(e: int, p: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rademacher probes ``(p, e)``: the same ones on every call."""
    gen = torch.Generator().manual_seed(0x5EED + e)
    return (torch.randint(0, 2, (p, e), generator=gen).to(dtype) * 2 - 1).to(device)


def _orth_rows(x: Tensor) -> Tensor:
    """Orthonormal rows spanning the rows of ``x`` (``(..., b, d)``)."""
    q, _ = torch.linalg.qr(x.transpose(-2, -1))
    rows: Tensor = q.transpose(-2, -1)
    return rows


def _sketch_group(
    matrices: Sequence[Tensor],
    idx: list[int],
    fro: Tensor,
    warm_start: Sequence[Tensor | None] | None,
    work: torch.dtype,
    sizes: tuple[int, int, int, int],
    values: Tensor,
    errors: Tensor,
    bases: list[Tensor | None],
) -> None:
    """Matrices of one shape: three products each, the small linear algebra batched over the group."""
    grads = [matrices[i].detach() for i in idx]
    grads = [g if g.dtype == work else g.to(work) for g in grads]
    m, n = grads[0].shape
    steps = _sketch_steps((m, n), grads[0].device, idx, fro, warm_start, work, sizes, values, errors, bases)
    request = next(steps)
    while True:
        rows, right, out_side = request
        try:
            request = steps.send(_product(grads, rows, right, out_side))
        except StopIteration:
            return


#: one product the sketch asks for: ``(rows, right, out_side)``, answered by ``rows @ G^T`` (``right``) or
#: ``rows @ G`` for each matrix ``G`` of the group (``rows``: ``(L, b, .)``, the answer ``(L, b, out_side)``)
Request = tuple[Tensor, bool, int]


def _sketch_steps(
    shape: tuple[int, int],
    device: torch.device,
    idx: list[int],
    fro: Tensor,
    warm_start: Sequence[Tensor | None] | None,
    work: torch.dtype,
    sizes: tuple[int, int, int, int],
    values: Tensor,
    errors: Tensor,
    bases: list[Tensor | None],
) -> Generator[Request, Tensor, None]:
    """The sketch of a group of ``m x n`` matrices, reading them only through the three products it yields
    (:data:`Request`): whoever answers them (one process, or processes holding blocks of each matrix) gets the
    same values. Writes ``values``, ``errors`` and ``bases`` at the rows ``idx``."""
    m, n = shape
    tall = m >= n
    d, e = (n, m) if tall else (m, n)  # the block's side (small) and the other
    rank, extra, p, seed = sizes
    k = min(rank, d)
    count = len(idx)
    gen = torch.Generator().manual_seed(seed)
    if warm_start is not None:
        v = torch.stack([warm_start[i] for i in idx])  # type: ignore[misc]
    else:
        v = torch.randn((count, k, d), generator=gen, dtype=work).to(device)
    block = torch.cat([v, torch.randn((count, extra, d), generator=gen, dtype=work).to(device)], 1) if extra else v
    # product 1 (a range finder step from the warm start): the other side's top subspace Q
    w1 = yield (block, tall, e)
    q = _orth_rows(w1)
    b1 = q.shape[1]
    w = _probes(e, p, device, work).expand(count, p, e)
    w = w - (w @ q.transpose(-2, -1)) @ q  # the probes off span Q
    x = torch.cat([q, w], 1)
    # products 2 and 3: Z = G^T X and A X = G Z on the other side (A = G G^T there)
    z = yield (x, not tall, d)
    ax = yield (z, tall, e)
    f2 = fro[idx].to(torch.float64).square()
    zq, axq, axw = z[:, :b1], ax[:, :b1], ax[:, b1:]
    # Rayleigh-Ritz on span Q: Q A Q^T = Z_Q Z_Q^T, Q A^2 Q^T = (A Q)(A Q)^T (b1 x b1, then float64)
    m1 = (zq @ zq.transpose(-2, -1)).to(torch.float64)
    m2 = (axq @ axq.transpose(-2, -1)).to(torch.float64)
    # sum s^4 = ||A Q||_F^2 + Hutchinson over the projected probes (Hutch++)
    tail_each = torch.linalg.vector_norm(axw, dim=-1).to(torch.float64).square()
    tail4 = tail_each.mean(-1)
    s4 = m2.diagonal(dim1=-2, dim2=-1).sum(-1) + tail4
    eps = 8 * float(torch.finfo(work).eps)
    pr = _safe_div(f2.square(), s4)
    pr_err = _safe_div(tail_each.std(-1) / math.sqrt(p), s4) + eps
    theta, c = torch.linalg.eigh(0.5 * (m1 + m1.transpose(-2, -1)))
    theta, c = theta.flip(-1).clamp_min(0.0), c.flip(-1)
    lam = torch.linalg.eigvalsh(0.5 * (m2 + m2.transpose(-2, -1)))[:, -1].clamp_min(0.0).sqrt()
    lam = torch.maximum(lam, theta[:, 0])
    # the top Ritz pair's residual: ||A y - theta y||^2 = c^T (Q A^2 Q^T) c - theta^2 (Q orthonormal)
    c1 = c[:, :, 0]
    rnorm = ((c1[:, None, :] @ m2 @ c1[:, :, None]).reshape(-1) - theta[:, 0].square()).clamp_min(0.0).sqrt()
    gap = (theta[:, 0] - theta[:, 1]).clamp_min(torch.finfo(torch.float64).tiny)
    upper = theta[:, 0] + torch.minimum(rnorm, rnorm.square() / gap)
    s1_err = 0.5 * _safe_div((upper - lam).clamp_min(0.0), lam) + eps
    # the next warm start: this side's top k directions, Z_Q rotated by the top Ritz vectors
    nxt = _orth_rows(c[:, :, :k].transpose(-2, -1).to(work) @ zq)
    rows = torch.tensor(idx, device=values.device)
    values[rows] = torch.stack([lam.sqrt(), _safe_div(f2, lam), pr], -1).to(values.device)
    errors[rows] = torch.stack([s1_err, 2 * s1_err, pr_err], -1).to(values.device)
    for j, i in enumerate(idx):
        bases[i] = nxt[j]


def _product(grads: Sequence[Tensor], rows: Tensor, right: bool, out_side: int) -> Tensor:
    """Each matrix times its rows of ``rows`` (``(L, b, .)``): ``rows @ G^T`` when ``right`` else ``rows @ G``.

    The block stays on the left (row-major ``(b, .) @ (., .)``), the layout in which a thin product
    runs fastest on CPU (the right-hand form ``G @ V`` was 2-3x slower)."""
    out = torch.empty((rows.shape[0], rows.shape[1], out_side), dtype=rows.dtype, device=rows.device)
    for j, g in enumerate(grads):
        torch.matmul(rows[j], g.T if right else g, out=out[j])
    return out
