"""The three front doors (Lightning, transformers Trainer, a plain loop) over one engine give the same records."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gradspectra import GradientSpectrumMonitor, GradientSpectrumTracker
from gradspectra.integrations.transformers import GradientSpectrumCallback
from gradspectra.reporting import read_records

from .conftest import Samples, batches, clone, hf_args, tiny_llama

STEPS = 6
OPTIONS: dict[str, Any] = {"spectra": "exact", "figure_every_n_steps": 2, "warmup_steps": 5, "verbose": False}


class LitCausalLM(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss  # type: ignore[no-any-return]

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run_lightning(model: nn.Module, data: list[dict[str, Tensor]], out: Path) -> tuple[list[dict[str, Any]], Path]:
    monitor = GradientSpectrumMonitor(**OPTIONS)
    logger = TensorBoardLogger(str(out), name="tb")
    trainer = pl.Trainer(
        default_root_dir=str(out),
        max_steps=len(data),
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(LitCausalLM(model), DataLoader(Samples(data), batch_size=4))
    records = read_records(Path(logger.log_dir) / "gradspectra" / "batches.jsonl")
    # a layer without an index is named by its module path, which the LightningModule's attribute prefixes
    for r in records:
        r["metrics"] = {k.removeprefix("model."): v for k, v in r["metrics"].items()}
    return records, Path(logger.log_dir)


def run_transformers(
    model: nn.Module, data: list[dict[str, Tensor]], out: Path, **options: Any
) -> tuple[list[dict[str, Any]], Path]:
    from transformers import Trainer

    callback = GradientSpectrumCallback(**{**OPTIONS, **options})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(
        model=model,
        args=hf_args(out, len(data)),
        train_dataset=Samples(data),
        callbacks=[callback],
        optimizers=(optimizer, None),
    )
    trainer.train()
    folder = out / "gradspectra"
    return read_records(folder / "batches.jsonl"), folder


def run_plain(
    model: nn.Module, data: list[dict[str, Tensor]], out: Path, **options: Any
) -> tuple[list[dict[str, Any]], Path]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientSpectrumTracker(model, log_dir=out, optimizer=optimizer, **{**OPTIONS, **options}) as tracker:
        for batch in data:
            loss = model(**batch).loss
            loss.backward()
            tracker.step(loss=loss)
            optimizer.step()
            optimizer.zero_grad()
    return read_records(out / "gradspectra" / "batches.jsonl"), out


def spectrum_tags(log_dir: Path) -> set[str]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    wanted = [t for t in tags if re.match(r"^(grad_spectrum|gradspectra/flagged)", t)]
    return {t.replace("/model.lm_head", "/lm_head") for t in wanted}


def test_three_front_doors_measure_the_same_gradients(tmp_path: Path) -> None:
    model, data = tiny_llama(), batches(STEPS)
    runs = {
        "lightning": run_lightning(clone(model), data, tmp_path / "pl"),
        "transformers": run_transformers(clone(model), data, tmp_path / "hf"),
        "plain": run_plain(clone(model), data, tmp_path / "plain"),
    }
    reference, _ = runs["lightning"]
    assert [r["step"] for r in reference] == list(range(STEPS))
    layers = set(reference[0]["metrics"])
    assert "self_attn.q_proj/layer_01" in layers and "lm_head" in layers
    for name, (records, _) in runs.items():
        assert [r["step"] for r in records] == list(range(STEPS)), name
        for mine, ref in zip(records, reference):
            assert set(mine["metrics"]) == layers, name
            for layer, values in ref["metrics"].items():
                assert mine["metrics"][layer] == pytest.approx(values, rel=1e-6), (name, mine["step"], layer)
    # the loss: given to Lightning and the plain loop, read from the model's output by the transformers
    # callback (the Trainer passes num_items_in_batch: the mean over the label tokens all the same)
    for name in ("plain", "transformers"):
        assert [r["loss"] for r in runs[name][0]] == pytest.approx([r["loss"] for r in reference], rel=1e-6), name
    assert all("loss_seen" not in r for _, (records, _) in runs.items() for r in records)
    # the same tags in every door's TensorBoard event files
    tags = {name: spectrum_tags(log_dir) for name, (_, log_dir) in runs.items()}
    assert "grad_spectrum/effective_rank/self_attn.q_proj/layer_00" in tags["lightning"]
    assert tags["transformers"] == tags["lightning"] == tags["plain"]


def test_transformers_door_reads_clipped_gradients_as_documented(tmp_path: Path) -> None:
    """max_grad_norm clips before on_pre_optimizer_step: norms scale by max_norm / norm, ranks do not move."""
    model, data = tiny_llama(), batches(1)
    unclipped, _ = run_transformers(clone(model), data, tmp_path / "free")
    from transformers import Trainer

    callback = GradientSpectrumCallback(**OPTIONS)
    trainer = Trainer(
        model=clone(model),
        args=hf_args(tmp_path / "clip", 1, max_grad_norm=0.5),
        train_dataset=Samples(data),
        callbacks=[callback],
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
    )
    trainer.train()
    clipped = callback.batch_records[0]["metrics"]
    free = unclipped[0]["metrics"]
    total = sum(v["frobenius_norm"] ** 2 for v in free.values()) ** 0.5  # every parameter is a watched weight here?
    assert total > 0.5
    ratio = {k: clipped[k]["nuclear_norm"] / free[k]["nuclear_norm"] for k in free}
    # one factor for every layer (the global clip), below 1, and ranks unchanged
    factors = list(ratio.values())
    assert max(factors) == pytest.approx(min(factors), rel=1e-5) and factors[0] < 1.0
    for k in free:
        assert clipped[k]["effective_rank"] == pytest.approx(free[k]["effective_rank"], rel=1e-6)
