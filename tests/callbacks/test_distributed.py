"""Real 2-process DDP on CPU (gloo): the spectral work is split across ranks and the records match one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from gradspectra import GradientSpectrumMonitor
from gradspectra.reporting import read_records

from .conftest import RandomTokens, TinyBert, trainer_kwargs


def _fit(tmp_path: Path, out: Path, data: DataLoader[Any], **overrides: Any) -> list[dict[str, Any]]:
    pl.seed_everything(0, verbose=False)
    monitor = GradientSpectrumMonitor(
        spectra="exact", figure_every_n_steps=0, warmup_steps=5, output_dir=out, sample_id_key="sample_id"
    )
    kwargs = trainer_kwargs(tmp_path, max_steps=7, logger=False)
    kwargs.update(overrides)
    pl.Trainer(**kwargs, callbacks=[monitor]).fit(TinyBert(), data)
    return read_records(out / "batches.jsonl")


@pytest.mark.timeout(240)
def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    # Lightning's DistributedSampler shuffles with seed 0: rank r takes positions r, r+2, ... of
    # randperm(64). Fed that permutation in order, one process sees the same 8 samples per step as
    # the two ranks together (4 each, averaged by DDP's all-reduce).
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    single = _fit(tmp_path, tmp_path / "single", DataLoader(RandomTokens(64), batch_size=8, sampler=order))
    ddp = _fit(
        tmp_path,
        tmp_path / "ddp",
        DataLoader(RandomTokens(64), batch_size=4),
        strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True),
        devices=2,
    )
    assert len(ddp) == len(single) == 7
    n_layers = len(single[0]["metrics"])
    for a, b in zip(single, ddp):
        assert b["step"] == a["step"]
        assert set(b["metrics"]) == set(a["metrics"])
        for key, values in a["metrics"].items():
            for name, value in values.items():
                assert b["metrics"][key][name] == pytest.approx(value, rel=1e-4, abs=1e-9), (key, name)
        assert b["flagged"] == a["flagged"]
        # the loss is averaged over ranks, so it is the global batch's; the ids are both ranks' (4 each)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert len(b["sample_ids"]) == 8
        assert sorted(b["sample_ids"]) == sorted(a["sample_ids"])
        if a["score"] is None:
            assert b["score"] is None
        else:
            assert b["score"] == pytest.approx(a["score"], rel=1e-3, abs=1e-3)
        # each rank measured about half of the layers, and together all of them
        per_rank = b["layers_per_rank"]
        assert len(per_rank) == 2 and sum(per_rank) == n_layers
        assert min(per_rank) >= n_layers // 2 - 3
        assert "layers_per_rank" not in a


class NanFromStep3(TinyBert):
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 3 else loss


@pytest.mark.timeout(240)
def test_ddp_instability_stop_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    # from step 3 on both ranks' losses, so every gradient, are NaN; the 2nd such step (step 4) is a
    # stability warning. Every rank holds the same all-reduced table, so every rank decides to stop after
    # step 4 and none waits on another
    pl.seed_everything(0, verbose=False)
    monitor = GradientSpectrumMonitor(
        figure_every_n_steps=0, warmup_steps=5, output_dir=tmp_path / "ddp", instability_action="stop"
    )
    kwargs = trainer_kwargs(tmp_path, max_steps=12, logger=False)
    kwargs.update(strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True), devices=2)
    pl.Trainer(**kwargs, callbacks=[monitor]).fit(NanFromStep3(), DataLoader(RandomTokens(96), batch_size=4))
    records = read_records(tmp_path / "ddp" / "batches.jsonl")
    warned = [r["step"] for r in records if any(e["kind"] == "instability" for e in r["events"])]
    assert warned == [4]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]  # rank 0's records: training ended after step 4
