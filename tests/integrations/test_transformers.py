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


def _bert_classifier(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def _classes(steps: int) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        {"input_ids": torch.randint(1, 64, (4, 10), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
        for _ in range(steps)
    ]


def test_the_loss_is_read_from_the_models_output_under_accumulation(tmp_path: Path) -> None:
    """A TrainerCallback is not given the loss: it is read from each training forward's output. With the
    Trainer's num_items_in_batch (a causal LM) the micro-batches' losses add up to the step's mean over its
    label tokens; without it (a classifier) the step's loss is their mean. Evaluation forwards do not count."""
    from transformers import Trainer

    # a causal LM, 2 micro-batches of 4 a step: the record's loss is the mean over both micro-batches'
    # label tokens at the step's weights (step 0: the initial model)
    lm, data = tiny_llama(), batches(4)
    initial = clone(lm).eval()
    callback = GradientSpectrumCallback(**OPTIONS)
    args = hf_args(tmp_path / "lm", 2, gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=1)
    trainer = Trainer(
        model=lm,
        args=args,
        train_dataset=Samples(data),
        eval_dataset=Samples(data[:1]),
        callbacks=[callback],
        optimizers=(torch.optim.SGD(lm.parameters(), lr=0.1), None),
    )
    trainer.train()
    records = read_records(tmp_path / "lm" / "gradspectra" / "batches.jsonl")
    with torch.no_grad():
        logits = initial(input_ids=torch.cat([data[0]["input_ids"], data[1]["input_ids"]])).logits
        labels = torch.cat([data[0]["labels"], data[1]["labels"]])
        expected = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert [r["step"] for r in records] == [0, 1]
    assert records[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert all("loss_seen" not in r and r["loss"] is not None for r in records)

    # a model whose forward takes no loss kwargs (no num_items_in_batch; the Trainer divides each micro-batch's
    # loss by the accumulation steps): the mean of the micro-batches' losses. transformers' own classifiers
    # take the kwargs and ignore them, so the Trainer back-propagates (and reports) the sum of their means:
    # the record says the same
    data = _classes(4)
    for wrapped, combine in ((True, "mean"), (False, "sum")):
        model = _bert_classifier()
        initial = clone(model).eval()
        callback = GradientSpectrumCallback(**OPTIONS)
        trainer = Trainer(
            model=_NoLossKwargs(model) if wrapped else model,
            args=hf_args(tmp_path / combine, 2, gradient_accumulation_steps=2),
            train_dataset=Samples(data),
            callbacks=[callback],
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )
        result = trainer.train()
        records = read_records(tmp_path / combine / "gradspectra" / "batches.jsonl")
        with torch.no_grad():
            losses = [float(initial(**batch).loss) for batch in data[:2]]
        expected = sum(losses) / (2 if combine == "mean" else 1)
        assert records[0]["loss"] == pytest.approx(expected, rel=1e-5), combine
        assert result.training_loss == pytest.approx(sum(r["loss"] for r in records) / 2, rel=1e-5), combine
        assert all("loss_seen" not in r for r in records)


class _NoLossKwargs(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return {"loss": self.model(input_ids=input_ids, labels=labels).loss}


def test_a_model_that_returns_no_loss_leaves_the_record_without_one(tmp_path: Path) -> None:
    from transformers import Trainer

    model, data = tiny_llama(), batches(2)

    def loss_outside(outputs: Any, labels: Tensor, num_items_in_batch: Any = None) -> Tensor:
        logits = outputs["logits"]
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    callback = GradientSpectrumCallback(**OPTIONS)
    trainer = Trainer(
        model=model,
        args=hf_args(tmp_path, 2),
        train_dataset=Samples(data),
        callbacks=[callback],
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        compute_loss_func=loss_outside,  # the labels are taken out: the model computes no loss
    )
    trainer.train()
    records = read_records(tmp_path / "gradspectra" / "batches.jsonl")
    assert len(records) == 2 and all(r["loss"] is None and r["loss_seen"] is False for r in records)
    assert callback._loss_tap is None  # the hooks are removed at the end of training
    assert not model._forward_hooks and not model._forward_pre_hooks


class _RaisesAt(nn.Module):
    """The wrapped model, raising in the forward of its ``at``-th training call."""

    def __init__(self, model: nn.Module, at: int) -> None:
        super().__init__()
        self.model, self.at, self.calls = model, at, 0

    def forward(self, input_ids: Tensor, labels: Tensor) -> dict[str, Tensor]:
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("boom")
        return {"loss": self.model(input_ids=input_ids, labels=labels).loss}


def test_after_training_raises_the_loss_hooks_are_replaced_not_added(tmp_path: Path) -> None:
    # a TrainerCallback hears of no exception: the hooks stay on the model until the next train(), which
    # replaces them; what they keep meanwhile is one running sum, however many forwards run
    from transformers import Trainer

    model, data = _RaisesAt(tiny_llama(), at=3), batches(4)
    callback = GradientSpectrumCallback(**OPTIONS)

    def trainer(out: str) -> Any:
        return Trainer(
            model=model,
            args=hf_args(tmp_path / out, 4),
            train_dataset=Samples(data),
            callbacks=[callback],
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )

    with pytest.raises(RuntimeError, match="boom"):
        trainer("first").train()
    assert len(model._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1
    for batch in data:
        model(**batch)  # the user's own forwards after the failure
    tap = callback._loss_tap
    assert tap is not None and tap._count == 4 and tap._total is not None and tap._total.dim() == 0
    with torch.no_grad():  # (not a training forward: not counted)
        first_loss = float(model(**data[0])["loss"])
    assert tap._count == 4
    trainer("second").train()
    records = read_records(tmp_path / "second" / "gradspectra" / "batches.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3] and all(r["loss"] is not None for r in records)
    assert records[0]["loss"] == pytest.approx(first_loss, rel=1e-5)  # nothing from before the step counted
    assert not model._forward_hooks and not model._forward_pre_hooks  # removed at the end of training


def test_stability_options_are_saved_as_checked() -> None:
    from types import MappingProxyType

    options = {"growth": 6.0}
    callback = GradientSpectrumCallback(stability=MappingProxyType(options), verbose=False)
    options["growth"] = 0.5  # the user's dict changes later: what was checked is what is saved
    saved = callback.state()["args"]["stability"]
    assert saved == {"growth": 6.0}
    rebuilt = GradientSpectrumCallback(**callback.state()["args"])
    assert rebuilt.engine.stability is not None and rebuilt.engine.stability.limits["growth"] == 6.0


def test_a_loss_that_cannot_be_read_leaves_the_step_without_one_and_training_goes_on() -> None:
    from gradspectra.integrations.transformers import _LossTap

    class Unreadable(Tensor):
        def detach(self) -> Tensor:  # type: ignore[override]
            raise RuntimeError("cannot detach")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bad = False

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            loss = (x**2).mean()
            return {"loss": loss.as_subclass(Unreadable) if self.bad else loss}

    model = Model().train()
    tap = _LossTap(model)
    x = torch.ones(3, requires_grad=True)
    model(x)
    model.bad = True
    assert "loss" in model(x)  # the forward returns; the hook did not raise
    assert tap.take() is None  # one of the step's losses is missing: the step has none
    model.bad = False
    model(2 * x)
    loss = tap.take()
    assert loss is not None and float(loss) == pytest.approx(4.0)  # the next step is read again
    tap.remove()
