"""Real 2-process CPU (gloo) runs of the plain-loop tracker and the transformers Trainer callback, launched
with ``torch.distributed.run``: the spectral work is split across the ranks, rank 0 alone writes, and the
records match one process trained on the same global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gradspectra.integrations.transformers import GradientSpectrumCallback
from gradspectra.reporting import read_records

from ._ddp_worker import LORA_INCLUDE, OPTIONS
from .conftest import BATCH, Samples, batches, hf_args, lora_llama, tiny_llama
from .test_front_doors import run_plain

WORKER = Path(__file__).with_name("_ddp_worker.py")
WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(mode: str, out: Path, steps: int) -> list[dict[str, Any]]:
    """Run the worker on ``WORLD`` CPU processes; each rank's report (rank, layers measured, records, rows)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(WORLD),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(WORKER),
        mode,
        str(out),
        str(steps),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def assert_same_metrics(mine: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    assert set(mine) == set(ref), what
    for layer, values in ref.items():
        assert set(mine[layer]) == set(values), (what, layer)
        for name, value in values.items():
            assert mine[layer][name] == pytest.approx(value, rel=1e-4, abs=1e-9), (what, layer, name)


def assert_split(ranks: list[dict[str, Any]], records: list[dict[str, Any]], n_layers: int, steps: int) -> None:
    """Both ranks measured a share of the layers, the shares add up, and every rank returned the same records."""
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == WORLD for r in ranks)
    for record in records:
        per_rank = record["layers_per_rank"]
        assert len(per_rank) == WORLD and sum(per_rank) == n_layers
        assert all(0 < share < n_layers for share in per_rank)
    for r in ranks:
        assert r["layers_computed_here"] == sum(rec["layers_per_rank"][r["rank"]] for rec in records)
        assert 0 < r["layers_computed_here"] < n_layers * steps
    # the one all-reduce gives every rank the whole table: the same record (and the same decision) everywhere
    for mine, ref in zip(ranks[1]["records"], ranks[0]["records"]):
        assert mine["step"] == ref["step"] and mine["flagged"] == ref["flagged"]
        assert_same_metrics(mine["metrics"], ref["metrics"], "rank 1 vs rank 0")


def written_once(path: Path, steps: int) -> list[dict[str, Any]]:
    """The records file holds one line per step: rank 0 wrote it, and rank 1 did not write a second copy."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert len(lines) == steps, lines
    records = read_records(path)
    assert [r["step"] for r in records] == list(range(steps))
    return records


def event_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*"))


@pytest.mark.timeout(240)
def test_tracker_under_ddp_matches_one_process(tmp_path: Path) -> None:
    steps = 6
    data = batches(steps)
    # one process over the whole global batches, from the same initial weights
    single, _ = run_plain(tiny_llama(), data, tmp_path / "single", **OPTIONS)
    n_layers = len(single[0]["metrics"])
    assert n_layers == 15 and "layers_per_rank" not in single[0]

    ranks = torchrun("tracker", tmp_path / "ddp", steps)
    # rank r trained on rows [2r, 2r + 2) of every global batch
    half = BATCH // WORLD
    for r in ranks:
        expected = [b["input_ids"][r["rank"] * half : (r["rank"] + 1) * half].tolist() for b in data]
        assert r["rows"] == expected
    ddp = written_once(tmp_path / "ddp" / "logs" / "gradspectra" / "batches.jsonl", steps)
    assert len(event_files(tmp_path / "ddp" / "logs")) == 1  # TensorBoard events from rank 0 only
    assert_split(ranks, ddp, n_layers, steps)
    for a, b in zip(single, ddp):
        # DDP averages the gradients of the two half-batch mean losses: the gradient of the global mean loss
        assert_same_metrics(b["metrics"], a["metrics"], f"step {a['step']}")
        assert b["flagged"] == a["flagged"]
        # the engine averages the loss over the ranks: the global batch's mean loss
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        if a["score"] is None:
            assert b["score"] is None
        else:
            assert b["score"] == pytest.approx(a["score"], rel=1e-3, abs=1e-3)
    assert ranks[1]["records"][-1]["loss"] == pytest.approx(single[-1]["loss"], rel=1e-5)


@pytest.mark.timeout(240)
def test_lora_implied_gradients_under_ddp_are_the_ranks_average(tmp_path: Path) -> None:
    """Frozen base weights get no DDP all-reduce: the engine averages their D^T X over the ranks itself."""
    pytest.importorskip("peft")
    steps = 4
    data = batches(steps)
    single, _ = run_plain(lora_llama(), data, tmp_path / "single", **{**OPTIONS, "include": LORA_INCLUDE})
    assert len(single[0]["metrics"]) == 8 and len(single[0]["implied_layers"]) == 8
    ranks = torchrun("lora", tmp_path / "ddp", steps)
    ddp = written_once(tmp_path / "ddp" / "logs" / "gradspectra" / "batches.jsonl", steps)
    assert_split(ranks, ddp, 8, steps)
    for a, b in zip(single, ddp):
        assert_same_metrics(b["metrics"], a["metrics"], f"step {a['step']}")
        assert b["implied_layers"] == a["implied_layers"]


@pytest.mark.timeout(240)
def test_a_frozen_layer_only_one_rank_reaches_does_not_desynchronise_the_ranks(tmp_path: Path) -> None:
    ranks = torchrun("branch", tmp_path / "ddp", 2)
    for r in ranks:
        for record in r["records"]:
            assert sorted(record["metrics"]) == ["a", "b", "head"] and "error" not in record
            assert set(record["implied_layers"]) == {"a", "b"}
    # rank 1 added zeros for b: the average is half of rank 0's own D^T X, which is not zero
    assert ranks[0]["records"][0]["metrics"]["b"]["frobenius_norm"] > 0


def one_process_trainer(out: Path, data: Any, steps: int) -> list[dict[str, Any]]:
    """The records of a one-process Trainer fit (per-device batch 4, SGD lr 0.1) of the tiny Llama on ``data``."""
    from transformers import Trainer

    model = tiny_llama()
    trainer = Trainer(
        model=model,
        args=hf_args(out, steps),
        train_dataset=Samples(data),
        callbacks=[GradientSpectrumCallback(**OPTIONS)],
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
    )
    trainer.train()
    return read_records(out / "gradspectra" / "batches.jsonl")


@pytest.mark.timeout(240)
def test_trainer_callback_under_torchrun_matches_one_process(tmp_path: Path) -> None:

    steps = 4
    data = batches(steps)
    # one process, per-device batch 4: the same global batches
    single = one_process_trainer(tmp_path / "single", data, steps)
    n_layers = len(single[0]["metrics"])

    # two processes, per-device batch 2. An IterableDataset is dispatched by accelerate: rank 0 reads
    # WORLD per-device batches in order, concatenates them and sends rank r its slice r, so step k's
    # samples are 4k..4k+3 as in one process; the forward hook in the worker saw which rows each rank got.
    ranks = torchrun("trainer", tmp_path / "ddp", steps)
    half = BATCH // WORLD
    for r in ranks:
        expected = [b["input_ids"][r["rank"] * half : (r["rank"] + 1) * half].tolist() for b in data]
        assert r["rows"] == expected, f"rank {r['rank']} trained on other samples than assumed"
    folder = tmp_path / "ddp" / "trainer" / "gradspectra"
    ddp = written_once(folder / "batches.jsonl", steps)
    assert len(event_files(tmp_path / "ddp")) == 1  # TensorBoard events from world process zero only
    assert_split(ranks, ddp, n_layers, steps)
    for a, b in zip(single, ddp):
        assert_same_metrics(b["metrics"], a["metrics"], f"step {a['step']}")
        assert b["flagged"] == a["flagged"]
        # the loss read from each rank's model output: num_items_in_batch counts every rank's label tokens,
        # so each rank's is its share of the step's mean, combined into that mean
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and "loss_seen" not in b


@pytest.mark.timeout(240)
def test_trainer_callback_under_accelerate_fsdp2_matches_one_process(tmp_path: Path) -> None:

    steps = 4
    data = batches(steps)
    single = one_process_trainer(tmp_path / "single", data, steps)
    assert len(single) == steps

    # two processes under FSDP2 (fully_shard by accelerate): every weight and gradient a DTensor, each rank
    # holding half the rows; the callback attaches at on_train_begin, after accelerate sharded the model
    ranks = torchrun("trainer-fsdp2", tmp_path / "fsdp2", steps)
    assert all(r["dtensors"] > 0 for r in ranks)
    records = written_once(tmp_path / "fsdp2" / "trainer" / "gradspectra" / "batches.jsonl", steps)
    for a, b in zip(single, records):
        assert_same_metrics(b["metrics"], a["metrics"], f"step {a['step']}")
        assert b["flagged"] == a["flagged"] and "error" not in b
        assert set(b["sharded"]["gathered_layers"]) == set(a["metrics"])  # spectra="exact": each gathered whole
    for mine, ref in zip(ranks[1]["records"], ranks[0]["records"]):
        assert_same_metrics(mine["metrics"], ref["metrics"], "rank 1 vs rank 0")
