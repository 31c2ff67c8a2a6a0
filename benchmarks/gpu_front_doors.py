"""GPU checks of the front doors: the fp16 loss scale is undone before measuring (transformers Trainer with
accelerate's GradScaler, with and without clipping; the plain-loop tracker after ``scaler.unscale_``).

Run on a CUDA machine: ``PYTHONPATH=src python benchmarks/gpu_front_doors.py``. Prints one line per check
and exits non-zero when one fails. For each run a tap callback (after ours) reads the gradients the
optimizer is about to use; the record's Frobenius norms must equal the tap's, and the fp16 run's step-0
spectra must match an fp32 run of the same batch to within fp16 rounding (a missed scale would be off by
the scale, ~65536x).
"""

from __future__ import annotations

import copy
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import IterableDataset

from gradspectra import GradientSpectrumTracker
from gradspectra.functional import frobenius_norm

VOCAB, SEQ, BATCH, STEPS = 512, 64, 8, 4
FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ)
    return LlamaForCausalLM(cfg)


def data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS * BATCH):
        ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[0] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


class Stream(IterableDataset[dict[str, torch.Tensor]]):
    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.items)


Run = tuple[list[dict[str, Any]], list[dict[str, float]], list[float]]


def param_name(key: str) -> str:
    """The parameter of a record's layer key (``self_attn.q_proj/layer_02`` is
    ``model.layers.2.self_attn.q_proj.weight``)."""
    if "/layer_" not in key:
        return f"{key}.weight"
    component, index = key.split("/layer_")
    return f"model.layers.{int(index)}.{component}.weight"


def hf_run(base: nn.Module, fp16: bool, max_grad_norm: float) -> Run:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradspectra.integrations.transformers import GradientSpectrumCallback

    taps: list[dict[str, float]] = []
    scales: list[float] = []
    m = copy.deepcopy(base)

    class Tap(TrainerCallback):  # type: ignore[misc]
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            taps.append({n: float(frobenius_norm(p.grad)) for n, p in m.named_parameters()
                         if p.grad is not None and p.grad.ndim == 2})
            scaler = getattr(kwargs.get("optimizer"), "scaler", None)
            scales.append(float(scaler.get_scale()) if scaler is not None else 1.0)

    callback = GradientSpectrumCallback(spectra="exact", figure_every_n_steps=0, warmup_steps=5, verbose=False)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=STEPS, per_device_train_batch_size=BATCH,
                                 learning_rate=1e-3, max_grad_norm=max_grad_norm, fp16=fp16, report_to="none",
                                 save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                 remove_unused_columns=False, seed=0)
        Trainer(model=m, args=args, train_dataset=Stream(data()), callbacks=[callback, Tap()]).train()
    return list(callback.batch_records), taps, scales


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def main() -> None:
    cuda = torch.cuda.is_available()
    # without CUDA (a dry run of this script's code paths) every run is fp32 and the tracker check is skipped
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (dry run)'}, torch {torch.__version__}", flush=True)
    import transformers

    print(f"transformers {transformers.__version__}", flush=True)
    base = model()
    ref, _, _ = hf_run(base, fp16=False, max_grad_norm=0.0)
    for clip in (0.0, 1.0):
        records, taps, scales = hf_run(base, fp16=cuda, max_grad_norm=clip)
        worst = 0.0
        for r, tap in zip(records, taps):
            for key, values in r["metrics"].items():
                worst = max(worst, rel(values["frobenius_norm"], tap[param_name(key)]))
        check(f"hf fp16 clip={clip}: record equals the gradients the optimizer gets", worst < 1e-5,
              f"worst rel diff of Frobenius norms {worst:.2e}; loss scales seen {sorted(set(scales))}")
        if clip == 0.0:
            diffs = [rel(records[0]["metrics"][k]["nuclear_norm"], v["nuclear_norm"])
                     for k, v in ref[0]["metrics"].items()]
            er = [rel(records[0]["metrics"][k]["effective_rank"], v["effective_rank"])
                  for k, v in ref[0]["metrics"].items()]
            check("hf fp16 step 0 matches fp32 (scale undone)", max(diffs) < 0.05 and max(er) < 0.05,
                  f"nuclear rel diff median {sorted(diffs)[len(diffs)//2]:.2e} max {max(diffs):.2e}; "
                  f"effective rank max {max(er):.2e}")
    if not cuda:
        sys.exit(1 if FAILED else 0)
    # the tracker with torch.amp: scaler.unscale_ before tracker.step
    m = copy.deepcopy(base).cuda()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    items = data()
    batch = {k: torch.stack([it[k] for it in items[:BATCH]]).cuda() for k in items[0]}
    with tempfile.TemporaryDirectory() as out, GradientSpectrumTracker(
        m, log_dir=out, optimizer=opt, spectra="exact", figure_every_n_steps=0, verbose=False
    ) as tracker:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = m(**batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        record = tracker.step(loss=loss)
        scaler.step(opt)
        scaler.update()
    assert record is not None
    diffs = [rel(record["metrics"][k]["nuclear_norm"], v["nuclear_norm"]) for k, v in ref[0]["metrics"].items()]
    check("tracker autocast fp16 step 0 matches the fp32 Trainer run", max(diffs) < 0.05,
          f"nuclear rel diff max {max(diffs):.2e}; loss {record['loss']:.4f}")
    print(f"{len(FAILED)} failed: {FAILED}" if FAILED else "all GPU front-door checks passed", flush=True)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
