"""per_sample= in real Lightning runs: a ``samples`` entry per sample in the records and the file, duplicates
named with their partners, values equal to a backward per sample, flagged-only mode, and the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gradspectra import GradientSpectrumMonitor, GradientSpectrumTracker
from gradspectra.monitoring import MonitorConfig, MonitorEngine
from gradspectra.reporting import read_records
from reference import ref_metrics

from .conftest import RandomTokens, TinyBert, trainer_kwargs
from .test_shift import JUMP_AT, JumpingBert

BATCH = 8


class WithDuplicates(RandomTokens):
    """Random token batches of 8 in which sample 5 of every batch repeats sample 2 (same text, same label)."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        for start in range(0, n, BATCH):
            self.ids[start + 5] = self.ids[start + 2]
            self.labels[start + 5] = self.labels[start + 2]


def test_always_gives_every_sample_an_entry_and_names_repeated_samples(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(
        per_sample="always", spectra="exact", sample_id_key="sample_id", figure_every_n_steps=0, verbose=False
    )
    steps = 6
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=steps), callbacks=[monitor])
    trainer.fit(TinyBert(), DataLoader(WithDuplicates(BATCH * steps), batch_size=BATCH))

    records = read_records(Path(trainer.log_dir or tmp_path) / "gradspectra" / "batches.jsonl")
    assert len(records) == steps
    named_steps = top_steps = 0
    for record in records:
        samples = record["samples"]
        assert [e["index"] for e in samples] == list(range(BATCH))
        assert [e["id"] for e in samples] == record["sample_ids"]
        assert record["samples_ms"] > 0 and "samples_note" not in record
        top = sorted(samples, key=lambda e: -e["score"])[:2]
        top_steps += {e["index"] for e in top} == {2, 5}
        twin = "gradient almost identical to sample {} (cosine 1.00, batch mean removed)"
        named = twin.format(5) in samples[2]["reasons"]
        assert named == (twin.format(2) in samples[5]["reasons"])
        named_steps += named
        assert samples[0]["metrics"]["layers"] == len(monitor.engine.watched) - 1  # all but the unused layer
        assert all(e["tokens"] == 12 for e in samples)
    # the pair ranks first and is named on most steps; this tiny model's gradients of one label are all nearly
    # parallel, so on some steps a twin's cosine of 1 is not far above the others' (0.999): no reason then
    assert named_steps >= steps - 2 and top_steps >= steps - 2
    assert monitor.engine.state_dict()["samples"]  # the running baseline is checkpointed


def test_values_equal_a_backward_per_sample_through_the_plain_loop_door(tmp_path: Path) -> None:
    model = TinyBert().double()
    data = RandomTokens(BATCH)
    ids, labels = data.ids[:BATCH], data.labels[:BATCH]
    watched_include = "*.encoder.*"

    def loss_of(i: slice) -> Tensor:
        hidden = model.bert(input_ids=ids[i]).last_hidden_state.mean(1)
        return nn.functional.cross_entropy(model.head(hidden), labels[i], reduction="sum")

    reference = []
    for i in range(BATCH):
        model.zero_grad()
        loss_of(slice(i, i + 1)).backward()
        reference.append({n: p.grad.detach().numpy().copy() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    with GradientSpectrumTracker(
        model, log_dir=tmp_path, per_sample="always", spectra="exact", include=watched_include, verbose=False
    ) as tracker:
        loss = loss_of(slice(0, BATCH))
        loss.backward()
        record = tracker.step(loss=loss)
    assert record is not None
    names = {w.key: w.name for w in tracker.engine.watched}
    for entry in record["samples"]:
        i = entry["index"]
        for name in ("nuclear_norm", "effective_rank", "top_sv_ratio", "frobenius_norm"):
            want = np.mean([ref_metrics(reference[i][names[key]])[name] for key in names])
            assert entry["metrics"][name] == pytest.approx(want, rel=1e-9), (i, name)


def test_output_gradient_is_the_heads_p_minus_y_whatever_the_module_order(tmp_path: Path) -> None:
    """Each sample's ``output_gradient`` is the norm of its output gradient at the layer closest to the loss:
    for a cross-entropy head, ``|softmax - onehot|`` (float64, relative 1e-9). The head is found from the
    backward's order, not the modules': a linear layer registered after it (``unused``) is never closest."""
    model = TinyBert().double()
    data = RandomTokens(BATCH)
    ids, labels = data.ids[:BATCH], data.labels[:BATCH]
    with GradientSpectrumTracker(model, log_dir=tmp_path, per_sample="always", spectra="exact", verbose=False) as t:
        logits = model.head(model.bert(input_ids=ids).last_hidden_state.mean(1))
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        loss.backward()
        record = t.step(loss=loss)
    assert record is not None
    want = (torch.softmax(logits.detach(), -1) - nn.functional.one_hot(labels, 2)).norm(dim=1).numpy()
    got = np.array([e["metrics"]["output_gradient"] for e in record["samples"]])
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_output_gradient_of_a_token_level_head_over_micro_batches_and_padding(tmp_path: Path) -> None:
    """A token-level head (a small LM, padding labelled -100) over two micro-batches: each sample's value is the
    root mean square of its output-gradient rows over the tokens that carry gradient, from its own micro-batch's
    backward (float64, relative 1e-9); a padded token does not dilute it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 50)).double()
    ids = torch.randint(0, 50, (6, 10))
    labels = torch.randint(0, 50, (6, 10))
    for i, length in enumerate([10, 3, 7, 1, 10, 5]):
        labels[i, length:] = -100  # padding: no loss, no output gradient
    rows: list[Tensor] = []
    with GradientSpectrumTracker(model, log_dir=tmp_path, per_sample="always", spectra="exact", verbose=False) as t:
        for part in (slice(0, 3), slice(3, 6)):  # two micro-batches of one optimizer step
            logits = model(ids[part])
            logits.register_hook(rows.append)
            loss = nn.functional.cross_entropy(logits.reshape(-1, 50), labels[part].reshape(-1), ignore_index=-100)
            loss.backward()
        record = t.step(loss=loss)
    assert record is not None and "samples_note" not in record, record.get("samples_note")
    delta = torch.cat(rows)  # (6, 10, 50)
    carried = (labels != -100).sum(1).double()
    want = (delta.square().sum((1, 2)) / carried).sqrt().numpy()
    got = np.array([e["metrics"]["output_gradient"] for e in record["samples"]])
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_flagged_measures_only_the_flagged_steps(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(
        per_sample="flagged", spectra="exact", warmup_steps=10, figure_every_n_steps=0, verbose=False
    )
    steps = JUMP_AT + 4
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=steps), callbacks=[monitor])
    trainer.fit(JumpingBert(), DataLoader(RandomTokens(4 * steps), batch_size=4))
    records = read_records(Path(trainer.log_dir or tmp_path) / "gradspectra" / "batches.jsonl")
    flagged = [r for r in records if r["flagged"]]
    assert len(flagged) >= 3  # the jump at JUMP_AT
    assert all(len(r["samples"]) == 4 for r in flagged)
    assert all("samples" not in r for r in records if not r["flagged"])


def test_accumulated_micro_batches_are_one_list_of_samples(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(per_sample="always", spectra="exact", figure_every_n_steps=0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, accumulate_grad_batches=2), callbacks=[monitor])
    trainer.fit(TinyBert(), DataLoader(RandomTokens(24), batch_size=4))
    for record in monitor.batch_records:
        assert [e["index"] for e in record["samples"]] == list(range(8))  # 2 micro-batches of 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"per_sample": "sometimes"}, "`per_sample` can be None, flagged, always, got 'sometimes'"),
        ({"per_sample": "flagged", "scoring": False}, "`per_sample='flagged'` needs `scoring=True`"),
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradientSpectrumMonitor(**options)


def test_refusals_name_why() -> None:
    engine = MonitorEngine(MonitorConfig(per_sample="always"))
    with pytest.raises(ValueError, match="needs a single process for now, got a world of 2 processes"):
        engine.attach(TinyBert(), world=2)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"needs watched nn.Linear weights .* none of the 1 watched parameters"):
        MonitorEngine(MonitorConfig(per_sample="always", include="*.weight")).attach(conv)


def test_a_gradient_the_factors_do_not_explain_is_left_out_with_a_note(tmp_path: Path) -> None:
    model = TinyBert()
    gen = torch.Generator().manual_seed(0)
    with GradientSpectrumTracker(model, log_dir=tmp_path, per_sample="always", verbose=False) as tracker:
        hidden = model.bert(input_ids=RandomTokens(4).ids).last_hidden_state.mean(1)
        loss = nn.functional.cross_entropy(model.head(hidden), RandomTokens(4).labels)
        loss.backward()
        for p in model.parameters():  # e.g. a gradient hook of the user: not the sum of the samples' shares
            if p.grad is not None:
                p.grad.add_(torch.randn(p.grad.shape, generator=gen) * p.grad.abs().max())
        record = tracker.step(loss=loss)
    assert record is not None and record["samples"] is None
    assert record["samples_note"].startswith("per-sample values left out for")
    assert "not a multiple of their kept factors' sum" in record["samples_note"]


def test_clipped_gradients_give_the_samples_shares_of_the_clipped_gradient(tmp_path: Path) -> None:
    model = TinyBert().double()
    data = RandomTokens(BATCH)
    values = []
    for clip in (None, 1e-3):
        with GradientSpectrumTracker(
            model, log_dir=tmp_path, per_sample="always", spectra="exact", include="*.encoder.*", verbose=False
        ) as tracker:
            model.zero_grad()
            hidden = model.bert(input_ids=data.ids).last_hidden_state.mean(1)
            loss = nn.functional.cross_entropy(model.head(hidden), data.labels)
            loss.backward()
            if clip is not None:
                factor = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            record = tracker.step(loss=loss)
        assert record is not None and "samples_note" not in record
        values.append([e["metrics"]["nuclear_norm"] for e in record["samples"]])
    ratio = clip / factor  # what clip_grad_norm_ multiplied every gradient by
    np.testing.assert_allclose(values[1], np.array(values[0]) * ratio, rtol=1e-5)


def test_bf16_autocast_a_loss_scaler_and_a_nan_sample(tmp_path: Path) -> None:
    model = TinyBert()
    data = RandomTokens(BATCH)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with GradientSpectrumTracker(model, log_dir=tmp_path, per_sample="always", spectra="exact", verbose=False) as tr:
        for poison in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = model.bert(input_ids=data.ids).last_hidden_state.mean(1)
                if poison:
                    hidden = hidden * torch.tensor([1.0] * 3 + [float("nan")] + [1.0] * (BATCH - 4))[:, None]
                logits = model.head(hidden).float()
                loss = nn.functional.cross_entropy(logits, data.labels)
            scaler.scale(loss).backward()  # output gradients scaled by 1024; .grad unscaled below
            scaler.unscale_(optimizer)
            record = tr.step(loss=loss)  # the loss scale is not passed: the check finds the multiple
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            assert record is not None and record["samples"] is not None, record.get("samples_note")
            if not poison:
                assert "samples_note" not in record, record["samples_note"]
                assert all(np.isfinite(e["score"]) for e in record["samples"])
                # the head's output gradient, (p - y) / B, with the loss scale divided out (bf16 rows: 1 %)
                p_minus_y = torch.softmax(logits.detach(), -1) - nn.functional.one_hot(data.labels, 2)
                want = (p_minus_y.norm(dim=1) / BATCH).numpy()
                got = np.array([e["metrics"]["output_gradient"] for e in record["samples"]])
                np.testing.assert_allclose(got, want, rtol=2e-2)
            else:
                scores = [e["score"] for e in record["samples"]]
                assert scores[3] == float("inf") and record["samples"][3]["reasons"][0].startswith("non-finite")
                assert all(np.isfinite(s) for i, s in enumerate(scores) if i != 3)
