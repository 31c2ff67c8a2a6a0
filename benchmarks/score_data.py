"""Throughput of `score_data`: the factored route against the papers' per-sample method, on the same samples.

Models (float32, CPU, eval mode, q/k/v/o attention projections of every layer watched):

- ``minilm``: the pretrained all-MiniLM-L6-v2 (6 layers, hidden 384) with a new 2-class head (seed 0), on
  generated reviews (text/label);
- ``llama``: a tiny Llama built from a config (4 layers, hidden 256, intermediate 688, 4 heads, 2 key/value
  heads, random weights, seed 0: the shape of ``cheap_accuracy.py``) with a word-level tokenizer over the
  generated data (:class:`WordTokenizer`, about 60 tokens a sample, a vocabulary of a few hundred words), on
  generated arithmetic prompts with chain-of-thought responses (loss on the response tokens only). A 30522-word
  vocabulary on hidden 256 would make the output layer (7.8M weights, 2.7x the rest of the model) dominate both
  routes, which no real LLM shape does; the character tokenizer gives ~220 tokens a sample, close to the
  hidden size, where a ``T x T`` core is as large as the matrix.
- ``llama-768`` (not run by default): the same with hidden 768, intermediate 2048, 12 heads, 4 key/value heads,
  to show how the speedup grows with the width of the watched matrices (a full SVD costs ``O(n^3)`` per matrix
  and sample, the forward and backward ``O(T n^2)``).

Routes timed:

- ``factored``: ``score_data(method="factored")``: one forward and backward per batch, per-sample spectra from
  ``T x T`` cores in float64;
- ``reference``: ``score_data(method="reference")``: batch size 1, one backward, ``.grad``, float64 SVD;
- ``papers``: the papers' loop as their code runs it: batch size 1, one backward, ``.grad``, float32
  ``torch.linalg.svdvals`` of every watched matrix (the fastest per-sample baseline; the speedup is against it).

Run: ``python benchmarks/score_data.py --samples 64 --batch-size 16 --threads 2``.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from gradspectra.data_scoring import (
    collate,
    encode,
    infer_task,
    load_data,
    load_model,
    per_sample_loss,
    score_data,
    watched_weights,
)
from gradspectra.demo.data import arithmetic_problem, review
from gradspectra.demo.models import minilm_path


def reviews(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.randint(0, 1)
        out.append({"text": review(rng, label), "label": label, "id": f"review-{i}"})
    return out


def arithmetic(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt, _, slow = arithmetic_problem(rng)
        out.append({"prompt": prompt, "response": slow, "id": f"cot-{i}"})
    return out


class WordTokenizer:
    """Words, numbers and punctuation marks as tokens, over a vocabulary built from the given texts (0 pads)."""

    def __init__(self, texts: Sequence[str]) -> None:
        words = sorted({w for t in texts for w in self.split(t)})
        self.index = {w: i + 1 for i, w in enumerate(words)}
        self.pad_token_id = 0

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text)

    @property
    def vocab_size(self) -> int:
        return len(self.index) + 1

    def encode(self, text: str) -> list[int]:
        return [self.index[w] for w in self.split(text)]


def build(name: str, data: Sequence[dict[str, Any]]) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of one benchmark model."""
    if name == "minilm":
        return load_model(minilm_path(), "classification", 2)
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = WordTokenizer([r["prompt"] + r["response"] for r in data])
    torch.manual_seed(0)
    wide = name == "llama-768"
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=768 if wide else 256,
        intermediate_size=2048 if wide else 688,
        num_hidden_layers=4,
        num_attention_heads=12 if wide else 4,
        num_key_value_heads=4 if wide else 2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config), tokenizer


def papers_loop(model: nn.Module, tokenizer: Any, data: Sequence[dict[str, Any]]) -> list[list[float]]:
    """The papers' loop: per sample one backward, read ``.grad``, float32 ``svdvals`` of each watched matrix.

    Returns each sample's nuclear norms (one per watched matrix), so the work cannot be skipped.
    """
    rows = load_data(data)
    task = infer_task(rows)
    samples = encode(rows, task, tokenizer, 512)
    watched = watched_weights(model, None)
    model.eval()
    out = []
    for sample in samples:
        batch = collate([sample], getattr(tokenizer, "pad_token_id", 0) or 0, torch.device("cpu"))
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, batch, task).sum().backward()
        out.append([float(torch.linalg.svdvals(w.grad_matrix()).sum()) for w in watched])  # type: ignore[arg-type]
    model.zero_grad(set_to_none=True)
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """``(wall seconds, process CPU seconds, result)``: CPU time is steadier on a machine shared with others."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def max_rel_diff(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> float:
    worst = 0.0
    for ra, rb in zip(a, b):
        for key, values in ra["layers"].items():
            for metric, v in values.items():
                ref = rb["layers"][key][metric]
                worst = max(worst, abs(v - ref) / max(abs(ref), 1e-30))
    return worst if not math.isnan(worst) else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="samples per model (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="factored route's batch size (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--models", nargs="+", default=["minilm", "llama"], choices=["minilm", "llama", "llama-768"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 model, {args.samples} samples, "
        f"factored batch size {args.batch_size}",
        "",
        "| model | watched matrices | mean tokens | factored (samples/s) | reference, float64 SVD (samples/s) "
        "| papers, float32 SVD (samples/s) | speedup vs papers, wall (CPU time) "
        "| speedup vs reference, wall (CPU time) | max rel. diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        data = reviews(args.samples) if name == "minilm" else arithmetic(args.samples)
        model, tokenizer = build(name, data)
        model.float()
        run: dict[str, Any] = {"tokenizer": tokenizer, "progress": False}
        score_data(model, data[: args.batch_size], batch_size=args.batch_size, **run)  # warm-up
        t_fact, c_fact, fact = timed(partial(score_data, model, data, batch_size=args.batch_size, **run))
        t_ref, c_ref, ref = timed(partial(score_data, model, data, method="reference", **run))
        t_pap, c_pap, _ = timed(partial(papers_loop, model, tokenizer, data))
        n = len(data)
        tokens = sum(r["length"] for r in fact) / n
        lines.append(
            f"| {name} | {len(fact[0]['layers'])} | {tokens:.1f} | {n / t_fact:.1f} | {n / t_ref:.2f} | "
            f"{n / t_pap:.2f} | {t_pap / t_fact:.1f}x ({c_pap / c_fact:.1f}x) | {t_ref / t_fact:.1f}x "
            f"({c_ref / c_fact:.1f}x) | {max_rel_diff(fact, ref):.2e} |"
        )
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
