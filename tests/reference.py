"""Plain numpy float64 references for the tests: every formula written out again, independently of the package."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch

# The accuracy promised for every metric, whatever the input dtype, against float64 math on the same numbers.
RTOL = 1e-6

SHAPES: tuple[tuple[int, int], ...] = ((1, 7), (7, 1), (1, 1), (5, 5), (40, 12), (12, 40), (64, 64), (150, 30))


def to_numpy64(t: torch.Tensor) -> np.ndarray:
    """The float64 value of exactly the numbers in ``t`` (bf16/fp16/fp32 upcasts are exact)."""
    return t.detach().to(torch.float64).numpy()


def random_orthogonal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n x k`` with orthonormal columns, Haar distributed (QR with the sign of R's diagonal fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def with_spectrum(rng: np.random.Generator, m: int, n: int, s: np.ndarray) -> np.ndarray:
    """``U diag(s) V^T`` with random orthonormal ``U`` (m x r) and ``V`` (n x r), ``r = len(s) <= min(m, n)``."""
    r = len(s)
    return (random_orthogonal(rng, m, r) * np.asarray(s, dtype=np.float64)) @ random_orthogonal(rng, n, r).T


def spectra(r: int) -> dict[str, np.ndarray]:
    """Known spectra of length ``r``: the shapes gradients take, and the degenerate ones."""
    k = min(4, r)
    half = max(1, r // 2)
    return {
        "geometric": 0.8 ** np.arange(r),
        "steep_geometric": 0.4 ** np.arange(r),
        "low_rank_plus_noise": np.concatenate([np.linspace(3.0, 1.0, k), np.full(r - k, 1e-5)]),
        "flat": np.ones(r),
        "rank_one": np.concatenate([[2.5], np.zeros(r - 1)]),
        "rank_deficient": np.concatenate([np.linspace(2.0, 0.5, half), np.zeros(r - half)]),
    }


def ref_singular_values(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if min(a.shape[-2:]) == 0:
        return np.zeros((*a.shape[:-2], 0))
    return np.linalg.svd(a, compute_uv=False)


def ref_metrics_from_s(s: np.ndarray, fro: float) -> dict[str, float]:
    """Metrics of one matrix from its singular values, with the 0-for-0/0 conventions of the definitions."""
    s = np.asarray(s, dtype=np.float64)
    total = float(s.sum())
    top = float(s[0]) if len(s) else 0.0
    if total > 0:
        p = s / total
        p = p[p > 0]
        erank = float(np.exp(-np.sum(p * np.log(p))))
    else:
        erank = 0.0
    return {
        "nuclear_norm": total,
        "spectral_norm": top,
        "frobenius_norm": fro,
        "stable_rank": (fro / top) ** 2 if top > 0 else 0.0,
        "top_sv_ratio": top / total if total > 0 else 0.0,
        "effective_rank": erank,
        # (sum s^2)^2 / sum s^4 on s / s_1 (no overflow), 0 for the zero matrix
        "participation_ratio": float(np.sum((s / top) ** 2) ** 2 / np.sum((s / top) ** 4)) if top > 0 else 0.0,
    }


def ref_metrics(a: np.ndarray) -> dict[str, float]:
    """Every metric of one finite matrix, float64 numpy."""
    a = np.asarray(a, dtype=np.float64)
    peak = np.abs(a).max() if a.size else 0.0
    scale = peak if peak > 0 else 1.0
    # scaled like any careful float64 code would, so 1e200 entries do not overflow the reference itself
    s = ref_singular_values(a / scale) * scale
    fro = float(np.sqrt(np.sum((a / scale) ** 2)) * scale)
    return ref_metrics_from_s(s, fro)


def assert_metric_close(name: str, got: float, want: float, rtol: float = RTOL, context: object = "") -> None:
    """Relative closeness; an exact reference zero must be matched exactly."""
    assert np.isfinite(got), f"{name}: got {got}, want {want} ({context})"
    if want == 0:
        assert got == 0, f"{name}: got {got}, want exactly 0 ({context})"
    else:
        assert abs(got - want) <= rtol * abs(want), (
            f"{name}: got {got!r}, want {want!r}, rel err {abs(got - want) / abs(want):.2e} ({context})"
        )


def ref_mad(values: Sequence[float]) -> float:
    """Paper 1's mean absolute difference, as a loop."""
    if len(values) < 2:
        return 0.0
    diffs = [abs(float(values[i + 1]) - float(values[i])) for i in range(len(values) - 1)]
    return sum(diffs) / len(diffs)


def ref_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def ref_stream_stats(values: Sequence[float]) -> dict[str, float]:
    """Streaming statistics of a sequence of observations, the two-pass way (non-finite ones only counted)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    n = len(finite)
    return {
        "mean": float(finite.mean()) if n else float("nan"),
        "std": float(finite.std(ddof=0)) if n else float("nan"),
        "min": float(finite.min()) if n else float("nan"),
        "max": float(finite.max()) if n else float("nan"),
        "last": float(v[-1]) if len(v) else float("nan"),
        "count": float(n),
        "nonfinite": float(len(v) - n),
    }


@contextmanager
def single_threaded() -> Iterator[None]:
    """One BLAS/LAPACK thread for torch and numpy while the small matrices of these tests are decomposed.

    On a machine shared with other jobs, two spinning OpenMP/OpenBLAS threads that wait on each
    other make a 100 x 30 decomposition take seconds instead of microseconds.
    """
    previous = torch.get_num_threads()
    with ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # numpy keeps its threads; only slower on a busy machine
            pass
        else:
            stack.enter_context(threadpool_limits(limits=1))
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def load_benchmark(name: str) -> Any:
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package), registered in
    ``sys.modules`` as ``<name>_benchmark`` so that its dataclasses find their module."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
