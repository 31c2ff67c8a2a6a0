"""Real 2-process FSDP on CPU (gloo): gradients are sharded, the owner of each layer measures its full matrix.

Lightning launches FSDP ranks by re-running the script, so the FSDP fit runs in a child process,
``python -m callbacks.test_fsdp <out>`` (this file), which Lightning re-runs as rank 1; each rank
writes what it saw to ``<out>/rank<r>.json`` and the test compares that with a single-process fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from gradspectra import GradientSpectrumMonitor

from .conftest import RandomTokens, TinyBert, trainer_kwargs

TESTS = Path(__file__).resolve().parents[1]
POISONED = 13  # a NaN sample: position 19 of the shuffled order, so step 2 is flagged and skipped


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy``, unchanged, let through on CPU.

    Lightning refuses ``FSDPStrategy`` with ``accelerator="cpu"`` ("The strategy `fsdp` requires a
    GPU accelerator"); the check compares ``type(strategy) is FSDPStrategy``, so a subclass passes.
    Its automatic wrapping passes ``device_id=None``, which torch's FSDP rejects without an
    accelerator ("FSDP needs a non-CPU accelerator device"), so the model wraps its own modules in
    ``configure_model`` with ``device_id=cpu`` and Lightning leaves an already wrapped model as it is.
    """


class ShardedTinyBert(TinyBert):
    """TinyBert with one FSDP unit per encoder layer, one for the embeddings' root, the head and the unused layer."""

    def configure_model(self) -> None:
        if not isinstance(self.trainer.strategy, FSDPStrategy) or isinstance(self.head, FullyShardedDataParallel):
            return
        from transformers.models.bert.modeling_bert import BertLayer

        kwargs: dict[str, Any] = {"device_id": torch.device("cpu"), "use_orig_params": True}
        self.bert = FullyShardedDataParallel(self.bert, auto_wrap_policy=ModuleWrapPolicy({BertLayer}), **kwargs)
        self.head = FullyShardedDataParallel(self.head, **kwargs)
        self.unused = FullyShardedDataParallel(self.unused, **kwargs)


class ShardTap(Callback):
    """What each rank holds of each watched gradient: its local piece's size, sum of squares and dimensions."""

    def __init__(self, monitor: GradientSpectrumMonitor) -> None:
        self.monitor = monitor
        self.steps: list[dict[str, tuple[int, float, int]]] = []
        self.weights_sum: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.weights_sum.append(float(sum(p.detach().double().sum() for p in pl_module.parameters())))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Optimizer) -> None:
        self.steps.append(
            {
                w.key: (0, 0.0, 0)
                if w.param.grad is None
                else (w.param.grad.numel(), float(w.param.grad.double().square().sum()), w.param.grad.ndim)
                for w in self.monitor.watched
            }
        )


def _fit(out: Path, data: DataLoader[Any], **overrides: Any) -> tuple[GradientSpectrumMonitor, ShardTap, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    monitor = GradientSpectrumMonitor(
        figure_every_n_steps=0,
        warmup_steps=5,
        output_dir=out,
        sample_id_key="sample_id",
        spectra="exact",
        action="skip",
    )
    tap = ShardTap(monitor)
    kwargs = trainer_kwargs(out, max_steps=7, logger=False)
    kwargs.update(overrides)
    trainer = pl.Trainer(**kwargs, callbacks=[tap, monitor])  # the tap reads the gradients before a skip drops them
    trainer.fit(ShardedTinyBert(), data)
    return monitor, tap, trainer


def _fsdp_worker(out: Path) -> None:
    torch.set_num_threads(1)
    data = DataLoader(RandomTokens(64, nan_at={POISONED}), batch_size=4)
    monitor, tap, trainer = _fit(out, data, strategy=CPUFSDPStrategy(), devices=2)
    report = {
        "records": list(monitor.batch_records),
        "shards": tap.steps,
        "weights_sum": tap.weights_sum,
        "layers_computed_here": monitor.layers_computed_here,
        "finite": all(bool(torch.isfinite(p).all()) for p in trainer.lightning_module.parameters()),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def _same(a: Any, b: Any, rel: float) -> bool:
    return b == pytest.approx(a, rel=rel, abs=1e-9, nan_ok=True)


@pytest.mark.timeout(240)
def test_fsdp_two_processes_match_single_process(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    fsdp_out = tmp_path / "fsdp"
    fsdp_out.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-m", "callbacks.test_fsdp", str(fsdp_out)],
        cwd=TESTS,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # meanwhile the reference: Lightning's DistributedSampler shuffles with seed 0 and rank r takes
    # positions r, r+2, ... of randperm(64); fed that order, one process sees each global batch of 8
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    torch.set_num_threads(1)
    monitor, _, _ = _fit(
        tmp_path / "single", DataLoader(RandomTokens(64, nan_at={POISONED}), batch_size=8, sampler=order)
    )
    single = list(monitor.batch_records)
    sizes = {w.key: w.param.numel() for w in monitor.watched}
    output, _ = child.communicate(timeout=220)
    assert child.returncode == 0, output[-4000:]
    ranks = [json.loads((fsdp_out / f"rank{r}.json").read_text()) for r in (0, 1)]

    assert len(single) == 7
    n_layers = len(single[0]["metrics"])  # 13 with a gradient; `unused` has none
    for rank in ranks:
        records = rank["records"]
        assert len(records) == 7
        for a, b in zip(single, records):
            assert b["step"] == a["step"]
            # same layer keys as without FSDP, and the same values: the full matrices were measured
            assert set(b["metrics"]) == set(a["metrics"])
            assert b["missing_layers"] == a["missing_layers"]
            for key, values in a["metrics"].items():
                for name, value in values.items():
                    assert _same(value, b["metrics"][key][name], 1e-4), (b["step"], key, name)
            assert b["flagged"] == a["flagged"]
            assert bool(b.get("skipped")) == bool(a.get("skipped"))
            assert _same(a["loss"], b["loss"], 1e-5)
            assert _same(a["score"], b["score"], 1e-3) if a["score"] is not None else b["score"] is None
            per_rank = b["layers_per_rank"]
            assert len(per_rank) == 2 and sum(per_rank) == n_layers
            assert min(per_rank) >= n_layers // 2 - 3
        assert rank["finite"]  # the NaN step was skipped on this rank's shards
    # every rank decided alike: identical records (the sample ids of both ranks included) but the timing
    for a, b in zip(*(rank["records"] for rank in ranks)):
        a, b = ({k: v for k, v in r.items() if k != "monitor_ms"} for r in (a, b))
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert single[2].get("skipped") and single[2]["nonfinite_layers"]  # the NaN batch (a high score may skip others)
    for rank in ranks:
        # the skipped step moved no weight
        assert rank["weights_sum"][3] == rank["weights_sum"][2]
        assert rank["weights_sum"][2] != rank["weights_sum"][1]
    assert ranks[0]["layers_computed_here"] + ranks[1]["layers_computed_here"] == 7 * n_layers

    # the gradients really were sharded: each rank held flat (1-D) pieces, about half of the elements;
    # the pieces add up to each full matrix and their squared norms to the measured Frobenius norm
    # squared, so the metrics are of the whole matrix, not of a rank's piece
    total = sum(sizes[key] for key in single[0]["metrics"])
    for step, record in enumerate(ranks[0]["records"]):
        held = [0, 0]
        for key, metrics in record["metrics"].items():
            pieces = [rank["shards"][step][key] for rank in ranks]
            assert all(ndim <= 1 for _, _, ndim in pieces), (key, pieces)
            assert sum(numel for numel, _, _ in pieces) == sizes[key], (key, pieces)
            held = [h + numel for h, (numel, _, _) in zip(held, pieces)]
            if not record["nonfinite_layers"]:
                assert metrics["frobenius_norm"] ** 2 == pytest.approx(sum(sq for _, sq, _ in pieces), rel=1e-6)
        assert max(held) < 0.75 * total, held


if __name__ == "__main__":
    _fsdp_worker(Path(sys.argv[1]))
