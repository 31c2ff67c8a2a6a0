"""Fast vs slow thinking, live: layer-wise nuclear norms of attention gradients, answer-only vs chain-of-thought.

A tiny Llama (random weights, built from a config) is trained on synthetic arithmetic twice from the same
initial weights: once with answer-only responses ("fast thinking"), once with step-by-step responses ("slow
thinking"). The monitor records every q/k/v/o projection's gradient; the script draws the mean nuclear norm per
layer of both runs, as in Li, Li & Zhou (2024), and prints each curve's mean absolute difference across layers.

Run: python examples/fast_vs_slow_thinking.py [--steps 60] [--out gradspectra_runs/fast_vs_slow]
"""

import argparse
import random
from pathlib import Path

import lightning.pytorch as pl
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from gradspectra import GradientSpectrumMonitor
from gradspectra.demo.data import arithmetic_problem
from gradspectra.demo.models import CharTokenizer, TinyCausalLM, lm_batch
from gradspectra.functional import layer_mad

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--layers", type=int, default=6)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--out", default="gradspectra_runs/fast_vs_slow")
args = parser.parse_args()

tokenizer = CharTokenizer()
rng = random.Random(0)
problems = [arithmetic_problem(rng) for _ in range(args.steps * args.batch_size)]
components = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
curves = {}
for style in ("fast", "slow"):
    batches = []
    for i in range(0, len(problems), args.batch_size):
        chunk = problems[i : i + args.batch_size]
        responses = [p[1] if style == "fast" else p[2] for p in chunk]
        batches.append(lm_batch(tokenizer, [p[0] for p in chunk], responses))
    pl.seed_everything(0, verbose=False)  # the same initial weights for both runs
    model = TinyCausalLM(tokenizer.vocab_size, num_layers=args.layers)
    monitor = GradientSpectrumMonitor(
        spectra="exact", include="*.self_attn.*", metrics=["nuclear_norm"], figure_every_n_steps=0
    )
    trainer = pl.Trainer(
        max_steps=args.steps,
        logger=TensorBoardLogger(args.out, name=style),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, DataLoader(batches, batch_size=None))
    assert monitor.spectrum is not None
    mean = monitor.spectrum.compute()["mean"][:, 0].cpu()
    keys = [w.key for w in monitor.watched]
    curves[style] = {c: [float(mean[keys.index(f"{c}/layer_{i:02d}")]) for i in range(args.layers)] for c in components}

fig, axes = plt.subplots(1, len(components), figsize=(4 * len(components), 3.2), sharey=False)
for ax, component in zip(axes, components):
    for style, colour in (("fast", "tab:red"), ("slow", "tab:blue")):
        ax.plot(range(args.layers), curves[style][component], marker="o", color=colour, label=f"{style} thinking")
    ax.set_title(component)
    ax.set_xlabel("layer")
axes[0].set_ylabel("mean nuclear norm of the gradient")
axes[0].legend()
fig.tight_layout()
out = Path(args.out) / "nuclear_norm_by_layer.png"
out.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(out, dpi=100)
print(f"{'component':<18} {'fast mean':>10} {'slow mean':>10} {'fast MAD':>9} {'slow MAD':>9}")
for c in components:
    fast, slow = torch.tensor(curves["fast"][c]), torch.tensor(curves["slow"][c])
    print(f"{c:<18} {fast.mean():>10.4f} {slow.mean():>10.4f} {layer_mad(fast):>9.4f} {layer_mad(slow):>9.4f}")
print(f"figure: {out}")
