"""``GradientSpectrumMonitor``: the Lightning callback that measures, logs and scores gradient spectra every step.

It orchestrates: selection comes from :mod:`gradspectra.capture`, math from
:mod:`gradspectra.functional`, streaming state from :mod:`gradspectra.metrics`, the batch score
from :mod:`gradspectra.scoring` and the outputs from :mod:`gradspectra.reporting`.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from gradspectra.capture import Selection, WatchedParameter, group_by_component, select_parameters
from gradspectra.functional import METHODS, layer_mad, spectral_metrics_many
from gradspectra.functional.spectral import _check_metric_names
from gradspectra.functional.svd import Method
from gradspectra.metrics import LayerwiseSpectrum
from gradspectra.reporting import (
    RECORD_FILENAME,
    TAG_ROOT,
    RecordBuffer,
    RecordWriter,
    custom_scalars_layout,
    flagged_table,
    heatmap_figure,
    layer_profile_figure,
    layer_tag,
)
from gradspectra.scoring import BatchScorer, ScoreResult

Action = Literal["log", "skip", "raise"]
ACTIONS: tuple[str, ...] = get_args(Action)


class GradientAnomalyError(RuntimeError):
    """Raised by ``GradientSpectrumMonitor(action="raise")`` for a flagged batch; ``.record`` holds its record."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        reasons = "; ".join(record.get("reasons") or [])
        super().__init__(
            f"gradspectra flagged step {record.get('step')} (batch {record.get('batch_idx')}, "
            f"score {record.get('score')}): {reasons}"
        )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


class GradientSpectrumMonitor(Callback):
    r"""Watch the spectrum of every layer's gradient while a model trains.

    After each backward, in ``on_before_optimizer_step`` (gradients accumulated over
    ``accumulate_grad_batches``, AMP-unscaled, not yet clipped), the monitor turns each watched
    weight's gradient into a matrix, computes the spectral metrics of all of them (same-shaped
    matrices in one batched call, on the gradients' device), and

    - folds them into streaming per-layer statistics (:class:`~gradspectra.metrics.LayerwiseSpectrum`);
    - logs ``grad_spectrum/<metric>/<component>/layer_<NN>`` scalars, cross-layer aggregates and
      the cross-layer ``layer_mad`` per component to every logger in ``trainer.loggers``; for
      TensorBoard also a custom-scalars layout, layer-profile figures and layer x step heatmaps;
    - scores the batch against a running robust baseline, flags anomalies with reasons, and acts
      on flags (``action``);
    - appends one JSON record per monitored step to ``<log dir>/gradspectra/batches.jsonl``
      (global rank 0, flushed per line) and keeps the newest ones in :attr:`batch_records`.

    Args:
        include: glob pattern(s) on parameter names to watch (``"*.self_attn.*_proj.weight"``).
        exclude: glob pattern(s) on parameter names to leave out.
        regex: a regular expression searched in parameter names.
        module_types: module classes whose ``weight`` is watched; default every ``nn.Linear``,
            convolution and GPT-2 style ``Conv1D``.
        predicate: ``f(name, parameter, module) -> bool``, a last say on each candidate.
        include_embeddings: also watch ``nn.Embedding`` weights.
        metrics: metric names (see :data:`gradspectra.functional.METRIC_NAMES`); ``None`` for all.
        method: singular value route, ``"auto"``, ``"svd"`` or ``"gram"``.
        every_n_steps: measure every n-th optimizer step.
        log_every_n_steps: send per-layer scalars to the loggers every n-th measured step.
        figure_every_n_steps: draw layer-profile figures and heatmaps (TensorBoard) every n-th
            measured step, and once at the end of training; ``0`` disables figures.
        heatmap_steps: how many recent measured steps the heatmaps show.
        output_dir: where ``batches.jsonl`` goes; default ``<first logger's log_dir>/gradspectra``,
            else ``<trainer.default_root_dir>/gradspectra``.
        max_records_in_memory: how many recent records :attr:`batch_records` keeps (the file keeps all).
        scoring: score and flag batches.
        warmup_steps: measured steps that build the baseline before scores are given.
        false_flag_rate: the target share of clean batches flagged, which sets the threshold.
        action: what a flag does: ``"log"`` (default) only records it; ``"skip"`` drops the
            optimizer step (every parameter's ``.grad`` set to ``None``, so no optimizer moves it);
            ``"raise"`` raises :class:`GradientAnomalyError` carrying the record.
        sample_id_key: key of the batch (a mapping) that holds per-sample ids, listed in the record.
        summary_top_k: rows in the end-of-training table of the highest-scoring batches.
        verbose: print that table on the console (rank 0) at the end of training.
        cpu_threads: intra-op threads for the monitor's linear algebra on CPU gradients (restored
            afterwards). The default 1 avoids OpenMP oversubscription: measured on a busy 2-core
            machine, 36 MiniLM-shaped float64 SVDs took 4.7 s with 1 thread and 128 s with 2.
            ``None`` keeps torch's setting.
        distribute: under multi-process data parallel training (DDP), split the spectral work:
            each rank measures a disjoint set of layers, balanced by cost, and one all-reduce of
            the small ``(layers x metrics)`` table gives every rank all values.

    Raises:
        ValueError / TypeError: for a bad argument, naming it and what was received.

    Example::

        from lightning.pytorch import Trainer
        from gradspectra import GradientSpectrumMonitor

        trainer = Trainer(callbacks=[GradientSpectrumMonitor()])
    """

    def __init__(
        self,
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        regex: str | re.Pattern[str] | None = None,
        module_types: Sequence[type[nn.Module]] | None = None,
        predicate: Callable[[str, nn.Parameter, nn.Module], bool] | None = None,
        include_embeddings: bool = False,
        metrics: Sequence[str] | None = None,
        method: Method = "auto",
        every_n_steps: int = 1,
        log_every_n_steps: int = 1,
        figure_every_n_steps: int = 100,
        heatmap_steps: int = 200,
        output_dir: str | os.PathLike[str] | None = None,
        max_records_in_memory: int = 10_000,
        scoring: bool = True,
        warmup_steps: int = 20,
        false_flag_rate: float = 0.01,
        action: Action = "log",
        sample_id_key: str | None = None,
        summary_top_k: int = 10,
        verbose: bool = True,
        distribute: bool = True,
        cpu_threads: int | None = 1,
    ) -> None:
        super().__init__()
        self.metric_names: tuple[str, ...] = _check_metric_names(metrics)
        if method not in METHODS:
            raise ValueError(f"`method` can be {', '.join(METHODS)}, got {method!r}")
        if action not in ACTIONS:
            raise ValueError(f"`action` can be {', '.join(ACTIONS)}, got {action!r}")
        if action != "log" and not scoring:
            raise ValueError(f"`action={action!r}` needs `scoring=True`, got scoring={scoring!r}")
        if (
            isinstance(figure_every_n_steps, bool)
            or not isinstance(figure_every_n_steps, int)
            or figure_every_n_steps < 0
        ):
            raise ValueError(f"`figure_every_n_steps` must be an int >= 0, got {figure_every_n_steps!r}")
        if sample_id_key is not None and not isinstance(sample_id_key, str):
            raise TypeError(f"`sample_id_key` must be a str or None, got {sample_id_key!r}")
        self.selection_kwargs: dict[str, Any] = {
            "include": include,
            "exclude": exclude,
            "regex": regex,
            "module_types": module_types,
            "predicate": predicate,
            "include_embeddings": include_embeddings,
        }
        self.method: Method = method
        self.every_n_steps = _positive_int("every_n_steps", every_n_steps)
        self.log_every_n_steps = _positive_int("log_every_n_steps", log_every_n_steps)
        self.figure_every_n_steps = figure_every_n_steps
        self.heatmap_steps = _positive_int("heatmap_steps", heatmap_steps)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.max_records_in_memory = _positive_int("max_records_in_memory", max_records_in_memory)
        self.summary_top_k = _positive_int("summary_top_k", summary_top_k)
        self.action: Action = action
        self.sample_id_key = sample_id_key
        self.verbose = verbose
        self.distribute = bool(distribute)
        if cpu_threads is not None:
            cpu_threads = _positive_int("cpu_threads", cpu_threads)
        self.cpu_threads = cpu_threads
        # the scorer validates its own arguments, so a bad value fails here, in __init__
        self.scorer: BatchScorer | None = (
            BatchScorer(warmup_steps=warmup_steps, false_flag_rate=false_flag_rate) if scoring else None
        )

        self.batch_records = RecordBuffer(self.max_records_in_memory)
        self.selection: Selection | None = None
        self.watched: list[WatchedParameter] = []
        self.spectrum: LayerwiseSpectrum | None = None
        self.steps_monitored = 0
        self.flagged_total = 0
        self.skipped_total = 0
        self.missing_grad_total = 0
        self.nonfinite_total = 0
        self.error_total = 0
        self.monitor_seconds = 0.0
        self.record_path: Path | None = None
        self._writer: RecordWriter | None = None
        self._history: deque[tuple[int, np.ndarray]] = deque(maxlen=self.heatmap_steps)
        self._pending_state: dict[str, Any] | None = None
        self._layout_written = False
        self._loss_sum: Tensor | None = None
        self._sample_ids: list[Any] = []
        self._batch_idx: int | None = None
        self._component_rows: dict[str, list[int]] = {}
        self._owners: list[int] = []
        self._owners_world = 0
        self.layers_computed_here = 0

    # ------------------------------------------------------------------ identity and state

    @property
    @override
    def state_key(self) -> str:
        keys = {k: v for k, v in self.selection_kwargs.items() if isinstance(v, (str, bool, type(None)))}
        return f"{type(self).__qualname__}{{metrics={list(self.metric_names)!r}, selection={keys!r}}}"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "layer_keys": [w.key for w in self.watched],
            "metric_names": list(self.metric_names),
            "spectrum": None if self.spectrum is None else {k: v.cpu() for k, v in self.spectrum.state_dict().items()},
            "scorer": None if self.scorer is None else self.scorer.state_dict(),
            "steps_monitored": self.steps_monitored,
            "flagged_total": self.flagged_total,
            "skipped_total": self.skipped_total,
            "missing_grad_total": self.missing_grad_total,
            "nonfinite_total": self.nonfinite_total,
            "error_total": self.error_total,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied once the watched layers are known (setup runs before checkpoint restore, the
        # metric state is created on the gradients' device at the first step)
        self._pending_state = dict(state_dict)
        self.steps_monitored = int(state_dict.get("steps_monitored", 0))
        self.flagged_total = int(state_dict.get("flagged_total", 0))
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self.missing_grad_total = int(state_dict.get("missing_grad_total", 0))
        self.nonfinite_total = int(state_dict.get("nonfinite_total", 0))
        self.error_total = int(state_dict.get("error_total", 0))
        if self.scorer is not None and state_dict.get("scorer") is not None:
            self.scorer.load_state_dict(state_dict["scorer"])

    # ------------------------------------------------------------------ set-up

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise ValueError(
                f"`GradientSpectrumMonitor` cannot run under {strategy} yet: gradients are sharded there and "
                "every rank would measure a shard, not the layer's matrix. Use DDP or a single device."
            )
        selection = select_parameters(pl_module, **self.selection_kwargs)
        if not selection.watched:
            raise ValueError(
                "`GradientSpectrumMonitor` found no parameter to watch with "
                f"{ {k: v for k, v in self.selection_kwargs.items() if v not in (None, False)} }. "
                + selection.describe_empty(pl_module)
            )
        self.selection = selection
        self.watched = selection.watched
        row = {id(w): i for i, w in enumerate(self.watched)}
        self._component_rows = {
            component: [row[id(p)] for p in params]
            for component, params in group_by_component(self.watched).items()
            if len(params) >= 2 and params[0].index is not None
        }
        if selection.frozen:
            rank_zero_info(
                f"gradspectra: {len(selection.frozen)} matching parameters are frozen and not watched "
                f"(e.g. {selection.frozen[0]})"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        base = self.output_dir
        if base is None:
            log_dir = None
            for logger in trainer.loggers:
                log_dir = getattr(logger, "log_dir", None)
                if log_dir:
                    break
            base = Path(log_dir or trainer.default_root_dir) / "gradspectra"
        self.record_path = Path(base) / RECORD_FILENAME
        if not trainer.loggers:
            rank_zero_warn(
                "`GradientSpectrumMonitor` with `Trainer(logger=False)`: no scalars or figures are logged; "
                f"the batch records still go to {self.record_path}"
            )
        if trainer.is_global_zero:
            self._writer = RecordWriter(self.record_path)

    # ------------------------------------------------------------------ per batch

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx
        if self.sample_id_key is not None and isinstance(batch, Mapping) and self.sample_id_key in batch:
            ids = batch[self.sample_id_key]
            if isinstance(ids, Tensor):
                ids = ids.detach().cpu().tolist()
            self._sample_ids.extend(list(ids))

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # Lightning passes the loss divided by accumulate_grad_batches, so the sum over the window is
        # its mean; under 16-mixed it is also multiplied by the grad scaler's scale (undone below)
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        step = trainer.global_step
        loss_sum, self._loss_sum = self._loss_sum, None
        sample_ids, self._sample_ids = self._sample_ids, []
        if step % self.every_n_steps != 0 or not self.watched:
            return
        started = time.perf_counter()
        record = self._measure(trainer, step, loss_sum, sample_ids, started)
        if record.get("flagged") and self.action == "skip":
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.skipped_total += 1
            record["skipped"] = True
        self.monitor_seconds += time.perf_counter() - started
        if record.get("flagged") and self.action == "raise":
            raise GradientAnomalyError(record)

    def _measure(
        self, trainer: pl.Trainer, step: int, loss_sum: Tensor | None, sample_ids: list[Any], started: float
    ) -> dict[str, Any]:
        keys = [w.key for w in self.watched]
        grads: list[Tensor] = []
        present: list[int] = []
        for i, w in enumerate(self.watched):
            g = w.grad_matrix()
            if g is not None:
                grads.append(g)
                present.append(i)
        missing = [keys[i] for i in range(len(keys)) if i not in set(present)]
        error: str | None = None
        values = torch.full((len(keys), len(self.metric_names)), float("nan"), dtype=torch.float64)
        world = trainer.world_size if self.distribute else 1
        layers_per_rank: list[int] | None = None
        try:
            if grads:
                device = grads[0].device
                # every rank holds the same all-reduced gradients: each measures the layers it owns
                owners = self._layer_owners(world)
                mine = [k for k, i in enumerate(present) if owners[i] == trainer.global_rank] if world > 1 else None
                rows = present if mine is None else [present[k] for k in mine]
                todo = grads if mine is None else [grads[k] for k in mine]
                computed = self._compute(todo) if todo else None
                self.layers_computed_here += len(rows)
                full = torch.zeros(values.shape, dtype=torch.float64, device=device)
                if computed is not None:
                    full[rows] = computed.to(device)
                if world > 1:
                    counts = torch.zeros(world, dtype=torch.float64, device=device)
                    counts[trainer.global_rank] = len(rows)
                    local_loss = torch.zeros(1, dtype=torch.float64, device=device)
                    if loss_sum is not None:
                        local_loss += loss_sum.to(device=device, dtype=torch.float64)
                    # one all-reduce: a layer's row is its owner's values plus zeros from the others;
                    # the losses are summed so every rank scores the same global mean loss
                    packed = trainer.strategy.reduce(torch.cat([full.flatten(), counts, local_loss]), reduce_op="sum")
                    full = packed[: full.numel()].view(full.shape)
                    layers_per_rank = [int(c) for c in packed[full.numel() : full.numel() + world].tolist()]
                    if loss_sum is not None:
                        loss_sum = packed[-1] / world
                mask = torch.zeros(len(keys), dtype=torch.bool, device=device)
                mask[present] = True
                full = torch.where(mask[:, None], full, torch.full_like(full, float("nan")))
                self._spectrum_on(device).update(full, mask=mask)
                # the one device-to-host copy per step: (layers x metrics) scalars
                values = full.cpu()
        except Exception as err:  # a measurement failure must never stop the user's training
            error = f"{type(err).__name__}: {err}"
            self.error_total += 1
            rank_zero_warn(f"gradspectra could not measure step {step}: {error}")

        loss = self._loss_value(trainer, loss_sum)
        present_set = set(present)
        layer_metrics = {
            keys[i]: {name: float(values[i, j]) for j, name in enumerate(self.metric_names)}
            for i in range(len(keys))
            if i in present_set
        }
        nonfinite = [k for k, mv in layer_metrics.items() if not all(math.isfinite(v) for v in mv.values())]
        self.missing_grad_total += len(missing)
        self.nonfinite_total += bool(nonfinite)

        result: ScoreResult | None = None
        if self.scorer is not None:
            result = self.scorer.score(layer_metrics, loss)
        flagged = bool(result.flagged) if result is not None else False
        self.flagged_total += flagged
        record: dict[str, Any] = {
            "step": step,
            "epoch": trainer.current_epoch,
            "batch_idx": self._batch_idx,
            "score": None if result is None or result.score is None else float(result.score),
            "flagged": flagged,
            "reasons": [] if result is None else list(result.reasons),
            "loss": loss,
            "metrics": layer_metrics,
            "sample_ids": sample_ids or None,
            "z": {} if result is None else dict(result.z),
            "threshold": None if result is None else getattr(result, "threshold", None),
            "nonfinite_layers": nonfinite,
            "missing_layers": missing,
        }
        if layers_per_rank is not None:
            record["layers_per_rank"] = layers_per_rank
        if error is not None:
            record["error"] = error
        # the monitor's own cost this step up to the record (logging and figures come after)
        record["monitor_ms"] = 1000.0 * (time.perf_counter() - started)
        self.steps_monitored += 1
        self.batch_records.append(record)
        if self._writer is not None:
            self._writer.write(record)
        self._history.append((step, values.numpy().copy()))
        self._log(trainer, step, values, present_set, record)
        return record

    def _compute(self, matrices: list[Tensor]) -> Tensor:
        if self.cpu_threads is None or matrices[0].device.type != "cpu":
            return spectral_metrics_many(matrices, self.metric_names, self.method)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.cpu_threads)
        try:
            return spectral_metrics_many(matrices, self.metric_names, self.method)
        finally:
            torch.set_num_threads(previous)

    def _layer_owners(self, world: int) -> list[int]:
        """Rank that measures each watched layer: longest-processing-time first, cost ~ m * n * min(m, n)."""
        if len(self._owners) != len(self.watched) or self._owners_world != world:
            costs = []
            for w in self.watched:
                shape = w.param.shape
                m, n = int(shape[0]), int(w.param.numel() // max(1, shape[0]))
                costs.append(m * n * min(m, n))
            load = [0] * world
            owners = [0] * len(costs)
            for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
                r = min(range(world), key=lambda r: (load[r], r))
                owners[i] = r
                load[r] += costs[i]
            self._owners, self._owners_world = owners, world
        return self._owners

    def _spectrum_on(self, device: torch.device) -> LayerwiseSpectrum:
        if self.spectrum is None:
            self.spectrum = LayerwiseSpectrum([w.key for w in self.watched], self.metric_names).to(device)
            pending, self._pending_state = self._pending_state, None
            if pending and pending.get("spectrum") is not None:
                if list(pending.get("layer_keys", [])) != [w.key for w in self.watched] or list(
                    pending.get("metric_names", [])
                ) != list(self.metric_names):
                    rank_zero_warn(
                        "gradspectra: the checkpoint watched other layers or metrics; streaming statistics restart"
                    )
                else:
                    self.spectrum.load_state_dict({k: v.to(device) for k, v in pending["spectrum"].items()})
        return self.spectrum

    @staticmethod
    def _loss_value(trainer: pl.Trainer, loss_sum: Tensor | None) -> float | None:
        if loss_sum is None:
            return None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        value = float(loss_sum)
        if scaler is not None and hasattr(scaler, "get_scale"):
            value /= float(scaler.get_scale())
        return value

    # ------------------------------------------------------------------ logging

    def _log(self, trainer: pl.Trainer, step: int, values: Tensor, present: set[int], record: dict[str, Any]) -> None:
        if not trainer.loggers:
            return
        scalars: dict[str, float] = {}
        if record["score"] is not None:
            scalars["gradspectra/score"] = record["score"]
        if record["threshold"] is not None:
            scalars["gradspectra/threshold"] = float(record["threshold"])
        scalars["gradspectra/flagged"] = float(record["flagged"])
        scalars["gradspectra/flagged_total"] = float(self.flagged_total)
        scalars["gradspectra/nonfinite_layers"] = float(len(record["nonfinite_layers"]))
        scalars["gradspectra/missing_layers"] = float(len(record["missing_layers"]))
        if record["loss"] is not None:
            scalars["gradspectra/loss"] = record["loss"]
        per_layer = (self.steps_monitored - 1) % self.log_every_n_steps == 0
        arr = values.numpy()
        rows = sorted(present)
        for j, metric in enumerate(self.metric_names):
            col = arr[rows, j] if rows else np.zeros(0)
            finite = col[np.isfinite(col)]
            if finite.size:
                scalars[f"{TAG_ROOT}_layers/{metric}/mean"] = float(finite.mean())
                scalars[f"{TAG_ROOT}_layers/{metric}/min"] = float(finite.min())
                scalars[f"{TAG_ROOT}_layers/{metric}/max"] = float(finite.max())
            if not per_layer:
                continue
            for i in rows:
                scalars[layer_tag(metric, self.watched[i].key)] = float(arr[i, j])
            for component, order in self._component_rows.items():
                # a component with a missing or non-finite layer gets a NaN MAD, dropped below
                scalars[f"{TAG_ROOT}_mad/{metric}/{component}"] = float(layer_mad(torch.from_numpy(arr[order, j])))
        scalars = {k: v for k, v in scalars.items() if math.isfinite(v)}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if trainer.is_global_zero and tensorboards:
            if not self._layout_written:
                components = sorted({w.component for w in self.watched})
                for tb in tensorboards:
                    tb.experiment.add_custom_scalars(custom_scalars_layout(self.metric_names, components))
                self._layout_written = True
            if self.figure_every_n_steps and self.steps_monitored % self.figure_every_n_steps == 0:
                self._draw_figures(tensorboards, step)
            for tb in tensorboards:
                tb.experiment.flush()

    def _draw_figures(self, tensorboards: Sequence[TensorBoardLogger], step: int) -> None:
        if not self._history:
            return
        import matplotlib.pyplot as plt

        steps = [s for s, _ in self._history]
        stack = np.stack([v for _, v in self._history], axis=-1)  # layers x metrics x steps
        window = stack[..., -max(1, min(self.figure_every_n_steps, stack.shape[-1])) :]
        with np.errstate(all="ignore"):
            recent = np.nanmean(np.where(np.isfinite(window), window, np.nan), axis=-1)
        keys = [w.key for w in self.watched]
        for j, metric in enumerate(self.metric_names):
            curves: dict[str, list[tuple[int, float]]] = {}
            for i, w in enumerate(self.watched):
                if w.index is not None and np.isfinite(recent[i, j]):
                    curves.setdefault(w.component, []).append((w.index, float(recent[i, j])))
            figures = []
            if curves:
                figures.append((f"{TAG_ROOT}_profile/{metric}", layer_profile_figure(metric, curves, step)))
            figures.append((f"{TAG_ROOT}_heatmap/{metric}", heatmap_figure(metric, keys, steps, stack[:, j, :])))
            for tag, fig in figures:
                for tb in tensorboards:
                    tb.experiment.add_figure(tag, fig, global_step=step, close=False)
                plt.close(fig)

    # ------------------------------------------------------------------ end of training

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if trainer.is_global_zero:
            table = self.summary(self.summary_top_k)
            if tensorboards:
                if self.figure_every_n_steps:
                    self._draw_figures(tensorboards, trainer.global_step)
                for tb in tensorboards:
                    tb.experiment.add_text(
                        "gradspectra/summary", "```\n" + table + "\n```", global_step=trainer.global_step
                    )
                    tb.experiment.flush()
            if self.verbose:
                print(table)
        self._close()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def summary(self, top: int = 10) -> str:
        """A text report: counts, then the ``top`` highest-scoring batches (from the records in memory)."""
        head = (
            f"gradspectra: {self.steps_monitored} steps monitored, {self.flagged_total} flagged"
            + (f", {self.skipped_total} skipped" if self.action == "skip" else "")
            + f", {self.nonfinite_total} with non-finite gradients, {self.missing_grad_total} missing layer gradients"
            + f"; monitor time {self.monitor_seconds:.2f} s"
        )
        if self.record_path is not None:
            head += f"\nrecords: {self.record_path}"
        return head + "\n" + flagged_table(list(self.batch_records), top)
