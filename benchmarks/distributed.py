"""Time spent in GradientSpectrumMonitor per rank, with 1 and with 2 ranks (CPU, gloo), on the same model.

DDP: each rank holds the same all-reduced gradient; with `distribute=True` each measures about half the layers.
FSDP (`--strategy fsdp`): gradients are sharded; each encoder layer is an FSDP unit, gathered in turn, and
each rank measures the layers it owns (`spectra="exact"` for these two).
FSDP2 and tensor parallel (`--strategy fsdp2|tp`, Lightning's `ModelParallelStrategy`): the default monitor
(`spectra="auto"`, `--max-overhead`); every layer's Frobenius norm and the cheap tier come from each rank's
blocks, only the layers given a full spectrum are gathered. `--gather` gathers every layer instead (what the
cheap tier on blocks saves). The table then also gives, per step (rank 0, median), the entries of the sharded
layers gathered whole and the numbers each rank put into the sums (record key `sharded`), and the bytes
(float32 entries, float64 agreement sums).
Prints one markdown table: ranks | layers measured per rank | median monitor ms per step (rank 0) | median step ms.

Run: python benchmarks/distributed.py [--steps 12] [--hidden 384] [--layers 4] [--strategy ddp|fsdp|fsdp2|tp]
     python benchmarks/distributed.py --strategy fsdp2 [--gather]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader, TensorDataset

from gradspectra import GradientSpectrumMonitor
from gradspectra.reporting import read_records


class Bert(pl.LightningModule):
    def __init__(self, hidden: int, layers: int, shard: str = "") -> None:
        super().__init__()
        self.shard = shard
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=1000,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 64),
            intermediate_size=4 * hidden,
            max_position_embeddings=128,
        )
        self.bert = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(hidden, 2)

    def configure_model(self) -> None:
        if self.shard == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.bert.encoder.layer:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.head, mesh=mesh)
            fully_shard(self.bert, mesh=mesh)
            return
        if self.shard == "tp":
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan: dict[str, Any] = {}
            for i in range(len(self.bert.encoder.layer)):
                plan[f"bert.encoder.layer.{i}.intermediate.dense"] = ColwiseParallel()
                plan[f"bert.encoder.layer.{i}.output.dense"] = RowwiseParallel()
            parallelize_module(self, self.device_mesh["tensor_parallel"], plan)
            return
        # on CPU the model wraps itself: Lightning's automatic FSDP wrapping needs an accelerator
        if not isinstance(self.trainer.strategy, FSDPStrategy) or isinstance(self.head, FSDP):
            return
        from transformers.models.bert.modeling_bert import BertLayer

        kwargs: dict[str, Any] = {"device_id": torch.device("cpu"), "use_orig_params": True}
        self.bert = FSDP(self.bert, auto_wrap_policy=ModuleWrapPolicy({BertLayer}), **kwargs)
        self.head = FSDP(self.head, **kwargs)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, labels = batch
        return nn.functional.cross_entropy(self.head(self.bert(input_ids=ids).last_hidden_state.mean(1)), labels)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy; a subclass passes Lightning's `type(strategy) is FSDPStrategy` GPU-only check."""


class GatherAll(Callback):
    """``--gather``: every sharded layer gathered whole each step (no cheap tier on the blocks), for comparison."""

    def __init__(self, monitor: GradientSpectrumMonitor) -> None:
        self.monitor = monitor

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        assert self.monitor.engine.blocks is not None
        self.monitor.engine.blocks.on_blocks = False  # each layer to its owner only, every step


class StepTimer(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a") as fh:
                fh.write(f"{1000 * (time.perf_counter() - self.start)}\n")


def run(ranks: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    n = args.steps * args.global_batch
    data = TensorDataset(torch.randint(0, 1000, (n, args.tokens), generator=g), torch.randint(0, 2, (n,), generator=g))
    out = root / f"ranks{ranks}"
    sharded = args.strategy in ("fsdp2", "tp")
    spectra = "auto" if sharded else "exact"
    monitor = GradientSpectrumMonitor(
        spectra=spectra, output_dir=out, figure_every_n_steps=0, verbose=False, max_overhead=args.max_overhead
    )
    strategy: Any = "auto"
    callbacks: list[Callback] = [monitor, StepTimer(out / "step_ms.txt")]
    if ranks > 1:
        if sharded:
            sizes = (2, 1) if args.strategy == "fsdp2" else (1, 2)
            strategy = ModelParallelStrategy(data_parallel_size=sizes[0], tensor_parallel_size=sizes[1])
            if args.gather:
                callbacks.append(GatherAll(monitor))
        else:
            strategy = CPUFSDPStrategy() if args.strategy == "fsdp" else DDPStrategy(start_method="spawn")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=ranks,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    per_rank_batch = args.global_batch // ranks if args.strategy != "tp" else args.global_batch
    shard = args.strategy if sharded and ranks > 1 else ""
    trainer.fit(Bert(args.hidden, args.layers, shard), DataLoader(data, batch_size=per_rank_batch))
    if not trainer.is_global_zero:
        return {}
    records = read_records(out / "batches.jsonl")[2:]  # skip the first steps (allocation, first-call costs)
    steps = [float(x) for x in (out / "step_ms.txt").read_text().split()][2:]
    per_rank = records[-1].get("layers_per_rank") or [len(records[-1]["metrics"])]
    row: dict[str, Any] = {
        "ranks": ranks,
        "layers": per_rank,
        "monitor_ms": statistics.median(r["monitor_ms"] for r in records),
        "step_ms": statistics.median(steps),
    }
    moved = [r["sharded"] for r in records if "sharded" in r]
    if moved:
        n = len(monitor.watched)
        row["gathered"] = statistics.median(m["gathered"] for m in moved)
        row["sent"] = statistics.median(m["sent"] for m in moved)
        # gathered entries and product sums in float32, the agreement in float64
        agreement = 4 * n + 1  # (whole?, cheap?, |block|^2, anchor? for each layer, and a failure flag)
        row["bytes"] = statistics.median(4 * m["gathered"] + 8 * agreement + 4 * (m["sent"] - agreement) for m in moved)
        row["kinds"] = dict(sorted(_count(r["spectra"].values() for r in records).items()))
    return row


def _count(groups: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for group in groups:
        for kind in group:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--strategy", choices=("ddp", "fsdp", "fsdp2", "tp"), default="ddp")
    parser.add_argument("--gather", action="store_true", help="fsdp2/tp: gather every layer (no cheap tier on blocks)")
    parser.add_argument("--max-overhead", type=float, default=0.03, help="fsdp2/tp: the default monitor's budget")
    args = parser.parse_args()
    if os.environ.get("LOCAL_RANK", "0") != "0":
        # Lightning re-runs this script for the other FSDP ranks: they join the 2-rank run only
        run(2, args, Path(os.environ["GRADSPECTRA_BENCH_DIR"]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GRADSPECTRA_BENCH_DIR"] = tmp
        rows = [run(1, args, Path(tmp)), run(2, args, Path(tmp))]
    shape = f"global batch {args.global_batch} x {args.tokens} tokens"
    threads = torch.get_num_threads()
    print(f"BERT hidden={args.hidden} layers={args.layers}, {shape}, {args.strategy}, CPU, {threads} threads")
    if args.strategy in ("fsdp2", "tp"):
        how = "every layer gathered" if args.gather else "cheap tier on blocks"
        print(f"spectra='auto', max_overhead={args.max_overhead}, 2 ranks: {how}")
    head = "| ranks | layers measured per rank | monitor ms per step (rank 0, median) | step ms (rank 0, median) |"
    more = " gathered entries / step | numbers sent / step | bytes / step | layers by kind, all steps |"
    print(head + (more if "gathered" in rows[-1] else ""))
    print("|---|---|---|---|" + ("---|---|---|---|" if "gathered" in rows[-1] else ""))
    for r in rows:
        line = f"| {r['ranks']} | {r['layers']} | {r['monitor_ms']:.1f} | {r['step_ms']:.1f} |"
        if "gathered" in r:
            line += f" {r['gathered']:.0f} | {r['sent']:.0f} | {r['bytes']:.0f} | {r['kinds']} |"
        elif "gathered" in rows[-1]:
            line += " | | | |"
        print(line)


if __name__ == "__main__":
    main()
