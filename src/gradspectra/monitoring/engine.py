"""The monitoring engine: torch only, no training framework. One monitored step is a pipeline of stages
(collect gradients, plan, compute across ranks, score, assemble the record, emit), each returning a value;
the front doors (Lightning, transformers, a plain loop) translate their hooks into calls of this class.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from gradspectra.capture import Selection, WatchedParameter, group_by_component, select_parameters
from gradspectra.capture.factors import FactorCapture
from gradspectra.capture.implied import ImpliedGradients
from gradspectra.capture.sharded import fsdp_groups, has_dtensors, is_dtensor, is_sharded
from gradspectra.functional import CHEAP_METRICS, frobenius_norm_values, needs_spectrum
from gradspectra.functional.reshape import as_matrix
from gradspectra.metrics import LayerwiseSpectrum
from gradspectra.monitoring.blocks import BlockStep, BlockTier
from gradspectra.monitoring.budget import DETECT, Plan
from gradspectra.monitoring.config import MonitorConfig
from gradspectra.monitoring.distributed import (
    Processes,
    gather_dtensors,
    gather_ids,
    gather_sharded,
    layer_owners,
    pack,
    unpack,
)
from gradspectra.monitoring.planner import Planner
from gradspectra.monitoring.records import BatchRecord, HostTable, assemble_record
from gradspectra.monitoring.samples import SampleStage
from gradspectra.monitoring.sources import SpectrumSource
from gradspectra.monitoring.spectra import FactorSource, SpectraResult, SpectraRunner, source_columns
from gradspectra.reporting import (
    LayerRuns,
    RecordBuffer,
    RecordWriter,
    SummaryWriterLike,
    TensorBoardViews,
    ViewLayer,
    flagged_table,
    instability_lines,
    set_aside_records_after,
)
from gradspectra.reporting.tags import (
    EVENTS_TAG,
    finite_only,
    layer_run_scalars,
    layer_scalars,
    skip_scalars,
    status_scalars,
)
from gradspectra.scoring import BatchScorer, SampleScorer

log = logging.getLogger("gradspectra")


class _FallbackHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Prints gradspectra's messages (INFO and up) while the application has not configured logging; once
    the root logger has a handler, the records propagate there instead (no double printing)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


if not log.handlers:
    log.addHandler(_FallbackHandler())
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
_AFFORDS_AFTER = 20  # measured steps before the monitor says what the budget affords (it has learned by then)
_IMPLIED_LEARN = 20  # on a GPU, the formings timed (each waits for the device) to learn their cost
_IMPLIED_SHARE = 0.5  # under spectra="auto": the share of the budget that forming implied gradients may take
_SAMPLES_SHARE = 0.5  # per_sample="always" under spectra="auto": the share of the budget it aims at
_LIGHT_ROWS = 64  # light steps' rows kept before they are folded into the streaming statistics
_LIGHT_BATCH = 16  # light steps whose records are made together (at most this many steps late) ...
_LIGHT_WAIT_SECONDS = 2.0  # ... and at most this late
_SKIP_MESSAGE_SECONDS = 10.0  # a run skipping many steps says so, without a line per step
_COUNTERS = (
    "steps_monitored",
    "flagged_total",
    "skipped_total",
    "missing_grad_total",
    "nonfinite_total",
    "error_total",
    "shift_total",
    "aftermath_total",
    "instability_total",
)


class GradientAnomalyError(RuntimeError):
    """Raised with ``action="raise"`` for a flagged batch; ``.record`` holds its record."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        reasons = "; ".join(record.get("reasons") or [])
        super().__init__(
            f"gradspectra flagged step {record.get('step')} (batch {record.get('batch_idx')}, "
            f"score {record.get('score')}): {reasons}"
        )


class InstabilityError(RuntimeError):
    """Raised with ``instability_action="raise"`` at a stability warning; ``.record`` holds the step's record."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        messages = "; ".join(e["message"] for e in record.get("events", []) if e.get("kind") == "instability")
        super().__init__(f"gradspectra at step {record.get('step')}: {messages}")


@dataclass
class StepInputs:
    """What a front door knows of the optimizer step being measured.

    ``loss``: the step's mean loss (a tensor may stay on the device: it travels in the one host copy),
    times ``loss_scale`` (an AMP scale, divided out here). ``loss_seen=False`` where the front door
    has no loss (the record says so; the score rests on the gradients). ``share_ids``: under
    DDP/FSDP the record lists every rank's ``sample_ids`` (rank 0's first). ``scope`` and ``optimizer``:
    with several optimizers, each step measures the layers of the optimizer that steps
    (:meth:`MonitorEngine.rows_of`) and is scored against that optimizer's own baseline.
    """

    step: int
    epoch: int | None = None
    batch_idx: int | None = None
    loss: Tensor | float | None = None
    loss_scale: float | None = None
    sample_ids: list[Any] = field(default_factory=list)
    loss_seen: bool = True
    share_ids: bool = False  # gather every rank's ids (a collective: every rank must say the same)
    scope: frozenset[int] | None = None  # the watched layers this step measures (default: all)
    optimizer: int | None = None  # which of several optimizers steps: its own baseline, named in the record


@dataclass
class Outputs:
    """Where a step's results go besides the record file: scalar loggers (every rank that logs) and
    rank 0's TensorBoard writers (layout, figures, summary text)."""

    log_scalars: Callable[[dict[str, float], int], None] | None = None
    writers: Sequence[SummaryWriterLike] = ()
    layer_runs_dir: Path | None = None  # rank 0's folder of per-layer runs, used with ``layer_runs=True``


@dataclass
class Collected:
    """The watched layers with a gradient this step (``present``) and their matrices (empty placeholders on
    FSDP ranks that do not own a layer)."""

    present: list[int]
    matrices: list[Tensor]


@dataclass
class _Pending:
    """A light step measured, its record not made yet: what the record needs."""

    inputs: StepInputs
    procs: Processes
    outputs: Outputs
    present: list[int]
    norms: list[float] | None  # on the host
    device: torch.device | None  # where the gradients were (the streaming statistics' device)
    unmeasured: list[int]
    error: str | None
    seconds: float
    at: float  # when it was measured (perf_counter)


class MonitorEngine:
    """Measures, scores, records and reports gradient spectra of a model's watched layers, one optimizer
    step at a time. See :class:`gradspectra.GradientSpectrumMonitor` for the options (:class:`MonitorConfig`).
    """

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.metric_names = config.metric_names
        self.scorer = config.make_scorer()
        self.stability = config.make_stability()  # the first optimizer's run only
        self.stop_requested = False  # instability_action="stop": the front door stops training after this step
        self.optimizer_scorers: dict[int, BatchScorer] = {}  # optimizers after the first, each its own baseline
        # per optimizer (0: the first), the scorer of the light steps, fed every step (see _record)
        self.light_scorers: dict[int, BatchScorer] = {}
        self._records = RecordBuffer(config.max_records_in_memory)
        self._pending: list[_Pending] = []  # light steps measured, their records not made yet (_flush_light)
        # light steps may be recorded in small batches: set by the doors that return no record (see _defers)
        self.defer_light = False
        self.selection: Selection | None = None
        self.watched: list[WatchedParameter] = []
        self._spectrum: LayerwiseSpectrum | None = None
        # light steps' (values, validity, device), folded into the streaming statistics in one update
        self._light_rows: list[tuple[np.ndarray, np.ndarray, torch.device]] = []
        self.factors: FactorCapture | None = None
        self.implied: ImpliedGradients | None = None
        self._implied_layers: dict[str, str | None] = {}
        self._implied_cost: float | None = None  # seconds per token x m x n to form an implied gradient (EMA)
        self._implied_formed_at: dict[int, int] = {}  # layer -> the measured step its implied gradient was formed
        self._unmeasured: list[int] = []  # implied layers this step left for a later one (their turn comes)
        self._implied_rotates = False
        self._implied_shapes: dict[int, tuple[int, int]] = {}
        self._implied_tokens: dict[int, int] = {}  # tokens each implied layer saw when it was last formed
        self._implied_learned = 0  # formings timed so far (on a GPU only the first _IMPLIED_LEARN are)
        self.samples: SampleStage | None = None  # per_sample=: hooks of per-sample spectra (one process)
        self.sample_scorer = SampleScorer() if config.per_sample is not None else None
        self.planner: Planner | None = None
        self.runner = SpectraRunner(self.metric_names, config.method, config.cpu_threads)
        self._no_result = self.runner.empty(0, torch.device("cpu"))  # a light step's (no spectral work)
        self.views: TensorBoardViews | None = None
        self.record_path: Path | None = None
        self.sharded: nn.Module | None = None
        self.dtensor = False  # FSDP2 / tensor parallel: the watched weights are DTensors (set by `open`)
        self.blocks: BlockTier | None = None  # their cheap tier on each rank's blocks (not under spectra="exact")
        self._block_step: tuple[BlockStep, Plan | None, set[int]] | None = None
        self._moved: dict[str, Any] | None = None  # the step's record key `sharded`
        self._dtensor_failure: str | None = None  # this rank's failure in the step's sharded phases
        self._world = 1
        self.steps_monitored = self.flagged_total = self.skipped_total = 0
        self.missing_grad_total = self.nonfinite_total = self.error_total = self.shift_total = 0
        self.instability_total = self.aftermath_total = 0
        self.full_steps = 0  # measured steps that were not light (the cadence of per-layer scalars and figures)
        self._light = False  # the step begun is a light one (begin_step)
        self._steps_begun = 0  # measured steps begun (the implied layers' turns: oldest first)
        self.monitor_seconds = 0.0
        self.layers_computed_here = 0
        self.last_step: int | None = None  # the last step measured (kept in checkpoints)
        self.affordance: str | None = None  # what the budget affords, in words, once learned
        self.resume_after: int | None = None  # the restored checkpoint's last measured step
        self._writer: RecordWriter | None = None
        self._writing_batch = False  # records made together (light steps): their lines flushed once
        self._pending_state: dict[str, Any] | None = None
        self._shapes: list[tuple[int, int]] = []
        self._keys: list[str] = []
        self._component_rows: dict[str, list[int]] = {}
        self._owners: tuple[int, list[int]] | None = None
        self._source_columns: dict[torch.device, Tensor] = {}
        self._layer_runs: LayerRuns | None = None
        self._last_skip_message = -math.inf
        self._last_layer_log = -math.inf  # full_steps when per-layer scalars were last logged
        self._spectra_counts: deque[int] = deque(maxlen=_AFFORDS_AFTER)  # layers with a full spectrum, per step
        self._cheap_counts: deque[int] = deque(maxlen=_AFFORDS_AFTER)  # layers with the cheap tier, per step
        self._formed_counts: deque[int] = deque(maxlen=_AFFORDS_AFTER)  # implied gradients formed, per step
        self._affordance_said = False
        self._skips_unsaid = 0

    # ------------------------------------------------------------------ set-up

    def attach(self, model: nn.Module, world: int = 1, owner: str = "GradientSpectrumMonitor") -> None:
        """Choose the watched parameters of ``model`` (before any sharding wrapper flattens them)."""
        kwargs = self.config.selection_kwargs
        selection = select_parameters(model, **kwargs)
        if not selection.watched:
            raise ValueError(
                f"`{owner}` found no parameter to watch with "
                f"{ {k: v for k, v in kwargs.items() if v not in (None, False)} }. " + selection.describe_empty(model)
            )
        self.selection, self.watched = selection, selection.watched
        self._world = world
        self._keys = [w.key for w in self.watched]  # formatted once: the record and the scalars use them every step
        # full (m, n) of each matrix, taken now: under FSDP `param.shape` becomes a flat shard's
        self._shapes = [(int(w.param.shape[0]), math.prod(w.param.shape[1:])) for w in self.watched]
        row = {id(w): i for i, w in enumerate(self.watched)}
        self._component_rows = {
            component: [row[id(p)] for p in params]
            for component, params in group_by_component(self.watched).items()
            if len(params) >= 2 and params[0].index is not None
        }
        # under DDP every rank must make the same steps (the scorer's flags, the stability stop); a light step's
        # score rests on the Frobenius norms
        light = (
            world == 1
            and self.config.spectra == "auto"
            and "frobenius_norm" in self.metric_names
            and not has_dtensors(self.watched)  # (a sharded model: the engine's multi-process path)
        )
        if self.planner is None or self.planner.shapes != self._shapes:
            self.planner = Planner(
                self.config.spectra,
                self.config.max_overhead,
                self._shapes,
                cheap=self.config.cheap_spectra,
                light=light,
            )
        else:
            # the same layers fitted again (another Trainer.fit, a resume): the budget keeps what it learned
            # about the step and the work; the step count starts over, and light steps follow this fit's world
            self.planner.restart(light)
        self._owners = None
        self.stop_requested = False  # a stop asked in an earlier fit is not this fit's
        if self.factors is not None:
            self.factors.close()
        # factors of one process: under DDP/FSDP the gradient is the ranks' average, not Delta^T X. Only
        # for spectra="exact": what the hooks cost happens inside the training step, unseen by the budget
        use_factors = self.config.factored and self.config.spectra == "exact" and world == 1
        self.factors = FactorCapture(self.watched) if use_factors else None
        self._attach_implied(world)
        # the kept rows are this rank's: under DDP the implied gradient is the ranks' average, not their D^T X
        self.runner.factors = self._factor_source() if world == 1 else self.factors
        self._attach_samples(world, owner)
        if selection.frozen:
            log.info(
                f"gradspectra: {len(selection.frozen)} matching parameters are frozen and not watched "
                f"(e.g. {selection.frozen[0]})"
            )

    def _factor_source(self) -> FactorSource | None:
        """The ``T x T`` route's factors: the implied layers' own (any mode), the others' from FactorCapture."""
        implied, capture = self.implied, self.factors
        if implied is None:
            return capture
        rows = set(implied.layers)

        class Both:
            def factors(self, i: int, grad: Tensor) -> tuple[Tensor, Tensor] | None:
                if i in rows:
                    assert implied is not None
                    return implied.factors(i)
                return capture.factors(i, grad) if capture is not None else None

        return Both()

    def _attach_implied(self, world: int) -> None:
        """Hooks for the frozen watched weights measured by their implied gradient ``D^T X``."""
        if self.implied is not None:
            self.implied.close()
            self.implied = None
        self._implied_layers = {w.key: w.adapter for w in self.watched if w.implied}
        self._implied_rotates = world == 1 and self.config.spectra == "auto"
        if self._implied_layers:
            self.implied = ImpliedGradients(self.watched)
            # each implied layer's matrix as it is formed: the out x in of as_matrix (GPT-2's Conv1D is stored in x out)
            self._implied_shapes = {}
            for i, w in enumerate(self.watched):
                matrix = as_matrix(w.param.detach(), w.module) if w.implied else None
                if matrix is not None:
                    self._implied_shapes[i] = (int(matrix.shape[0]), int(matrix.shape[1]))
            if self._implied_rotates and self.planner is not None and self.planner.budget is None:
                # the budget covers every layer from the start, although the implied ones take turns
                self.planner.rows = list(range(len(self.watched)))
            adapted = sum(a is not None for a in self._implied_layers.values())
            log.info(
                f"gradspectra: {len(self._implied_layers)} frozen linear weights ({adapted} wrapped by adapters) are "
                "measured by their implied full-weight gradient D^T X (gradients='parameters' measures the "
                "adapters' own gradients instead)"
            )

    def _attach_samples(self, world: int, owner: str) -> None:
        if self.samples is not None:
            self.samples.close()
            self.samples = None
        if self.config.per_sample is None:
            return
        if world > 1:
            # each rank holds only its own samples' factors, and the gradient is the ranks' average
            raise ValueError(
                f"`{owner}(per_sample={self.config.per_sample!r})` needs a single process for now, got a world "
                f"of {world} processes; use per_sample=None under DDP/FSDP"
            )
        assert self.sample_scorer is not None
        stage = SampleStage(self.watched, self.metric_names, self.sample_scorer)
        implied = self.implied
        if implied is not None:
            # frozen layers: the samples' factors add up to the implied gradient (formed only on its turn)
            rows = set(implied.layers)
            stage.gradient = lambda r: implied.matrix(r) if r in rows else self.watched[r].grad_matrix()
        if not stage.layers:
            stage.close()
            raise ValueError(
                f"`{owner}(per_sample={self.config.per_sample!r})` needs watched nn.Linear weights (per-sample "
                f"spectra come from their inputs and output gradients); none of the {len(self.watched)} watched "
                f"parameters is one (e.g. {self.watched[0].name})"
            )
        self.samples = stage

    def open(self, record_path: Path, write: bool, wrapped: nn.Module | None = None) -> None:
        """Where records go (``write`` on global rank 0 only) and, once wrapped, whether gradients are sharded."""
        self.record_path = record_path
        if write:
            self._writer = RecordWriter(record_path)
        # under FSDP this fails early if the watched weights were flattened away
        self.sharded = wrapped if wrapped is not None and is_sharded(wrapped) else None
        if self.sharded is not None:
            if self._implied_layers:
                raise ValueError(
                    f"gradspectra measures frozen weights by their implied gradient (here {len(self._implied_layers)}, "
                    f"e.g. {next(iter(self._implied_layers))}) in one process or under DDP, not under FSDP yet; "
                    "pass gradients='parameters' to watch the trainable (adapter) weights instead"
                )
            fsdp_groups(self.sharded, self.watched)
        self.dtensor = has_dtensors(self.watched)
        self.blocks = BlockTier(self.watched, self._world) if self.dtensor else None
        if self.blocks is not None:
            self.blocks.on_blocks = self.config.spectra != "exact"
        if self.dtensor and self._implied_layers:
            raise ValueError(
                f"gradspectra measures frozen weights by their implied gradient (here {len(self._implied_layers)}, "
                f"e.g. {next(iter(self._implied_layers))}) in one process or under DDP, not under FSDP2 or tensor "
                "parallelism yet; pass gradients='parameters' to watch the trainable (adapter) weights instead"
            )
        self.views = TensorBoardViews(
            self.metric_names,
            [ViewLayer(w.key, w.component, w.index) for w in self.watched],
            self.config.figure_every_n_steps,
            self.config.heatmap_steps,
        )

    def set_aside_after_resume(self) -> Path | None:
        """After a restore: move the records of steps after the checkpoint's last measured step aside."""
        after, self.resume_after = self.resume_after, None
        if after is None or self._writer is None or self.record_path is None:
            return None
        aside = set_aside_records_after(self.record_path, after)
        if aside is not None:
            log.info(
                f"gradspectra: resumed after step {after}; the records of later steps, which this run "
                f"repeats, were moved to {aside}"
            )
        return aside

    # ------------------------------------------------------------------ per step

    def rows_of(self, params: Iterable[nn.Parameter]) -> frozenset[int]:
        """The watched layers among ``params`` (an optimizer's parameters, say)."""
        ids = {id(p) for p in params}
        return frozenset(i for i, w in enumerate(self.watched) if id(w.param) in ids)

    def _scorer_for(self, optimizer: int | None) -> BatchScorer | None:
        if not optimizer or self.scorer is None:
            return self.scorer
        if optimizer not in self.optimizer_scorers:
            self.optimizer_scorers[optimizer] = self.config.make_scorer()  # type: ignore[assignment]
        return self.optimizer_scorers[optimizer]

    def _light_scorer_for(self, optimizer: int | None) -> BatchScorer | None:
        """The light steps' scorer of ``optimizer``, where light steps can happen (``None`` elsewhere)."""
        if self.scorer is None or self.planner is None or not self.planner.light:
            return None
        key = optimizer or 0
        if key not in self.light_scorers:
            self.light_scorers[key] = self.config.make_light_scorer()  # type: ignore[assignment]
        return self.light_scorers[key]

    def measures(self, step: int) -> bool:
        return step % self.config.every_n_steps == 0 and bool(self.watched)

    def begin_step(self, step: int) -> None:
        """At an optimizer step's first micro-batch: plan its work, tell the factor hooks what to keep."""
        measured = self.measures(step)
        plan = self.planner.begin() if measured and self.planner is not None else None
        self._light = plan is not None and plan.light  # for every optimizer that steps in this batch
        self._steps_begun += measured
        if self.samples is not None:
            self.samples.capture.enabled = measured
        if self.implied is not None:
            self.implied.enabled = measured
            # the turns are chosen now, so that the layers whose turn it is not keep no rows at all
            self.implied.active = (
                set(self._implied_turn(self.implied.layers, plan)[0]) if measured and self._implied_rotates else None
            )

        if self.factors is not None:
            if not measured:
                self.factors.active = set()
            elif self.config.spectra == "exact":
                self.factors.active = None
            else:
                self.factors.active = set() if plan is None else set(plan.exact)

    def step(
        self,
        inputs: StepInputs,
        procs: Processes | None = None,
        outputs: Outputs | None = None,
        params: Callable[[], Iterable[nn.Parameter]] | None = None,
    ) -> BatchRecord | None:
        """Measure the gradients as they are now (accumulated, unscaled, before the optimizer step).

        Returns the record, or ``None`` on a step that is not measured. With ``action="skip"`` a flagged
        step's ``params`` lose their ``.grad``; with ``action="raise"`` a :class:`GradientAnomalyError` follows.
        """
        procs = procs or Processes()
        if not self.measures(inputs.step):
            self._release_factors()
            return None
        light = self._light  # (kept for the batch: with several optimizers each steps, light or full alike)
        if light and self._defers(procs):
            self._measure_pending(inputs, procs, outputs or Outputs())
            return None
        self._flush_light()  # the records in step order
        started = time.perf_counter()
        if inputs.share_ids and procs.world > 1:
            inputs.sample_ids = gather_ids(inputs.sample_ids, procs.world)
        assert self.planner is not None
        self.planner.step_started(started, inputs.step)
        table, result, error = self._measure_light(inputs, procs) if light else self._measure(inputs, procs)
        record = self._record(inputs, table, result, error, light)
        self._measure_samples(record, inputs)
        record["monitor_ms"] = 1000.0 * (time.perf_counter() - started)
        # the action before the record goes out, so that the file, the scalars and the console all say so
        self._act(record, params, procs)
        spaced_seconds = self._emit(record, table, procs, outputs or Outputs(), light)
        ended = time.perf_counter()
        self.monitor_seconds += ended - started
        # per-layer logging and figures are paid for apart (spaced by the budget), not as a fixed cost per step
        fixed = ended - started - result.seconds - result.cheap_seconds - spaced_seconds
        self.planner.step_ended(ended, inputs.step, fixed, light)
        self._say_affordance(record, procs)
        self.last_step = inputs.step
        self._release_factors()
        if record["flagged"] and self.config.action == "raise":
            raise GradientAnomalyError(dict(record))
        if any(e.get("kind") == "instability" for e in record["events"]):
            if self.config.instability_action == "raise":
                raise InstabilityError(dict(record))
            if self.config.instability_action == "stop":
                self.stop_requested = True
        return record

    def _collect(self, procs: Processes, world: int, scope: frozenset[int] | None) -> Collected:
        if self.dtensor:
            return self._collect_dtensors(procs, world, scope)
        if self.sharded is not None:
            present, matrices = gather_sharded(self.sharded, self.watched, self._layer_owners(world), procs.rank, world)
            kept = [k for k, i in enumerate(present) if scope is None or i in scope]
            return Collected([present[k] for k in kept], [matrices[k] for k in kept])
        collected = Collected([], [])
        implied = self.implied
        for i, w in enumerate(self.watched):
            if scope is not None and i not in scope:
                continue
            if w.implied:
                continue
            g = w.grad_matrix()
            if g is not None:
                collected.present.append(i)
                collected.matrices.append(g)
        self._unmeasured = []
        if implied is not None:
            rows = [i for i in implied.layers if scope is None or i in scope]
            if self._implied_rotates:
                active = implied.active if implied.active is not None else set(self._implied_turn(rows, None)[0])
                self._unmeasured = [i for i in rows if i not in active]
                rows = [i for i in rows if i in active]
            if procs.world == 1:
                rows = [i for i in rows if implied.has(i)]  # (under DDP every rank lists every layer: one all-reduce)
            formed = self._form_implied(rows, implied)
            if procs.world > 1:
                formed = self._implied_over_ranks(rows, formed, procs)
            for i, g in formed.items():
                collected.present.append(i)
                collected.matrices.append(g)
            order = sorted(range(len(collected.present)), key=collected.present.__getitem__)
            collected.present = [collected.present[k] for k in order]
            collected.matrices = [collected.matrices[k] for k in order]
        return collected

    def _collect_dtensors(self, procs: Processes, world: int, scope: frozenset[int] | None) -> Collected:
        """FSDP2 / tensor parallel: every layer whole for its owner under ``spectra="exact"``; otherwise only the
        layers whose owner plans a full spectrum, the others measured on their blocks (:mod:`.blocks`)."""
        rows = [i for i in range(len(self.watched)) if scope is None or i in scope]
        self._unmeasured = []
        self._block_step = None
        self._dtensor_failure = None
        owners = self._layer_owners(world)
        to_owner = None if self.blocks is None else self.blocks.to_owner
        if self.blocks is None or not self.blocks.on_blocks:
            # every layer gathered whole for its owner (spectra="exact")
            if self.blocks is not None:
                self.blocks.prepare(procs)
            kept, whole, errors = gather_dtensors(self.watched, owners, procs.rank, world, rows, to_owner)
            self._moved = self._moved_by([i for i in kept if is_dtensor(self.watched[i].param)], 0)
            self._dtensor_failure = errors[0] if errors else None  # (said in the step's all-reduce)
            return Collected(kept, whole)
        assert self.planner is not None
        present = [i for i in rows if self.watched[i].param.grad is not None]
        grad = self.watched[present[0]].param.grad if present else None
        empty = torch.empty(0, device=grad.device) if grad is not None else torch.empty(0)
        mine = [i for i in present if owners[i] == procs.rank]
        # a failure on one rank must not leave the others waiting in a collective: each phase is guarded, the
        # agreement sum says whether any rank failed before it (then every rank leaves the step alike), and a
        # later failure is said in the step's one all-reduce (`_compute_blocks` raises, `_measure` joins it)
        failure: str | None = None
        plan = None
        try:
            plan = self.planner.plan(mine) if mine and needs_spectrum(self.metric_names) else None
        except Exception as err:
            failure = f"{type(err).__name__}: {err}"
        step = self.blocks.agree(present, owners, plan, procs, self.metric_names, failed=failure is not None)
        gathered: list[int] = []
        matrices: list[Tensor] = []
        if not step.failed_ranks:
            gathered, matrices, errors = gather_dtensors(self.watched, owners, procs.rank, world, step.gather, to_owner)
            failure = failure or (errors[0] if errors else None)
            try:
                self.blocks.measure(step, procs)
            except Exception as err:
                failure = failure or f"{type(err).__name__}: {err}"
            try:
                self.blocks.detect(step, procs)
            except Exception as err:
                failure = failure or f"{type(err).__name__}: {err}"
        self._dtensor_failure = failure
        self._moved = self._moved_by([i for i in gathered if self.blocks.distributed[i]], step.sent)
        self._block_step = (step, plan, set(gathered))
        # every present layer is listed (its Frobenius norm at least); matrices only where gathered
        by_row = dict(zip(gathered, matrices))
        return Collected(present, [by_row.get(i, empty) for i in present])

    def _moved_by(self, gathered: list[int], sent: int) -> dict[str, Any]:
        """The record's ``sharded``: the sharded layers gathered whole, their entries, the numbers summed."""
        entries = sum(self._shapes[i][0] * self._shapes[i][1] for i in gathered)
        return {"gathered_layers": [self._keys[i] for i in gathered], "gathered": entries, "sent": sent}

    def _compute_blocks(self, collected: Collected, procs: Processes, world: int) -> SpectraResult:
        """This rank's layers under FSDP2 / tensor parallel: the gathered ones it owns by the runner, then the
        Frobenius norms and the cheap tier of those measured on their blocks."""
        assert self._block_step is not None and self.planner is not None
        step, plan, gathered = self._block_step
        owners = self._layer_owners(world)
        n = len(self.watched)
        device = collected.matrices[0].device
        mine = [(i, g) for i, g in zip(collected.present, collected.matrices) if owners[i] == procs.rank]
        whole = [(i, g) for i, g in mine if i in gathered]
        if whole:
            rows, todo = [i for i, _ in whole], [g for _, g in whole]
            # the anchors valued on their blocks are not valued again from a gathered matrix (one route each)
            by_runner = plan
            if plan is not None and step.detect:
                by_runner = replace(plan, detect=[i for i in plan.detect if i not in set(step.detect)])
            result = self.runner.run(todo, rows, n, device, by_runner, self.steps_monitored)
        else:
            result = self.runner.empty(n, device)
        names = self.metric_names
        rest = [i for i, _ in mine if i not in gathered]
        if rest and "frobenius_norm" in names and step.frobenius is not None:
            result.values[rest, names.index("frobenius_norm")] = step.frobenius[rest].to(device)
        cheap = [(k, i) for k, i in enumerate(step.rows) if owners[i] == procs.rank]
        if cheap and step.cheap is not None:
            rows = [i for _, i in cheap]
            cols = [j for j, name in enumerate(names) if name in CHEAP_METRICS]
            src = [CHEAP_METRICS.index(names[j]) for j in cols]
            at = [k for k, _ in cheap]
            if cols:
                cells = (torch.tensor(rows, device=device)[:, None], torch.tensor(cols, device=device))
                result.values[cells] = step.cheap.values[at][:, src].to(device)
                result.errors[cells] = step.cheap.rel_error[at][:, src].to(device)
            result.codes[rows] = SpectrumSource.CHEAP.code
            # every rank spends the time on every rank's layers: each charges all of it to its own, so that the
            # budgets, planning their own layers, keep the whole within max_overhead
            result.work.append((SpectrumSource.CHEAP, rows, step.seconds))
        result.cheap_seconds += step.seconds
        detected = [(k, i) for k, i in enumerate(step.detect) if owners[i] == procs.rank]
        if detected and step.detection is not None:
            rows = [i for _, i in detected]
            result.detection[rows] = step.detection[[k for k, _ in detected]].to(device)
            result.detected[rows] = 1.0
            result.work.append((DETECT, rows, step.detect_seconds))  # (each rank charges all of it, as above)
        result.cheap_seconds += step.detect_seconds
        self.planner.learn(result, planned=plan is not None and self.config.spectra == "auto")
        self.layers_computed_here += result.computed
        return result

    def _form_implied(self, rows: list[int], implied: ImpliedGradients) -> dict[int, Tensor]:
        """Each layer's ``D^T X``, timed to learn the cost (a layer that fails to form is left out of this step)."""
        started = time.perf_counter()
        formed: dict[int, Tensor] = {}
        for i in rows:
            try:
                g = implied.matrix(i)
            except RuntimeError as err:  # e.g. out of memory: this layer has no value this step
                message = f"gradspectra could not form the implied gradient of {self._keys[i]}: {err}"
                warnings.warn(message, stacklevel=2)
                continue
            if g is not None:
                formed[i] = g
        device = next(iter(formed.values())).device if formed else None
        timed = True
        if device is not None and device.type == "cuda":
            # the products run asynchronously: timing them waits for the device, so only while the turns
            # still learn the cost (their first _IMPLIED_LEARN formings)
            timed = self._implied_rotates and self._implied_learned < _IMPLIED_LEARN
            if timed:
                torch.cuda.synchronize(device)
        self._learn_implied_cost(list(formed), implied, time.perf_counter() - started if timed else None)
        return formed

    def _implied_turn(self, rows: list[int], plan: Plan | None) -> tuple[list[int], list[int]]:
        """Under ``spectra="auto"``: the implied layers whose ``D^T X`` is formed this step, and those left for later.

        Forming costs ``2 T m n`` flops a layer (what autograd spends on a trainable weight): the layers take
        turns, oldest first, in at most half of the step's budget (at least one a step), besides the step's
        detection anchors (``plan.detect``, formed every step, so that the scorer's detection series has no
        gaps). Until the step time and the cost are learned (the first steps), one layer a step besides the
        anchors. The cost of a layer is predicted from the tokens it saw when it was last formed.
        """
        budget = self.planner.budget if self.planner is not None else None
        step_seconds = budget.step_seconds if budget is not None else None
        cost_per = self._implied_cost
        allowance = 0.0
        if step_seconds is not None and cost_per is not None:
            allowance = _IMPLIED_SHARE * self.config.max_overhead * step_seconds
        anchors = set(plan.detect) if plan is not None else set()
        tokens = max(self._implied_tokens.values(), default=0)
        chosen: list[int] = []
        spent = 0.0
        turns = 0  # layers formed in turn (besides the anchors): at least one a step, so that every layer's comes
        for i in sorted(rows, key=lambda r: (r not in anchors, self._implied_formed_at.get(r, -1))):
            m, n = self._shapes[i]
            cost = (cost_per or 0.0) * self._implied_tokens.get(i, tokens) * m * n
            if i not in anchors:
                if turns and (cost_per is None or spent + cost > allowance):
                    continue
                turns += 1
            chosen.append(i)
            spent += cost
        taken = set(chosen)
        return sorted(chosen), [i for i in rows if i not in taken]

    def _learn_implied_cost(self, rows: list[int], implied: ImpliedGradients, seconds: float | None) -> None:
        """Which layers were formed (their turn, their tokens), and what it cost (``None``: not timed)."""
        size = sum(implied.tokens(i) * self._shapes[i][0] * self._shapes[i][1] for i in rows)
        for i in rows:
            self._implied_formed_at[i] = self._steps_begun
            self._implied_tokens[i] = implied.tokens(i)
        if size <= 0 or seconds is None:
            return
        self._implied_learned += 1
        cost = seconds / size
        self._implied_cost = cost if self._implied_cost is None else 0.8 * self._implied_cost + 0.2 * cost

    def _implied_over_ranks(self, rows: list[int], matrices: dict[int, Tensor], procs: Processes) -> dict[int, Tensor]:
        """Under DDP: the ranks' average of each implied gradient (what DDP gives a trainable weight), one all-reduce.

        A rank without a layer's gradient this step adds zeros; a layer no rank has stays missing.
        """
        if not rows:
            return matrices
        device = self.watched[rows[0]].param.device
        parts = []
        for i in rows:
            m, n = self._implied_shapes[i]
            g = matrices.get(i)
            parts.append(g.float() if g is not None else torch.zeros(m, n, dtype=torch.float32, device=device))
        counts = torch.tensor([float(i in matrices) for i in rows], dtype=torch.float32, device=device)
        flat = procs.reduce_sum(pack([*parts, counts], dtype=torch.float32))
        *summed, seen = unpack(flat, [*parts, counts])
        return {i: g / procs.world for i, g, c in zip(rows, summed, seen.tolist()) if c > 0}

    def _layer_owners(self, world: int) -> list[int]:
        if self._owners is None or self._owners[0] != world:
            self._owners = (world, layer_owners(self._shapes, world))
        return self._owners[1]

    def _measure(self, inputs: StepInputs, procs: Processes) -> tuple[HostTable, SpectraResult, str | None]:
        """Collect, compute this rank's share, combine across ranks, fold into the streaming state, copy to host.

        A failure is reported in the record and never stops the user's training.
        """
        n, k = len(self.watched), len(self.metric_names)
        # under FSDP the layers are always split: a rank measuring every layer would hold every full gradient
        world = procs.world if self.config.distribute or self.sharded is not None or self.dtensor else 1
        result = self.runner.empty(0, torch.device("cpu"))
        present: list[int] = []
        loss = inputs.loss
        try:
            collected = self._collect(procs, world, inputs.scope)
            present = collected.present
            if not present:
                return self._host_loss(HostTable.unmeasured(n, k, present), loss, inputs), result, None
            failure: str | None = None
            try:
                result = self._compute(collected, procs, world)
            except Exception as err:
                if world == 1:
                    raise
                # this rank still joins the step's all-reduce (the other ranks wait in it), saying it failed
                failure = f"{type(err).__name__}: {err}"
                result = self.runner.empty(n, collected.matrices[0].device)
            table = self._combine(result, collected, procs, world, loss, failure)
            return self._host_loss(table, table.loss if loss is not None else None, inputs), result, None
        except Exception as err:  # a measurement failure must never stop the user's training
            error = self._failed(err, inputs.step, procs)
            return self._host_loss(HostTable.unmeasured(n, k, present), loss, inputs), result, error

    def _failed(self, err: Exception, step: int, procs: Processes) -> str:
        """A step that could not be measured: counted, said on rank 0; the error for its record."""
        error = f"{type(err).__name__}: {err}"
        self.error_total += 1
        if procs.is_zero:
            warnings.warn(f"gradspectra could not measure step {step}: {error}", stacklevel=4)
        return error

    @property
    def batch_records(self) -> RecordBuffer:
        """The newest records in memory, oldest first (every measured step's, the light ones included)."""
        self._flush_light()
        return self._records

    def _defers(self, procs: Processes) -> bool:
        """Whether a light step's record may wait for a few more light steps' (made together, :func:`_flush_light`):
        only where nothing must be decided at the step itself (no skip or raise, no instability stop, no
        per-sample stage) and the door returns no record."""
        return (
            self.defer_light
            and procs.world == 1
            and self.config.action == "log"
            and self.config.instability_action == "log"
            and self.samples is None
        )

    def _light_norms(
        self, inputs: StepInputs, procs: Processes
    ) -> tuple[list[int], list[float] | None, torch.device | None, str | None]:
        """A light step's measurement (one process): the layers present, their Frobenius norms (one read each on
        the gradients' device, then on the host) and that device; a failure is the error for the record and never
        stops the user's training."""
        present: list[int] = []
        try:
            if self.sharded is None and self.implied is None and not self.dtensor:
                collected = self._plain_grads(inputs.scope)
            else:
                collected = self._collect(procs, 1, inputs.scope)
            present = collected.present
            if not present:
                return present, None, None, None
            device = collected.matrices[0].device
            with self.runner.threads(device):  # (as a full step reads them: the same sums, the same values)
                norms = frobenius_norm_values(collected.matrices)
            return present, norms, device, None
        except Exception as err:
            return present, None, None, self._failed(err, inputs.step, procs)

    def _plain_grads(self, scope: frozenset[int] | None) -> Collected:
        """The watched gradients as they are, for their norms: a matrix's Frobenius norm is its gradient's,
        whatever its orientation, so only a gradient that is not a plain matrix goes through
        :meth:`WatchedParameter.grad_matrix` (on a fast step the per-layer reshaping is a cost of its own)."""
        self._unmeasured = []
        collected = Collected([], [])
        for i, w in enumerate(self.watched):
            if scope is not None and i not in scope:
                continue
            g = w.param.grad
            if g is None:
                continue
            if g.ndim != 2 or g.layout != torch.strided:
                g = w.grad_matrix()
                if g is None:
                    continue
            collected.present.append(i)
            collected.matrices.append(g)
        return collected

    def _light_table(self, present: list[int], norms: list[float] | None, device: torch.device | None) -> HostTable:
        """A light step's host table, its row kept for the streaming statistics (on ``device``)."""
        n, k = len(self.watched), len(self.metric_names)
        table = HostTable.unmeasured(n, k, present)
        if norms is not None:
            column = self.metric_names.index("frobenius_norm")
            table.values[present, column] = norms
            table.valid[present, column] = True
            assert device is not None
            self._light_rows.append((table.values, table.valid, device))
            if len(self._light_rows) >= _LIGHT_ROWS:
                self._fold_light_rows()
        return table

    def _measure_pending(self, inputs: StepInputs, procs: Processes, outputs: Outputs) -> None:
        """A light step whose record waits: every layer's Frobenius norm now (the gradients are gone after the
        optimizer step), the rest of the record with the next few light steps' (on a step of milliseconds the
        scorer, the record and the file cost several times less together than one by one)."""
        started = time.perf_counter()
        assert self.planner is not None
        self.planner.step_started(started, inputs.step)
        present, norms, device, error = self._light_norms(inputs, procs)
        self._release_factors()
        ended = time.perf_counter()
        unmeasured = list(self._unmeasured)
        self._pending.append(
            _Pending(inputs, procs, outputs, present, norms, device, unmeasured, error, ended - started, started)
        )
        self.monitor_seconds += ended - started
        self.last_step = inputs.step
        # a step that went wrong is recorded at once (it may be the last before training fails)
        wrong = error is not None or (norms is not None and not all(map(math.isfinite, norms)))
        late = ended - self._pending[0].at >= _LIGHT_WAIT_SECONDS  # a file tailed live lags by seconds at most
        if wrong or late or len(self._pending) >= _LIGHT_BATCH:
            self._flush_light()
        self.planner.step_ended(time.perf_counter(), inputs.step, None, light=True)

    def _flush_light(self) -> None:
        """The records of the light steps waiting, in order: table, score, stability, record, file, scalars."""
        if not self._pending:
            return
        self._writing_batch = True  # the file lines flushed together, once
        try:
            self._flush_pending()
        finally:
            self._writing_batch = False
            if self._writer is not None:
                t0 = time.perf_counter()
                self._writer.flush()
                self.monitor_seconds += time.perf_counter() - t0

    def _flush_pending(self) -> None:
        while self._pending:  # one at a time: a failure leaves the later ones waiting, not lost
            p = self._pending.pop(0)
            t0 = time.perf_counter()
            table = self._host_loss(self._light_table(p.present, p.norms, p.device), p.inputs.loss, p.inputs)
            self._unmeasured = p.unmeasured
            record = self._record(p.inputs, table, self._no_result, p.error, light=True)
            seconds = p.seconds + time.perf_counter() - t0
            record["monitor_ms"] = 1000.0 * seconds
            self._emit(record, table, p.procs, p.outputs, light=True)
            seconds = p.seconds + time.perf_counter() - t0
            self.monitor_seconds += seconds - p.seconds
            assert self.planner is not None
            self.planner.observe_light(seconds)
            self._say_affordance(record, p.procs)

    def _measure_light(self, inputs: StepInputs, procs: Processes) -> tuple[HostTable, SpectraResult, str | None]:
        """A light step measured and tabled at once (the doors that return each step's record)."""
        present, norms, device, error = self._light_norms(inputs, procs)
        table = self._host_loss(self._light_table(present, norms, device), inputs.loss, inputs)
        return table, self._no_result, error

    @staticmethod
    def _host_loss(table: HostTable, loss: Tensor | float | None, inputs: StepInputs) -> HostTable:
        table.loss = None if loss is None else float(loss) / (inputs.loss_scale or 1.0)
        return table

    def _compute(self, collected: Collected, procs: Processes, world: int) -> SpectraResult:
        """This rank's layers: every rank holds the same all-reduced gradients, each measures those it owns."""
        assert self.planner is not None
        if self._dtensor_failure is not None:
            # this rank failed in the sharded phases, which every rank finished alike: `_measure` joins the
            # step's all-reduce saying so, and every rank records the step's error
            failure, self._dtensor_failure = self._dtensor_failure, None
            raise RuntimeError(failure)
        if self._block_step is not None:
            return self._compute_blocks(collected, procs, world)
        present, matrices = collected.present, collected.matrices
        owners = self._layer_owners(world)
        mine = [j for j, i in enumerate(present) if world == 1 or owners[i] == procs.rank]
        rows, todo = [present[j] for j in mine], [matrices[j] for j in mine]
        plan = self.planner.plan(rows) if rows and needs_spectrum(self.metric_names) else None
        result = self.runner.run(todo, rows, len(self.watched), matrices[0].device, plan, self.steps_monitored)
        self.planner.learn(result, planned=plan is not None and self.config.spectra == "auto")
        self.layers_computed_here += result.computed
        return result

    def _combine(
        self,
        result: SpectraResult,
        collected: Collected,
        procs: Processes,
        world: int,
        loss: Tensor | float | None,
        failure: str | None = None,
    ) -> HostTable:
        values, errors, codes = result.values, result.errors, result.codes
        detection, detected = result.detection, result.detected
        device = values.device
        loss_t = None if loss is None else torch.as_tensor(loss, dtype=torch.float64, device=device).reshape(1)
        counts: Tensor | None = None
        failed = torch.zeros(1, dtype=torch.float64, device=device)
        if world > 1:
            counts = torch.zeros(world, dtype=torch.float64, device=device)
            counts[procs.rank] = float(result.computed)
            failed += failure is not None
            local_loss = loss_t if loss_t is not None else torch.zeros(1, dtype=torch.float64, device=device)
            # one all-reduce: a layer's rows are its owner's values plus zeros from the others; the losses
            # are summed so every rank scores the same global mean loss; ranks whose work failed are counted
            parts = [values, errors, codes, detection, detected, counts, local_loss, failed]
            values, errors, codes, detection, detected, counts, local_loss, failed = unpack(
                procs.reduce_sum(pack(parts)), parts
            )
            if loss_t is not None:
                loss_t = local_loss / world
        mask = torch.zeros(len(self.watched), dtype=torch.bool, device=device)
        mask[collected.present] = True
        # which columns each layer has, by how it was measured (a deferred layer: its entry metrics only)
        if device not in self._source_columns:  # made once per device: a host copy per step is a wait on GPU
            self._source_columns[device] = source_columns(self.metric_names, device)
        valid = mask[:, None] & self._source_columns[device][codes.long()]
        values = torch.where(valid, values, torch.full_like(values, float("nan")))
        detection = torch.where(mask & (detected > 0), detection, torch.full_like(detection, float("nan")))
        # the one device-to-host copy per step: the table, the sources, validity, failures, the detection
        # values, (DDP) layers per rank, the loss
        parts = [values, errors, codes, valid, failed, detection, *(t for t in (counts, loss_t) if t is not None)]
        host = [p.numpy() for p in unpack(pack(parts).cpu(), parts)]
        if host[4][0] > 0:  # every rank sees the same count, so every rank drops the step alike
            detail = f": {failure}" if failure else ""
            raise RuntimeError(f"measurement failed on {int(host[4][0])} of {world} ranks{detail}")
        self._fold_light_rows()  # in step order
        self._spectrum_on(device).update(values, mask=valid)
        return HostTable(
            values=host[0],
            valid=host[3] > 0,
            errors=host[1],
            sources=[SpectrumSource.from_code(c) for c in host[2].tolist()],
            present=list(collected.present),
            layers_per_rank=[int(c) for c in host[6].tolist()] if counts is not None else None,
            loss=float(host[-1][0]) if loss_t is not None else None,
            detection=host[5],
        )

    @property
    def spectrum(self) -> LayerwiseSpectrum | None:
        """The streaming statistics of every layer's metrics (``None`` before the first measured step)."""
        self._flush_light()
        self._fold_light_rows()
        return self._spectrum

    def flushed(self) -> MonitorEngine:
        """This engine with every measured step's record made (the light steps waiting included): for readers
        of its totals while training runs."""
        self._flush_light()
        return self

    def _fold_light_rows(self) -> None:
        """The light steps' values so far into the streaming statistics, in one update (before the next step's)."""
        if not self._light_rows:
            return
        rows, self._light_rows = self._light_rows, []
        device = rows[0][2]
        values = torch.from_numpy(np.stack([r[0] for r in rows])).to(device)
        valid = torch.from_numpy(np.stack([r[1] for r in rows])).to(device)
        self._spectrum_on(device).update(values, mask=valid)

    def _spectrum_on(self, device: torch.device) -> LayerwiseSpectrum:
        if self._spectrum is None:
            keys = [w.key for w in self.watched]
            self._spectrum = LayerwiseSpectrum(keys, self.metric_names).to(device)
            pending, self._pending_state = self._pending_state, None
            if pending and pending.get("spectrum") is not None:
                same = list(pending.get("layer_keys", [])) == keys
                if not same or list(pending.get("metric_names", [])) != list(self.metric_names):
                    warnings.warn(
                        "gradspectra: the checkpoint watched other layers or metrics; streaming statistics restart",
                        stacklevel=2,
                    )
                else:
                    self._spectrum.load_state_dict({k: v.to(device) for k, v in pending["spectrum"].items()})
        return self._spectrum

    def _record(
        self, inputs: StepInputs, table: HostTable, result: SpectraResult, error: str | None, light: bool = False
    ) -> BatchRecord:
        keys = self._keys
        # where light steps can happen, the light scorer sees every step's Frobenius norms (its series go on),
        # and scores the light ones; the scorer sees the full steps only
        light_scorer = self._light_scorer_for(inputs.optimizer)
        light_score = None
        layer_metrics = table.layer_metrics(keys, self.metric_names) if light else None
        if light_scorer is not None and layer_metrics is not None:
            # a light step's values are its Frobenius norms: the record's metrics, as the light scorer reads them
            light_score = light_scorer.score({k: v for k, v in layer_metrics.items() if v}, table.loss)
        elif light_scorer is not None:
            j = self.metric_names.index("frobenius_norm")
            column, valid = table.values[:, j].tolist(), table.valid[:, j].tolist()
            norms = {keys[i]: {"frobenius_norm": column[i]} for i in table.present if valid[i]}
            light_score = light_scorer.score(norms, table.loss)
        scorer = self._scorer_for(inputs.optimizer)
        if light:
            score = light_score
            if scorer is not None:
                scorer.forget_flag()  # a step it does not see: its next step is no aftermath of its last flag
        else:
            score = None if scorer is None else scorer.score(table.scored_metrics(keys, self.metric_names), table.loss)
            if score is not None and score.in_warmup and light_score is not None and not light_score.in_warmup:
                # the scorer sees only the full steps: while it warms up on them, the light scorer's score stands
                score = light_score
            elif light_scorer is not None and not (score is not None and score.flagged):
                light_scorer.forget_flag()  # its flag on this step was not the record's
        record = assemble_record(
            step=inputs.step,
            epoch=inputs.epoch,
            batch_idx=inputs.batch_idx,
            table=table,
            keys=keys,
            metric_names=self.metric_names,
            result=score,
            sample_ids=inputs.sample_ids,
            with_sources=self.config.spectra != "exact",
            factored_rows=result.factored_rows,
            error=error,
            loss_seen=inputs.loss_seen,
            scope=self._record_scope(inputs.scope),
            layer_metrics=layer_metrics,
        )
        if inputs.optimizer is not None:
            record["optimizer"] = inputs.optimizer
        if self._moved is not None:
            # FSDP2 / tensor parallel: what this step moved between ranks (each rank alike)
            record["sharded"] = self._moved
            self._moved = None
        if light:
            record["light"] = True
        if self._implied_layers:
            record["implied_layers"] = dict(self._implied_layers)
            if self._unmeasured:
                record["unmeasured_layers"] = [self._keys[i] for i in sorted(self._unmeasured)]
        if self.stability is not None and not inputs.optimizer:
            # the trend of the run, never reset by the scorer's shifts
            verdict = self.stability.update(record["metrics"], record.get("detection"), table.loss)
            record["events"].extend(verdict.events)
            if verdict.score is not None:
                record["stability"] = float(verdict.score)
            self.instability_total += len(verdict.events)
        self.missing_grad_total += len(record["missing_layers"])
        self.nonfinite_total += bool(record["nonfinite_layers"])
        self.flagged_total += record["flagged"]
        self.shift_total += sum(e.get("kind") == "shift" for e in record["events"])
        self.aftermath_total += sum(e.get("kind") == "aftermath" for e in record["events"])
        self.steps_monitored += 1
        return record

    def _record_scope(self, scope: frozenset[int] | None) -> frozenset[int] | None:
        """The layers this step was to measure: the implied layers whose turn it is not are not missing."""
        if not self._unmeasured:
            return scope
        rows = frozenset(range(len(self.watched))) if scope is None else scope
        return rows - frozenset(self._unmeasured)

    def _release_factors(self) -> None:
        """What the hooks kept for this step (the exact route's factors, the per-sample ones) goes."""
        if self.factors is not None:
            self.factors.clear()
        if self.implied is not None:
            self.implied.clear()
        if self.samples is not None:
            self.samples.clear()

    def _measure_samples(self, record: BatchRecord, inputs: StepInputs) -> None:
        """Per-sample spectra and scores into the record: every step (``"always"``) or flagged ones."""
        if self.samples is None or inputs.optimizer:
            return
        if self.config.per_sample == "flagged" and not record["flagged"]:
            return
        allowance = None
        budget = self.planner.budget if self.planner is not None else None
        if self.config.per_sample == "always" and budget is not None and budget.step_seconds is not None:
            # every step: aim at half of the budget's share of the step (its time is also counted as fixed work,
            # which the spectra's share gives up)
            allowance = _SAMPLES_SHARE * self.config.max_overhead * budget.step_seconds
        with self.runner.threads(torch.device("cpu")):
            out = self.samples.measure(inputs.sample_ids, inputs.loss_scale, allowance, inputs.scope)
        record["samples"] = out.entries
        record["samples_ms"] = 1000.0 * out.seconds
        if out.note is not None:
            record["samples_note"] = out.note

    def _emit(
        self, record: BatchRecord, table: HostTable, procs: Processes, outputs: Outputs, light: bool = False
    ) -> float:
        """The record to memory and file, scalars to the loggers, rank 0's TensorBoard views. Returns the
        seconds of the work the budget spaces out and pays for apart (per-layer logging, figures).

        A light step's record goes out whole; its status scalars only when it is flagged or says something
        (a non-finite gradient, an event), and nothing else."""
        self._records.append(cast(dict[str, Any], record))
        if self._writer is not None:
            self._writer.write(record, flush=not self._writing_batch)
        if procs.is_zero and record["events"]:
            self._say_events(record, outputs)
        if light:
            said = record["flagged"] or record["events"] or record["nonfinite_layers"] or record.get("skipped")
            if said and outputs.log_scalars is not None:
                outputs.log_scalars(finite_only(self._status_scalars(record)), record["step"])
            return 0.0
        self.full_steps += 1
        if self.views is None:
            return 0.0
        self.views.observe(record["step"], table.values)
        assert self.planner is not None
        # per-layer scalars on their cadence: under spectra="auto" the budget spaces them by what they cost
        period = self.planner.log_period(self.config.log_every_n_steps)
        per_layer = self.full_steps - self._last_layer_log >= period
        t0 = time.perf_counter()
        if outputs.log_scalars is not None:
            keys = self._keys
            scalars = self._status_scalars(record)
            scalars.update(
                layer_scalars(table.values, table.present, self.metric_names, keys, self._component_rows, per_layer)
            )
            outputs.log_scalars(finite_only(scalars), record["step"])
        if procs.is_zero and per_layer:
            self._log_layer_runs(record, table, outputs)
        logging_seconds = 0.0
        if per_layer:
            self._last_layer_log = self.full_steps
            logging_seconds = time.perf_counter() - t0
            self.planner.observe_logging(logging_seconds)
        if not (procs.is_zero and outputs.writers):
            return logging_seconds
        period = self.config.figure_every_n_steps
        if period:
            # under spectra="auto" the budget spaces the figures by what they cost to draw
            period = self.planner.figure_period(period, self.views.figures_per_drawing)
        seconds = self.views.update(outputs.writers, record["step"], self.full_steps, period)
        self.planner.observe_figures(seconds)
        return logging_seconds + seconds

    def _status_scalars(self, record: BatchRecord) -> dict[str, float]:
        scalars = status_scalars(record, self.flagged_total, record.get("optimizer"))
        if self.config.action == "skip":
            scalars.update(skip_scalars(record, self.skipped_total))
        return scalars

    def _say_events(self, record: BatchRecord, outputs: Outputs) -> None:
        """Each event of the step (a shift the scorer adopted, a stability warning) as TensorBoard text and one
        log line (a warning for instability)."""
        lines = [f"step {record['step']}: {e['message']}" for e in record["events"]]
        for writer in outputs.writers:
            writer.add_text(EVENTS_TAG, "\n\n".join(lines), global_step=record["step"])
        for event, line in zip(record["events"], lines):
            if event.get("kind") == "instability":
                log.warning(f"gradspectra {line}")
            else:
                log.info(f"gradspectra {line}")

    def _log_layer_runs(self, record: BatchRecord, table: HostTable, outputs: Outputs) -> None:
        if not self.config.layer_runs or outputs.layer_runs_dir is None:
            return
        if self._layer_runs is None or self._layer_runs.base != outputs.layer_runs_dir:
            self._layer_runs = LayerRuns(outputs.layer_runs_dir)
        layers = [(w.component, w.index) for w in self.watched]
        width = max((w.index_width for w in self.watched), default=2)
        runs = layer_run_scalars(table.values, table.present, self.metric_names, layers, width)
        self._layer_runs.log(runs, record["step"])

    def _say_affordance(self, record: BatchRecord, procs: Processes) -> None:
        """Once, on rank 0 under ``spectra="auto"``, what the budget affords, when it has learned it."""
        if self.config.spectra != "auto" or self._affordance_said or self.planner is None:
            return
        spectra = record.get("spectra")
        kinds = list(spectra.values()) if spectra is not None else ["exact"] * len(record["metrics"])
        self._spectra_counts.append(sum(SpectrumSource(k).is_full for k in kinds))
        self._cheap_counts.append(sum(k == SpectrumSource.CHEAP or SpectrumSource(k).is_full for k in kinds))
        implied = len(self._implied_layers)
        self._formed_counts.append(implied - len(record.get("unmeasured_layers", [])))
        if len(self._spectra_counts) < _AFFORDS_AFTER:
            return
        per_step = sum(self._spectra_counts) / len(self._spectra_counts)
        cheap = sum(self._cheap_counts) / len(self._cheap_counts)
        period = self.planner.log_period(self.config.log_every_n_steps)
        text = self.planner.affords(len(self.watched), per_step, period, cheap)
        formed = sum(self._formed_counts) / len(self._formed_counts)
        if text is not None and implied and formed < implied - 0.05:
            text += (
                f"; it forms the full-weight gradient D^T X of {formed:.1f} of the {implied} frozen layers a step "
                f"(each about every {implied / max(formed, 1e-9):.0f} steps; the others have no values on that step)"
            )
        if text is not None and procs.is_zero:
            log.info(text)
        self._affordance_said = text is not None
        self.affordance = text

    def _act(self, record: BatchRecord, params: Callable[[], Iterable[nn.Parameter]] | None, procs: Processes) -> None:
        if not (record["flagged"] and self.config.action == "skip" and params is not None):
            return
        # torch optimizers leave a parameter without .grad untouched (momentum and weight decay included)
        for p in params():
            p.grad = None
        for scorer in (self._scorer_for(record.get("optimizer")), self._light_scorer_for(record.get("optimizer"))):
            if scorer is not None:
                scorer.forget_flag()  # the batch moved nothing: the next steps are no aftermath of it
        self.skipped_total += 1
        record["skipped"] = True
        if procs.is_zero:
            self._say_skipped(record)

    def _say_skipped(self, record: BatchRecord) -> None:
        """One line per skipped step on rank 0, at most one every ``_SKIP_MESSAGE_SECONDS`` (the rest counted)."""
        now = time.perf_counter()
        if now - self._last_skip_message < _SKIP_MESSAGE_SECONDS:
            self._skips_unsaid += 1
            return
        more = f" ({self._skips_unsaid} more skipped since the last message)" if self._skips_unsaid else ""
        reasons = "; ".join(record["reasons"]) or "flagged"
        log.warning(f"gradspectra skipped the optimizer step {record['step']}: {reasons}{more}")
        self._last_skip_message, self._skips_unsaid = now, 0

    # ------------------------------------------------------------------ end, state, summary

    def finish(self, step: int, outputs: Outputs | None, is_zero: bool) -> str | None:
        """At the end of training (rank 0 gets the summary table, also written to TensorBoard)."""
        self._flush_light()
        if not is_zero:
            return None
        table = self.summary(self.config.summary_top_k)
        if outputs is not None and outputs.writers and self.views is not None:
            self.views.finish(outputs.writers, step, table)
        if self.config.verbose:
            print(table)
        return table

    def close(self) -> None:
        try:
            self._flush_light()  # no record is lost (an exception, a teardown)
        except Exception as err:  # closing must not fail (it may run while an exception unwinds)
            error = f"{type(err).__name__}: {err}"
            warnings.warn(f"gradspectra could not record the last light steps: {error}", stacklevel=2)
        if self.samples is not None:
            self.samples.close()
            self.samples = None
        if self.implied is not None:
            self.implied.close()
            self.implied = None
        if self.factors is not None:
            self.factors.close()
            self.factors = None
            self.runner.factors = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._layer_runs is not None:
            self._layer_runs.close()
            self._layer_runs = None

    def state_dict(self) -> dict[str, Any]:
        self._flush_light()  # the scorers' state after every step measured
        state: dict[str, Any] = {
            "version": 1,
            "layer_keys": [w.key for w in self.watched],
            "metric_names": list(self.metric_names),
            "spectrum": None if self.spectrum is None else {k: v.cpu() for k, v in self.spectrum.state_dict().items()},
            "scorer": None if self.scorer is None else self.scorer.state_dict(),
            "stability": None if self.stability is None else self.stability.state_dict(),
        }
        if self.sample_scorer is not None:
            state["samples"] = self.sample_scorer.state_dict()
        if self.optimizer_scorers:
            state["optimizer_scorers"] = {k: v.state_dict() for k, v in self.optimizer_scorers.items()}
        if self.light_scorers:
            state["light_scorers"] = {k: v.state_dict() for k, v in self.light_scorers.items()}
        state.update({name: getattr(self, name) for name in _COUNTERS})
        # the last step measured before this checkpoint: a resume sets later records aside
        state["last_step"] = self.last_step
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the streaming state is applied once the layers are known and its device is (the first step)
        self._pending_state = dict(state_dict)
        for name in _COUNTERS:
            setattr(self, name, int(state_dict.get(name, 0)))
        last_step = state_dict.get("last_step")
        self.resume_after = self.last_step = int(last_step) if last_step is not None else None
        if self.scorer is not None and state_dict.get("scorer") is not None:
            self.scorer.load_state_dict(state_dict["scorer"])
        if self.stability is not None and state_dict.get("stability") is not None:
            self.stability.load_state_dict(state_dict["stability"])
        if self.sample_scorer is not None and state_dict.get("samples") is not None:
            self.sample_scorer.load_state_dict(state_dict["samples"])
        for k, state in (state_dict.get("optimizer_scorers") or {}).items():
            scorer = self._scorer_for(int(k))
            if scorer is not None:
                scorer.load_state_dict(state)
        for k, state in (state_dict.get("light_scorers") or {}).items():
            light = self.config.make_light_scorer()
            if light is not None:
                light.load_state_dict(state)
                self.light_scorers[int(k)] = light

    def summary(self, top: int = 10) -> str:
        """A text report: counts, then the ``top`` highest-scoring batches (from the records in memory)."""
        head = (
            f"gradspectra: {self.steps_monitored} steps monitored, {self.flagged_total} flagged"
            + (f", {self.skipped_total} skipped" if self.config.action == "skip" else "")
            + (f", {self.shift_total} shifts adopted (see the records' events)" if self.shift_total else "")
            + (
                f", {self.aftermath_total} {'step' if self.aftermath_total == 1 else 'steps'} not flagged as the"
                " aftermath of a flagged one"
                if self.aftermath_total
                else ""
            )
            + (f", {self.instability_total} stability warnings" if self.instability_total else "")
            + f", {self.nonfinite_total} with non-finite gradients, {self.missing_grad_total} missing layer gradients"
            + f"; monitor time {self.monitor_seconds:.2f} s"
        )
        if self.record_path is not None:
            head += f"\nrecords: {self.record_path}"
        records = list(self.batch_records)  # (the light steps not recorded yet first)
        warnings_ = instability_lines(records)
        if warnings_:
            head += "\nstability warnings:\n" + "\n".join(f"  {line}" for line in warnings_)
        return head + "\n" + flagged_table(records, top)
