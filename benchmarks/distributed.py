"""Time spent in GradientSpectrumMonitor per rank, with 1 and with 2 DDP or FSDP ranks (CPU, gloo), on the same model.

DDP: each rank holds the same all-reduced gradient; with `distribute=True` each measures about half the layers.
FSDP (`--strategy fsdp`): gradients are sharded; each encoder layer is an FSDP unit, gathered in turn, and
each rank measures the layers it owns.
Prints one markdown table: ranks | layers measured per rank | median monitor ms per step (rank 0) | median step ms.

Run: python benchmarks/distributed.py [--steps 12] [--hidden 384] [--layers 4] [--strategy ddp|fsdp]
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
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader, TensorDataset

from gradspectra import GradientSpectrumMonitor
from gradspectra.reporting import read_records


class Bert(pl.LightningModule):
    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
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
    monitor = GradientSpectrumMonitor(spectra="exact", output_dir=out, figure_every_n_steps=0, verbose=False)
    strategy: Any = "auto"
    if ranks > 1:
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
        callbacks=[monitor, StepTimer(out / "step_ms.txt")],
    )
    trainer.fit(Bert(args.hidden, args.layers), DataLoader(data, batch_size=args.global_batch // ranks))
    if not trainer.is_global_zero:
        return {}
    records = read_records(out / "batches.jsonl")[2:]  # skip the first steps (allocation, first-call costs)
    steps = [float(x) for x in (out / "step_ms.txt").read_text().split()][2:]
    per_rank = records[-1].get("layers_per_rank") or [len(records[-1]["metrics"])]
    return {
        "ranks": ranks,
        "layers": per_rank,
        "monitor_ms": statistics.median(r["monitor_ms"] for r in records),
        "step_ms": statistics.median(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
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
    print("| ranks | layers measured per rank | monitor ms per step (rank 0, median) | step ms (rank 0, median) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {r['layers']} | {r['monitor_ms']:.1f} | {r['step_ms']:.1f} |")


if __name__ == "__main__":
    main()
