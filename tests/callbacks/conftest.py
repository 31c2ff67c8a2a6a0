"""Small real models and data for callback tests: a tiny BERT classifier built from a transformers config."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


class RandomTokens(Dataset[dict[str, Tensor]]):
    def __init__(self, n: int, seq: int = 12, vocab: int = 50, seed: int = 0, nan_at: set[int] | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, seq), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.nan_at = nan_at or set()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.ids[i],
            "labels": self.labels[i],
            "sample_id": torch.tensor(1000 + i),
            "poison": torch.tensor(float("nan") if i in self.nan_at else 1.0),
        }


class TinyBert(pl.LightningModule):
    def __init__(self, layers: int = 2, hidden: int = 32, lr: float = 1e-2, frozen_layer: int | None = None) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=50,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=hidden * 2,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,  # deterministic, so a reference backward can be compared
            attention_probs_dropout_prob=0.0,
        )
        self.bert = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(hidden, 2)
        self.unused = nn.Linear(hidden, hidden)  # never in the graph: its grad stays None
        self.lr = lr
        if frozen_layer is not None:
            for p in self.bert.encoder.layer[frozen_layer].parameters():
                p.requires_grad_(False)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        hidden = self.bert(input_ids=batch["input_ids"]).last_hidden_state.mean(1)
        hidden = hidden * batch["poison"][:, None]
        loss = nn.functional.cross_entropy(self.head(hidden), batch["labels"])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(n: int = 32, batch_size: int = 4, **kwargs: Any) -> DataLoader[dict[str, Tensor]]:
    return DataLoader(RandomTokens(n, **kwargs), batch_size=batch_size, shuffle=False)


def trainer_kwargs(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(tmp_path),
        max_steps=6,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(autouse=True)
def _seed() -> None:
    pl.seed_everything(0, verbose=False)
