"""Accuracy and cost of the spectral-metric estimator on real fine-tuning gradients; prints a markdown report.

Gradients are the weight gradients of every linear layer, read after each backward of a few AdamW
steps of

- the pretrained MiniLM-L6 encoder fine-tuned as a review classifier (``ReviewClassifier``, 16
  samples x 64 tokens): 384x384 attention, 1536x384 and 384x1536 FFN matrices;
- tiny causal LMs (``TinyCausalLM``, random init) learning chain-of-thought arithmetic (16 samples,
  loss on the responses): hidden 64 (the demo's model; every matrix has min(m, n) <= the default
  rank, so the estimator is exact there) and hidden 256 (256x256, 512x256, 256x512).

Each matrix is measured by :func:`gradspectra.functional.estimate_spectral_metrics_many` and by the
exact float64 route (:func:`gradspectra.functional.spectral_metrics_many`, ``svdvals``); the report
gives, per model, shape and metric, the median and 95th percentile relative error, the median
estimated ``rel_error``, the share of values whose error is within 3x the estimate, and ms per
matrix for both (median of ``--repeats`` timed runs, one shape group at a time, same process).
A second table shows warm starts: the previous step's bases with one power iteration fewer.

    python benchmarks/accuracy.py                      # ~3.5 min on 1 thread (1 min: two 4096x4096 SVDs)
    python benchmarks/accuracy.py --steps 4 --large-size 0 --out accuracy.md
    python benchmarks/accuracy.py --rank 64 --power-iters 2 --probes 8 --lanczos-steps 16

Timings on a machine shared with other jobs are noisy: estimator and exact are timed alternately
so that both see the same load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gradspectra.functional import METRIC_NAMES, estimate_spectral_metrics_many, spectral_metrics_many

REPORTED = ("nuclear_norm", "effective_rank", "spectral_norm", "stable_rank", "top_sv_ratio")


@dataclass
class Group:
    """The matrices of one model and shape, step by step (same parameter order in every step)."""

    model: str
    shape: tuple[int, int]
    steps: list[list[Tensor]] = field(default_factory=list)


def linear_grads(model: torch.nn.Module, keep: Callable[[str], bool]) -> dict[str, Tensor]:
    return {
        name: p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.grad is not None and p.ndim == 2 and keep(name)
    }


def minilm_gradients(steps: int, seed: int) -> list[dict[str, Tensor]]:
    """Encoder weight gradients of ``steps`` AdamW steps of MiniLM-L6 fine-tuning (16 x 64 tokens)."""
    from gradspectra.demo.data import review_batches
    from gradspectra.demo.models import ReviewClassifier, TokenizedBatches, load_tokenizer

    torch.manual_seed(seed)
    model = ReviewClassifier()
    data = TokenizedBatches(review_batches(steps, batch_size=16, seed=seed), load_tokenizer(), max_length=64)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    out = []
    for batch in data:
        opt.zero_grad()
        logits = model(batch["input_ids"], batch["attention_mask"])
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        out.append(linear_grads(model, lambda name: name.startswith("encoder.encoder.")))
        opt.step()
    return out


def lm_gradients(steps: int, seed: int, hidden: int) -> list[dict[str, Tensor]]:
    """Decoder-layer weight gradients of ``steps`` AdamW steps of a tiny Llama on arithmetic."""
    from gradspectra.demo.data import arithmetic_batches
    from gradspectra.demo.models import CharTokenizer, TinyCausalLM, lm_batch

    torch.manual_seed(seed)
    tokenizer = CharTokenizer()
    model = TinyCausalLM(tokenizer.vocab_size, hidden_size=hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = []
    for planned in arithmetic_batches(steps, batch_size=16, corrupt_fraction=0.0, seed=seed):
        batch = lm_batch(tokenizer, [s.prompt for s in planned.samples], [s.response for s in planned.samples])
        opt.zero_grad()
        model.model(**batch).loss.backward()
        out.append(linear_grads(model, lambda name: ".layers." in name))
        opt.step()
    return out


def by_shape(model: str, steps: Sequence[dict[str, Tensor]]) -> list[Group]:
    groups: dict[tuple[int, int], Group] = {}
    for step in steps:
        per_shape: dict[tuple[int, int], list[Tensor]] = defaultdict(list)
        for grad in step.values():
            per_shape[(grad.shape[0], grad.shape[1])].append(grad)
        for shape, mats in per_shape.items():
            groups.setdefault(shape, Group(model, shape)).steps.append(mats)
    return list(groups.values())


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Settings:
    rank: int
    power_iters: int
    probes: int
    lanczos_steps: int

    def kwargs(self) -> dict[str, int]:
        return {
            "rank": self.rank,
            "power_iters": self.power_iters,
            "probes": self.probes,
            "lanczos_steps": self.lanczos_steps,
        }


def evaluate(group: Group, settings: Settings, repeats: int) -> tuple[list[str], list[str]]:
    """Accuracy rows and one warm-start row for one group."""
    idx = {name: i for i, name in enumerate(METRIC_NAMES)}
    errors: dict[str, list[float]] = defaultdict(list)
    estimated: dict[str, list[float]] = defaultdict(list)
    est_times: list[float] = []
    exact_times: list[float] = []
    count = 0
    cold_fewer: list[tuple[float, float]] = []
    warm_fewer: list[tuple[float, float]] = []
    previous: list[Tensor] | None = None
    fewer = max(1, settings.power_iters - 1)
    for mats in group.steps:
        exact = spectral_metrics_many(mats)
        est = estimate_spectral_metrics_many(mats, **settings.kwargs())
        for _ in range(repeats):  # alternate, so that both see the same machine load
            est_times.append(timed(lambda m=mats: estimate_spectral_metrics_many(m, **settings.kwargs())))
            exact_times.append(timed(lambda m=mats: spectral_metrics_many(m)))
        count += 1
        for name in REPORTED:
            want = exact[:, idx[name]]
            got = est.values[:, idx[name]]
            errors[name].extend(((got - want).abs() / want.abs()).tolist())
            estimated[name].extend(est.rel_error[:, idx[name]].tolist())
        # warm start: one power iteration fewer, from the previous step's bases, on the same matrices
        kwargs = {**settings.kwargs(), "power_iters": fewer}
        cols = [idx["nuclear_norm"], idx["effective_rank"]]
        cold = estimate_spectral_metrics_many(mats, **kwargs)
        cold_fewer.extend(map(tuple, ((cold.values[:, cols] - exact[:, cols]).abs() / exact[:, cols]).tolist()))
        if previous is not None:
            warm = estimate_spectral_metrics_many(mats, warm_start=previous, **kwargs)
            warm_fewer.extend(map(tuple, ((warm.values[:, cols] - exact[:, cols]).abs() / exact[:, cols]).tolist()))
        previous = est.bases
    n = sum(len(m) for m in group.steps)
    per_call = n / count  # matrices per timed call
    est_ms = statistics.median(est_times) / per_call * 1e3
    exact_ms = statistics.median(exact_times) / per_call * 1e3
    rows = []
    shape = f"{group.shape[0]}x{group.shape[1]}"
    for name in REPORTED:
        err = np.asarray(errors[name])
        est_err = np.asarray(estimated[name])
        covered = float(np.mean(err <= 3 * est_err))
        rows.append(
            f"| {group.model} | {shape} | {n} | {name} | {np.median(err):.2e} | {np.percentile(err, 95):.2e} "
            f"| {np.median(est_err):.2e} | {covered:.0%} | {est_ms:.2f} | {exact_ms:.2f} |"
        )

    def pair(values: Sequence[tuple[float, float]] | dict[str, list[float]]) -> str:
        if isinstance(values, dict):
            return f"{np.median(values['nuclear_norm']):.2e} / {np.median(values['effective_rank']):.2e}"
        arr = np.asarray(values)
        return f"{np.median(arr[:, 0]):.2e} / {np.median(arr[:, 1]):.2e}" if len(arr) else "-"

    warm_row = f"| {group.model} | {shape} | {pair(cold_fewer)} | {pair(warm_fewer)} | {pair(errors)} |"
    return rows, [warm_row]


def large_cases(settings: Settings, size: int, seed: int) -> list[str]:
    """Synthetic ``size x size`` matrices, timed once each: estimator (second of two runs) and exact.

    Both are hard cases for the default rank: broad spectra whose tail beyond rank 96 holds much
    of the nuclear norm. ``s_i = 1/i``: full rank (the tail holds ~40% of the nuclear norm at
    4096). ``delta^T x``: a gradient-like product over ``size / 2`` tokens (rank ``size / 2``),
    both factors with feature scales ``i^-1/2``.
    """
    gen = torch.Generator().manual_seed(seed)
    r = torch.arange(size, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    power_law = ((u / (1 + r)) @ v.mT).to(torch.float32)
    del u, v
    tokens = size // 2
    feature_scales = (1 + r.float()) ** -0.5
    delta = torch.randn(tokens, size, generator=gen) * feature_scales
    x = torch.randn(tokens, size, generator=gen) * feature_scales
    factored = delta.mT @ x
    idx = {name: i for i, name in enumerate(METRIC_NAMES)}
    rows = []
    for name, g in (("s_i = 1/i", power_law), (f"delta^T x, {tokens} tokens", factored)):
        estimate_spectral_metrics_many([g], **settings.kwargs())
        est_s = timed(lambda g=g: estimate_spectral_metrics_many([g], **settings.kwargs()))
        est = estimate_spectral_metrics_many([g], **settings.kwargs())
        exact_s = timed(lambda g=g: spectral_metrics_many([g]))
        exact = spectral_metrics_many([g])
        errs = ((est.values - exact).abs() / exact.abs())[0]
        cells = " | ".join(
            f"{errs[idx[m]]:.2e} (est. {est.rel_error[0, idx[m]]:.2e})" for m in ("nuclear_norm", "effective_rank")
        )
        rows.append(f"| {name} | {size}x{size} | {est_s * 1e3:.0f} | {exact_s * 1e3:.0f} | {cells} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="AdamW steps per model (gradients per layer)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per step and shape group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm-hidden", type=int, nargs="*", default=[64, 256], help="tiny LM sizes (none: skip)")
    parser.add_argument("--no-minilm", action="store_true", help="skip MiniLM (no pretrained weights needed)")
    parser.add_argument(
        "--large-size", type=int, default=4096, help="size of the synthetic square matrix timed once (0: skip)"
    )
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--power-iters", type=int, default=None)
    parser.add_argument("--probes", type=int, default=None)
    parser.add_argument("--lanczos-steps", type=int, default=None)
    args = parser.parse_args()
    if args.steps < 2 or args.repeats < 1:
        parser.error(f"`--steps` must be >= 2 and `--repeats` >= 1, got {args.steps} and {args.repeats}")
    torch.set_num_threads(args.threads)
    import inspect

    defaults = {
        k: p.default
        for k, p in inspect.signature(estimate_spectral_metrics_many).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    settings = Settings(
        rank=args.rank or defaults["rank"],
        power_iters=args.power_iters or defaults["power_iters"],
        probes=args.probes or defaults["probes"],
        lanczos_steps=args.lanczos_steps or defaults["lanczos_steps"],
    )

    groups: list[Group] = []
    start = time.perf_counter()
    if not args.no_minilm:
        groups += by_shape("MiniLM-L6", minilm_gradients(args.steps, args.seed))
    for hidden in args.lm_hidden:
        groups += by_shape(f"tiny Llama h{hidden}", lm_gradients(args.steps, args.seed, hidden))
    collected = time.perf_counter() - start

    rows: list[str] = []
    warm_rows: list[str] = []
    for group in groups:
        r, w = evaluate(group, settings, args.repeats)
        rows += r
        warm_rows += w
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); estimator {settings.kwargs()}; "
        f"{args.steps} AdamW steps per model (gradients collected in {collected:.0f} s); "
        "errors relative to exact float64 svdvals",
        "",
        "| model | shape | matrices | metric | median rel. err | p95 rel. err | median est. rel_error "
        "| err <= 3x est. | ms/matrix estimator | ms/matrix exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Warm start: median rel. error (nuclear norm / effective rank) with power_iters="
        f"{max(1, settings.power_iters - 1)} cold and warm (the previous step's bases; steps 2+), and with "
        f"power_iters={settings.power_iters} cold",
        "",
        f"| model | shape | cold, {max(1, settings.power_iters - 1)} iter | warm, "
        f"{max(1, settings.power_iters - 1)} iter | cold, {settings.power_iters} iter |",
        "|---|---|---|---|---|",
        *warm_rows,
    ]
    if args.large_size > 0:
        lines += [
            "",
            "| synthetic matrix | shape | ms estimator | ms exact | nuclear norm rel. err | effective rank rel. err |",
            "|---|---|---|---|---|---|",
            *large_cases(settings, args.large_size, args.seed),
        ]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
