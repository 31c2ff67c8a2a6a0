"""The detection value (a coarse effective rank by low-order deflated Lanczos quadrature) against numpy float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradspectra.functional import coarse_effective_rank_many
from reference import ref_metrics, to_numpy64, with_spectrum


def erank(a: torch.Tensor) -> float:
    return float(ref_metrics(to_numpy64(a))["effective_rank"])


def known(m: int, n: int, s: np.ndarray, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(with_spectrum(np.random.default_rng(seed), m, n, s), dtype=dtype)


@pytest.mark.parametrize(("m", "n"), [(300, 120), (120, 300)])
def test_exact_when_the_deflated_top_holds_the_whole_spectrum(m: int, n: int) -> None:
    s = np.array([5.0, 4.0, 2.0, 2.0, 1.0, 0.5, 0.1])  # rank 7 <= rank 8: no tail
    assert coarse_effective_rank_many([known(m, n, s, 0)]).item() == pytest.approx(erank(known(m, n, s, 0)), rel=1e-5)
    g64 = known(m, n, s, 0, torch.float64)
    assert coarse_effective_rank_many([g64]).item() == pytest.approx(erank(g64), rel=1e-9)
    small = known(40, 6, np.array([3.0, 2.0, 1.0, 1.0, 0.5, 0.01]), 1)  # min(m, n) <= rank
    assert coarse_effective_rank_many([small]).item() == pytest.approx(erank(small), rel=1e-5)


def test_extreme_magnitudes_give_the_same_value() -> None:
    base = known(200, 100, np.logspace(0, -3, 100), 2, torch.float64)
    # one call each: the start and the probes are drawn per call and group of same-shaped matrices
    one = coarse_effective_rank_many([base]).item()
    for scale in (1e-25, 1e25):
        assert coarse_effective_rank_many([base * scale]).item() == pytest.approx(one, rel=1e-7)
    single = coarse_effective_rank_many([base.float()]).item()
    for scale in (1e-6, 1e6):
        assert coarse_effective_rank_many([base.float() * scale]).item() == pytest.approx(single, rel=1e-4)


def test_zero_nonfinite_and_empty() -> None:
    good = known(200, 100, np.linspace(1, 0.1, 100), 3)
    nan, inf = good.clone(), good.clone()
    nan[3, 4] = float("nan")
    inf[0, 0] = float("inf")
    got = coarse_effective_rank_many([torch.zeros(200, 100), nan, inf, good])
    assert got[0].item() == 0.0 and math.isnan(got[1].item()) and math.isnan(got[2].item())
    assert 0.5 * erank(good) < got[3].item() < 2 * erank(good)  # the others do not spoil it
    assert coarse_effective_rank_many([]).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_reads_the_upcast_numbers(dtype: torch.dtype) -> None:
    g = known(256, 128, np.logspace(0, -2, 128), 4).to(dtype)
    assert coarse_effective_rank_many([g]).item() == pytest.approx(
        coarse_effective_rank_many([g.float()]).item(), rel=1e-4
    )


def test_steady_and_ordered_like_the_effective_rank() -> None:
    """The same value on every call (fixed start and probes), and, as the tail of a spectrum broadens or
    collapses, it moves the way the papers' effective rank does: what a detector needs, whatever its bias."""
    mats, exact = [], []
    for k, tail in enumerate((0.0, 0.01, 0.03, 0.1, 0.3, 1.0)):  # a rank-8 top, then 120 values at `tail` x
        s = np.concatenate([np.linspace(3, 1, 8), tail * np.linspace(1, 0.05, 120)])
        g = known(384, 128, s, 10 + k)
        mats.append(g)
        exact.append(erank(g))
    first = coarse_effective_rank_many(mats)
    assert torch.equal(first, coarse_effective_rank_many(mats))
    assert exact == sorted(exact) and first.tolist() == sorted(first.tolist())
    for got, want in zip(first.tolist(), exact):
        assert 0.8 * want < got < 1.5 * want  # coarse, but of the order of the effective rank


def test_a_collapsed_tail_moves_it_several_fold_and_clean_batches_little() -> None:
    rng = np.random.default_rng(6)

    def grad(tokens: int) -> torch.Tensor:  # a linear layer's gradient over `tokens` tokens: D^T X
        return torch.tensor(rng.normal(size=(tokens, 384)).T @ rng.normal(size=(tokens, 384)), dtype=torch.float32)

    clean = coarse_effective_rank_many([grad(256) for _ in range(4)]).numpy()
    dup = coarse_effective_rank_many([grad(16)]).item()  # one sample's few tokens: the tail collapses
    assert dup < 0.3 * clean.min()
    assert clean.std() / clean.mean() < 0.05


def test_a_higher_order_converges_to_the_effective_rank() -> None:
    g = known(400, 200, 1 / (1 + np.arange(200.0)), 5)
    coarse = coarse_effective_rank_many([g]).item()
    fine = coarse_effective_rank_many([g], rank=128, probes=16, lanczos_steps=32).item()
    want = erank(g)
    assert abs(fine / want - 1) < 0.02 and abs(fine / want - 1) < abs(coarse / want - 1)


@pytest.mark.parametrize(("name", "value"), [("probes", 1), ("lanczos_steps", 0), ("rank", 0)])
def test_bad_arguments_are_named(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"`{name}`.*{value!r}"):
        coarse_effective_rank_many([torch.ones(3, 3)], **{name: value})  # type: ignore[arg-type]
