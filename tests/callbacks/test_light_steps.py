"""Light steps: on a step too fast for a full step's fixed work, every step is still scored and recorded."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from gradspectra import GradientSpectrumMonitor
from gradspectra.reporting import read_records

from .conftest import TinyBert, loader, trainer_kwargs

STEPS = 120
NAN_AT = range(4 * 96, 4 * 100)  # samples of steps 96-99 (batches of 4): their gradients are NaN


def test_every_step_is_scored_and_recorded_on_a_fast_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # TinyBert's step takes a few ms: 0.1 % of it is less than a full step's fixed work (records, scoring of
    # every metric, scalars) on any machine, so most steps are light: every layer's Frobenius norm, a score,
    # the record
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    monitor = GradientSpectrumMonitor(figure_every_n_steps=0, action="skip", verbose=False, max_overhead=1e-3)
    with caplog.at_level(logging.INFO, logger="gradspectra"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_steps=STEPS, logger=logger), callbacks=[monitor]).fit(
            TinyBert(), loader(n=4 * STEPS, nan_at=set(NAN_AT))
        )
    records = read_records(Path(logger.log_dir) / "gradspectra" / "batches.jsonl")
    assert [r["step"] for r in records] == list(range(STEPS))  # a record for every step, light or not
    light = [r for r in records if r.get("light")]
    full = [r for r in records if not r.get("light")]
    assert len(light) > STEPS // 2 and full  # mostly light steps, and full steps in between
    layers = set(full[-1]["metrics"])
    for r in light:
        if r["step"] in range(96, 100):
            continue
        assert set(r["metrics"]) == layers  # every layer's Frobenius norm, nothing else
        assert all(set(m) == {"frobenius_norm"} for m in r["metrics"].values())
        assert all(math.isfinite(m["frobenius_norm"]) and m["frobenius_norm"] > 0 for m in r["metrics"].values())
        assert "detection" not in r or not r["detection"]
        # no spectrum: every present layer deferred, in the watched order of the metrics
        assert r["spectra"] == {} and r["estimate_error"] == {} and r["deferred_layers"] == list(r["metrics"])
        assert r["nonfinite_layers"] == []
        assert "stability" in r or r["step"] < 60  # the stability detector sees every step
    # after warm-up every step has a score, light ones from the light scorer
    warm = [r for r in records if r["step"] >= 40 and r["step"] not in range(96, 100)]
    assert all(r["score"] is not None and math.isfinite(r["score"]) for r in warm)
    # the NaN steps are flagged and skipped, light or not, and the run goes on with finite gradients
    bad = [r for r in records if r["step"] in range(96, 100)]
    assert any(r.get("light") for r in bad)
    assert all(r["flagged"] and r["skipped"] and r["nonfinite_layers"] for r in bad)
    assert all(math.isfinite(m["frobenius_norm"]) for m in records[-1]["metrics"].values())
    # the streaming statistics hold every step's Frobenius norm (the light steps' folded in together)
    column = monitor.engine.metric_names.index("frobenius_norm")
    counts = monitor.spectrum.compute()["count"][:, column] + monitor.spectrum.compute()["nonfinite"][:, column]
    keys = [w.key for w in monitor.engine.watched]
    measured = [keys.index(k) for k in layers]
    assert counts[measured].tolist() == [float(STEPS)] * len(measured)
    # the scalars of a light step only when it says something: here the flagged ones
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    flagged_steps = {e.step for e in acc.Scalars("gradspectra/flagged")}
    assert {r["step"] for r in bad} <= flagged_steps
    assert {r["step"] for r in full} <= flagged_steps
    assert not {r["step"] for r in light if not r["flagged"]} & flagged_steps
    # said once, in words
    said = [m for m in caplog.messages if "light steps" in m]
    assert len(said) == 1 and "scores every step" in said[0]
    assert monitor.budget is not None and monitor.budget.period > 1


def test_light_steps_resume_with_their_scorer(tmp_path: Path) -> None:
    first = GradientSpectrumMonitor(figure_every_n_steps=0, verbose=False, max_overhead=1e-3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=60, logger=False), callbacks=[first])
    trainer.fit(TinyBert(), loader(n=240))
    assert any(r.get("light") for r in first.batch_records)
    state = first.state_dict()
    assert state["light_scorers"][0]["steps"] == 60  # it saw every step
    second = GradientSpectrumMonitor(figure_every_n_steps=0, verbose=False)
    second.load_state_dict(state)
    assert second.engine.light_scorers[0].state_dict() == first.engine.light_scorers[0].state_dict()


def test_no_light_steps_under_ddp_or_other_modes() -> None:
    for world, spectra in ((2, "auto"), (1, "exact"), (1, "estimate")):
        monitor = GradientSpectrumMonitor(spectra=spectra)
        monitor.engine.attach(TinyBert(), world=world)
        assert monitor.engine.planner is not None and not monitor.engine.planner.light
    monitor = GradientSpectrumMonitor()
    monitor.engine.attach(TinyBert(), world=1)
    assert monitor.engine.planner is not None and monitor.engine.planner.light


class Peek(pl.Callback):
    """Reads the monitor while training runs: the records, totals, statistics and state are complete at every
    step; a step with a non-finite gradient is in the file at once."""

    def __init__(self, monitor: GradientSpectrumMonitor, path: Path) -> None:
        self.monitor, self.path = monitor, path
        self.seen: list[tuple[int, ...]] = []
        self.on_file: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        step = trainer.global_step - 1
        if step == 40:  # the NaN step: on file before anything reads the monitor
            self.on_file.append((step, read_records(self.path)[-1]["step"]))
        if step in (30, 47, 61):
            column = self.monitor.engine.metric_names.index("frobenius_norm")
            counts = self.monitor.spectrum.compute()  # type: ignore[union-attr]
            seen = int((counts["count"][:, column] + counts["nonfinite"][:, column]).max())
            steps = self.monitor.steps_monitored
            records = list(self.monitor.batch_records)
            state = self.monitor.state_dict()
            self.seen.append((step, records[-1]["step"], state["light_scorers"][0]["steps"], steps, seen))


def test_light_records_made_a_few_at_a_time_are_all_there_in_order(tmp_path: Path) -> None:
    # under action="log" a light step's record waits for a few more light steps' (made together, cheaper):
    # reading the records or the state, or the end of training, makes the waiting ones first
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    monitor = GradientSpectrumMonitor(figure_every_n_steps=0, verbose=False, max_overhead=1e-3)
    peek = Peek(monitor, Path(logger.log_dir) / "gradspectra" / "batches.jsonl")
    steps = 80
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=steps, logger=logger), callbacks=[monitor, peek]).fit(
        TinyBert(),
        loader(n=4 * steps, nan_at={160}),  # step 40 has a NaN gradient
    )
    assert peek.seen == [(30, 30, 31, 31, 31), (47, 47, 48, 48, 48), (61, 61, 62, 62, 62)]
    assert peek.on_file == [(40, 40)]
    on_file = read_records(Path(logger.log_dir) / "gradspectra" / "batches.jsonl")
    assert [r["step"] for r in on_file] == list(range(steps))
    assert [r["step"] for r in monitor.batch_records] == list(range(steps))
    assert sum(bool(r.get("light")) for r in on_file) > steps // 2
    # the records made together: no spectrum, every present layer deferred, finite norms before the NaN step
    waited = [r for r in on_file[:40] if r.get("light")]
    assert waited and all(r["spectra"] == {} and r["deferred_layers"] == list(r["metrics"]) for r in waited)
    assert all(r["nonfinite_layers"] == [] for r in waited)
    # (from step 40 on the weights are NaN: every score is inf, null in JSON)
    assert all(r["score"] is not None for r in on_file[30:40])
    assert all(r["monitor_ms"] > 0 for r in on_file)
    assert all(r["light"] and r["flagged"] and r["nonfinite_layers"] for r in on_file[40:] if r.get("light"))
    column = monitor.engine.metric_names.index("frobenius_norm")
    stats = monitor.spectrum.compute()  # type: ignore[union-attr]
    assert set((stats["count"][:, column] + stats["nonfinite"][:, column]).tolist()) <= {0.0, float(steps)}


def test_several_optimizers_each_have_light_steps_and_their_own_light_scorer(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from .test_monitor import TwoOptimizers

    monitor = GradientSpectrumMonitor(figure_every_n_steps=0, verbose=False, max_overhead=1e-3)
    model = TwoOptimizers()
    data = DataLoader(TensorDataset(torch.randn(8 * 60, 8)), batch_size=8)
    # (each optimizer's step counts as a step: 60 batches)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=120, logger=False), callbacks=[monitor]).fit(model, data)
    records = list(monitor.batch_records)
    assert [r["optimizer"] for r in records] == [0, 1] * 60
    for first, second in zip(records[::2], records[1::2]):
        assert bool(first.get("light")) == bool(second.get("light"))  # the step is light for both, or full
    light_steps = sum(bool(r.get("light")) for r in records[::2])
    assert light_steps > 40
    scorers = monitor.engine.light_scorers
    assert scorers[0].state_dict()["steps"] == scorers[1].state_dict()["steps"] == 60
    # the main scorers see the full steps only
    assert monitor.engine.optimizer_scorers[1].state_dict()["steps"] == 60 - light_steps


def test_implied_layers_take_even_turns_on_light_steps(tmp_path: Path) -> None:
    from integrations.conftest import batches, lora_llama
    from integrations.test_lora import KEYS, groups, run_lightning

    model = lora_llama()
    monitor = GradientSpectrumMonitor(
        figure_every_n_steps=0, verbose=False, max_overhead=1e-3, include=["*self_attn*"], output_dir=tmp_path
    )
    records = run_lightning(model, groups(model), batches(100), tmp_path, monitor=monitor)
    light = [r for r in records if r.get("light")]
    assert len(light) > 60
    turns = {k: sum(k in r["metrics"] for r in light) for k in KEYS}
    assert max(turns.values()) - min(turns.values()) <= 2, turns  # oldest first, whatever the records wait for


class Pause(pl.Callback):
    """A pause of 2.1 s (a data-loader stall) before the first step from 20 on at which light records are waiting,
    fewer than a batch of them; what is on file after that step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.paused_at: int | None = None
        self.last_on_file: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        step = trainer.global_step
        if self.paused_at is not None or step < 20:
            return
        on_file = read_records(self.path)[-1]["step"]
        if 0 < step - 1 - on_file < 14:  # waiting, and this step alone does not make a batch of 16
            self.paused_at = step
            time.sleep(2.1)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if self.paused_at is not None and self.last_on_file is None:
            self.last_on_file = read_records(self.path)[-1]["step"]


def test_light_records_wait_two_seconds_at_most(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    monitor = GradientSpectrumMonitor(figure_every_n_steps=0, verbose=False, max_overhead=1e-3)
    pause = Pause(Path(logger.log_dir) / "gradspectra" / "batches.jsonl")
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=40, logger=logger), callbacks=[monitor, pause]).fit(
        TinyBert(), loader(n=160)
    )
    # the steps waiting from before the pause went out with the light step after it (the oldest had waited
    # over 2 s), not with the 16th
    assert pause.paused_at is not None
    assert pause.last_on_file == pause.paused_at


class MixedLayers(pl.LightningModule):
    """A conv kernel (4-D), GPT-2 ``Conv1D`` weights (stored ``in x out``) and a plain linear layer: a light step
    reads each gradient's norm without reshaping it, which must equal the norm of its matrix form."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.conv = torch.nn.Conv2d(3, 8, kernel_size=3)
        self.blocks = torch.nn.ModuleList(Conv1D(16, 8) for _ in range(2))
        self.head = torch.nn.Linear(16, 4)
        self.norms: list[tuple[int, dict[str, float]]] = []

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x = self.conv(batch).mean(dim=(2, 3))
        for block in self.blocks:
            x = torch.tanh(block(torch.cat([x, x], dim=-1)[..., :8]))
        return self.head(x).pow(2).mean()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # (a LightningModule's hook runs after the callbacks': the gradients are those the monitor read)
        named = {n: p.grad.double().norm().item() for n, p in self.named_parameters() if p.grad is not None}
        self.norms.append((self.trainer.global_step, named))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def test_light_norms_of_conv_and_transposed_weights_equal_a_float64_reference(tmp_path: Path) -> None:
    model = MixedLayers()
    monitor = GradientSpectrumMonitor(figure_every_n_steps=0, verbose=False, max_overhead=1e-3)
    data = torch.utils.data.DataLoader(torch.randn(40 * 4, 3, 6, 6), batch_size=4)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=40, logger=False), callbacks=[monitor]).fit(model, data)
    by_key = {w.key: w.name for w in monitor.engine.watched}
    assert {"conv", "blocks/layer_00", "blocks/layer_01", "head"} <= set(by_key)
    reference = dict(model.norms)
    light = [r for r in monitor.batch_records if r.get("light")]
    assert len(light) > 10
    for r in light:
        for key, values in r["metrics"].items():
            expected = reference[r["step"]][by_key[key]]
            assert values["frobenius_norm"] == pytest.approx(expected, rel=1e-5), (r["step"], key)
