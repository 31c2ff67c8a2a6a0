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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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

from gradspectra.callbacks.budget import ESTIMATE, EXACT, OverheadBudget, Plan
from gradspectra.capture import Selection, WatchedParameter, group_by_component, select_parameters
from gradspectra.capture.factors import FactorCapture
from gradspectra.capture.sharded import fsdp_groups, is_sharded, sharded_gradients
from gradspectra.functional import (
    METHODS,
    estimate_spectral_metrics_many,
    factored_singular_values,
    frobenius_norm,
    frobenius_norms,
    layer_mad,
    metrics_from_singular_values,
    needs_spectrum,
    spectral_metrics_many,
)
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
    set_aside_records_after,
)
from gradspectra.scoring import BatchScorer, ScoreResult

Action = Literal["log", "skip", "raise"]
ACTIONS: tuple[str, ...] = get_args(Action)
Spectra = Literal["auto", "exact", "estimate"]
SPECTRA: tuple[str, ...] = get_args(Spectra)
# per-layer codes of how its spectrum was obtained on a step (summed across ranks: only the owner adds)
_DEFERRED, _EXACT, _ESTIMATED, _AUDITED = 0, 1, 2, 3
_FLUSH_SECONDS = 2.0  # TensorBoard event files are flushed at most this often (and at the end)
_CODE_NAMES = {_EXACT: "exact", _ESTIMATED: "estimate", _AUDITED: "exact+audit"}


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
        method: exact singular value route, ``"auto"``, ``"svd"`` or ``"gram"``.
        spectra: how spectra are obtained. ``"auto"`` (default) keeps the monitor's cost near
            ``max_overhead`` x the training step: exact spectra when they fit, else bounded-error
            estimates (:func:`gradspectra.functional.estimate_spectral_metrics_many`), for as many
            layers as fit, oldest first, the others deferred to a later step (their Frobenius norm,
            exact, is still measured), with exact audits of the estimator in round-robin order.
            ``"exact"``: exact spectra of every layer every step, whatever they cost.
            ``"estimate"``: estimates of every layer every step, no audits.
            Each record says which layers got which (``spectra``) and the estimates' errors.
        max_overhead: the cost target of ``spectra="auto"`` as a fraction of the step time.
        every_n_steps: measure every n-th optimizer step.
        log_every_n_steps: send per-layer scalars to the loggers every n-th measured step.
        figure_every_n_steps: draw layer-profile figures and heatmaps (TensorBoard) every n-th
            measured step, and once at the end of training; ``0`` disables figures. Under
            ``spectra="auto"`` this is the shortest spacing: the budget spaces drawings further
            apart when they would cost more than a quarter of it (figures take seconds to draw).
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
        sample_id_key: key of the batch (a mapping) that holds per-sample ids, listed in the record
            (under DDP/FSDP every rank's ids of the step, rank 0's first).
        summary_top_k: rows in the end-of-training table of the highest-scoring batches.
        verbose: print that table on the console (rank 0) at the end of training.
        cpu_threads: intra-op threads for the monitor's linear algebra on CPU gradients (restored
            afterwards). The default 1 avoids OpenMP oversubscription: measured on a busy 2-core
            machine, 36 MiniLM-shaped float64 SVDs took 4.7 s with 1 thread and 128 s with 2.
            ``None`` keeps torch's setting.
        distribute: under multi-process data parallel training (DDP), split the spectral work:
            each rank measures a disjoint set of layers, balanced by cost, and one all-reduce of
            the small ``(layers x metrics)`` table gives every rank all values. Under FSDP the work
            is always split (each layer's owner gathers its full gradient; docs/distributed.md).
        factored: with ``spectra="exact"``, keep each watched ``nn.Linear``'s inputs and output
            gradients (hooks), and compute its exact spectrum from the ``T x T`` factored problem
            when fewer tokens than ``min(m, n)`` carry gradient and the factors reproduce the
            gradient (checked on a random direction; single process only).

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
        spectra: Spectra = "auto",
        max_overhead: float = 0.03,
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
        factored: bool = True,
    ) -> None:
        super().__init__()
        self.metric_names: tuple[str, ...] = _check_metric_names(metrics)
        if method not in METHODS:
            raise ValueError(f"`method` can be {', '.join(METHODS)}, got {method!r}")
        if spectra not in SPECTRA:
            raise ValueError(f"`spectra` can be {', '.join(SPECTRA)}, got {spectra!r}")
        # validated here by the budget's own checks, so a bad value fails in __init__
        OverheadBudget([], max_overhead)
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
        self.spectra: Spectra = spectra
        self.max_overhead = float(max_overhead)
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
        self.factored = bool(factored)
        self._factors: FactorCapture | None = None
        self._factored_rows: list[int] = []
        self._rows_computed = 0
        self._pending_plan: Plan | None = None
        self._last_flush = -math.inf
        self._last_figures = 0  # steps_monitored when the figures were last drawn
        self._figure_seconds = 0.0  # this step's figure drawing
        self._step_open = False
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
        self._resume_after: int | None = None  # the restored checkpoint's last measured step
        self._last_step: int | None = None  # the last step measured (kept in checkpoints)
        self._layout_written = False
        self._loss_sum: Tensor | None = None
        self._sample_ids: list[Any] = []
        self._batch_idx: int | None = None
        self._component_rows: dict[str, list[int]] = {}
        self._owners: list[int] = []
        self._owners_world = 0
        self.layers_computed_here = 0
        # full (m, n) of each watched matrix, taken in setup: under FSDP `param.shape` is a flat shard's
        self._shapes: list[tuple[int, int]] = []
        # the FSDP-wrapped model (set in on_fit_start), None when gradients are not sharded
        self._sharded: nn.Module | None = None
        self.budget: OverheadBudget | None = None
        self._budget_rows: list[int] = []
        self._bases: dict[int, Tensor] = {}
        self._last_end: tuple[float, int] | None = None
        self._spectra_seconds = 0.0

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
            # the last step measured before this checkpoint: a resume sets later records aside
            "last_step": self._last_step,
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
        last_step = state_dict.get("last_step")
        self._resume_after = int(last_step) if last_step is not None else None
        self._last_step = self._resume_after
        if self.scorer is not None and state_dict.get("scorer") is not None:
            self.scorer.load_state_dict(state_dict["scorer"])

    # ------------------------------------------------------------------ set-up

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in ("DeepSpeed", "ModelParallel")):
            raise ValueError(
                f"`GradientSpectrumMonitor` cannot run under {strategy} yet: gradients are sharded there and "
                "every rank would measure a shard, not the layer's matrix. Use DDP, FSDP or a single device."
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
        self._shapes = [(int(w.param.shape[0]), math.prod(w.param.shape[1:])) for w in self.watched]
        row = {id(w): i for i, w in enumerate(self.watched)}
        self._component_rows = {
            component: [row[id(p)] for p in params]
            for component, params in group_by_component(self.watched).items()
            if len(params) >= 2 and params[0].index is not None
        }
        if self._factors is not None:
            self._factors.close()
            self._factors = None
        # factors of one process: under DDP/FSDP the gradient is the ranks' average, not Delta^T X.
        # Only for spectra="exact": what the hooks cost happens inside the training step, where the
        # budget of spectra="auto" cannot see it
        if self.factored and self.spectra == "exact" and trainer.world_size == 1:
            self._factors = FactorCapture(self.watched)
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
        # the model is wrapped by now; under FSDP this fails early if the watched weights were flattened away
        model = trainer.model if trainer.model is not None else pl_module
        self._sharded = model if is_sharded(model) else None
        if self._sharded is not None:
            fsdp_groups(model, self.watched)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every checkpoint restore is done by now (some strategies restore after on_fit_start)
        after, self._resume_after = self._resume_after, None
        if after is None or not trainer.is_global_zero or self.record_path is None:
            return
        aside = set_aside_records_after(self.record_path, after)
        if aside is not None:
            rank_zero_info(
                f"gradspectra: resumed after step {after}; the records of later steps, which this run "
                f"repeats, were moved to {aside}"
            )

    # ------------------------------------------------------------------ per batch

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx
        if not self._step_open:
            # the first micro-batch of an optimizer step: plan its spectral work now, and tell the
            # factor hooks (spectra="exact") whether this step is measured
            self._step_open = True
            self._start_step(trainer.global_step)
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
        self._step_open = False
        if step % self.every_n_steps != 0 or not self.watched:
            if self._factors is not None:
                self._factors.clear()
            return
        started = time.perf_counter()
        if self.sample_id_key is not None and trainer.world_size > 1:
            sample_ids = _gather_ids(sample_ids, trainer.world_size)
        if self.budget is not None and self._last_end is not None and step > self._last_end[1]:
            # wall time since the monitor last finished: the training steps in between, without the monitor
            self.budget.observe_step((started - self._last_end[0]) / (step - self._last_end[1]))
        record = self._measure(trainer, step, loss_sum, sample_ids, started)
        if record.get("flagged") and self.action == "skip":
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.skipped_total += 1
            record["skipped"] = True
        ended = time.perf_counter()
        self.monitor_seconds += ended - started
        if self.budget is not None:
            # figures are paid for separately (spaced by the budget), not as a fixed cost per step
            self.budget.observe_fixed(max(0.0, ended - started - self._spectra_seconds - self._figure_seconds))
        self._last_end = (ended, step)
        self._last_step = step
        if self._factors is not None:
            self._factors.clear()
        if record.get("flagged") and self.action == "raise":
            raise GradientAnomalyError(record)

    def _measure(
        self, trainer: pl.Trainer, step: int, loss_sum: Tensor | None, sample_ids: list[Any], started: float
    ) -> dict[str, Any]:
        keys = [w.key for w in self.watched]
        grads: list[Tensor] = []
        present: list[int] = []
        # under FSDP the layers are always split: a rank measuring every layer would hold every full gradient
        world = trainer.world_size if self.distribute or self._sharded is not None else 1
        if self._sharded is not None:
            present, grads = self._gather_sharded(self._sharded, trainer.global_rank, world)
        else:
            for i, w in enumerate(self.watched):
                g = w.grad_matrix()
                if g is not None:
                    grads.append(g)
                    present.append(i)
        missing = [keys[i] for i in range(len(keys)) if i not in set(present)]
        error: str | None = None
        values = torch.full((len(keys), len(self.metric_names)), float("nan"), dtype=torch.float64)
        host_errors = torch.zeros_like(values)
        host_codes = torch.zeros(len(keys), dtype=torch.float64)
        host_valid = torch.zeros(values.shape, dtype=torch.bool)
        self._spectra_seconds = 0.0
        self._figure_seconds = 0.0
        self._factored_rows = []
        layers_per_rank: list[int] | None = None
        rank_counts: Tensor | None = None
        try:
            if grads:
                device = grads[0].device
                # every rank holds the same all-reduced gradients: each measures the layers it owns
                owners = self._layer_owners(world)
                mine = [k for k, i in enumerate(present) if owners[i] == trainer.global_rank] if world > 1 else None
                rows = present if mine is None else [present[k] for k in mine]
                todo = grads if mine is None else [grads[k] for k in mine]
                full, codes, errors = self._spectra_table(todo, rows, len(keys), device)
                self.layers_computed_here += self._rows_computed
                if world > 1:
                    counts = torch.zeros(world, dtype=torch.float64, device=device)
                    counts[trainer.global_rank] = float(self._rows_computed)
                    local_loss = torch.zeros(1, dtype=torch.float64, device=device)
                    if loss_sum is not None:
                        local_loss += loss_sum.to(device=device, dtype=torch.float64)
                    # one all-reduce: a layer's rows are its owner's values plus zeros from the others;
                    # the losses are summed so every rank scores the same global mean loss
                    packed = trainer.strategy.reduce(
                        torch.cat([full.flatten(), errors.flatten(), codes, counts, local_loss]), reduce_op="sum"
                    )
                    parts = torch.split(packed, [full.numel(), errors.numel(), codes.numel(), world, 1])
                    full, errors, codes = parts[0].view(full.shape), parts[1].view(errors.shape), parts[2]
                    rank_counts = parts[3]
                    if loss_sum is not None:
                        loss_sum = parts[4][0] / world
                mask = torch.zeros(len(keys), dtype=torch.bool, device=device)
                mask[present] = True
                # a deferred layer's spectral values were not measured this step; its Frobenius norm was
                valid = mask[:, None] & ((codes != _DEFERRED)[:, None] | self._entry_only_metrics(device)[None, :])
                full = torch.where(valid, full, torch.full_like(full, float("nan")))
                self._spectrum_on(device).update(full, mask=valid)
                # the one device-to-host copy per step: (layers x metrics) scalars, the codes, the
                # validity mask, the loss and (DDP) the layers each rank measured
                tail = [rank_counts] if rank_counts is not None else []
                if loss_sum is not None:
                    tail.append(loss_sum.detach().reshape(1).to(device=device, dtype=full.dtype))
                host = torch.cat([full.flatten(), errors.flatten(), codes, valid.flatten().to(full.dtype), *tail]).cpu()
                sizes = [full.numel(), full.numel(), len(keys), full.numel()] + [t.numel() for t in tail]
                pieces = list(torch.split(host, sizes))
                values = pieces[0].view(full.shape)
                host_errors = pieces[1].view(full.shape)
                host_codes = pieces[2]
                host_valid = pieces[3].view(full.shape) > 0
                if rank_counts is not None:
                    layers_per_rank = [int(c) for c in pieces[4].tolist()]
                if loss_sum is not None:
                    loss_sum = pieces[-1][0]  # on the host now: reading it is not another sync
        except Exception as err:  # a measurement failure must never stop the user's training
            error = f"{type(err).__name__}: {err}"
            self.error_total += 1
            rank_zero_warn(f"gradspectra could not measure step {step}: {error}")

        loss = self._loss_value(trainer, loss_sum)
        present_set = set(present)
        layer_metrics = {
            keys[i]: {name: float(values[i, j]) for j, name in enumerate(self.metric_names) if host_valid[i, j]}
            for i in range(len(keys))
            if i in present_set
        }
        spectra = {
            keys[i]: _CODE_NAMES[int(host_codes[i])] for i in range(len(keys)) if int(host_codes[i]) in _CODE_NAMES
        }
        estimate_error: dict[str, dict[str, float]] = {}
        audit_error: dict[str, dict[str, float]] = {}
        for i in range(len(keys)):
            code = int(host_codes[i])
            if code in (_ESTIMATED, _AUDITED):
                errs = {
                    name: float(host_errors[i, j])
                    for j, name in enumerate(self.metric_names)
                    if name != "frobenius_norm" and math.isfinite(float(host_errors[i, j]))
                }
                (audit_error if code == _AUDITED else estimate_error)[keys[i]] = errs
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
        if self.spectra != "exact":
            # which layers got which spectrum; deferred layers only have their Frobenius norm this step
            record["spectra"] = spectra
            record["deferred_layers"] = [keys[i] for i in sorted(present_set) if keys[i] not in spectra]
            record["estimate_error"] = estimate_error
            if audit_error:
                record["audit_error"] = audit_error
        if layers_per_rank is not None:
            record["layers_per_rank"] = layers_per_rank
        if self._factored_rows:
            # exact spectra from the T x T factored problem (fewer tokens carried gradient than min(m, n))
            record["factored_layers"] = [keys[i] for i in sorted(self._factored_rows)]
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
        """Exact metrics of ``matrices``, ``(len, metrics)`` float64."""
        with self._threads(matrices[0].device):
            return spectral_metrics_many(matrices, self.metric_names, self.method)

    def _exact(self, rows: list[int], matrices: list[Tensor]) -> Tensor:
        """Exact metrics of the layers ``rows`` (their gradients ``matrices``): from the ``T x T`` factored
        problem where the hooks kept factors that reproduce the gradient, else from the matrix."""
        out = torch.empty((len(rows), len(self.metric_names)), dtype=torch.float64, device=matrices[0].device)
        plain = list(range(len(rows)))
        if self._factors is not None and needs_spectrum(self.metric_names):
            plain = []
            with self._threads(matrices[0].device):
                for k, (row, matrix) in enumerate(zip(rows, matrices)):
                    factors = self._factors.factors(row, matrix)
                    if factors is None:
                        plain.append(k)
                        continue
                    s = factored_singular_values(*factors)
                    values = metrics_from_singular_values(s, frobenius_norm(matrix), self.metric_names)
                    out[k] = torch.stack([values[n] for n in self.metric_names]).to(out.device)
                    self._factored_rows.append(row)
        if plain:
            out[plain] = self._compute([matrices[k] for k in plain]).to(out.device)
        return out

    @contextmanager
    def _threads(self, device: torch.device) -> Iterator[None]:
        if self.cpu_threads is None or device.type != "cpu":
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(self.cpu_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def _entry_only_metrics(self, device: torch.device) -> Tensor:
        """Which metric columns come from the entries alone (measured even when a spectrum is deferred)."""
        return torch.tensor([name == "frobenius_norm" for name in self.metric_names], dtype=torch.bool, device=device)

    def _spectra_table(
        self, matrices: list[Tensor], rows: list[int], n_layers: int, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's share of the step's table: ``(values, codes, errors)`` for ``rows``, zeros elsewhere.

        ``values`` and ``errors`` are ``(layers, metrics)`` float64, ``codes`` ``(layers,)`` float64 with
        how each row was obtained (``_DEFERRED``, ``_EXACT``, ``_ESTIMATED``, ``_AUDITED``). ``errors`` holds
        the estimator's own relative error estimate for estimated rows and the realised relative error
        (estimate vs exact) for audited rows.
        """
        shape = (n_layers, len(self.metric_names))
        full = torch.zeros(shape, dtype=torch.float64, device=device)
        errors = torch.zeros(shape, dtype=torch.float64, device=device)
        codes = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self._rows_computed = 0  # layers given a spectrum here (counted on the host, no device sync)
        if not rows:
            return full, codes, errors
        spectral = needs_spectrum(self.metric_names)
        if self.spectra == "exact" or not spectral:
            t0 = time.perf_counter()
            full[rows] = self._exact(rows, matrices).to(device)
            codes[rows] = _EXACT
            self._rows_computed = len(rows)
            self._spectra_seconds = time.perf_counter() - t0
            return full, codes, errors
        plan = self._plan(rows, matrices)
        at = {row: k for k, row in enumerate(rows)}
        fro = [j for j, name in enumerate(self.metric_names) if name == "frobenius_norm"]
        spent = 0.0
        if fro:
            with self._threads(device):
                # every layer's exact norm, one read each and one host sync for all of them
                full[rows, fro[0]] = frobenius_norms(matrices).to(device)
        exact_rows = [r for r in plan.exact if r in at]
        self._rows_computed = len(exact_rows) + len([r for r in plan.estimate if r in at])
        if exact_rows:
            t0 = time.perf_counter()
            full[exact_rows] = self._exact(exact_rows, [matrices[at[r]] for r in exact_rows]).to(device)
            codes[exact_rows] = _EXACT
            seconds = time.perf_counter() - t0
            spent += seconds
            if self.budget is not None:
                self.budget.observe_work(EXACT, [self._budget_rows.index(r) for r in exact_rows], seconds)
        estimate_rows = [r for r in plan.estimate + plan.audit if r in at]
        if estimate_rows:
            t0 = time.perf_counter()
            with self._threads(device):
                est = estimate_spectral_metrics_many(
                    [matrices[at[r]] for r in estimate_rows],
                    self.metric_names,
                    warm_start=[self._bases.get(r) for r in estimate_rows],
                    seed=self.steps_monitored,
                )
            seconds = time.perf_counter() - t0
            spent += seconds
            if self.budget is not None:
                self.budget.observe_work(ESTIMATE, [self._budget_rows.index(r) for r in estimate_rows], seconds)
            for k, r in enumerate(estimate_rows):
                self._bases[r] = est.bases[k]
            values = est.values.to(device)
            # positions in estimate_rows, from host lists (no device round trip)
            audit_set = set(plan.audit)
            plain_k = [k for k, r in enumerate(estimate_rows) if r not in audit_set]
            audit_k = [k for k, r in enumerate(estimate_rows) if r in audit_set]
            plain = [estimate_rows[k] for k in plain_k]
            if plain:
                full[plain] = values[plain_k]
                errors[plain] = est.rel_error.to(device)[plain_k]
                codes[plain] = _ESTIMATED
            audit_rows = [estimate_rows[k] for k in audit_k]
            if audit_rows:
                exact = full[audit_rows]
                errors[audit_rows] = (values[audit_k] - exact).abs() / exact.abs().clamp_min(
                    torch.finfo(exact.dtype).tiny
                )
                codes[audit_rows] = _AUDITED
        if self.budget is not None:
            self.budget.spend(spent)
        self._spectra_seconds = spent
        return full, codes, errors

    def _start_step(self, step: int) -> None:
        self._pending_plan = None
        monitored = step % self.every_n_steps == 0
        if self.spectra == "auto" and self.budget is not None and monitored:
            local = self.budget.plan()

            def back(idx: list[int]) -> list[int]:
                return [self._budget_rows[k] for k in idx]

            self._pending_plan = Plan(
                exact=back(local.exact),
                estimate=back(local.estimate),
                audit=back(local.audit),
                deferred=back(local.deferred),
            )
        if self._factors is not None:
            if not monitored:
                self._factors.active = set()
            elif self.spectra == "exact":
                self._factors.active = None
            else:
                self._factors.active = set() if self._pending_plan is None else set(self._pending_plan.exact)

    def _plan(self, rows: list[int], matrices: list[Tensor]) -> Plan:
        """This step's plan over ``rows`` (this rank's present layers), as watched-layer indices."""
        if self.spectra == "estimate":
            return Plan(estimate=list(rows))
        pending, self._pending_plan = self._pending_plan, None
        if pending is not None and self.budget is not None and all(r in self._budget_rows for r in rows):
            rows_set = set(rows)
            return Plan(
                exact=[r for r in pending.exact if r in rows_set],
                estimate=[r for r in pending.estimate if r in rows_set],
                audit=[r for r in pending.audit if r in rows_set],
                deferred=[r for r in pending.deferred if r in rows_set],
            )
        if self.budget is None or any(r not in self._budget_rows for r in rows):
            # the budget covers the layers this rank owns; built once those are known
            self._budget_rows = sorted(set(self._budget_rows) | set(rows))
            shapes = []
            for r in self._budget_rows:
                shapes.append(self._shapes[r])
            self.budget = OverheadBudget(shapes, self.max_overhead)
        local = self.budget.plan()
        rows_set = set(rows)

        def back(idx: list[int]) -> list[int]:
            return [self._budget_rows[k] for k in idx if self._budget_rows[k] in rows_set]

        return Plan(
            exact=back(local.exact),
            estimate=back(local.estimate),
            audit=back(local.audit),
            deferred=back(local.deferred),
        )

    def _gather_sharded(self, model: nn.Module, rank: int, world: int) -> tuple[list[int], list[Tensor]]:
        """Under FSDP: the watched layers that have a gradient, and their full matrices where this rank owns them.

        Units are gathered one at a time (a collective: every rank takes part); the owner copies its
        layers' matrices out of the gathered buffer, the other ranks keep an empty placeholder. So a
        rank holds its own layers' full gradients plus one unit in transit, never all of them.
        """
        owners = self._layer_owners(world)
        found: list[tuple[int, Tensor]] = []
        for unit in sharded_gradients(model, self.watched):
            for i, g in unit:
                if g is not None:
                    found.append((i, g.clone() if world == 1 or owners[i] == rank else g.new_empty(0)))
        found.sort(key=lambda item: item[0])
        return [i for i, _ in found], [g for _, g in found]

    def _layer_owners(self, world: int) -> list[int]:
        """Rank that measures each watched layer: longest-processing-time first, cost ~ m * n * min(m, n)."""
        if len(self._owners) != len(self.watched) or self._owners_world != world:
            costs = []
            for m, n in self._shapes:
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
        if "spectra" in record:
            kinds = list(record["spectra"].values())
            scalars["gradspectra/spectra/exact"] = float(sum(k != "estimate" for k in kinds))
            scalars["gradspectra/spectra/estimated"] = float(kinds.count("estimate"))
            scalars["gradspectra/spectra/deferred"] = float(len(record["deferred_layers"]))
            for key, tag in (("estimate_error", "estimate_error"), ("audit_error", "audit_error")):
                by_metric: dict[str, list[float]] = {}
                for errs in record.get(key, {}).values():
                    for metric, err in errs.items():
                        by_metric.setdefault(metric, []).append(err)
                for metric, errs in by_metric.items():
                    # the worst layer: an audit shows what the estimator really got wrong
                    scalars[f"gradspectra/{tag}/{metric}"] = max(errs)
        per_layer = (self.steps_monitored - 1) % self.log_every_n_steps == 0
        arr = values.numpy()
        rows = sorted(present)
        for j, metric in enumerate(self.metric_names):
            col = arr[rows, j] if rows else np.zeros(0)
            finite = col[np.isfinite(col)]
            # over every present layer or not at all: a mean over the few layers whose spectra the
            # budget afforded this step would jump with the choice of layers
            if finite.size and finite.size == col.size:
                scalars[f"{TAG_ROOT}_layers/{metric}/mean"] = float(finite.mean())
                scalars[f"{TAG_ROOT}_layers/{metric}/min"] = float(finite.min())
                scalars[f"{TAG_ROOT}_layers/{metric}/max"] = float(finite.max())
            if not per_layer:
                continue
            for i in rows:
                scalars[layer_tag(metric, self.watched[i].key)] = float(arr[i, j])
            if not finite.size:
                continue  # nothing measured for this metric this step (spectra deferred)
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
            if self.figure_every_n_steps:
                # under spectra="auto" the budget spaces the figures by what they cost to draw
                period = self.figure_every_n_steps
                if self.budget is not None:
                    period = self.budget.figure_period(period, 2 * len(self.metric_names))
                if self.steps_monitored - self._last_figures >= period:
                    t0 = time.perf_counter()
                    self._draw_figures(tensorboards, step)
                    self._figure_seconds = time.perf_counter() - t0
                    self._last_figures = self.steps_monitored
                    if self.budget is not None:
                        self.budget.observe_figures(self._figure_seconds)
            now = time.perf_counter()
            if now - self._last_flush >= _FLUSH_SECONDS:
                # live enough for a person watching, and a flush per step cost ~0.3 ms per tag file
                for tb in tensorboards:
                    tb.experiment.flush()
                self._last_flush = now

    def _draw_figures(self, tensorboards: Sequence[TensorBoardLogger], step: int) -> None:
        if not self._history:
            return
        import matplotlib.pyplot as plt

        steps = [s for s, _ in self._history]
        stack = np.stack([v for _, v in self._history], axis=-1)  # layers x metrics x steps
        window = stack[..., -max(1, min(self.figure_every_n_steps, stack.shape[-1])) :]
        finite = np.isfinite(window)
        count = finite.sum(axis=-1)
        # the mean of each layer's measured values in the window (NaN where none was measured)
        recent = np.where(count > 0, np.where(finite, window, 0.0).sum(axis=-1) / np.maximum(count, 1), np.nan)
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
        if self._factors is not None:
            self._factors.close()
            self._factors = None
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


def _gather_ids(ids: list[Any], world_size: int) -> list[Any]:
    """Every rank's sample ids of this step, rank 0's first (one collective; every rank calls it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ids
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, list(ids))
    return [i for part in gathered for i in (part or [])]
