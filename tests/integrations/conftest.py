"""A tiny Llama built from a config and fixed token batches, shared by the three front doors' tests."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import IterableDataset

VOCAB, SEQ, BATCH = 64, 12, 4


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def lora_llama(seed: int = 0) -> nn.Module:
    """:func:`tiny_llama` with peft LoRA adapters (r=4) on q and v; ``lora_B`` drawn, not zero, so that the
    adapters change the model from the first step."""
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = peft.get_peft_model(tiny_llama(seed), config)
    torch.manual_seed(seed + 3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return model


def batches(steps: int, seed: int = 1, poison_at: set[int] | None = None) -> list[dict[str, Tensor]]:
    """``steps`` batches of random tokens; labels are the inputs with the first position ignored, so that the
    mean over label tokens is the same whether a trainer counts labels before or after the shift."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
        if poison_at and step in poison_at:
            ids[:] = ids[0]  # every sample the same: a low-diversity batch
        labels = ids.clone()
        labels[:, 0] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


class Samples(IterableDataset[dict[str, Tensor]]):
    """The samples of :func:`batches` in order (an iterable dataset: the Trainer does not shuffle it)."""

    def __init__(self, steps: list[dict[str, Tensor]]) -> None:
        self.steps = steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for batch in self.steps:
            for i in range(len(batch["input_ids"])):
                yield {k: v[i] for k, v in batch.items()}


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    # one thread: the Trainer's steps are 20x faster on this 2-core machine, and runs are comparable
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def hf_args(out: Any, steps: int, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)
