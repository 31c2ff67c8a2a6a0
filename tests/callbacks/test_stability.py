"""A run made to break in a real Lightning fit (SGD on least squares, the learning rate growing 30 % a step
until it diverges): the monitor's default constructor warns once, with an ``instability`` event (record,
TensorBoard text and scalars, console warning, summary); ``"stop"`` ends the fit after the step, ``"raise"``
raises with the record; a stable run gets no warning."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradspectra import GradientSpectrumMonitor, InstabilityError
from gradspectra.reporting import read_records

from .conftest import trainer_kwargs

RAMP_FROM = 40


class Regression(pl.LightningModule):
    def __init__(self, ramp: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 1))
        self.ramp = ramp

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        factor = lambda step: 1.0 if step < RAMP_FROM else self.ramp ** (step - RAMP_FROM + 1)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def data(n: int = 4096) -> DataLoader[tuple[Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def fit(tmp_path: Path, ramp: float, steps: int, **options: Any) -> tuple[GradientSpectrumMonitor, pl.Trainer, Path]:
    monitor = GradientSpectrumMonitor(figure_every_n_steps=0, verbose=False, **options)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=steps, logger=logger), callbacks=[monitor])
    trainer.fit(Regression(ramp), data())
    return monitor, trainer, Path(logger.log_dir)


def warnings_in(records: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(r["step"], e["message"]) for r in records for e in r["events"] if e["kind"] == "instability"]


def test_a_breaking_run_is_warned_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # plain SGD diverging on least squares has no precursor: loss and gradients explode together, and the
    # warning comes after the loss-spike rules would fire (benchmarks/stability.py measures the lead on
    # fine-tunes); here the plumbing: one event, where it is said, and the score
    with caplog.at_level(logging.WARNING, logger="gradspectra"):
        monitor, _, log_dir = fit(tmp_path, ramp=1.3, steps=RAMP_FROM + 30)
    records = read_records(log_dir / "gradspectra" / "batches.jsonl")
    warned = warnings_in(records)
    assert len(warned) == 1
    step, message = warned[0]
    assert step > RAMP_FROM
    assert message.startswith("instability: ") and "gradient norm up" in message
    assert records[step]["stability"] >= 1.0
    assert f"step {step}: instability" in caplog.text
    assert "1 stability warnings" in monitor.summary()
    assert f"stability warnings:\n  step {step}: instability: " in monitor.summary()

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    counts = {e.step: e.value for e in acc.Scalars("gradspectra/instability")}
    assert counts[step] == 1.0 and sum(counts.values()) == 1.0
    # the warned step logs its scalars even when it is a light step (a step this fast is mostly light ones,
    # whose scalars are logged only when they say something)
    stability = {e.step: e.value for e in acc.Scalars("gradspectra/stability")}
    assert stability[step] >= 1.0
    assert max(r["stability"] for r in records if r["step"] < RAMP_FROM and "stability" in r) < 1.0
    texts = acc.Tensors("gradspectra/events/text_summary")
    assert any(t.step == step and "instability" in t.tensor_proto.string_val[0].decode() for t in texts)


def test_stop_ends_the_fit_after_the_warned_step(tmp_path: Path) -> None:
    monitor, trainer, _ = fit(tmp_path, ramp=1.3, steps=RAMP_FROM + 60, instability_action="stop")
    warned = warnings_in(list(monitor.batch_records))
    assert len(warned) == 1
    # the warned step's optimizer step completed, and none after it
    assert trainer.global_step == warned[0][0] + 1
    assert trainer.global_step < RAMP_FROM + 60


def test_raise_carries_the_record(tmp_path: Path) -> None:
    with pytest.raises(InstabilityError, match=r"gradspectra at step \d+: instability: ") as caught:
        fit(tmp_path, ramp=1.3, steps=RAMP_FROM + 60, instability_action="raise")
    assert caught.value.record["events"][-1]["kind"] == "instability"


def test_a_stable_run_gets_no_warning(tmp_path: Path) -> None:
    monitor, _, _ = fit(tmp_path, ramp=1.0, steps=150)
    assert warnings_in(list(monitor.batch_records)) == []
    assert all(r.get("stability", 0.0) < 1.0 for r in monitor.batch_records)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"`instability_action` can be log, raise, stop, got 'skip'"):
        GradientSpectrumMonitor(instability_action="skip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs the stability detector \(`stability=True` or a dict"):
        GradientSpectrumMonitor(stability=False, instability_action="stop")
    with pytest.raises(
        TypeError, match=r"`stability` must be a bool or a dict of StabilityDetector options, got 'yes'"
    ):
        GradientSpectrumMonitor(stability="yes")  # type: ignore[arg-type]
    # a dict: the detector's own options, checked at construction, naming what is wrong
    monitor = GradientSpectrumMonitor(stability={"growth": 6.0, "loss_fall": 1.5}, instability_action="stop")
    detector = monitor.engine.stability
    assert detector is not None and detector.limits["growth"] == 6.0 and detector.loss_fall == 1.5
    assert GradientSpectrumMonitor(stability={}).engine.stability is not None  # all defaults
    with pytest.raises(TypeError, match=r"`stability` has no option 'grwoth'; its options are recent, gap, "):
        GradientSpectrumMonitor(stability={"grwoth": 6.0})
    with pytest.raises(ValueError, match=r"`stability`: `loss_fall` must be a finite number in \(1.0, inf\), got 0.5"):
        GradientSpectrumMonitor(stability={"loss_fall": 0.5})


def test_stability_options_change_what_warns(tmp_path: Path) -> None:
    # the breaking run of the first test, with a growth limit no run reaches: the growth warning is gone
    monitor, _, _ = fit(tmp_path, ramp=1.3, steps=RAMP_FROM + 30, stability={"growth": 1e12, "divergence": 1e12})
    messages = [m for _, m in warnings_in(list(monitor.batch_records))]
    assert not any("gradient norm up" in m for m in messages)


def test_a_stop_asked_in_one_fit_does_not_stop_the_next(tmp_path: Path) -> None:
    monitor, trainer, _ = fit(tmp_path, ramp=1.3, steps=RAMP_FROM + 60, instability_action="stop")
    assert trainer.global_step < RAMP_FROM + 60 and monitor.engine.stop_requested
    # the user lowers the rate and fits again with the same monitor: no ramp, it trains to the end
    again = pl.Trainer(**trainer_kwargs(tmp_path / "again", max_steps=20, logger=False), callbacks=[monitor])
    again.fit(Regression(ramp=1.0), data())
    assert again.global_step == 20
