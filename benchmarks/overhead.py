"""What the monitor costs: step time with ``GradientSpectrumMonitor`` over step time without, interleaved.

One process, one model that keeps training; blocks of ``--block`` optimizer steps run in turn without
the monitor and with it in each configuration (a fresh ``Trainer`` per block, the same monitor object
for a configuration across its blocks, so its budget keeps what it learned), round after round, so that
a change in the machine's load hits every configuration alike. The first step of each block (the
Trainer starting) is not timed. Step time = wall time from ``on_train_batch_start`` to
``on_train_batch_end`` (forward, backward, the monitor, the optimizer step), with a TensorBoard logger
attached in every configuration, as a user would run it.

Configurations:

- ``none``: no monitor (the baseline);
- ``default``: ``GradientSpectrumMonitor()`` (``spectra="auto"``, ``max_overhead=0.03``);
- ``exact``: ``spectra="exact"``, exact spectra of every layer every step;
- ``estimate``: ``spectra="estimate"``, estimates of every layer every step;
- ``default-nostability``: the default with ``stability=False`` (not in the default set of configurations);
- ``idle``: the monitor attached with ``every_n_steps`` past the run, measuring nothing: what its hooks and
  the Lightning callback cost alone (not in the default set).

With ``--lora`` (the cpu, small and gpu sections) the model gets peft LoRA adapters (r=8) on the attention's
query and value projections and trains only those (and the MiniLM classifier head); the monitor then
measures the frozen base weights by their implied gradient ``D^T X`` (docs/lora.md). Two more
configurations for it (not in the default set):

- ``hooks``: only the hooks that keep ``(D, X)`` of the layers the default watches, released after each
  step, nothing measured: what keeping the references costs inside the training step;
- ``papers``: the default with the papers' layers, ``include`` of every attention projection (q/k/v/o,
  adapted or not: their implied gradients).

The memory line gives the bytes the hooks held at the optimizer step (references and folded sums); with
``--accumulate N`` (``accumulate_grad_batches``) it shows what gradient accumulation adds.

CPU section: the pretrained MiniLM-L6 (``gradspectra.demo``), 16 reviews x 64 tokens, every linear
layer watched (37 matrices). Small section: a tiny Llama (hidden 128, 4 layers, 8 x 32 tokens, a ~20 ms
step on 2 cores), where the monitor's fixed cost, not the spectra, decides the overhead. GPU section
(only when CUDA is available): a Llama-shaped model of about
1.1 B parameters (hidden 2048, 22 layers, intermediate 5632, random init, bf16-mixed), 4 x 512 tokens.

    python benchmarks/overhead.py                         # CPU, ~10 min on 2 cores
    python benchmarks/overhead.py --rounds 2 --block 4    # quicker, noisier
    python benchmarks/overhead.py --section small --configs none,default --rounds 12   # the tiny model
    python benchmarks/overhead.py --section gpu           # on a machine with a GPU
    python benchmarks/overhead.py --section cpu --lora --configs none,hooks,default,papers
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIGS = ("none", "default", "exact", "estimate", "default-nostability", "hooks", "papers", "idle")
PAPERS_INCLUDE = {"cpu": "*.attention.*", "small": "*.self_attn.*_proj.weight", "gpu": "*.self_attn.*_proj.weight"}


class StepTimer:
    """A Lightning callback recording each training step's wall time (built lazily: Lightning is imported late)."""

    def __new__(cls) -> Any:
        import lightning.pytorch as pl

        class _Timer(pl.Callback):
            def __init__(self) -> None:
                self.seconds: list[float] = []
                self._t0 = 0.0

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                if pl_module.device.type == "cuda":
                    import torch

                    torch.cuda.synchronize()
                self._t0 = time.perf_counter()

            def on_train_batch_end(
                self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
            ) -> None:
                if pl_module.device.type == "cuda":
                    import torch

                    torch.cuda.synchronize()
                self.seconds.append(time.perf_counter() - self._t0)

        return _Timer()


def make_monitor(config: str, out: Path, section: str = "cpu") -> Any:
    from gradspectra import GradientSpectrumMonitor

    if config == "hooks":
        return HooksOnly()
    include = PAPERS_INCLUDE[section] if config == "papers" else None
    spectra = {"exact": "exact", "estimate": "estimate"}.get(config, "auto")
    if config == "idle":
        return GradientSpectrumMonitor(output_dir=out / config, verbose=False, every_n_steps=10**6)
    stability = config != "default-nostability"  # what the stability detector costs on top of the default
    return GradientSpectrumMonitor(
        spectra=spectra, output_dir=out / config, verbose=False, stability=stability, include=include
    )


class HooksOnly:
    """A Lightning callback with only the implied-gradient hooks of the default selection, released each step."""

    def __new__(cls) -> Any:
        import lightning.pytorch as pl

        from gradspectra.capture import ImpliedGradients, select_parameters

        class _Hooks(pl.Callback):
            def __init__(self) -> None:
                self.implied: Any = None
                self.kept: list[int] = []
                self.batch_records: list[dict[str, Any]] = []

            def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
                if self.implied is None:
                    self.implied = ImpliedGradients(select_parameters(pl_module).watched)

            def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
                self.kept.append(self.implied.kept_bytes())
                self.implied.clear()

        return _Hooks()


def add_lora(model: Any, section: str) -> Any:
    """peft LoRA (r=8) on the attention's query and value projections; only adapters (and a head) train."""
    import peft

    targets = ["query", "value"] if section == "cpu" else ["q_proj", "v_proj"]
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
    if section == "cpu":
        model.encoder = peft.get_peft_model(model.encoder, config)
    else:
        model.model = peft.get_peft_model(model.model, config)
    return model


def minilm_section(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from torch.utils.data import DataLoader

    from gradspectra.demo.data import review_batches
    from gradspectra.demo.models import ReviewClassifier, TokenizedBatches, load_tokenizer

    steps = (args.rounds + 1) * len(args.configs) * args.block * args.accumulate + 8
    planned = review_batches(steps, batch_size=16, corrupt_fraction=0.0, seed=args.seed)
    data = TokenizedBatches(planned, load_tokenizer(), max_length=64)
    return ReviewClassifier(), DataLoader(data, batch_size=None, shuffle=False), "MiniLM-L6, 16 x 64 tokens, CPU"


def llama_section(args: argparse.Namespace, small: bool | str) -> tuple[Any, Any, str]:
    """A Llama-shaped causal LM; ``small`` shrinks it to run anywhere (a smoke test of this section)."""
    import lightning.pytorch as pl
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if small == "tiny":
        # the first-hour case of issue #16: a step of ~20 ms on this CPU
        shape = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4}
        batch, tokens = 8, 32
    elif small:
        shape = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4}
        batch, tokens = 2, 32
    else:
        shape = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32}
        batch, tokens = 4, 512
    vocab = 1000 if small == "tiny" else 32000
    config = LlamaConfig(vocab_size=vocab, num_key_value_heads=shape["num_attention_heads"], **shape)

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = LlamaForCausalLM(config)

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
            return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-5)

    g = torch.Generator().manual_seed(args.seed)
    steps = (args.rounds + 1) * len(args.configs) * args.block * args.accumulate + 8
    data = [{"input_ids": torch.randint(0, vocab, (batch, tokens), generator=g)} for _ in range(steps)]
    from torch.utils.data import DataLoader

    model = LM()
    params = sum(p.numel() for p in model.parameters())
    label = f"Llama-shaped, {params / 1e9:.2f} B parameters, {batch} x {tokens} tokens"
    return model, DataLoader(data, batch_size=None, shuffle=False), label  # type: ignore[arg-type]


def coverage(records: Sequence[dict[str, Any]]) -> str:
    """What the default measured: the share of layer-steps with the cheap tier's values, the steps with a
    detection value (and on how many anchors), and the cadence of full spectra (observed gaps, and layers /
    full spectra per step)."""
    if not records or "spectra" not in records[0]:
        return ""
    layer_steps = sum(len(r["metrics"]) for r in records)
    cheap = sum(sum("spectral_norm" in v for v in r["metrics"].values()) for r in records)
    detected = sum(bool(r.get("detection")) for r in records)
    anchors = statistics.median(len(r.get("detection") or {}) for r in records)
    last: dict[str, int] = {}
    gaps: list[int] = []
    full_per_step = []
    for t, r in enumerate(records):  # by position: each block's Trainer counts its steps from 0 again
        full = [k for k, v in r["spectra"].items() if v != "cheap"]
        full_per_step.append(len(full))
        for k in full:
            if k in last:
                gaps.append(t - last[k])
            last[k] = t
    n_layers = max(len(r["metrics"]) for r in records)
    per_step = statistics.fmean(full_per_step)
    cadence = f"every ~{n_layers / per_step:.0f} steps" if per_step > 0 else "never"
    observed = f"; observed gaps: median {statistics.median(gaps):.0f}, max {max(gaps)}" if gaps else ""
    light = sum(bool(r.get("light")) for r in records)
    return (
        f"light steps {light}/{len(records)}; "
        f"cheap tier on {100 * cheap / max(1, layer_steps):.1f}% of layer-steps; detection value on "
        f"{detected}/{len(records)} steps ({anchors:g} anchor layers, median); full spectra {per_step:.2f} "
        f"layers/step ({n_layers} layers: each {cadence}{observed})"
    )


def run(args: argparse.Namespace, section: str) -> str:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    if section == "cpu":
        model, loader, label = minilm_section(args)
        trainer_kw: dict[str, Any] = {"accelerator": "cpu"}
    elif section == "small":
        model, loader, label = llama_section(args, small="tiny")
        label = "tiny " + label
        trainer_kw = {"accelerator": "cpu"}
    else:
        model, loader, label = llama_section(args, small=not torch.cuda.is_available())
        cuda = torch.cuda.is_available()
        trainer_kw = {"accelerator": "gpu" if cuda else "cpu", "precision": "bf16-mixed" if cuda else "32-true"}
        if cuda:
            label += f", {torch.cuda.get_device_name()}"
    if args.lora:
        model = add_lora(model, section)
        label += ", LoRA r=8 on q/v"
    iterator = iter(loader)
    configs: tuple[str, ...] = args.configs
    times: dict[str, list[float]] = {c: [] for c in configs}
    round_medians: dict[str, list[float]] = {c: [] for c in configs}
    records: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        monitors = {c: make_monitor(c, out, section) for c in configs if c != "none"}
        warm_records: dict[str, int] = {}
        # round 0 warms up (allocator, kernels, the monitors' budgets and estimator bases) and is not timed
        for r in range(args.rounds + 1):
            for config in configs if r % 2 == 0 else tuple(reversed(configs)):
                if args.settle > 0:
                    # let the previous block's after-effects pass (a TensorBoard writer thread still
                    # serialising, garbage, freed memory) before timing the next one
                    gc.collect()
                    time.sleep(args.settle)
                timer = StepTimer()
                callbacks = [timer] + ([monitors[config]] if config != "none" else [])
                trainer = pl.Trainer(
                    max_steps=args.block,
                    accumulate_grad_batches=args.accumulate,
                    max_epochs=1,
                    logger=TensorBoardLogger(str(out / "tb"), name=config),
                    callbacks=callbacks,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    **trainer_kw,
                )
                block = [next(iterator) for _ in range(args.block * args.accumulate)]
                from torch.utils.data import DataLoader

                trainer.fit(model, DataLoader(block, batch_size=None, shuffle=False))  # type: ignore[arg-type]
                if r > 0:
                    times[config].extend(timer.seconds[1:])
                    round_medians[config].append(statistics.median(timer.seconds[1:]))
                elif config != "none":
                    warm_records[config] = len(monitors[config].batch_records)
                print(
                    f"round {r}/{args.rounds} {config:>8}: "
                    + " ".join(f"{1000 * s:.0f}" for s in timer.seconds[1:])
                    + " ms",
                    file=sys.stderr,
                    flush=True,
                )
        for config, monitor in monitors.items():
            records[config] = list(monitor.batch_records)[warm_records.get(config, 0) :]
    base = statistics.median(times["none"])
    lines = [
        f"### {label}",
        "",
        "| configuration | median step ms | ratio to no monitor | mean ratio | per-round ratio: median (range), "
        "mean +- standard error "
        "| monitor ms/step: median, mean (% of the no-monitor median step) "
        "| layers exact / estimated / cheap only / deferred per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        med = statistics.median(times[config])
        mean_ratio = statistics.fmean(times[config]) / statistics.fmean(times["none"])
        recs = records[config]
        monitor_ms = statistics.median(r["monitor_ms"] for r in recs) if recs else 0.0
        # the monitor's own time, timed inside it (light steps' include their share of the records made
        # together): far less noisy than the step-time ratio on a fast step, blind to what it costs outside
        monitor_mean = statistics.fmean(r["monitor_ms"] for r in recs) if recs else 0.0
        if recs and "spectra" in recs[0]:
            ex = statistics.fmean(sum(v in ("exact", "exact+audit") for v in r["spectra"].values()) for r in recs)
            es = statistics.fmean(sum(v == "estimate" for v in r["spectra"].values()) for r in recs)
            ch = statistics.fmean(sum(v == "cheap" for v in r["spectra"].values()) for r in recs)
            de = statistics.fmean(len(r["deferred_layers"]) for r in recs)
            spread = f"{ex:.1f} / {es:.1f} / {ch:.1f} / {de:.1f}"
        elif recs:
            spread = f"{len(recs[0]['metrics'])} / 0 / 0 / 0"
        else:
            spread = ""
        # each round's block median over the same round's no-monitor block median: slow changes in the
        # machine's load cancel within a round
        paired = [c / n for c, n in zip(round_medians[config], round_medians["none"])]
        se = statistics.stdev(paired) / math.sqrt(len(paired)) if len(paired) > 1 else math.nan
        per_round = (
            f"{statistics.median(paired):.3f}x ({min(paired):.3f}-{max(paired):.3f}), "
            f"{statistics.fmean(paired):.3f} +- {se:.3f}"
        )
        lines.append(
            f"| {config} | {1000 * med:.0f} | {med / base:.3f}x | {mean_ratio:.3f}x | {per_round} "
            f"| {monitor_ms:.2f}, {monitor_mean:.2f} ({monitor_mean / (10 * base):.1f}%) | {spread} |"
        )
    lines.append("")
    for config in configs:
        if config == "default" and coverage(records[config]):
            lines.append(f"Coverage of the default: {coverage(records[config])}.")
            lines.append("")
    for config, monitor in monitors.items():
        kept = getattr(monitor, "kept", None)
        if kept:
            mib = [k / 2**20 for k in kept]
            held = f"median {statistics.median(mib):.1f} MiB, max {max(mib):.1f} MiB"
            lines.append(f"Memory held by the hooks at the optimizer step ({config}): {held}.")
            lines.append("")
    lines.append(
        f"{len(times['none'])} timed steps per configuration ({args.rounds} rounds x {args.block - 1}), "
        f"torch threads {torch.get_num_threads()}, monitor cpu_threads 1."
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--section", choices=("cpu", "small", "gpu", "all"), default="all", help="gpu runs only with CUDA"
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds over the configurations (default 4)")
    parser.add_argument("--block", type=int, default=6, help="steps per block, the first not timed (default 6)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for training (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="seconds to wait (after a garbage collection) before each block (default 2)",
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS[:4]),
        help="comma-separated configurations to interleave, 'none' always included "
        f"(default {','.join(CONFIGS[:4])}; 'none,default' spends every round on the default's ratio)",
    )
    parser.add_argument("--gpu-smoke", action="store_true", help="run the GPU section's code on a tiny model on CPU")
    parser.add_argument(
        "--accumulate", type=int, default=1, help="micro-batches per optimizer step (accumulate_grad_batches)"
    )
    parser.add_argument(
        "--lora", action="store_true", help="LoRA adapters (peft, r=8) on q/v; the monitor measures implied gradients"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here (.md)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs can be any of {', '.join(CONFIGS)}, got {args.configs!r}")
    args.configs = tuple(c for c in CONFIGS if c == "none" or c in configs)
    if ("hooks" in args.configs or "papers" in args.configs) and not args.lora:
        parser.error("--configs hooks and papers measure LoRA runs: add --lora")
    if args.block < 2:
        parser.error(f"--block must be >= 2 (the first step is not timed), got {args.block}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sections = []
    if args.section in ("cpu", "all") and not args.gpu_smoke:
        sections.append(run(args, "cpu"))
    if args.section in ("small", "all") and not args.gpu_smoke:
        sections.append(run(args, "small"))
    if args.section in ("gpu", "all"):
        if torch.cuda.is_available() or args.gpu_smoke:
            sections.append(run(args, "gpu"))
        else:
            sections.append("### GPU section\n\nSkipped: no CUDA device on this machine.")
    text = "\n\n".join(sections)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
