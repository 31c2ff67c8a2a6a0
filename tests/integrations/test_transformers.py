"""The transformers Trainer front door in real Trainer runs on CPU: resume, skip, the missing extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gradspectra.integrations.transformers import GradientSpectrumCallback
from gradspectra.reporting import read_records

from .conftest import Samples, batches, clone, hf_args, tiny_llama

OPTIONS: dict[str, Any] = {"spectra": "exact", "figure_every_n_steps": 0, "warmup_steps": 5, "verbose": False}


class NanAtMarker(nn.Module):
    """The wrapped model's loss, made NaN for a batch whose first sample starts with token 0."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, labels: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        loss = self.model(input_ids=input_ids, labels=labels).loss
        if int(input_ids[0, 0]) == 0:
            loss = loss * float("nan")
        return {"loss": loss}


def train(model: nn.Module, data: list[dict[str, Tensor]], out: Path, callback: Any, **args: Any) -> Any:
    from transformers import Trainer

    trainer = Trainer(
        model=model,
        args=hf_args(out, len(data), **args),
        train_dataset=Samples(data),
        callbacks=[callback],
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
    )
    return trainer


def test_resume_restores_state_and_sets_repeated_records_aside(tmp_path: Path) -> None:
    model, data = tiny_llama(), batches(6)
    first = GradientSpectrumCallback(**OPTIONS)
    train(clone(model), data, tmp_path, first, save_strategy="steps", save_steps=3).train()
    assert first.engine.steps_monitored == 6
    # a second run from the step-3 checkpoint repeats steps 3-5
    second = GradientSpectrumCallback(**OPTIONS)
    train(clone(model), data, tmp_path, second, save_strategy="no").train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-3")
    )
    assert second.engine.steps_monitored == 6  # 3 restored + 3 measured
    assert second.engine.scorer is not None and second.engine.scorer.state_dict()["steps"] >= 6
    folder = tmp_path / "gradspectra"
    assert [r["step"] for r in read_records(folder / "batches.jsonl")] == list(range(6))
    assert [r["step"] for r in read_records(folder / "batches.after-step-2.jsonl")] == [3, 4, 5]


def test_skip_drops_the_flagged_step_and_nothing_recreates_the_gradients(tmp_path: Path) -> None:
    data = batches(4)
    data[2]["input_ids"][0, 0] = 0  # step 2's loss is NaN: every gradient NaN, the step is flagged
    model = NanAtMarker(tiny_llama())
    callback = GradientSpectrumCallback(**{**OPTIONS, "action": "skip"})
    trainer = train(model, data, tmp_path, callback)
    seen: list[dict[str, Tensor]] = []

    class Snapshot(__import__("transformers").TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            seen.append({n: p.detach().clone() for n, p in model.named_parameters()})

    trainer.add_callback(Snapshot())
    trainer.train()
    records = list(callback.batch_records)
    assert [r["flagged"] for r in records] == [False, False, True, False]
    assert records[2].get("skipped") is True and callback.engine.skipped_total == 1
    assert all(torch.isfinite(p).all() for p in seen[-1].values())  # the NaN step never reached the weights
    for name, before in seen[1].items():
        assert torch.equal(seen[2][name], before), name  # step 2 left every parameter as it was
    assert any(not torch.equal(seen[3][n], seen[2][n]) for n in seen[2])  # step 3 trained again


def test_missing_extra_names_it() -> None:
    # the engine first (torchmetrics looks transformers up on import), then transformers made unimportable
    code = (
        "import sys, gradspectra.monitoring\n"
        "for name in [m for m in sys.modules if m.split('.')[0] == 'transformers']:\n"
        "    del sys.modules[name]\n"
        "sys.modules['transformers'] = None\n"
        "try:\n    import gradspectra.integrations.transformers\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 'pip install "gradspectra[hf]"' in out.stdout, out.stdout + out.stderr


def test_bad_option_names_itself() -> None:
    with pytest.raises(ValueError, match="`spectra` can be auto, exact, estimate, got 'fast'"):
        GradientSpectrumCallback(spectra="fast")
    with pytest.raises(TypeError, match="max_overheads"):
        GradientSpectrumCallback(max_overheads=0.1)


def test_instability_stop_ends_training_after_the_warned_step(tmp_path: Path) -> None:
    # from step 3 on the loss is NaN: the 2nd non-finite step in a row (step 4) is a stability warning
    data = batches(8)
    for step in range(3, 8):
        data[step]["input_ids"][0, 0] = 0
    model = NanAtMarker(tiny_llama())
    callback = GradientSpectrumCallback(**{**OPTIONS, "instability_action": "stop"})
    trainer = train(model, data, tmp_path, callback)
    trainer.train()
    records = list(callback.batch_records)
    warned = [r["step"] for r in records if any(e["kind"] == "instability" for e in r["events"])]
    assert warned == [4]
    assert "non-finite gradients or loss in 2 of the last 3 steps" in records[4]["events"][-1]["message"]
    assert trainer.state.global_step == 5  # step 4's optimizer step completed, none after it
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]


def test_per_sample_entries_under_gradient_accumulation(tmp_path: Path) -> None:
    data = batches(4)
    data[2]["input_ids"][3] = data[2]["input_ids"][1]  # a repeated sample in the first micro-batch of step 1
    data[2]["labels"][3] = data[2]["labels"][1]
    callback = GradientSpectrumCallback(**OPTIONS, per_sample="always")
    train(tiny_llama(), data, tmp_path, callback, gradient_accumulation_steps=2, max_steps=2).train()
    records = read_records(tmp_path / "gradspectra" / "batches.jsonl")
    assert len(records) == 2
    for record in records:
        assert [e["index"] for e in record["samples"]] == list(range(8))  # two micro-batches of 4
        assert "samples_note" not in record
    samples = records[1]["samples"]
    assert {e["index"] for e in sorted(samples, key=lambda e: -e["score"])[:2]} == {1, 3}
    assert "gradient almost identical to sample 3 (cosine 1.00, batch mean removed)" in samples[1]["reasons"]
