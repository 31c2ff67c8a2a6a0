"""GradientSpectrumMonitor in real Lightning Trainer runs on CPU (no mocks)."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from gradspectra import GradientAnomalyError, GradientSpectrumMonitor
from gradspectra.functional import as_matrix, spectral_metrics
from gradspectra.reporting import read_records

from .conftest import TinyBert, loader, trainer_kwargs

CONTRACT_KEYS = {"step", "epoch", "batch_idx", "score", "flagged", "reasons", "loss", "metrics", "sample_ids"}


class GradTap(Callback):
    """Keeps a copy of every gradient as the optimizer is about to step (runs after the monitor)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def _event_file(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_records_and_tensorboard_tags(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=3, warmup_steps=5)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, logger=logger), callbacks=[monitor])
    trainer.fit(TinyBert(), loader())

    path = Path(logger.log_dir) / "gradspectra" / "batches.jsonl"
    records = read_records(path)
    assert [r["step"] for r in records] == list(range(8))
    assert len(monitor.batch_records) == 8
    for r in records:
        assert set(r) >= CONTRACT_KEYS
        assert isinstance(r["flagged"], bool)
        assert math.isfinite(r["loss"])
        assert "attention.self.query/layer_01" in r["metrics"]
        assert set(r["metrics"]["attention.self.query/layer_01"]) == set(monitor.metric_names)
        assert "unused" in r["missing_layers"]
    assert all(r["score"] is None for r in records[:5])  # warm-up
    assert all(isinstance(r["score"], float) for r in records[5:])

    acc = _event_file(logger.log_dir)
    tags = acc.Tags()
    scalars = set(tags["scalars"])
    for metric in monitor.metric_names:
        for layer in (0, 1):
            assert f"grad_spectrum/{metric}/attention.self.query/layer_{layer:02d}" in scalars
            assert f"grad_spectrum/{metric}/intermediate.dense/layer_{layer:02d}" in scalars
        assert f"grad_spectrum_layers/{metric}/mean" in scalars
        assert f"grad_spectrum_mad/{metric}/attention.self.query" in scalars
    assert "grad_spectrum/nuclear_norm/head" in scalars
    assert "gradspectra/score" in scalars
    steps = [e.step for e in acc.Scalars("grad_spectrum/nuclear_norm/attention.self.query/layer_00")]
    assert steps == list(range(8))
    logged = [e.value for e in acc.Scalars("grad_spectrum/nuclear_norm/attention.self.query/layer_00")]
    expected = [r["metrics"]["attention.self.query/layer_00"]["nuclear_norm"] for r in records]
    assert logged == pytest.approx(expected, rel=1e-6)  # event files store float32
    images = set(tags["images"])
    assert "grad_spectrum_profile/nuclear_norm" in images
    assert "grad_spectrum_heatmap/effective_rank" in images
    assert acc.Images("grad_spectrum_profile/nuclear_norm")[0].encoded_image_string[:4] == b"\x89PNG"
    # the custom-scalars layout is a plugin tensor in the event file
    assert "custom_scalars__config__" in tags["tensors"]
    assert any(t.startswith("gradspectra/summary") for t in tags["tensors"])


def test_metrics_are_of_the_accumulated_unclipped_gradient(tmp_path: Path) -> None:
    model = TinyBert()
    reference = copy.deepcopy(model)
    monitor = GradientSpectrumMonitor(spectra="exact", scoring=False, figure_every_n_steps=0)
    tap = GradTap()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=3, logger=False, accumulate_grad_batches=2, gradient_clip_val=1e-4),
        callbacks=[monitor, tap],
    )
    trainer.fit(model, loader(n=24, batch_size=4))

    assert len(monitor.batch_records) == 3  # one record per optimizer step, not per batch
    assert [r["batch_idx"] for r in monitor.batch_records] == [1, 3, 5]
    # the gradient the monitor saw at step 0 is the mean over the two micro-batches, before clipping
    data = loader(n=24, batch_size=4)
    reference.zero_grad()
    for i, batch in enumerate(data):
        if i == 2:
            break
        (reference.training_step(batch, i) / 2).backward()
    ref_grad = reference.bert.encoder.layer[0].attention.self.query.weight.grad
    tapped = tap.grads[0]["bert.encoder.layer.0.attention.self.query.weight"]
    torch.testing.assert_close(tapped, ref_grad, rtol=1e-5, atol=1e-7)
    assert float(tapped.norm()) > 1e-4  # clipping to 1e-4 would have changed it
    for step, record in enumerate(monitor.batch_records):
        for w in monitor.watched:
            if w.name not in tap.grads[step]:
                assert w.key in record["missing_layers"]
                continue
            expected = spectral_metrics(as_matrix(tap.grads[step][w.name], w.module))
            got = record["metrics"][w.key]
            for name in monitor.metric_names:
                assert got[name] == pytest.approx(float(expected[name]), rel=1e-9), (w.key, name)
    # the streaming state saw every step
    assert monitor.spectrum is not None
    counts = monitor.spectrum.compute()["count"]
    unused = [w.key for w in monitor.watched].index("unused")
    assert torch.all(counts[unused] == 0)  # no gradient: untouched, not counted as non-finite
    assert torch.all(torch.cat([counts[:unused], counts[unused + 1 :]]) == 3)


def test_loss_in_record_is_the_window_mean(tmp_path: Path) -> None:
    class LossTap(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            self.losses.append(float(outputs["loss"]))

    tap = LossTap()
    monitor = GradientSpectrumMonitor(spectra="exact", scoring=False, figure_every_n_steps=0)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=2, logger=False, accumulate_grad_batches=2), callbacks=[monitor, tap]
    )
    trainer.fit(TinyBert(), loader())
    # Lightning reports each micro-batch's loss divided by accumulate_grad_batches: their sum is the mean
    for k, record in enumerate(monitor.batch_records):
        assert record["loss"] == pytest.approx(sum(tap.losses[2 * k : 2 * k + 2]), rel=1e-5)


def test_bf16_mixed(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, warmup_steps=5)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=4, logger=False, precision="bf16-mixed"), callbacks=[monitor]
    )
    trainer.fit(TinyBert(), loader())
    assert len(monitor.batch_records) == 4
    for r in monitor.batch_records:
        assert all(math.isfinite(v) for layer in r["metrics"].values() for v in layer.values())


def test_resume_continues_state_and_appends(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    out = tmp_path / "out"
    first = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, warmup_steps=5, output_dir=out)
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=5, save_top_k=-1)
    kwargs = trainer_kwargs(tmp_path, max_steps=6, logger=False, enable_checkpointing=True)
    pl.Trainer(**kwargs, callbacks=[first, checkpoint]).fit(TinyBert(), loader())
    ckpt = next(ckpt_dir.glob("*step=5.ckpt"))
    assert len(read_records(out / "batches.jsonl")) == 6

    second = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, warmup_steps=5, output_dir=out)
    kwargs["max_steps"] = 8
    pl.Trainer(**kwargs, callbacks=[second]).fit(TinyBert(), loader(), ckpt_path=str(ckpt))
    records = read_records(out / "batches.jsonl")
    # step 5 ran after the checkpoint was written (after step 4), and runs again after the resume: the
    # first run's record of it is set aside, not lost, and the main file holds each step once
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6, 7]
    aside = read_records(out / "batches.after-step-4.jsonl")
    assert [r["step"] for r in aside] == [5]
    assert aside[0]["loss"] == first.batch_records[5]["loss"]
    assert second.steps_monitored == 8
    assert second.spectrum is not None
    assert torch.all(second.spectrum.compute()["count"][:-1] == 8)  # every layer but `unused`
    # the scorer came back warm: no warm-up again after the resume
    assert all(r["score"] is not None for r in records[5:])


def test_csv_logger_gets_the_scalars(tmp_path: Path) -> None:
    logger = CSVLogger(str(tmp_path), name="csv")
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=1, warmup_steps=5)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, logger=logger), callbacks=[monitor]).fit(TinyBert(), loader())
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "grad_spectrum/effective_rank/attention.self.query/layer_00" in header
    assert (Path(logger.log_dir) / "gradspectra" / "batches.jsonl").exists()


def test_logger_false_falls_back_to_root_dir(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, logger=False), callbacks=[monitor])
    with pytest.warns(UserWarning, match="logger=False"):
        trainer.fit(TinyBert(), loader())
    assert len(read_records(tmp_path / "gradspectra" / "batches.jsonl")) == 2


def test_no_matching_layers_is_a_clear_error(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(include="*.does_not_exist.*")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False), callbacks=[monitor])
    with pytest.raises(ValueError, match="found no parameter to watch"):
        trainer.fit(TinyBert(), loader())


def test_frozen_layers_are_skipped_and_counted(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, scoring=False)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, logger=False), callbacks=[monitor]).fit(
        TinyBert(frozen_layer=1), loader()
    )
    assert monitor.selection is not None
    assert "bert.encoder.layer.1.attention.self.query.weight" in monitor.selection.frozen
    keys = set(monitor.batch_records[0]["metrics"])
    assert "attention.self.query/layer_00" in keys
    assert "attention.self.query/layer_01" not in keys


def test_nan_gradient_is_reported_and_training_goes_on(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, warmup_steps=5)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, logger=logger), callbacks=[monitor])
    trainer.fit(TinyBert(), loader(nan_at={13}))  # sample 13 is in batch 3
    records = read_records(Path(logger.log_dir) / "gradspectra" / "batches.jsonl")
    assert len(records) == 6
    bad = records[3]
    assert bad["flagged"] is True
    assert bad["nonfinite_layers"]
    assert any("non-finite" in reason for reason in bad["reasons"])
    # strict JSON on disk: NaN written as null
    assert None in bad["metrics"][bad["nonfinite_layers"][0]].values()
    assert monitor.nonfinite_total >= 1


def test_skip_action_drops_the_flagged_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class ParamTap(Callback):
        def __init__(self) -> None:
            self.before: list[torch.Tensor] = []

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, i: int) -> None:
            self.before.append(pl_module.head.weight.detach().clone())

    tap = ParamTap()
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, warmup_steps=5, action="skip")
    model = TinyBert()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    with caplog.at_level(logging.WARNING, logger="gradspectra"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, logger=logger), callbacks=[monitor, tap]).fit(
            model, loader(nan_at={13})
        )
    records = list(monitor.batch_records)
    assert records[3]["flagged"] and records[3].get("skipped")
    assert monitor.skipped_total == sum(bool(r.get("skipped")) for r in records) >= 1
    # the skip is in the file, in TensorBoard and on the console
    written = read_records(Path(logger.log_dir) / "gradspectra" / "batches.jsonl")
    assert [bool(r.get("skipped")) for r in written] == [bool(r.get("skipped")) for r in records]
    acc = _event_file(logger.log_dir)
    assert [e.value for e in acc.Scalars("gradspectra/skipped")][3] == 1.0
    assert acc.Scalars("gradspectra/skipped_total")[-1].value == monitor.skipped_total
    said = [r.getMessage() for r in caplog.records if "skipped the optimizer step 3" in r.getMessage()]
    assert len(said) == 1 and "non-finite" in said[0]
    torch.testing.assert_close(tap.before[4], tap.before[3])  # step 3 did not move the weights
    assert not torch.equal(tap.before[3], tap.before[2])
    assert all(torch.isfinite(p).all() for p in model.parameters())  # NaN never reached the weights


def test_raise_action_carries_the_record(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, warmup_steps=5, action="raise")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, logger=False), callbacks=[monitor])
    with pytest.raises(GradientAnomalyError) as info:
        trainer.fit(TinyBert(), loader(nan_at={13}))
    assert info.value.record["step"] == 3
    assert info.value.record["flagged"] is True


def test_sample_ids_are_recorded(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, sample_id_key="sample_id", scoring=False)
    pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=2, logger=False, accumulate_grad_batches=2), callbacks=[monitor]
    ).fit(TinyBert(), loader())
    assert monitor.batch_records[0]["sample_ids"] == list(range(1000, 1008))
    assert monitor.batch_records[1]["sample_ids"] == list(range(1008, 1016))


def test_every_n_steps(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, every_n_steps=2, scoring=False)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, logger=False), callbacks=[monitor]).fit(TinyBert(), loader())
    assert [r["step"] for r in monitor.batch_records] == [0, 2, 4]
    assert torch.get_num_threads() == threads  # the monitor's 1-thread section restores the setting


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "delete"}, "`action` can be log, skip, raise, got 'delete'"),
        ({"metrics": ["nuclear"]}, "`metrics` can be any of"),
        ({"every_n_steps": 0}, "`every_n_steps` must be a positive int, got 0"),
        ({"method": "qr"}, "`method` can be auto, svd, gram, got 'qr'"),
        ({"figure_every_n_steps": -1}, "`figure_every_n_steps` must be an int >= 0, got -1"),
        ({"action": "skip", "scoring": False}, "needs `scoring=True`"),
        ({"cpu_threads": 0}, "`cpu_threads` must be a positive int, got 0"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)").replace("`", "`")):
        GradientSpectrumMonitor(**kwargs)


def test_records_file_is_strict_json(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, output_dir=tmp_path / "o")
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, logger=False), callbacks=[monitor]).fit(
        TinyBert(), loader(nan_at={1})
    )
    for line in (tmp_path / "o" / "batches.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_conv_model_is_watched(tmp_path: Path) -> None:
    class ConvNet(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 6 * 6, 2)

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.fc(self.conv(x).flatten(1)), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,)))
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, scoring=False)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, logger=False), callbacks=[monitor]).fit(
        ConvNet(), torch.utils.data.DataLoader(data, batch_size=8)
    )
    assert set(monitor.batch_records[0]["metrics"]) == {"conv", "fc"}
    # a 4 x 9 conv kernel matrix has effective rank at most 4
    assert 1.0 <= monitor.batch_records[0]["metrics"]["conv"]["effective_rank"] <= 4.0


def test_16_mixed_reads_the_gradient_the_optimizer_gets(tmp_path: Path) -> None:
    # on CPU Lightning runs 16-mixed without a GradScaler; the scaler path (unscale_ before this
    # hook) needs a GPU and is not exercised here
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, scoring=False)
    tap = GradTap()
    pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=3, logger=False, precision="16-mixed"), callbacks=[monitor, tap]
    ).fit(TinyBert(), loader())
    for record, grads in zip(monitor.batch_records, tap.grads):
        expected = spectral_metrics(grads["head.weight"])
        assert record["metrics"]["head"]["nuclear_norm"] == pytest.approx(float(expected["nuclear_norm"]), rel=1e-9)
        assert math.isfinite(record["loss"])


@pytest.mark.parametrize("spectra", ["exact", "auto"])
def test_figures_follow_the_spacing_or_the_budget(tmp_path: Path, spectra: str) -> None:
    # a tiny model's step takes milliseconds and a drawing hundreds of them: under spectra="auto" the
    # budget spaces drawings far apart (here only the end of training's drawing is left)
    monitor = GradientSpectrumMonitor(spectra=spectra, figure_every_n_steps=2, warmup_steps=5)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, logger=logger), callbacks=[monitor]).fit(TinyBert(), loader())
    drawn = [e.step for e in _event_file(logger.log_dir).Images("grad_spectrum_heatmap/frobenius_norm")]
    if spectra == "exact":
        # every 2nd measured step (steps 1, 3, ...); the end's drawing is not repeated: step 7 was just drawn
        assert drawn == [1, 3, 5, 7]
    else:
        assert drawn == [7]  # at the end, logged at the last measured step
        assert monitor.budget is not None
        assert monitor.budget.figure_period(2, 12) > 1000


class TwoOptimizers(pl.LightningModule):
    """GAN-style manual optimization: optimizer 0 steps `layer`, optimizer 1 steps `l2`."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 4)
        self.grads: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x = batch[0]
        opt1, opt2 = self.optimizers()  # type: ignore[misc]
        opt1.zero_grad()
        self.manual_backward(self.layer(x).pow(2).mean())
        self.grads.append({"layer": self.layer.weight.grad.clone()})
        opt1.step()
        opt2.zero_grad()
        self.manual_backward(self.l2(torch.relu(self.layer(x)).detach()).abs().mean())
        self.grads.append({"l2": self.l2.weight.grad.clone()})
        opt2.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.layer.parameters(), lr=0.01), torch.optim.SGD(self.l2.parameters(), lr=0.01)


def test_several_optimizers_each_measure_their_own_layers(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, warmup_steps=5)
    model = TwoOptimizers()
    data = DataLoader(TensorDataset(torch.randn(64, 8)), batch_size=8)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=16, logger=logger), callbacks=[monitor]).fit(model, data)
    records = list(monitor.batch_records)
    assert [r["optimizer"] for r in records] == [0, 1] * 8
    for record, grads in zip(records, model.grads):
        # only the stepping optimizer's layer, measured on the gradient it steps with; nothing reported missing
        assert set(record["metrics"]) == set(grads) and record["missing_layers"] == []
        (name, grad), = grads.items()
        expected = spectral_metrics(grad)
        for metric, value in record["metrics"][name].items():
            assert value == pytest.approx(float(expected[metric]), rel=1e-6)
    # one baseline per optimizer: each saw only its own 8 steps
    assert monitor.engine.scorer is not None and monitor.engine.scorer.state_dict()["steps"] == 8
    assert monitor.engine.optimizer_scorers[1].state_dict()["steps"] == 8
    scalars = set(_event_file(logger.log_dir).Tags()["scalars"])
    assert {"gradspectra/optimizer_0/score", "gradspectra/optimizer_1/score"} <= scalars
    restored = GradientSpectrumMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.engine.optimizer_scorers[1].state_dict()["steps"] == 8


def test_layer_runs_give_each_layer_its_own_run(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(spectra="exact", figure_every_n_steps=0, warmup_steps=5, layer_runs=True)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, logger=logger), callbacks=[monitor]).fit(TinyBert(), loader())
    runs = Path(logger.log_dir) / "layers"
    assert sorted(p.name for p in runs.iterdir()) == ["layer_00", "layer_01"]
    records = list(monitor.batch_records)
    for layer in (0, 1):
        acc = _event_file(str(runs / f"layer_{layer:02d}"))
        # one tag per metric and component; the layer is the run, so TensorBoard colours and names it
        assert "grad_spectrum/effective_rank/attention.self.query" in acc.Tags()["scalars"]
        logged = [e.value for e in acc.Scalars("grad_spectrum/nuclear_norm/attention.self.query")]
        expected = [r["metrics"][f"attention.self.query/layer_{layer:02d}"]["nuclear_norm"] for r in records]
        assert logged == pytest.approx(expected, rel=1e-6)
    # off by default
    assert not (tmp_path / "tb" / "version_1" / "layers").exists()
