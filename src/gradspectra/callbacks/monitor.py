"""``GradientSpectrumMonitor``: the Lightning front door of the monitoring engine.

It only translates Lightning's hooks into engine calls (strategy checks, micro-batch bookkeeping,
undoing the AMP loss scale); the measuring, scoring, records and views are in
:mod:`gradspectra.monitoring` and :mod:`gradspectra.reporting`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from gradspectra.capture import Selection, WatchedParameter
from gradspectra.capture.selection import Gradients
from gradspectra.functional import Method
from gradspectra.metrics import LayerwiseSpectrum
from gradspectra.monitoring import (
    ACTIONS,
    Action,
    GradientAnomalyError,
    InstabilityAction,
    InstabilityError,
    MonitorConfig,
    MonitorEngine,
    Outputs,
    OverheadBudget,
    PerSample,
    Processes,
    Spectra,
    StepInputs,
)
from gradspectra.reporting import RECORD_FILENAME
from gradspectra.scoring import BatchScorer

__all__ = ["ACTIONS", "GradientAnomalyError", "GradientSpectrumMonitor", "InstabilityError"]

_DEFAULT_METRICS_IN_KEY = (
    "nuclear_norm",
    "spectral_norm",
    "frobenius_norm",
    "stable_rank",
    "top_sv_ratio",
    "effective_rank",
)


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
        gradients: which gradient a watched weight is measured by. ``"auto"`` (default): ``.grad`` of the
            trainable weights, and for frozen ``nn.Linear`` weights that adapters wrap (peft's LoRA, DoRA,
            IA3) or that an explicit ``include``/``regex``/``predicate`` matched, their implied
            full-weight gradient ``D^T X`` (output gradients and inputs kept by hooks, released after
            the step; what the papers measure, independent of the adapter's rank). A wrapped layer is one
            layer named as its base (``self_attn.q_proj/layer_00``) and matched as
            ``...q_proj.weight``; its adapters' own matrices are not watched. ``"implied"``: the implied
            gradient of every matched frozen ``nn.Linear``. ``"parameters"``: only ``.grad`` of trainable
            weights, each adapter matrix a layer of its own. See docs/lora.md.
        metrics: metric names (see :data:`gradspectra.functional.METRIC_NAMES`); ``None`` for all.
        method: exact singular value route, ``"auto"``, ``"svd"`` or ``"gram"``.
        spectra: how spectra are obtained. ``"auto"`` (default) keeps the monitor's cost near
            ``max_overhead`` x the training step: first the cheap tier (``cheap_spectra``), then full
            spectra with what is left: exact when they fit, else bounded-error
            estimates (:func:`gradspectra.functional.estimate_spectral_metrics_many`), for as many
            layers as fit, oldest first, the others deferred to a later step (their Frobenius norm,
            exact, is still measured), with exact audits of the estimator in round-robin order. On a step
            too fast for that (a small model's few milliseconds, one process), most steps are light (every
            layer's Frobenius norm, a score from them and the loss, the stability detector, the record) and
            one in a period chosen by the budget is full; the record says ``"light": true``.
            ``"exact"``: exact spectra of every layer every step, whatever they cost.
            ``"estimate"``: estimates of every layer every step, no audits.
            Each record says which layers got which (``spectra``) and the estimates' errors.
        max_overhead: the cost target of ``spectra="auto"`` as a fraction of the step time.
        every_n_steps: measure every n-th optimizer step.
        log_every_n_steps: send per-layer scalars to the loggers every n-th measured step (with light steps,
            every n-th full step).
        figure_every_n_steps: draw layer-profile figures and heatmaps (TensorBoard) every n-th
            measured step (with light steps, full step), and once at the end of training; ``0`` disables
            figures. Under
            ``spectra="auto"`` this is the shortest spacing: the budget spaces drawings further
            apart when they would cost more than a quarter of it (figures take seconds to draw).
        heatmap_steps: how many recent measured steps the heatmaps show.
        output_dir: where ``batches.jsonl`` goes; default ``<first logger's log_dir>/gradspectra``,
            else ``<trainer.default_root_dir>/gradspectra``.
        max_records_in_memory: how many recent records :attr:`batch_records` keeps (the file keeps all).
        scoring: score and flag batches.
        warmup_steps: measured steps that build the baseline before scores are given.
        false_flag_rate: the target share of clean batches flagged, which sets the threshold (a target,
            not a guarantee: on clean-only runs of ``benchmarks/detection.py --grid`` the default 0.01
            flagged 2.0 % on average, see docs/scoring.md).
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
        layer_runs: also write each indexed layer's scalars as a TensorBoard run of its own,
            ``<log dir>/layers/layer_<NN>``, under the tag ``grad_spectrum/<metric>/<component>``: in
            TensorBoard's scalars dashboard one chart per metric and component then shows every layer
            in its own colour, named in the legend (the custom-scalars charts colour all layers of a
            run alike). Costs a second write of the per-layer scalars; off by default.
        cheap_spectra: under ``spectra="auto"``, first a detection value for the scorer on a few anchor
            layers every step (a coarse, steady effective rank by low-order Lanczos quadrature,
            ``detection`` in the record), then the cheap tier: every watched layer's spectral norm,
            stable rank and participation ratio (accurate to about 1 %, each with its error estimate
            in ``estimate_error``) from three thin products per matrix, every step the budget covers
            it; full spectra (nuclear norm, effective rank, top share) rotate through the layers with
            what is left (docs/cost.md).
        stability: watch the run's trends for what precedes a break (the gradient collapsing onto few
            directions, gradient norms growing or layers moving apart, non-finite steps) and give an
            ``instability`` event (record ``events``, TensorBoard text, a warning on the console) with
            what moved, where and by how much; ``gradspectra/stability`` is the score (``>= 1``: a trend
            over its limit). ``True`` (default), ``False``, or a dict of
            :class:`gradspectra.scoring.StabilityDetector` options to change its limits, for example
            ``{"growth": 6.0, "loss_fall": 1.5}`` (checked at construction). See docs/stability.md.
        instability_action: what a stability warning does: ``"log"`` (default); ``"raise"`` raises
            :class:`InstabilityError` carrying the record; ``"stop"`` asks the trainer to stop after the
            step (the optimizer step completes, checkpoints are written as usual).
        per_sample: which samples of a batch stand out: ``None`` (default), ``"flagged"`` (on flagged
            steps only) or ``"always"`` (every measured step). Per-sample spectra of the watched
            ``nn.Linear`` layers from their inputs and output gradients (kept by hooks as references,
            released at the optimizer step; padding excluded), scored against the batch and recent samples:
            record key ``samples``, one entry per sample with its score and reasons. One process only
            (not under DDP/FSDP yet). See docs/attribution.md.

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
        gradients: Gradients = "auto",
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
        layer_runs: bool = False,
        cheap_spectra: bool = True,
        stability: bool | Mapping[str, Any] = True,
        instability_action: InstabilityAction = "log",
        per_sample: PerSample | None = None,
    ) -> None:
        super().__init__()
        self.config = MonitorConfig(
            include=include,
            exclude=exclude,
            regex=regex,
            module_types=module_types,
            predicate=predicate,
            include_embeddings=include_embeddings,
            gradients=gradients,
            metrics=metrics,
            method=method,
            spectra=spectra,
            max_overhead=max_overhead,
            every_n_steps=every_n_steps,
            log_every_n_steps=log_every_n_steps,
            figure_every_n_steps=figure_every_n_steps,
            heatmap_steps=heatmap_steps,
            output_dir=output_dir,
            max_records_in_memory=max_records_in_memory,
            scoring=scoring,
            warmup_steps=warmup_steps,
            false_flag_rate=false_flag_rate,
            action=action,
            sample_id_key=sample_id_key,
            summary_top_k=summary_top_k,
            verbose=verbose,
            distribute=distribute,
            cpu_threads=cpu_threads,
            factored=factored,
            layer_runs=layer_runs,
            cheap_spectra=cheap_spectra,
            stability=stability,
            instability_action=instability_action,
            per_sample=per_sample,
        )
        self.engine = MonitorEngine(self.config)
        self.engine.defer_light = True  # no step's record is returned: light steps' are made a few at a time
        self._loss_sum: Tensor | None = None
        self._sample_ids: list[Any] = []
        self._batch_idx: int | None = None
        self._step_open = False
        self._scopes: dict[int, frozenset[int]] = {}  # each optimizer's watched layers (several optimizers)
        # Lightning names every hook call by `state_key` and the loggers do not change during a fit: both are
        # made once (a fast step pays for every microsecond)
        self._state_key: str | None = None
        self._late_attach = False
        self._fit_outputs: Outputs | None = None
        self._fit_procs: Processes | None = None  # (made once a fit: rank and world do not change within one)

    # ------------------------------------------------------------------ what the engine holds, by its public names

    metric_names = property(lambda self: self.engine.metric_names)
    selection_kwargs = property(lambda self: self.config.selection_kwargs)
    spectra = property(lambda self: self.config.spectra)
    action = property(lambda self: self.config.action)
    summary_top_k = property(lambda self: self.config.summary_top_k)
    batch_records = property(lambda self: self.engine.batch_records)
    steps_monitored = property(lambda self: self.engine.flushed().steps_monitored)
    flagged_total = property(lambda self: self.engine.flushed().flagged_total)
    skipped_total = property(lambda self: self.engine.flushed().skipped_total)
    nonfinite_total = property(lambda self: self.engine.flushed().nonfinite_total)
    missing_grad_total = property(lambda self: self.engine.flushed().missing_grad_total)
    error_total = property(lambda self: self.engine.flushed().error_total)
    monitor_seconds = property(lambda self: self.engine.flushed().monitor_seconds)
    layers_computed_here = property(lambda self: self.engine.layers_computed_here)
    record_path = property(lambda self: self.engine.record_path)

    @property
    def scorer(self) -> BatchScorer | None:
        return self.engine.scorer

    @property
    def watched(self) -> list[WatchedParameter]:
        return self.engine.watched

    @property
    def selection(self) -> Selection | None:
        return self.engine.selection

    @property
    def spectrum(self) -> LayerwiseSpectrum | None:
        return self.engine.spectrum

    @property
    def budget(self) -> OverheadBudget | None:
        return None if self.engine.planner is None else self.engine.planner.budget

    # ------------------------------------------------------------------ identity and state

    @property
    @override
    def state_key(self) -> str:
        if self._state_key is None:
            self._state_key = self._make_state_key()
        return self._state_key

    def _make_state_key(self) -> str:
        keys = {k: v for k, v in self.selection_kwargs.items() if isinstance(v, (str, bool, type(None)))}
        if keys.get("gradients") == "auto":
            del keys["gradients"]  # added later: the default keeps the key that earlier checkpoints were saved under
        # the default metric list as it was when checkpoints were first written: a metric added to the
        # defaults later must not change the key, or every old checkpoint's state would be orphaned
        metrics = _DEFAULT_METRICS_IN_KEY if self.config.metrics is None else self.metric_names
        return f"{type(self).__qualname__}{{metrics={list(metrics)!r}, selection={keys!r}}}"

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied once the watched layers are known (setup runs before checkpoint restore, the
        # metric state is created on the gradients' device at the first step)
        self.engine.load_state_dict(state_dict)

    # ------------------------------------------------------------------ set-up

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if "DeepSpeed" in strategy:
            raise ValueError(
                f"`GradientSpectrumMonitor` cannot run under {strategy} yet: ZeRO partitions the gradients and "
                "every rank would measure a partition, not the layer's matrix. Use ModelParallelStrategy (FSDP2, "
                "tensor parallel), FSDP, DDP or a single device; docs/distributed.md says how."
            )
        # under ModelParallelStrategy the model is sharded in `configure_model`, after this hook: the watched
        # weights are chosen at `on_fit_start`, once they are the DTensors that train
        self._late_attach = "ModelParallel" in strategy
        if not self._late_attach:
            self.engine.attach(pl_module, trainer.world_size)
        self._scopes.clear()
        self._state_key = None
        self._fit_outputs = None
        self._fit_procs = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        base = self.config.output_dir
        if base is None:
            log_dir = next((d for d in (getattr(lg, "log_dir", None) for lg in trainer.loggers) if d), None)
            base = Path(log_dir or trainer.default_root_dir) / "gradspectra"
        record_path = Path(base) / RECORD_FILENAME
        if not trainer.loggers:
            rank_zero_warn(
                "`GradientSpectrumMonitor` with `Trainer(logger=False)`: no scalars or figures are logged; "
                f"the batch records still go to {record_path}"
            )
        if self._late_attach:
            self.engine.attach(pl_module, trainer.world_size)
        # the model is wrapped by now: under FSDP the engine checks the watched weights survived flattening
        self.engine.open(record_path, trainer.is_global_zero, trainer.model if trainer.model is not None else pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every checkpoint restore is done by now (some strategies restore after on_fit_start)
        self.engine.set_aside_after_resume()

    # ------------------------------------------------------------------ per batch

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx
        if not self._step_open:
            # the first micro-batch of an optimizer step: the engine plans the step's work now
            self._step_open = True
            self.engine.begin_step(trainer.global_step)
        key = self.config.sample_id_key
        if key is not None and isinstance(batch, Mapping) and key in batch:
            ids = batch[key]
            if isinstance(ids, Tensor):
                ids = ids.detach().cpu().tolist()
            self._sample_ids.extend(list(ids))

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # Lightning passes the loss divided by accumulate_grad_batches, so the sum over the window is
        # its mean; under 16-mixed it is also multiplied by the grad scaler's scale (undone at the step)
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        loss_sum, self._loss_sum = self._loss_sum, None
        sample_ids, self._sample_ids = self._sample_ids, []
        if sample_ids and self._tensor_parallel_follower(pl_module):
            sample_ids = []  # (the same samples as its tensor-parallel peer at position 0: listed once, by that one)
        self._step_open = False
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        inputs = StepInputs(
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            batch_idx=self._batch_idx,
            loss=loss_sum,
            loss_scale=float(scaler.get_scale()) if scaler is not None and hasattr(scaler, "get_scale") else None,
            sample_ids=sample_ids,
            share_ids=self.config.sample_id_key is not None,
        )
        if len(trainer.optimizers) > 1:
            # several optimizers (manual optimization): measure the layers of the one that steps, against its
            # own baseline; another optimizer's gradients were used (or will be) by that optimizer's step
            inputs.optimizer = next(i for i, opt in enumerate(trainer.optimizers) if opt is optimizer)
            if id(optimizer) not in self._scopes:
                stepped = (p for group in optimizer.param_groups for p in group["params"])
                self._scopes[id(optimizer)] = self.engine.rows_of(stepped)
            inputs.scope = self._scopes[id(optimizer)]
        if self._fit_procs is None:
            reduce_sum = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
            self._fit_procs = Processes(trainer.global_rank, trainer.world_size, reduce_sum)
        procs = self._fit_procs
        params = lambda: (p for group in optimizer.param_groups for p in group["params"])  # noqa: E731
        if self._fit_outputs is None:
            self._fit_outputs = self._outputs(trainer)
        self.engine.step(inputs, procs, self._fit_outputs, params)
        if self.engine.stop_requested:
            # instability_action="stop": this optimizer step completes; Lightning stops after it
            trainer.should_stop = True

    def _tensor_parallel_follower(self, pl_module: pl.LightningModule) -> bool:
        """Under ``ModelParallelStrategy`` with tensor parallelism, whether this rank is not the first of its
        tensor-parallel group: the ranks of a group train on the same samples."""
        if not self._late_attach:
            return False
        mesh = getattr(pl_module, "device_mesh", None)
        names = getattr(mesh, "mesh_dim_names", None) or ()
        if mesh is None or "tensor_parallel" not in names:
            return False
        group = mesh["tensor_parallel"]
        return bool(group.size() > 1 and group.get_local_rank() != 0)

    @staticmethod
    def _outputs(trainer: pl.Trainer) -> Outputs:
        def log_scalars(scalars: dict[str, float], step: int) -> None:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)

        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not trainer.is_global_zero:
            return Outputs(log_scalars if trainer.loggers else None)
        runs = Path(tensorboards[0].log_dir) / "layers" if tensorboards else None
        return Outputs(log_scalars if trainer.loggers else None, [tb.experiment for tb in tensorboards], runs)

    # ------------------------------------------------------------------ end of training

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # global_step is one past the last optimizer step by now: the last measured step is one before
        self.engine.finish(max(0, trainer.global_step - 1), self._outputs(trainer), trainer.is_global_zero)
        self.engine.close()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.engine.close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.engine.close()
        self._fit_outputs = self._fit_procs = None  # (they refer to the trainer)

    def summary(self, top: int = 10) -> str:
        """A text report: counts, then the ``top`` highest-scoring batches (from the records in memory)."""
        return self.engine.summary(top)
