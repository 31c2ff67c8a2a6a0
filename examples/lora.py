"""A LoRA fine-tune of the pretrained MiniLM-L6 in Lightning, watched through the full-weight gradient D^T X.

The adapters (peft, r=8 on the attention's query and value) are what trains; the monitor measures the frozen
q/k/v/o weights by the gradient they would get if they were trained (what the papers measure), under the
names a full fine-tune has, e.g. ``attention.self.query/layer_03``.

Needs the ``lora`` extra (``pip install "gradspectra[lora]"``, i.e. peft).
Run: python examples/lora.py [--steps 60] [--out lora_runs]
Then: tensorboard --logdir lora_runs   (records: lora_runs/lora/version_0/gradspectra/batches.jsonl)
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import peft
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from gradspectra import GradientSpectrumMonitor
from gradspectra.demo.data import review_batches
from gradspectra.demo.models import ReviewClassifier, TokenizedBatches, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--out", default="lora_runs")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    planned = review_batches(args.steps, batch_size=16, clean_prefix=25, corrupt_fraction=0.15)
    data = TokenizedBatches(planned, load_tokenizer(), max_length=args.max_length)

    model = ReviewClassifier(lr=5e-4)  # LoRA wants a larger learning rate than a full fine-tune
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
    model.encoder = peft.get_peft_model(model.encoder, lora)  # the classifier head stays fully trainable

    # the attention's q/k/v/o, as the papers watch: adapted (query, value) or not (key, output), all frozen
    monitor = GradientSpectrumMonitor(include="*.attention.*", spectra="exact", warmup_steps=20, verbose=True)
    logger = TensorBoardLogger(args.out, name="lora")
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[monitor],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=None, shuffle=False))

    record = monitor.batch_records[-1]
    adapted = [k for k, adapter in record["implied_layers"].items() if adapter is not None]
    print(f"{len(record['implied_layers'])} frozen layers measured by D^T X, {len(adapted)} of them adapted")
    for key in ("attention.self.query/layer_00", "attention.self.key/layer_00", "attention.self.query/layer_05"):
        values = record["metrics"][key]
        rank, nuclear = values["effective_rank"], values["nuclear_norm"]
        adapter = "adapter r=8" if record["implied_layers"][key] else "no adapter"
        print(f"{key} ({adapter}): effective rank {rank:.1f}, nuclear norm {nuclear:.3g}")
    print(f"tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
