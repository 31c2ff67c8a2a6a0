"""Time and accuracy of each singular value route on gradient-shaped matrices; prints one markdown table.

Routes: ``torch.linalg.svdvals`` in fp32, the package's ``method="svd"`` / ``"gram"`` / ``"auto"``
(float64 on a rescaled copy), an fp32 Gram + ``eigvalsh`` baseline (what "fast" code often does; not
safe), and the factored ``T x T`` route for a gradient given as ``delta^T @ x``. Errors are relative
to numpy's float64 SVD of the same numbers (for the factored route: of ``delta^T @ x`` formed in
float64 from the same fp32 factors). Times cover the singular values only, not the metrics.

    python benchmarks/spectra.py                       # all default shapes, ~3 min on 2 cores
    python benchmarks/spectra.py --shapes 768x768 --repeats 9
    python benchmarks/spectra.py --shapes 4096x4096 --budget 0   # no time budget: every route
    python benchmarks/spectra.py --threads 1           # stable timings on a machine shared with others

Routes that would overrun ``--budget`` (estimated from the same route on the previous shape) are
listed as skipped. On a busy machine, multi-threaded LAPACK can be slowed down 10-100x by threads
waiting on each other; ``--threads 1`` avoids that.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gradspectra.functional import factored_singular_values, singular_values

DEFAULT_SHAPES = ("384x384", "1536x384", "768x768", "3072x768", "4096x4096")
TOKENS = 64
ROUTES = (
    "svdvals fp32",
    'svdvals fp64 (method="svd")',
    'Gram fp64 (method="gram")',
    'method="auto"',
    "Gram fp32 + eigvalsh (unsafe baseline)",
    "factored T x T",
)
# cheapest first, so a time budget drops the dearest routes of the largest shapes
RUN_ORDER = (ROUTES[5], ROUTES[4], ROUTES[2], ROUTES[3], ROUTES[1], ROUTES[0])
METRICS = ("nuclear_norm", "effective_rank", "spectral_norm")


@dataclass
class Case:
    """One gradient-like matrix: the fp32 ``grad`` every route sees, and the factors when it has them."""

    name: str
    grad: Tensor
    factors: tuple[Tensor, Tensor] | None = None


def low_rank_plus_noise(m: int, n: int, gen: torch.Generator) -> Case:
    """A decaying top-32 spectrum over a noise floor 1% of the top: what accumulated gradients look like."""
    k = min(32, m, n)
    decay = 0.8 ** torch.arange(k, dtype=torch.float32)
    left = torch.randn(m, k, generator=gen) / m**0.5
    right = torch.randn(k, n, generator=gen) / n**0.5
    noise = torch.randn(m, n, generator=gen) * (0.01 / (m**0.5 + n**0.5))
    return Case("low-rank + noise", (left * decay) @ right + noise)


def token_factored(m: int, n: int, gen: torch.Generator) -> Case:
    """``G = delta^T @ x`` over 64 tokens: rank at most 64, formed in fp32 as autograd would."""
    delta = torch.randn(TOKENS, m, generator=gen) * (0.97 ** torch.arange(m, dtype=torch.float32))
    x = torch.randn(TOKENS, n, generator=gen)
    return Case(f"delta^T x (T={TOKENS})", delta.mT @ x, (delta, x))


def reference_metrics(a: np.ndarray) -> dict[str, float]:
    s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    return metrics_of(s)


def metrics_of(s: np.ndarray) -> dict[str, float]:
    s = np.asarray(s, dtype=np.float64)
    total = float(s.sum())
    p = s[s > 0] / total
    return {
        "nuclear_norm": total,
        "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
        "spectral_norm": float(s.max()),
    }


def route_fn(route: str, case: Case) -> Callable[[], Tensor] | None:
    g = case.grad
    if route == ROUTES[0]:
        return lambda: torch.linalg.svdvals(g)
    if route == ROUTES[1]:
        return lambda: singular_values(g, "svd")
    if route == ROUTES[2]:
        return lambda: singular_values(g, "gram")
    if route == ROUTES[3]:
        return lambda: singular_values(g, "auto")
    if route == ROUTES[4]:

        def gram32() -> Tensor:
            gram = g.mT @ g if g.shape[0] >= g.shape[1] else g @ g.mT
            return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()

        return gram32
    if case.factors is None:
        return None
    delta, x = case.factors
    return lambda: factored_singular_values(delta, x)


def parse_shape(text: str) -> tuple[int, int]:
    try:
        m, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"`--shapes` entries look like 768x3072, got {text!r}") from None
    return m, n


class Budget:
    """Skips a route when its cost, extrapolated as m * n * min(m, n) from the last run, would overrun."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()
        self.last: dict[str, tuple[float, float]] = {}

    def allows(self, key: str, units: float, runs: int) -> bool:
        if self.seconds <= 0 or key not in self.last:
            return True
        seen_units, seen_seconds = self.last[key]
        estimate = seen_seconds * units / seen_units * runs
        return time.perf_counter() - self.start + estimate <= self.seconds

    def record(self, key: str, units: float, seconds: float) -> None:
        self.last[key] = (units, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per route (median reported)")
    parser.add_argument("--large-repeats", type=int, default=1, help="timed runs for shapes with min(m, n) >= 2048")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds; dearer routes are skipped (0: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.repeats < 1 or args.large_repeats < 1:
        parser.error(f"`--repeats` and `--large-repeats` must be >= 1, got {args.repeats} and {args.large_repeats}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    budget = Budget(args.budget)
    rows: list[str] = []
    for m, n in args.shapes:
        large = min(m, n) >= 2048
        repeats = args.large_repeats if large else args.repeats
        units = float(m) * n * min(m, n)
        gen = torch.Generator().manual_seed(args.seed)
        for case in (low_rank_plus_noise(m, n, gen), token_factored(m, n, gen)):
            results: dict[str, str] = {}
            if not budget.allows("reference", units, 1):
                for route in ROUTES:
                    if route_fn(route, case) is not None:
                        results[route] = _row(m, n, case.name, route, "skipped (budget)", None, None)
                rows.extend(results[r] for r in ROUTES if r in results)
                continue
            t0 = time.perf_counter()
            ref = reference_metrics(case.grad.double().numpy())
            ref_exact = ref
            if case.factors is not None:
                delta, x = (f.double().numpy() for f in case.factors)
                ref_exact = reference_metrics(delta.T @ x)
            budget.record("reference", units, time.perf_counter() - t0)
            for route in RUN_ORDER:
                fn = route_fn(route, case)
                if fn is None:
                    continue
                runs = repeats + (0 if large else 1)  # one warm-up run where it is cheap
                if not budget.allows(route, units, runs):
                    results[route] = _row(m, n, case.name, route, "skipped (budget)", None, None)
                    continue
                want = ref_exact if route == ROUTES[5] else ref
                times: list[float] = []
                errors = dict.fromkeys(METRICS, 0.0)
                for i in range(runs):
                    t0 = time.perf_counter()
                    s = fn()
                    elapsed = time.perf_counter() - t0
                    if large or i > 0:
                        times.append(elapsed)
                    got = metrics_of(s.double().numpy())
                    for k in METRICS:
                        errors[k] = max(errors[k], abs(got[k] - want[k]) / abs(want[k]))
                median = statistics.median(times)
                budget.record(route, units, median)
                results[route] = _row(m, n, case.name, route, f"{median * 1e3:.1f}", errors, len(times))
            rows.extend(results[r] for r in ROUTES if r in results)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; errors relative to numpy float64 SVD\n")
    print("| shape | matrix | route | median ms (runs) | worst rel. err: nuclear | eff. rank | spectral |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def _row(m: int, n: int, case: str, route: str, ms: str, errors: dict[str, float] | None, runs: int | None) -> str:
    errs = " | ".join(f"{errors[k]:.1e}" for k in METRICS) if errors is not None else " | ".join("-" for _ in METRICS)
    timing = f"{ms} ({runs})" if runs is not None else ms
    return f"| {m}x{n} | {case} | {route} | {timing} | {errs} |"


if __name__ == "__main__":
    main()
