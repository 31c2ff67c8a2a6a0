"""One rank of a real 2-process CPU (gloo) run of a front door, launched by ``torch.distributed.run``.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 _ddp_worker.py {tracker|lora|trainer|trainer-fsdp2} OUT
STEPS``.

``tracker``: the tiny Llama in ``DistributedDataParallel``, each rank trained on its half of every global
batch of :func:`conftest.batches`, a ``GradientSpectrumTracker`` between backward and the SGD step.
``lora``: the same with :func:`conftest.lora_llama`, watching the papers' q/k/v/o pattern (implied gradients).
``trainer``: a transformers ``Trainer`` (per-device batch 2) over :class:`conftest.Samples` with a
``GradientSpectrumCallback``; ``trainer-fsdp2``: the same under accelerate's FSDP2 (``fully_shard`` of each decoder
layer and of the model: DTensor gradients). Each rank writes ``OUT/rank<r>.json``: its rank and world, the layers it
measured, the records its door returned, the token rows it trained on.

Imported (not run) by pytest's doctest collection: nothing happens at import.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

OPTIONS: dict[str, Any] = {"spectra": "exact", "figure_every_n_steps": 0, "warmup_steps": 5, "verbose": False}
LORA_INCLUDE = "*.self_attn.*_proj.weight"  # the papers' pattern: q/v adapted, k/o frozen without adapters


def _conftest() -> Any:
    tests = str(Path(__file__).resolve().parents[1])
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from integrations import conftest

    return conftest


def _dump(out: Path, rank: int, payload: dict[str, Any]) -> None:
    (out / f"rank{rank}.json").write_text(json.dumps(payload, default=float))


def run_tracker(out: Path, steps: int, lora: bool = False) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gradspectra import GradientSpectrumTracker

    c = _conftest()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = c.BATCH // world
    # lora: frozen base weights measured by their implied gradient D^T X, averaged over the ranks by the engine
    model = DistributedDataParallel(c.lora_llama() if lora else c.tiny_llama())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    options = {**OPTIONS, "include": LORA_INCLUDE} if lora else OPTIONS
    tracker = GradientSpectrumTracker(model, log_dir=out / "logs", **options)
    returned, rows = [], []
    for batch in c.batches(steps):
        mine = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
        rows.append(mine["input_ids"].tolist())
        loss = model(**mine).loss
        loss.backward()
        returned.append(tracker.step(loss=loss))
        optimizer.step()
        optimizer.zero_grad()
    tracker.close()
    _dump(
        out,
        rank,
        {
            "rank": rank,
            "world": world,
            "layers_computed_here": tracker.engine.layers_computed_here,
            "records": returned,
            "rows": rows,
        },
    )
    dist.barrier()
    dist.destroy_process_group()


def _fsdp_on_cpu() -> None:
    """accelerate (1.16) keeps its FSDP plugin only on accelerators: on CPU it drops it without a word and wraps
    the model in DDP. The test harness lets it through (FSDP2's ``fully_shard`` itself runs on CPU, gloo)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init  # type: ignore[method-assign]


def run_trainer(out: Path, steps: int, fsdp2: bool = False) -> None:
    import torch
    from transformers import Trainer, TrainerCallback

    from gradspectra.integrations.transformers import GradientSpectrumCallback

    c = _conftest()
    torch.set_num_threads(1)
    model = c.tiny_llama()
    rows: list[list[list[int]]] = []
    # the token rows this rank's forward passes see (a Trainer callback does not see the batch)
    model.model.embed_tokens.register_forward_hook(lambda m, args, output: rows.append(args[0].tolist()))
    callback = GradientSpectrumCallback(**OPTIONS)
    returned: list[Any] = []

    class Tap(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            returned.append(callback.engine.batch_records[-1] if callback.engine.batch_records else None)

    per_device = c.BATCH // int(os.environ["WORLD_SIZE"])
    extra: dict[str, Any] = {}
    optimizers: Any = (torch.optim.SGD(model.parameters(), lr=0.1), None)
    if fsdp2:
        _fsdp_on_cpu()
        extra = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
        extra["optim"] = "sgd"  # (the Trainer's own SGD, lr 0.1: made after the model is sharded)
        optimizers = (None, None)
    args = c.hf_args(out / "trainer", steps, per_device_train_batch_size=per_device, ddp_backend="gloo", **extra)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=c.Samples(c.batches(steps)),
        callbacks=[callback, Tap()],
        optimizers=optimizers,
    )
    trainer.train()
    dtensors = sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
    _dump(
        out,
        args.process_index,
        {
            "rank": args.process_index,
            "world": args.world_size,
            "layers_computed_here": callback.engine.layers_computed_here,
            "records": returned,
            "rows": rows,
            "dtensors": dtensors,
        },
    )
    # accelerate leaves the gloo group up; torn down by the interpreter at exit, gloo's threads can abort
    # the process ("terminate called without an active exception") after a successful run
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_branch(out: Path, steps: int) -> None:
    """A frozen layer that only rank 0's batches reach (an expert, a branch): the ranks still agree on the
    implied layers' all-reduce, and rank 1 adds zeros for it."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from gradspectra import GradientSpectrumTracker

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8), "head": nn.Linear(8, 2)})
    model["a"].requires_grad_(False)
    model["b"].requires_grad_(False)
    ddp = DistributedDataParallel(model)
    tracker = GradientSpectrumTracker(ddp, log_dir=out / "logs", include="*.weight", **{**OPTIONS, "spectra": "exact"})
    optimizer = torch.optim.SGD(model["head"].parameters(), lr=0.1)
    returned = []
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 16, 8, generator=g)[rank]
        h = torch.relu(model["a"](x))
        if rank == 0:
            h = h + model["b"](h)
        loss = model["head"](h).square().mean()
        loss.backward()
        returned.append(tracker.step(loss=loss))
        optimizer.step()
        optimizer.zero_grad()
    tracker.close()
    _dump(out, rank, {"rank": rank, "world": dist.get_world_size(), "records": returned})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, folder, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    if mode == "lora":
        run_tracker(folder, n, lora=True)
    elif mode == "branch":
        run_branch(folder, n)
    elif mode == "trainer-fsdp2":
        run_trainer(folder, n, fsdp2=True)
    else:
        {"tracker": run_tracker, "trainer": run_trainer}[mode](folder, n)
