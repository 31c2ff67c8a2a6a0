"""LoRA fine-tunes through the three front doors: the frozen base weights are measured by their implied
full-weight gradient D^T X under their base names, equal to a run where the same weights are made trainable
(in an lr=0 group: autograd then forms their .grad) and measured the usual way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gradspectra import GradientSpectrumMonitor, GradientSpectrumTracker
from gradspectra.integrations.transformers import GradientSpectrumCallback
from gradspectra.reporting import read_records

from .conftest import Samples, batches, clone, hf_args, lora_llama

peft = pytest.importorskip("peft")  # the `lora` extra; installed by `.[test]`

PAPERS = "*.self_attn.*_proj.weight"
OPTIONS: dict[str, Any] = {
    "include": PAPERS,
    "spectra": "exact",
    "figure_every_n_steps": 0,
    "warmup_steps": 5,
    "verbose": False,
}
KEYS = [f"self_attn.{p}_proj/layer_{i:02d}" for i in range(2) for p in "qkvo"]


def unfrozen(model: nn.Module) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The same model with the watched base weights trainable, in an lr=0 group (they never move)."""
    twin = clone(model)
    base = []
    for name, p in twin.named_parameters():
        if not p.requires_grad and ".self_attn." in name and name.endswith(".weight"):
            p.requires_grad_(True)  # q/k/v/o base weights (the adapters' own are trainable already)
            base.append(p)
    ids = {id(p) for p in base}
    adapters = [p for p in twin.parameters() if p.requires_grad and id(p) not in ids]
    return twin, [{"params": adapters}, {"params": base, "lr": 0.0}]


def groups(model: nn.Module) -> list[dict[str, Any]]:
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


class Lit(pl.LightningModule):
    def __init__(self, model: nn.Module, params: list[dict[str, Any]]) -> None:
        super().__init__()
        self.model, self.params = model, params

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss  # type: ignore[no-any-return]

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.params, lr=0.1)


def run_lightning(
    model: nn.Module,
    params: list[dict[str, Any]],
    data: list[dict[str, Tensor]],
    out: Path,
    monitor: GradientSpectrumMonitor | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    accumulate = options.pop("accumulate", 1)
    precision = options.pop("precision", "32-true")
    monitor = monitor or GradientSpectrumMonitor(**{**OPTIONS, "output_dir": out, **options})
    trainer = pl.Trainer(
        default_root_dir=str(out),
        max_steps=len(data) // accumulate,
        accumulate_grad_batches=accumulate,
        precision=precision,
        logger=False,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Lit(model, params), DataLoader(Samples(data), batch_size=4))
    return read_records(out / "batches.jsonl")


def run_plain(
    model: nn.Module, params: list[dict[str, Any]], data: list[dict[str, Tensor]], out: Path, **options: Any
) -> list[dict[str, Any]]:
    """The plain-loop tracker over ``data`` (SGD on ``params``); the records it returned, in order."""
    optimizer = torch.optim.SGD(params, lr=0.1)
    returned = []
    with GradientSpectrumTracker(model, log_dir=out, optimizer=optimizer, **{**OPTIONS, **options}) as tracker:
        for batch in data:
            loss = model(**batch).loss
            loss.backward()
            returned.append(tracker.step(loss=loss))
            optimizer.step()
            optimizer.zero_grad()
    assert [r["step"] for r in read_records(out / "gradspectra" / "batches.jsonl")] == [r["step"] for r in returned]
    return returned


def assert_same_spectra(mine: list[dict[str, Any]], reference: list[dict[str, Any]], rel: float = 1e-6) -> None:
    assert [r["step"] for r in mine] == [r["step"] for r in reference] and mine
    for a, b in zip(mine, reference):
        assert list(a["metrics"]) == KEYS and list(b["metrics"]) == KEYS
        assert not a["missing_layers"] and not a["nonfinite_layers"]
        for key in KEYS:
            assert a["metrics"][key] == pytest.approx(b["metrics"][key], rel=rel), (a["step"], key)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_lora_measures_the_full_weight_gradient(tmp_path: Path, accumulate: int) -> None:
    model, data = lora_llama(), batches(4)
    twin, twin_groups = unfrozen(model)
    net = clone(model)
    implied = run_lightning(net, groups(net), data, tmp_path / "lora", accumulate=accumulate)
    reference = run_lightning(twin, twin_groups, data, tmp_path / "twin", accumulate=accumulate, gradients="parameters")
    assert_same_spectra(implied, reference)
    first = implied[0]
    assert first["implied_layers"] == {k: "default" if ("q_proj" in k or "v_proj" in k) else None for k in KEYS}
    assert "implied_layers" not in reference[0]
    # the implied gradient does not depend on the adapter's rank: far above r = 4
    assert first["metrics"]["self_attn.q_proj/layer_01"]["effective_rank"] > 8


def test_default_selection_watches_what_the_adapters_wrap(tmp_path: Path) -> None:
    model, data = lora_llama(), batches(2)
    options = {k: v for k, v in OPTIONS.items() if k != "include"}
    monitor = GradientSpectrumMonitor(**options, output_dir=tmp_path)
    run_lightning(model, groups(model), data, tmp_path, monitor=monitor)
    record = monitor.batch_records[-1]
    assert list(record["metrics"]) == [f"self_attn.{p}_proj/layer_{i:02d}" for i in range(2) for p in "qv"]
    assert set(record["implied_layers"].values()) == {"default"}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_transformers_and_plain_loop_doors(tmp_path: Path, accumulate: int) -> None:
    from transformers import Trainer

    model, data = lora_llama(), batches(4)
    twin, twin_groups = unfrozen(model)
    plain = clone(model)
    runs = {}
    for name, net, params, options in (
        ("lora", model, groups(model), {}),
        ("twin", twin, twin_groups, {"gradients": "parameters"}),
    ):
        callback = GradientSpectrumCallback(**{**OPTIONS, **options})
        trainer = Trainer(
            model=net,
            args=hf_args(
                tmp_path / name,
                len(data),
                gradient_accumulation_steps=accumulate,
                per_device_train_batch_size=4 // accumulate,  # the same 4 samples per optimizer step
            ),
            train_dataset=Samples(data),
            callbacks=[callback],
            optimizers=(torch.optim.SGD(params, lr=0.1), None),
        )
        trainer.train()
        runs[name] = read_records(tmp_path / name / "gradspectra" / "batches.jsonl")
    assert_same_spectra(runs["lora"], runs["twin"])

    assert_same_spectra(run_plain(plain, groups(plain), data, tmp_path / "plain"), runs["twin"])


def test_under_the_budget_implied_layers_take_turns(tmp_path: Path) -> None:
    """spectra="auto" with a budget too small to form every D^T X each step: the layers take turns, none is
    reported missing, and each is measured again within a few steps."""
    model, data = lora_llama(), batches(24)
    monitor = GradientSpectrumMonitor(**{**OPTIONS, "spectra": "auto", "max_overhead": 1e-4, "output_dir": tmp_path})
    records = run_lightning(model, groups(model), data, tmp_path, monitor=monitor)
    assert "frozen layers a step" in str(monitor.engine.affordance)  # the user is told, in words
    assert len(records[0]["metrics"]) == 1  # the first step forms one layer: the cost is learned from it
    later = records[4:]
    assert all(r["unmeasured_layers"] for r in later)
    for r in records:
        assert not r["missing_layers"]
        measured = set(r["metrics"])
        assert measured | set(r.get("unmeasured_layers", [])) == set(KEYS)
        assert not measured & set(r.get("unmeasured_layers", []))
        assert measured  # at least one layer a step
    last_seen = {k: max(r["step"] for r in later if k in r["metrics"]) for k in KEYS}
    assert all(records[-1]["step"] - step < 9 for step in last_seen.values()), last_seen


def test_few_tokens_take_the_exact_t_by_t_route(tmp_path: Path) -> None:
    """Fewer tokens than min(m, n) carry gradient: the exact spectra of the implied gradients come from the
    kept rows (T x T), equal to the trainable twin's from .grad."""
    model = lora_llama()
    data = [{k: v[:2] for k, v in b.items()} for b in batches(3)]  # 2 x 12 tokens < 32 = min(m, n)
    twin, twin_groups = unfrozen(model)
    runs = {}
    for name, net, params, options in (
        ("lora", model, groups(model), {}),
        ("twin", twin, twin_groups, {"gradients": "parameters", "factored": False}),
    ):
        runs[name] = run_plain(net, params, data, tmp_path / name, **options)
    # q/o are 32 x 32 (24 tokens < 32: factored); k/v are 16 x 32 (grouped-query heads: 24 >= 16, formed)
    wide = [k for k in KEYS if "q_proj" in k or "o_proj" in k]
    assert all(r["factored_layers"] == wide for r in runs["lora"])
    assert all("factored_layers" not in r for r in runs["twin"])
    assert_same_spectra(runs["lora"], runs["twin"])


def test_bf16_mixed_matches_the_trainable_weights_gradient(tmp_path: Path) -> None:
    """Under autocast the kept input is the float32 one and D^T X is summed in float32; autograd's weight
    gradient is a bf16 product: the two agree to bf16 rounding (measured 0.25 % at worst)."""
    model, data = lora_llama(), batches(3)
    twin, twin_groups = unfrozen(model)
    net = clone(model)
    implied = run_lightning(net, groups(net), data, tmp_path / "lora", precision="bf16-mixed")
    reference = run_lightning(
        twin, twin_groups, data, tmp_path / "twin", precision="bf16-mixed", gradients="parameters"
    )
    assert_same_spectra(implied, reference, rel=1e-2)


def test_per_sample_spectra_of_a_lora_model(tmp_path: Path) -> None:
    """per_sample= on frozen layers: the samples' factors are checked against the implied gradient."""
    model, data = lora_llama(), batches(3)
    for record in run_plain(model, groups(model), data, tmp_path, per_sample="always"):
        assert record is not None and record["samples"] is not None, record.get("samples_note")
        assert len(record["samples"]) == 4 and "samples_note" not in record, record.get("samples_note")
