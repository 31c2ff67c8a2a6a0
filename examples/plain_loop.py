"""A plain PyTorch training loop with GradientSpectrumTracker: one call between backward and the optimizer step.

Run: python examples/plain_loop.py [--steps 60] [--out plain_runs]
Then: tensorboard --logdir plain_runs   (records: plain_runs/gradspectra/batches.jsonl)
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForSequenceClassification

from gradspectra import GradientSpectrumTracker
from gradspectra.demo.data import review_batches
from gradspectra.demo.models import load_tokenizer, minilm_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--out", default="plain_runs")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5)
    stream = review_batches(args.steps, batch_size=16, clean_prefix=25, corrupt_fraction=0.15)
    options = {"include": "*.attention.*", "spectra": "exact", "warmup_steps": 20, "sample_id_key": None}
    with GradientSpectrumTracker(model, log_dir=args.out, optimizer=optimizer, **options) as tracker:
        for planned in stream:
            enc = tokenizer(
                [s.text for s in planned.samples],
                padding="max_length",
                truncation=True,
                max_length=args.max_length,
                return_tensors="pt",
            )
            labels = torch.tensor([s.label for s in planned.samples])
            loss = model(**enc, labels=labels).loss
            loss.backward()
            record = tracker.step(loss=loss, sample_ids=[s.sample_id for s in planned.samples])
            optimizer.step()
            optimizer.zero_grad()
            if record is not None and record["flagged"]:
                reasons = "; ".join(record["reasons"])
                print(f"step {record['step']} flagged ({planned.corruption or 'clean'}): {reasons}")
    print(f"records: {tracker.record_path}")
    print(f"tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
