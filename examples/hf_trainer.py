"""Fine-tune the pretrained MiniLM-L6 with transformers' Trainer and watch its gradient spectra.

Run: python examples/hf_trainer.py [--steps 60] [--out hf_runs]
Then: tensorboard --logdir hf_runs   (records: hf_runs/gradspectra/batches.jsonl)
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import IterableDataset
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from gradspectra.demo.data import review_batches
from gradspectra.demo.models import load_tokenizer, minilm_path
from gradspectra.integrations.transformers import GradientSpectrumCallback


class ReviewStream(IterableDataset[dict[str, torch.Tensor]]):
    """Templated reviews, some batches deliberately corrupted, in order (so a batch stays a batch)."""

    def __init__(self, steps: int, batch_size: int, max_length: int) -> None:
        tokenizer = load_tokenizer()
        self.items = []
        self.corrupted: dict[int, str] = {}
        for b in review_batches(steps, batch_size=batch_size, clean_prefix=25, corrupt_fraction=0.15):
            if b.corruption:
                self.corrupted[b.index] = b.corruption
            enc = tokenizer(
                [s.text for s in b.samples], padding="max_length", truncation=True, max_length=max_length
            )
            for i, s in enumerate(b.samples):
                self.items.append(
                    {
                        "input_ids": torch.tensor(enc["input_ids"][i]),
                        "attention_mask": torch.tensor(enc["attention_mask"][i]),
                        "labels": torch.tensor(s.label),
                    }
                )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--out", default="hf_runs")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = ReviewStream(args.steps, batch_size=16, max_length=args.max_length)
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2)
    # the q/k/v/o attention projections, as both papers watch; exact spectra every step
    callback = GradientSpectrumCallback(include="*.attention.*", spectra="exact", warmup_steps=20, verbose=True)
    training = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=3e-5,
        max_grad_norm=0.0,  # clipping happens before the callback reads gradients: off, to read them unclipped
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    Trainer(model=model, args=training, train_dataset=data, callbacks=[callback]).train()
    print(f"records: {callback.record_path}")
    print(f"tensorboard --logdir {Path(args.out).resolve()}")
    flagged = [r for r in callback.batch_records if r["flagged"]]
    print(f"flagged {len(flagged)} of {len(callback.batch_records)} steps; injected corruptions: {data.corrupted}")


if __name__ == "__main__":
    main()
