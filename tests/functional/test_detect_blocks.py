"""The detection value (and the estimator) on matrices held in blocks across processes: the whole matrices'.

Threads stand for the processes, summing through a barrier (as in test_sketch_blocks.py); real collectives run
in tests/callbacks/test_model_parallel.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import Tensor

from gradspectra.functional import coarse_effective_rank_many, frobenius_norms
from gradspectra.functional.detect import coarse_effective_rank_blocks, detection_block_numbers
from gradspectra.functional.estimate import estimate_spectral_metrics_blocks, estimate_spectral_metrics_many
from gradspectra.functional.sketch import MatrixBlock

from .test_sketch_blocks import Sum, _known, _split


def _threads(per_rank: list[list[MatrixBlock]], fn: object, expected: type = ()) -> tuple[list[object], Sum]:  # type: ignore[assignment]
    reducer = Sum(len(per_rank))
    out: list[object] = [None] * len(per_rank)

    def work(rank: int) -> None:
        try:
            out[rank] = fn(per_rank[rank], lambda t: reducer(rank, t))  # type: ignore[operator]
        except expected as err:  # raised after every sum was joined: the others finish
            out[rank] = err
        except BaseException as err:  # anything else: nobody is left waiting in the barrier
            out[rank] = err
            reducer.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,), name=f"rank{r}") for r in range(len(per_rank))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return out, reducer


def _effective_rank(g: Tensor) -> float:
    s = np.linalg.svd(g.double().numpy(), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_one_group_of_blocks_gives_the_whole_matrices_detection_value() -> None:
    # one shape, one axis: the same random start as on the whole matrices; only the scaling (by the Frobenius
    # norm, not the largest entry) and the order of the sums differ
    mats = [_known(200, 120, [3.0 * 0.93**i for i in range(120)], seed).float() for seed in range(3)]
    fro = torch.stack([m.double().norm() for m in mats])
    per_rank = [[_split(m, 0, [110, 90])[r] for m in mats] for r in range(2)]
    out, reducer = _threads(per_rank, lambda blocks, summed: coarse_effective_rank_blocks(blocks, fro, summed))
    assert torch.equal(out[0], out[1])  # type: ignore[arg-type]
    whole = coarse_effective_rank_many(mats)
    np.testing.assert_allclose(out[0].numpy(), whole.numpy(), rtol=1e-4)  # type: ignore[union-attr]
    # 3 products for the top, 2 per Lanczos step: one sum each for all the matrices, thin ones
    assert reducer.calls == [3 + 2 * 8] * 2
    # what one process sends: (2 m + n) k for the top (k = 8) and 4 probes x (m + n) per step, a matrix:
    # 14,400 of its 24,000 entries here; for a 4096 x 4096 layer, 2.1 % of them
    assert reducer.numbers == 3 * ((2 * 200 + 120) * 8 + 8 * 4 * (200 + 120)) == 3 * detection_block_numbers((200, 120))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_mixed_shapes_axes_zero_and_nan(dtype: torch.dtype) -> None:
    mats = [
        _known(200, 120, [2.0 * 0.95**i for i in range(120)], 1),
        _known(96, 150, [1.0] * 60 + [0.1] * 36, 2),
        torch.zeros(96, 150, dtype=torch.float64),
        _known(64, 100, [1.0 * 0.9**i for i in range(64)], 3),
        _known(200, 120, [5.0 * 0.8**i for i in range(100)], 4),
    ]
    mats[3][5, 7] = float("nan")
    mats = [m.to(dtype) for m in mats]
    layouts = [(0, [100, 100, 0]), (1, [50, 50, 50]), (1, [50, 50, 50]), (0, [22, 21, 21]), (0, [100, 100, 0])]
    per_rank: list[list[MatrixBlock]] = [[], [], []]
    for g, (axis, sizes) in zip(mats, layouts):
        for r, blk in enumerate(_split(g, axis, sizes)):
            per_rank[r].append(blk)
    fro = torch.stack([m.double().norm() for m in mats])
    names = ["effective_rank", "nuclear_norm", "spectral_norm"]

    def run(blocks: list[MatrixBlock], summed: object) -> object:
        return estimate_spectral_metrics_blocks(blocks, fro, summed, names, rank=16, probes=8, lanczos_steps=12)  # type: ignore[arg-type]

    out, _ = _threads(per_rank, run)
    got = out[0]
    assert torch.equal(got.values.nan_to_num(-1), out[1].values.nan_to_num(-1))  # type: ignore[union-attr]
    assert got.values[2].tolist() == [0.0, 0.0, 0.0]  # type: ignore[union-attr]
    assert torch.isnan(got.values[3]).all()  # type: ignore[union-attr]
    whole = estimate_spectral_metrics_many(mats, names, rank=16, probes=8, lanczos_steps=12)
    for i in (0, 1, 4):
        s = np.linalg.svd(mats[i].double().numpy(), compute_uv=False)
        exact = np.array([_effective_rank(mats[i]), s.sum(), s[0]])
        mine = got.values[i].numpy()  # type: ignore[union-attr]
        err = np.abs(mine - exact) / exact
        # within 3 of its own error estimates (plus bf16's rounding), like the whole matrices' estimate
        slack = 2e-2 if dtype == torch.bfloat16 else 1e-6
        assert (err <= 3 * got.rel_error[i].numpy() + slack).all(), (i, err, got.rel_error[i])  # type: ignore[union-attr]
        assert (np.abs(mine - whole.values[i].numpy()) / exact < 0.1).all()


@pytest.mark.parametrize("failing_call", [1, 4])
def test_a_process_whose_share_fails_joins_every_sum_then_raises(
    monkeypatch: pytest.MonkeyPatch, failing_call: int
) -> None:
    import gradspectra.functional.estimate as estimate

    answer = estimate._block_answer
    calls = [0]

    def failing(*args: object, **kwargs: object) -> Tensor:
        if threading.current_thread().name == "rank1":
            calls[0] += 1
            if calls[0] == failing_call:  # (the first product, or the fourth)
                raise MemoryError("out of memory (one process)")
        return answer(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(estimate, "_block_answer", failing)
    mats = [_known(150, 100, [1.0 * 0.9**i for i in range(100)], 5).float()]
    fro = torch.stack([m.double().norm() for m in mats])
    per_rank = [[_split(m, 1, [50, 50])[r] for m in mats] for r in range(2)]
    out, reducer = _threads(
        per_rank, lambda blocks, summed: coarse_effective_rank_blocks(blocks, fro, summed), expected=MemoryError
    )
    assert isinstance(out[1], MemoryError) and isinstance(out[0], Tensor)
    assert reducer.calls[0] == reducer.calls[1] == 3 + 2 * 8  # every sum joined


@pytest.mark.parametrize(("axis", "sizes"), [(0, [64, 64, 64, 64]), (1, [64, 64, 64, 64]), (0, [70, 70, 70, 46])])
def test_four_processes_and_gradient_like_spectra(axis: int, sizes: list[int]) -> None:
    # sums of token outer products with decaying output gradients: long-tailed, rank 192 of 256, as a linear
    # layer's gradient of 192 tokens
    g = torch.Generator().manual_seed(0)
    mats = [
        (torch.randn(192, 256, generator=g) * torch.logspace(0, -3, 192)[:, None]).T
        @ torch.randn(192, 256, generator=g)
        for _ in range(6)
    ]
    fro = torch.stack([m.double().norm() for m in mats])
    per_rank = [[_split(m, axis, sizes)[r] for m in mats] for r in range(4)]
    out, _ = _threads(per_rank, lambda blocks, summed: coarse_effective_rank_blocks(blocks, fro, summed))
    np.testing.assert_allclose(out[0].numpy(), coarse_effective_rank_many(mats).numpy(), rtol=1e-5)  # type: ignore[union-attr]


def test_tiny_and_huge_norms_stay_finite() -> None:
    # scaled by the Frobenius norm, the factor capped as for whole matrices: no overflow to inf
    base = _known(150, 100, [1.0 * 0.9**i for i in range(100)], 7)
    for mats in ([(base * 1e-39).float(), (base * 1e30).float()], [base * 1e-300]):
        fro = frobenius_norms(mats)  # (rescaled where the squares underflow)
        per_rank = [[_split(m, 0, [75, 75])[r] for m in mats] for r in range(2)]
        out, _ = _threads(per_rank, lambda blocks, summed, fro=fro: coarse_effective_rank_blocks(blocks, fro, summed))
        got = out[0]
        assert isinstance(got, Tensor) and torch.isfinite(got).all() and (got > 0).all(), got
        whole = coarse_effective_rank_many(mats)  # one group each call: the same random start, like for like
        np.testing.assert_allclose(got[-1:].numpy(), whole[-1:].numpy(), rtol=1e-4)
        assert abs(got[0].item() / whole[0].item() - 1) < 0.05  # (subnormal float32 entries: digits lost)
