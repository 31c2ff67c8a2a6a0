"""Real 2-process ``ModelParallelStrategy`` on CPU (gloo): FSDP2 (``fully_shard``) and tensor parallelism.

The weights and gradients are DTensors there: each rank holds a block of rows (``Shard(0)``) or of columns
(``Shard(1)``). The records must be those of one process fed the same global batches, and the values
those of each layer's whole gradient. The ranks are started with ``torch.multiprocessing.spawn`` and the
environment Lightning reads (``LightningEnvironment`` then creates no processes itself).
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from gradspectra import GradientSpectrumMonitor
from gradspectra.capture.sharded import full_gradient, is_dtensor
from gradspectra.functional import coarse_effective_rank_many

from .conftest import RandomTokens, TinyBert, trainer_kwargs

STEPS = 5
HIDDEN = 256  # the auto tests: layers where the blocks move less than a gather (the cheap tier and an anchor
# detection value on one layer: small side above about 180)
POISONED = 13  # a NaN sample (in the third global batch of the shuffled order): flagged and skipped


class ShardedBert(TinyBert):
    """TinyBert sharded in ``configure_model``: FSDP2 over every encoder layer and the head, or tensor
    parallelism on each layer's MLP (``intermediate.dense`` column-wise, ``output.dense`` row-wise)."""

    def __init__(self, mode: str = "none", hidden: int = 32) -> None:
        super().__init__(layers=2, hidden=hidden)
        self.mode = mode

    def configure_model(self) -> None:
        if self.mode == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.bert.encoder.layer:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.head, mesh=mesh)
            fully_shard(self.bert, mesh=mesh)  # the embeddings (the root of the BERT part)
        elif self.mode == "tp":
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan = {}
            for i in range(len(self.bert.encoder.layer)):
                plan[f"bert.encoder.layer.{i}.intermediate.dense"] = ColwiseParallel()
                plan[f"bert.encoder.layer.{i}.output.dense"] = RowwiseParallel()
            parallelize_module(self, self.device_mesh["tensor_parallel"], plan)


class WholeGradients(Callback):
    """Before the monitor: every watched layer's whole gradient (gathered by every rank alike), its float64
    singular values' metrics, and what this rank held of it."""

    def __init__(self, monitor: GradientSpectrumMonitor) -> None:
        self.monitor = monitor
        self.steps: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Optimizer) -> None:
        step: dict[str, Any] = {}
        for w in self.monitor.watched:
            g = full_gradient(w)
            if g is None:
                continue
            a = g.double().numpy()
            s = np.linalg.svd(a, compute_uv=False) if np.isfinite(a).all() else np.full(1, np.nan)
            local = w.param.grad.to_local() if is_dtensor(w.param.grad) else w.param.grad
            placements = [str(p) for p in w.param.grad.placements] if is_dtensor(w.param.grad) else None
            step[w.key] = {
                "nuclear_norm": float(s.sum()),
                "spectral_norm": float(s[0]),
                "frobenius_norm": float(np.sqrt((s**2).sum())),
                "stable_rank": float((s**2).sum() / s[0] ** 2),
                "participation_ratio": float((s**2).sum() ** 2 / (s**4).sum()),
                "detection": float(coarse_effective_rank_many([g]).item()),
                "local": list(local.shape),
                "full": list(g.shape),
                "placements": placements,
            }
        self.steps.append(step)


class NoRoomOnce(Callback):
    """On rank 1, at step 3, the monitor cannot allocate the buffer that receives a layer's blocks (out of memory
    on the owner, inside the gather's guard): the callbacks around the monitor open and close the window."""

    def __init__(self, opening: bool, state: dict[str, bool]) -> None:
        self.opening, self.state = opening, state

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        self.state["on"] = self.opening and trainer.global_rank == 1 and trainer.global_step == 3


def _no_room(state: dict[str, bool], world: int) -> None:
    empty = torch.empty

    def guarded(*size: Any, **kwargs: Any) -> Tensor:
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        if state.get("on") and len(shape) == 3 and shape[0] == world:  # (the receive buffer: world x block)
            raise MemoryError("out of memory (the owner's receive buffer, rank 1)")
        return empty(*size, **kwargs)

    torch.empty = guarded  # type: ignore[assignment]


def _fit(
    out: Path, data: DataLoader[Any], mode: str, fail: bool = False, **overrides: Any
) -> tuple[GradientSpectrumMonitor, Any]:
    pl.seed_everything(0, verbose=False)
    monitor = GradientSpectrumMonitor(
        figure_every_n_steps=0,
        warmup_steps=5,
        output_dir=out,
        spectra="exact",
        action="skip",
        verbose=False,
        sample_id_key="sample_id",
    )
    tap = WholeGradients(monitor)
    kwargs = trainer_kwargs(out, max_steps=STEPS, logger=False)
    kwargs.update(overrides)
    callbacks: list[Callback] = [tap, monitor]
    if fail:
        state: dict[str, bool] = {}
        _no_room(state, int(overrides.get("devices", 1)))
        callbacks = [tap, NoRoomOnce(True, state), monitor, NoRoomOnce(False, state)]
    trainer = pl.Trainer(**kwargs, callbacks=callbacks)
    trainer.fit(ShardedBert(mode), data)
    return monitor, tap


class FailOnce(Callback):
    """On rank 1 only, the monitor's planning raises at step 2 (a failure one rank meets and the others do not)."""

    def __init__(self, monitor: GradientSpectrumMonitor) -> None:
        self.monitor = monitor

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        planner = self.monitor.engine.planner
        if trainer.global_rank != 1 or trainer.global_step != 2 or planner is None:
            return
        plan = planner.plan

        def failing(rows: Any) -> Any:
            planner.plan = plan  # type: ignore[method-assign]
            raise MemoryError("out of memory (a failure on rank 1 only)")

        planner.plan = failing  # type: ignore[method-assign]


def _rank(rank: int, port: int, world: int, mode: str) -> ModelParallelStrategy:
    """This process as rank ``rank`` of ``world`` (the environment Lightning reads), and the strategy: FSDP2 over
    every rank, or tensor parallelism over every rank (one data-parallel rank)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )
    torch.set_num_threads(1)
    sizes = {"fsdp2": (world, 1), "tp": (1, world)}[mode]
    return ModelParallelStrategy(
        data_parallel_size=sizes[0], tensor_parallel_size=sizes[1], timeout=timedelta(seconds=60)
    )


def _auto_worker(
    rank: int, port: int, out: str, mode: str, world: int = 2, fail: bool = False, hidden: int = HIDDEN
) -> None:
    """The default constructor (``spectra="auto"``) with room for the cheap tier on every layer."""
    strategy = _rank(rank, port, world, mode)
    pl.seed_everything(0, verbose=False)
    monitor = GradientSpectrumMonitor(figure_every_n_steps=0, output_dir=out, max_overhead=0.3, verbose=False)
    callbacks: list[Callback] = [WholeGradients(monitor), monitor]
    if fail:
        callbacks.append(FailOnce(monitor))
    kwargs = trainer_kwargs(out, max_steps=STEPS if world > 1 else 30, logger=False, strategy=strategy, devices=world)
    trainer = pl.Trainer(**kwargs, callbacks=callbacks)
    trainer.fit(ShardedBert(mode, hidden=hidden), DataLoader(RandomTokens(128), batch_size=4))
    report = {
        "records": list(monitor.batch_records),
        "whole": callbacks[0].steps,  # type: ignore[attr-defined]
        "watched": len(monitor.watched),
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))


def _worker(rank: int, port: int, out: str, mode: str, world: int = 2, fail: bool = False) -> None:
    strategy = _rank(rank, port, world, mode)
    # a global batch of 8 under FSDP2 (whatever the ranks), of 4 under tensor parallelism (one data rank)
    per_rank = 8 // world if mode == "fsdp2" else 4
    data = DataLoader(RandomTokens(64, nan_at={POISONED}), batch_size=per_rank)
    # every whole gradient gathered by full_tensor() (sent to every rank), counted: the test's own (the tap's)
    # and any the monitor would make
    from torch.distributed.tensor import DTensor

    full_tensor, counted = DTensor.full_tensor, [0]

    def counting(self: Any, *args: Any, **kwargs: Any) -> Tensor:
        counted[0] += 1
        return full_tensor(self, *args, **kwargs)

    DTensor.full_tensor = counting  # type: ignore[method-assign]
    monitor, tap = _fit(Path(out), data, mode, fail, strategy=strategy, devices=world)
    report = {
        "records": list(monitor.batch_records),
        "whole": tap.steps,
        "computed": monitor.layers_computed_here,
        "full_tensor": counted[0],
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _same(a: Any, b: Any, rel: float) -> bool:
    return b == pytest.approx(a, rel=rel, abs=1e-9, nan_ok=True)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("mode", "world"),
    # 4 processes on 2 cores take 28 s of the suite's 10 minutes: run with -m benchmark
    [("fsdp2", 2), ("tp", 2), pytest.param("fsdp2", 4, marks=pytest.mark.benchmark)],
)
def test_model_parallel_processes_match_single_process(tmp_path: Path, mode: str, world: int) -> None:
    # 4 processes on 2 cores: for correctness only (uneven and empty shards: the 2-row head on 4 ranks)
    out = tmp_path / mode
    out.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(out), mode, world), nprocs=world, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    # the reference: Lightning's DistributedSampler shuffles with seed 0; under FSDP2 (data-parallel ranks)
    # rank r takes positions r, r+world, ... of randperm(64) and a global batch is 8 samples; under tensor
    # parallelism every rank takes every position and a batch is 4
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    batch = 8 if mode == "fsdp2" else 4
    torch.set_num_threads(1)
    single, _ = _fit(tmp_path / "single", DataLoader(RandomTokens(64, nan_at={POISONED}), batch, sampler=order), "none")
    reference = list(single.batch_records)
    assert len(reference) == STEPS

    for rank in ranks:
        records = rank["records"]
        assert [r["step"] for r in records] == list(range(STEPS))
        for a, b, whole in zip(reference, records, rank["whole"]):
            assert set(b["metrics"]) == set(a["metrics"]) and b["missing_layers"] == a["missing_layers"]
            for key, values in a["metrics"].items():
                for name, value in values.items():
                    # the same global batch: equal up to float32 rounding of the gradient (summed across ranks
                    # in another order)
                    assert _same(value, b["metrics"][key][name], 1e-4), (b["step"], key, name)
                if not b["nonfinite_layers"]:
                    # and exactly the whole gradient's spectrum, whatever each rank held of it
                    for name in ("nuclear_norm", "spectral_norm", "frobenius_norm"):
                        assert _same(whole[key][name], b["metrics"][key][name], 1e-6), (b["step"], key, name)
            assert b["flagged"] == a["flagged"] and bool(b.get("skipped")) == bool(a.get("skipped"))
            # every sample of the global batch listed once (tensor-parallel peers train on the same samples)
            assert sorted(b["sample_ids"]) == sorted(a["sample_ids"]), (b["step"], b["sample_ids"])
            assert _same(a["loss"], b["loss"], 1e-5)
            assert len(b["layers_per_rank"]) == world and sum(b["layers_per_rank"]) == len(b["metrics"])
    # the ranks decided alike: the same records but the timing
    for other in ranks[1:]:
        for a, b in zip(ranks[0]["records"], other["records"]):
            a, b = ({k: v for k, v in r.items() if k != "monitor_ms"} for r in (a, b))
            assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert any(r.get("skipped") and r["nonfinite_layers"] for r in ranks[0]["records"])
    assert sum(rank["computed"] for rank in ranks) == sum(len(r["metrics"]) for r in ranks[0]["records"])
    # the monitor gathered each sharded layer to its owner alone: every full_tensor() call was the test's own
    # (one per layer with a gradient per step, in WholeGradients), none the monitor's
    for rank in ranks:
        assert rank["full_tensor"] == sum(1 for step in rank["whole"] for v in step.values() if v["placements"]), rank[
            "full_tensor"
        ]

    # the gradients really were sharded: a rank held half of each sharded layer (rows or columns)
    from torch.distributed.tensor import Shard

    rows, columns = str(Shard(0)), str(Shard(1))
    whole = ranks[0]["whole"][0]
    sharded = {key: v for key, v in whole.items() if v["placements"]}
    if mode == "fsdp2":
        assert len(sharded) == len(whole)  # every watched layer: the encoder layers, the head, the embeddings'
        assert all(v["placements"] == [rows] for v in sharded.values())
        assert all(v["local"][0] < v["full"][0] for v in sharded.values() if v["full"][0] > 1)
    else:
        assert {v["placements"][0] for v in sharded.values()} == {rows, columns}
        assert len(sharded) == 4  # two MLP layers of each of the two encoder layers; the rest are plain tensors
        for v in sharded.values():
            dim = 0 if v["placements"] == [rows] else 1
            assert v["local"][dim] * world == v["full"][dim]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("mode", "world"), [("fsdp2", 2), ("tp", 2)])
def test_the_cheap_tier_runs_on_the_blocks_without_gathering_them(tmp_path: Path, mode: str, world: int) -> None:
    mp.spawn(_auto_worker, args=(_free_port(), str(tmp_path), mode, world), nprocs=world, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for other in ranks[1:]:  # the ranks decided alike
        for a, b in zip(ranks[0]["records"], other["records"]):
            a, b = ({k: v for k, v in r.items() if k != "monitor_ms"} for r in (a, b))
            assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    records, wholes = ranks[0]["records"], ranks[0]["whole"]
    assert [r["step"] for r in records] == list(range(STEPS))
    on_blocks = cheap_on_blocks = detected_on_blocks = 0
    for record, whole in zip(records, wholes):
        sharded = record["sharded"]
        gathered = set(sharded["gathered_layers"])
        assert set(record["metrics"]) == set(whole)  # every layer with a gradient, gathered or not
        assert gathered <= {k for k, v in whole.items() if v["placements"]}  # a plain layer is never sent
        for key, values in record["metrics"].items():
            # every layer's Frobenius norm from its blocks (or whole): the whole gradient's, to the float32
            # accumulation of each block's norm (as in one process: 1.1e-6 seen on a 256 x 256 layer)
            assert _same(whole[key]["frobenius_norm"], values["frobenius_norm"], 1e-5), (record["step"], key)
            blocked = whole[key]["placements"] and key not in gathered
            on_blocks += bool(blocked)
            if record["spectra"].get(key) != "cheap":
                continue
            # the cheap tier within its own error estimate of the whole gradient's float64 values, plus 0.2 %: on
            # these first steps the sketch starts cold (no warm start), where its estimate can run low (the
            # participation ratio's, a standard error: 0.15 % against 0.02 % seen); blocks and whole matrices
            # give the same sketch (tests/functional/test_sketch_blocks.py)
            for name in ("spectral_norm", "stable_rank", "participation_ratio"):
                err = abs(values[name] - whole[key][name]) / whole[key][name]
                assert err <= 3 * record["estimate_error"][key][name] + 2e-3, (record["step"], key, name, err)
            cheap_on_blocks += bool(blocked)
        for key, value in record.get("detection", {}).items():
            # an anchor's detection value, from its blocks unless it was gathered: the whole gradient's, up to the
            # coarse estimate's random start, which the test draws for another set of matrices (0.82-1.24 seen
            # with 2 ranks, 1.50 once with 4, gathered anchors alike); tests/functional/test_detect_blocks.py
            # checks blocks against whole matrices in a like-for-like call to 1e-5
            assert 1 / 1.6 < value / whole[key]["detection"] < 1.6, (record["step"], key, value, whole[key])
            detected_on_blocks += bool(whole[key]["placements"] and key not in gathered)
        # never a whole gradient for the layers measured on their blocks: what was sent is a fraction of them
        blocked_keys = [k for k, v in whole.items() if v["placements"] and k not in gathered]
        entries = sum(whole[k]["full"][0] * whole[k]["full"][1] for k in blocked_keys)
        assert sharded["gathered"] == sum(whole[k]["full"][0] * whole[k]["full"][1] for k in gathered)
        if blocked_keys:
            # (besides the agreement: 4 numbers a watched layer and a failure flag)
            assert sharded["sent"] - (4 * ranks[0]["watched"] + 1) < entries, (record["step"], sharded, entries)
    # on this small model the budget's plans swing from step to step (the cheap tier and the anchors on most
    # layers' blocks, or full spectra of every layer, gathered): the first two steps' plans, made before it has
    # learned the step's time, have both; the checks above hold on every step whatever the plan
    # (4 ranks: the exact test above, and tests/functional for the cheap tier and the detection value on uneven
    # and empty blocks)
    assert on_blocks >= 2 and cheap_on_blocks >= 2, (cheap_on_blocks, on_blocks)
    # anchors' detection values from their blocks, never gathered for them (FSDP2; under tensor parallelism
    # this model's anchors are attention layers, left whole on every rank)
    assert detected_on_blocks >= 2 or mode == "tp", detected_on_blocks


def test_deepspeed_is_refused_with_what_to_use_instead(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class DeepSpeedStandIn(SingleDeviceStrategy):
        """Named like Lightning's ``DeepSpeedStrategy``, which cannot be built here (deepspeed needs CUDA)."""

    monitor = GradientSpectrumMonitor(verbose=False)
    strategy = DeepSpeedStandIn(device=torch.device("cpu"))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False, strategy=strategy), callbacks=[monitor])
    with pytest.raises(ValueError, match=r"DeepSpeedStandIn.*ModelParallelStrategy \(FSDP2, tensor parallel\)"):
        trainer.fit(TinyBert(), DataLoader(RandomTokens(8), batch_size=4))


@pytest.mark.timeout(240)
def test_a_failure_on_one_rank_is_recorded_by_every_rank_and_training_goes_on(tmp_path: Path) -> None:
    mp.spawn(_auto_worker, args=(_free_port(), str(tmp_path), "fsdp2", 2, True, 64), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        records = rank["records"]
        assert [r["step"] for r in records] == list(range(STEPS))  # no rank waited in a collective
        assert "measurement failed on 1 of 2 ranks" in records[2]["error"]  # said alike by both ranks
        assert all("error" not in r for r in records if r["step"] != 2)  # the next step measures again
        assert all(r["metrics"] for r in records if r["step"] != 2)


@pytest.mark.timeout(240)
def test_one_process_model_parallel_measures_every_step(tmp_path: Path) -> None:
    # one rank: DTensors on a one-rank mesh, no light steps (the sharded path), every layer every step
    mp.spawn(_auto_worker, args=(_free_port(), str(tmp_path), "fsdp2", 1, False, 64), nprocs=1, join=True)
    records = json.loads((tmp_path / "rank0.json").read_text())["records"]
    assert [r["step"] for r in records] == list(range(30))
    for record, whole in zip(records, json.loads((tmp_path / "rank0.json").read_text())["whole"]):
        assert "error" not in record and not record.get("light")
        assert set(record["metrics"]) == set(whole)
        for key, values in record["metrics"].items():
            assert _same(whole[key]["frobenius_norm"], values["frobenius_norm"], 1e-5)  # (float32 accumulation)


@pytest.mark.timeout(240)
def test_a_failure_inside_a_gather_is_recorded_by_every_rank_and_training_goes_on(tmp_path: Path) -> None:
    # spectra="exact": rank 1 cannot allocate a receive buffer at step 3; every rank leaves that gather alike
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), "fsdp2", 2, True), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        records = rank["records"]
        assert [r["step"] for r in records] == list(range(STEPS))
        assert "measurement failed on" in records[3]["error"], records[3].get("error")
        assert all("error" not in r for r in records if r["step"] != 3)
