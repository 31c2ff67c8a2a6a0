"""The cheap tier on matrices held in blocks across processes: the same values as on the whole matrix.

The processes are threads here, each holding its blocks and summing through a barrier (real collectives
run in tests/callbacks/test_model_parallel.py): the math is checked against the whole matrix and against
float64 singular values of matrices with known spectra.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import Tensor

from gradspectra.functional.sketch import (
    CheapSpectra,
    MatrixBlock,
    cheap_block_numbers,
    cheap_spectral_metrics_blocks,
    cheap_spectral_metrics_many,
    sketchable,
)


class Sum:
    """A sum over ``n`` threads: each passes its part and gets the total (like an all-reduce)."""

    def __init__(self, n: int) -> None:
        self.n, self.parts, self.calls = n, [None] * n, [0] * n
        self.barrier = threading.Barrier(n)
        self.numbers = 0  # what one process sent, in all

    def __call__(self, rank: int, part: Tensor) -> Tensor:
        self.parts[rank] = part.clone()
        self.calls[rank] += 1
        if rank == 0:
            self.numbers += part.numel()
        self.barrier.wait()
        total = torch.stack(self.parts).sum(0)  # type: ignore[arg-type]
        self.barrier.wait()
        return total


def _known(m: int, n: int, s: Sequence[float], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


def _split(g: Tensor, axis: int, sizes: Sequence[int]) -> list[MatrixBlock]:
    blocks, start = [], 0
    for size in sizes:
        local = g[start : start + size] if axis == 0 else g[:, start : start + size]
        blocks.append(MatrixBlock(local.contiguous(), (g.shape[0], g.shape[1]), axis, start))
        start += size
    return blocks


def _run(per_rank: list[list[MatrixBlock]], fro: Tensor, **kwargs: object) -> tuple[list[CheapSpectra], Sum]:
    reducer = Sum(len(per_rank))
    out: list[CheapSpectra | BaseException | None] = [None] * len(per_rank)

    def work(rank: int) -> None:
        try:
            out[rank] = cheap_spectral_metrics_blocks(
                per_rank[rank],
                fro,
                lambda t: reducer(rank, t),
                **kwargs,  # type: ignore[arg-type]
            )
        except BaseException as err:  # surfaced below
            out[rank] = err
            reducer.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(per_rank))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in out:
        if isinstance(o, BaseException):
            raise o
    return [o for o in out if isinstance(o, CheapSpectra)], reducer


def _reference(g: Tensor) -> np.ndarray:
    s = np.linalg.svd(g.double().numpy(), compute_uv=False)
    return np.array([s[0], (s**2).sum() / s[0] ** 2, (s**2).sum() ** 2 / (s**4).sum()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_blocks_give_the_whole_matrix_values(dtype: torch.dtype) -> None:
    decay = [10.0 * 0.8**i for i in range(60)]
    flat = [1.0] * 70
    mats = [
        _known(200, 80, decay, 1),  # tall, rows split unevenly, one process's block empty
        _known(80, 200, flat, 2),  # wide, a flat spectrum
        _known(200, 80, decay[::-1], 3),
        _known(96, 150, decay, 4),
    ]
    mats = [m.to(dtype) for m in mats]
    layouts = [(0, [90, 110, 0]), (1, [70, 70, 60]), (1, [30, 30, 20]), (0, [32, 32, 32])]
    per_rank: list[list[MatrixBlock]] = [[], [], []]
    for g, (axis, sizes) in zip(mats, layouts):
        for r, blk in enumerate(_split(g, axis, sizes)):
            per_rank[r].append(blk)
    fro = torch.stack([m.double().norm() for m in mats])
    warm_blocks = warm_whole = None
    for call in range(3):  # warm-started from call to call, as the monitor runs it step after step
        results, reducer = _run(per_rank, fro, seed=call, warm_start=warm_blocks)
        whole = cheap_spectral_metrics_many(mats, fro, seed=call, warm_start=warm_whole)
        warm_blocks, warm_whole = results[0].bases, whole.bases
        for res in results[1:]:  # every process got the same values and the same next warm start
            assert torch.equal(res.values, results[0].values)
            assert all(torch.equal(a, b) for a, b in zip(res.bases, results[0].bases))  # type: ignore[arg-type]
        # the same sketch as on the whole matrix: from the same random block, equal up to float32 rounding of
        # the summed products; then warm-started from directions that rounding may turn inside a flat top of
        # the spectrum: within the two results' own error estimates
        a, b = results[0].values.numpy(), whole.values.numpy()
        rel = 1e-9 if dtype == torch.float64 else 2e-4
        if call == 0:
            np.testing.assert_allclose(a, b, rtol=rel)
        bound = 3 * (results[0].rel_error.numpy() + whole.rel_error.numpy()) + rel
        assert (np.abs(a - b) / np.abs(b) <= bound).all(), (call, a, b, bound)
    got = results[0]
    # and within its own error estimate (plus float32 rounding) of the float64 singular values
    slack = 1e-9 if dtype == torch.float64 else 1e-4
    for i, g in enumerate(mats):
        ref = _reference(g)
        err = np.abs(got.values[i].numpy() - ref) / ref
        assert (err <= 3 * got.rel_error[i].numpy() + slack).all(), (i, err, got.rel_error[i])
    # three sums in all, of (b1 + 2 b2) (m + n) numbers a matrix at most (b1 = 16, b2 = 24 at the defaults)
    assert reducer.calls == [3, 3, 3]
    assert reducer.numbers <= sum(64 * (m.shape[0] + m.shape[1]) for m in mats)


def test_a_large_layer_sends_a_small_fraction_of_its_entries() -> None:
    g = _known(1024, 512, [3.0 * 0.9**i for i in range(200)], 6).float()
    fro = g.double().norm()[None]
    results, reducer = _run([[blk] for blk in _split(g, 0, [512, 512])], fro, seed=3)
    whole = cheap_spectral_metrics_many([g], fro, seed=3)
    np.testing.assert_allclose(results[0].values.numpy(), whole.values.numpy(), rtol=2e-4)
    assert reducer.numbers == cheap_block_numbers((1024, 512)) <= 40 * (1024 + 512) < 0.2 * g.numel()


def test_zero_and_nonfinite_matrices_and_warm_starts() -> None:
    g = _known(120, 64, [5.0 * 0.7**i for i in range(50)], 5).float()
    zero = torch.zeros(120, 64)
    bad = g.clone()
    bad[3, 4] = float("nan")
    mats = [g, zero, bad]
    fro = torch.tensor([g.double().norm().item(), 0.0, float("nan")], dtype=torch.float64)
    per_rank = [[blk for blk in (_split(m, 0, [60, 60])[r] for m in mats)] for r in range(2)]
    first, _ = _run(per_rank, fro, seed=1)
    res = first[0]
    assert res.values[1].tolist() == [0.0, 0.0, 0.0] and bool(res.exact[1])
    assert torch.isnan(res.values[2]).all()
    # warm-started from the first call: as on the whole matrix with the same warm start
    second, _ = _run(per_rank, fro, seed=2, warm_start=res.bases)
    whole = cheap_spectral_metrics_many(mats, fro, seed=2, warm_start=res.bases)
    np.testing.assert_allclose(second[0].values[0].numpy(), whole.values[0].numpy(), rtol=2e-4)


def test_what_the_sketch_does_not_take_is_refused_by_name() -> None:
    assert not sketchable((40, 500), 1.0)  # small side 40 <= 48: the exact route
    assert not sketchable((400, 500), 1e20)  # float32 products would overflow
    assert sketchable((400, 500), 3.0) and sketchable((10, 10), 0.0) and sketchable((10, 10), float("inf"))
    g = torch.randn(40, 500)
    with pytest.raises(ValueError, match=r"block 0 .*40 x 500.*gather it"):
        cheap_spectral_metrics_blocks([MatrixBlock(g, (40, 500), 0, 0)], g.double().norm()[None], lambda t: t)
    with pytest.raises(ValueError, match="does not fit"):
        MatrixBlock(torch.zeros(10, 7), (20, 8), 0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        MatrixBlock(torch.zeros(10, 8), (20, 8), 0, 15)
    with pytest.raises(ValueError, match="`axis` must be 0"):
        MatrixBlock(torch.zeros(10, 8), (20, 8), 2, 0)


def test_a_process_whose_share_fails_joins_every_sum_then_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradspectra.functional.sketch as sketch

    product = sketch._block_product
    calls = {"rank1": 0}

    def failing(*args: object) -> Tensor:
        name = threading.current_thread().name
        if name == "rank1":
            calls[name] += 1
            if calls[name] == 2:  # the second product, on one process only
                raise MemoryError("out of memory (one process)")
        return product(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(sketch, "_block_product", failing)
    mats = [_known(200, 80, [2.0 * 0.8**i for i in range(60)], 9).float(), torch.randn(120, 300, dtype=torch.float64)]
    fro = torch.stack([m.double().norm() for m in mats])
    per_rank = [[_split(m, 0, [m.shape[0] // 2, m.shape[0] - m.shape[0] // 2])[r] for m in mats] for r in range(2)]
    reducer = Sum(2)
    out: list[object] = [None, None]

    def work(rank: int) -> None:
        try:
            out[rank] = cheap_spectral_metrics_blocks(per_rank[rank], fro, lambda t: reducer(rank, t), seed=1)
        except MemoryError as err:
            out[rank] = err

    threads = [threading.Thread(target=work, args=(r,), name=f"rank{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)  # nobody left waiting in a sum
    assert isinstance(out[1], MemoryError) and isinstance(out[0], CheapSpectra)
    # float32 and float64 matrices: one sum per dtype and product, the same count on both processes
    assert reducer.calls == [6, 6]
