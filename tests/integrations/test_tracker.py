"""The plain-loop tracker: records and event files, NaN steps, skip, resume, every_n_steps, close."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradspectra import GradientAnomalyError, GradientSpectrumTracker
from gradspectra.reporting import read_records
from gradspectra.reporting.tags import EVENTS_TAG

from .conftest import batches, tiny_llama


def test_nan_step_is_recorded_flagged_and_skipped(tmp_path: Path) -> None:
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"action": "skip", "spectra": "exact", "figure_every_n_steps": 0, "verbose": False}
    tracker = GradientSpectrumTracker(model, log_dir=tmp_path, optimizer=optimizer, **options)
    for step, batch in enumerate(batches(4)):
        loss = model(**batch).loss * (float("nan") if step == 2 else 1.0)
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        record = tracker.step(loss=loss, sample_ids=[10 * step + i for i in range(4)])
        optimizer.step()
        optimizer.zero_grad()
        assert record is not None
        if step == 2:
            assert record["flagged"] and record["skipped"] and record["nonfinite_layers"]
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    tracker.close()
    records = read_records(tmp_path / "gradspectra" / "batches.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[1]["sample_ids"] == [10, 11, 12, 13]
    assert records[2]["loss"] is None  # NaN written as null
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("grad_spectrum/nuclear_norm/self_attn.q_proj/layer_00")]
    assert steps == [0, 1, 3]  # a NaN is not written as a scalar: the record names the layers instead
    assert "gradspectra/summary/text_summary" in acc.Tags()["tensors"]


def test_every_n_steps_resume_and_raise(tmp_path: Path) -> None:
    model = tiny_llama()
    data = batches(6)
    with GradientSpectrumTracker(model, log_dir=tmp_path, every_n_steps=2, verbose=False) as tracker:
        for batch in data[:4]:
            model(**batch).loss.backward()
            tracker.step()
            model.zero_grad()
        state = tracker.state_dict()
    assert [r["step"] for r in tracker.batch_records] == [0, 2]
    resumed = GradientSpectrumTracker(model, log_dir=tmp_path, every_n_steps=2, verbose=False, action="raise")
    resumed.load_state_dict(state)
    model(**data[4]).loss.backward()
    assert resumed.step() is not None and resumed.global_step == 5
    model.zero_grad()
    (model(**data[5]).loss * float("nan")).backward()
    assert resumed.step() is None  # step 5 is not measured
    with pytest.raises(GradientAnomalyError, match="non-finite"):
        model.zero_grad()
        (model(**data[5]).loss * float("nan")).backward()
        resumed.step()
    resumed.close()
    with pytest.raises(RuntimeError, match="after `close\\(\\)`"):
        resumed.step()
    assert [r["step"] for r in read_records(tmp_path / "gradspectra" / "batches.jsonl")] == [0, 2, 4, 6]


def test_a_fast_step_spaces_per_layer_logging_and_says_what_the_budget_affords(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """#16: on a step of milliseconds hundreds of per-layer scalars cost more than the whole budget: they are
    spaced out, every step is still recorded and scored, and the user is told once what the budget affords."""
    import logging

    model = tiny_llama()
    steps = 40
    options = {"max_overhead": 0.001, "warmup_steps": 5, "verbose": False}
    with (
        caplog.at_level(logging.INFO, logger="gradspectra"),
        GradientSpectrumTracker(model, log_dir=tmp_path, **options) as t,
    ):
        for batch in batches(steps):
            loss = model(**batch).loss
            loss.backward()
            t.step(loss=loss)
            model.zero_grad()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gradspectra: at 0.1% of a")]
    assert len(said) == 1 and said[0] == t.engine.affordance
    # a step this fast is mostly light steps: scored from the Frobenius norms and the loss
    assert "ms step the monitor scores every step" in said[0] and "logs per-layer scalars every" in said[0]
    records = read_records(tmp_path / "gradspectra" / "batches.jsonl")
    assert [r["step"] for r in records] == list(range(steps))
    assert all(isinstance(r["score"], float) for r in records[5:])  # every step after warm-up scored
    assert sum(bool(r.get("light")) for r in records) > steps // 2
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    per_layer = [e.step for e in acc.Scalars("grad_spectrum/frobenius_norm/self_attn.q_proj/layer_00")]
    # the status scalars of full steps, and of light steps only when they say something (flagged here)
    said_steps = {r["step"] for r in records if (not r.get("light") or r["flagged"]) and r["score"] is not None}
    tags = acc.Tags()["scalars"]
    scored = {e.step for e in acc.Scalars("gradspectra/score")} if "gradspectra/score" in tags else set()
    assert scored == said_steps
    full = {r["step"] for r in records if not r.get("light")}
    assert {e.step for e in acc.Scalars("gradspectra/flagged_total")} >= full
    assert per_layer[0] == 0 and len(per_layer) < steps // 2  # spaced by the budget
    budget = t.engine.planner.budget if t.engine.planner is not None else None
    assert budget is not None and budget.log_period(1) > 1


def test_instability_stop_and_raise_in_a_plain_loop(tmp_path: Path) -> None:
    from gradspectra import InstabilityError

    for action in ("stop", "raise"):
        model = tiny_llama()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        options = {"figure_every_n_steps": 0, "verbose": False, "instability_action": action}
        tracker = GradientSpectrumTracker(model, log_dir=tmp_path / action, optimizer=optimizer, **options)
        steps = 0
        with pytest.raises(InstabilityError) if action == "raise" else contextlib.nullcontext():
            for step, batch in enumerate(batches(8)):
                loss = model(**batch).loss * (float("nan") if step >= 3 else 1.0)
                loss.backward()
                tracker.step(loss=loss)
                optimizer.step()
                optimizer.zero_grad()
                steps += 1
                if tracker.should_stop:
                    break
        tracker.close()
        if action == "stop":
            assert steps == 5 and tracker.should_stop  # the warning at step 4, the 2nd non-finite step
        else:
            assert steps == 4  # raised inside step 4's tracker.step, before its optimizer step
        records = read_records(tmp_path / action / "gradspectra" / "batches.jsonl")
        assert [r["step"] for r in records] == [0, 1, 2, 3, 4]  # the warned step's record is written
        assert records[4]["events"][-1]["kind"] == "instability"


class _Blocks(torch.nn.Module):
    """Four same-shaped linear layers (``blocks/layer_00`` ...) whose gradients a test sets exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(24, 16, bias=False) for _ in range(4))

    def backward_with(self, grads: list[torch.Tensor]) -> None:
        # a real backward whose gradient of layer i is grads[i]: d/dW sum(W * G) = G
        sum((layer.weight * g).sum() for layer, g in zip(self.blocks, grads)).backward()  # type: ignore[union-attr]


def test_the_aftermath_of_a_far_out_step_is_recorded_said_and_counted(tmp_path: Path) -> None:
    # every step's gradients are fixed random matrices times a noisy scale; at step 100 the scale jumps 50x, then
    # fades (4x, 3x) as a model moved by a bad batch returns: one flag, then two aftermath events, not flags (the
    # stability detector is off: three steps of large gradients in a row are what its growth rule looks for)
    generator = torch.Generator().manual_seed(0)
    shapes = [torch.randn(16, 24, generator=generator) for _ in range(4)]
    model = _Blocks()
    scale = {100: 50.0, 101: 4.0, 102: 3.0}
    options = {"spectra": "exact", "figure_every_n_steps": 0, "verbose": False, "stability": False}
    with GradientSpectrumTracker(model, log_dir=tmp_path, **options) as tracker:
        for step in range(130):
            noise = torch.exp(0.1 * torch.randn(5, generator=generator))
            model.backward_with([g * float(noise[i]) * scale.get(step, 1.0) for i, g in enumerate(shapes)])
            tracker.step(loss=0.7 * float(noise[4]))
            model.zero_grad()
        summary = tracker.engine.summary()
    records = read_records(tmp_path / "gradspectra" / "batches.jsonl")
    assert records[100]["flagged"]
    for r in records[101:103]:
        assert not r["flagged"] and not r["reasons"] and r["score"] > r["threshold"]
        assert [e["kind"] for e in r["events"]] == ["aftermath"]
        assert r["events"][0]["message"].startswith("aftermath: frobenius_norm high")
    assert not any(r["flagged"] or r["events"] for r in records[103:])
    assert "2 steps not flagged as the aftermath of a flagged one" in summary
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors(f"{EVENTS_TAG}/text_summary")
    assert [e.step for e in texts] == [101, 102]
    assert b"aftermath: " in texts[0].tensor_proto.string_val[0]


def test_a_skipped_flagged_step_leaves_no_aftermath(tmp_path: Path) -> None:
    # action="skip": the far-out batch's optimizer step is dropped, so it moved nothing and the next far-out
    # steps are bad batches of their own, flagged (and skipped) rather than taken as its aftermath
    generator = torch.Generator().manual_seed(0)
    shapes = [torch.randn(16, 24, generator=generator) for _ in range(4)]
    model = _Blocks()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scale = {100: 50.0, 101: 4.0, 102: 3.0}
    options = {"spectra": "exact", "figure_every_n_steps": 0, "verbose": False, "stability": False, "action": "skip"}
    with GradientSpectrumTracker(model, log_dir=tmp_path, optimizer=optimizer, **options) as tracker:
        for step in range(104):
            noise = torch.exp(0.1 * torch.randn(5, generator=generator))
            model.backward_with([g * float(noise[i]) * scale.get(step, 1.0) for i, g in enumerate(shapes)])
            tracker.step(loss=0.7 * float(noise[4]))
            model.zero_grad()
    records = read_records(tmp_path / "gradspectra" / "batches.jsonl")
    assert all(r["flagged"] and r["skipped"] and not r["events"] for r in records[100:103])
