"""``GradientSpectrumTracker``: the plain PyTorch loop's front door of the monitoring engine."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from gradspectra.monitoring import MonitorConfig, MonitorEngine, Processes, StepInputs, all_reduce_sum
from gradspectra.monitoring.distributed import default_process_group
from gradspectra.monitoring.events import EventFiles
from gradspectra.monitoring.records import BatchRecord
from gradspectra.reporting import RECORD_FILENAME


class GradientSpectrumTracker:
    """Gradient spectra of a model trained by your own loop: call :meth:`step` between
    ``loss.backward()`` and ``optimizer.step()``.

    Args:
        model: the model (a ``DistributedDataParallel`` or FSDP wrapper is fine: the watched layers
            are chosen on the module inside).
        log_dir: TensorBoard event files go here (rank 0); the batch records to
            ``<log_dir>/gradspectra/batches.jsonl`` unless ``output_dir`` says otherwise.
        optimizer: with ``action="skip"``, the parameters whose ``.grad`` a flagged step drops (default:
            every parameter of ``model``).
        **options: the options of :class:`gradspectra.GradientSpectrumMonitor` (``include``, ``metrics``,
            ``spectra``, ``max_overhead``, ``action``, ...), with the same defaults and checks.

    Under ``torch.distributed`` (DDP, FSDP) every process creates a tracker and calls :meth:`step`;
    the spectral work is split across them as in the Lightning callback. With ``torch.amp.GradScaler``
    call ``scaler.unscale_(optimizer)`` before :meth:`step`, so that it reads unscaled gradients.

    Example::

        with GradientSpectrumTracker(model, log_dir="runs/plain") as tracker:
            for batch in loader:
                loss = model(**batch).loss
                loss.backward()
                record = tracker.step(loss=loss)     # None on steps that are not measured
                optimizer.step()
                optimizer.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        log_dir: str | os.PathLike[str] = "gradspectra_runs",
        *,
        optimizer: Optimizer | None = None,
        **options: Any,
    ) -> None:
        self.config = MonitorConfig(**options)
        self.engine = MonitorEngine(self.config)
        self.model = model
        self.optimizer = optimizer
        self.global_step = 0
        self.log_dir = Path(log_dir)
        rank, world = default_process_group()
        self.procs = Processes(rank, world, all_reduce_sum)
        module = getattr(model, "module", None)
        inner = module if isinstance(module, nn.Module) else model
        self.engine.attach(inner, world, owner=type(self).__name__)
        base = Path(self.config.output_dir) if self.config.output_dir is not None else self.log_dir / "gradspectra"
        self.engine.open(base / RECORD_FILENAME, rank == 0, model)
        self.events = EventFiles(self.log_dir, rank == 0)
        self.engine.begin_step(self.global_step)
        self._closed = False

    @property
    def batch_records(self) -> Any:
        """The newest records in memory (the file keeps them all)."""
        return self.engine.batch_records

    @property
    def should_stop(self) -> bool:
        """With ``instability_action="stop"``: a stability warning was given; end the training loop."""
        return self.engine.stop_requested

    @property
    def record_path(self) -> Path | None:
        return self.engine.record_path

    def step(
        self,
        loss: Tensor | float | None = None,
        *,
        sample_ids: Iterable[Any] | None = None,
        batch_idx: int | None = None,
        epoch: int | None = None,
    ) -> BatchRecord | None:
        """Measure the gradients as they are now, then count one optimizer step.

        Args:
            loss: the step's loss (its mean over accumulated micro-batches), for the score and the record.
            sample_ids: ids of the step's samples, listed in the record; under ``torch.distributed`` every
                rank's (gathered: pass them on every rank or on none).
            batch_idx, epoch: copied into the record.

        Returns:
            The step's record, ``None`` on a step that is not measured (``every_n_steps``).

        Raises:
            GradientAnomalyError: for a flagged step with ``action="raise"``.
            InstabilityError: at a stability warning with ``instability_action="raise"``.
        """
        if self._closed:
            raise RuntimeError("`GradientSpectrumTracker.step` called after `close()`")
        if isinstance(loss, Tensor):
            loss = loss.detach().float()
        inputs = StepInputs(
            step=self.global_step,
            epoch=epoch,
            batch_idx=batch_idx,
            loss=loss,
            sample_ids=list(sample_ids) if sample_ids is not None else [],
            share_ids=sample_ids is not None,
        )
        try:
            return self.engine.step(inputs, self.procs, self.events.outputs(), self._params)
        finally:
            self.global_step += 1
            self.engine.begin_step(self.global_step)

    def _params(self) -> Iterable[nn.Parameter]:
        if self.optimizer is not None:
            return (p for group in self.optimizer.param_groups for p in group["params"])
        return self.model.parameters()

    def summary(self, top: int = 10) -> str:
        return self.engine.summary(top)

    def close(self) -> None:
        """End of training: the summary (printed with ``verbose``, and written to TensorBoard), files closed."""
        if self._closed:
            return
        self._closed = True
        self.engine.finish(max(0, self.global_step - 1), self.events.outputs(), self.procs.is_zero)
        self.engine.close()
        self.events.close()

    def state_dict(self) -> dict[str, Any]:
        return {**self.engine.state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the records of steps after it are set aside (a resumed run repeats them)."""
        self.engine.load_state_dict(state_dict)
        self.global_step = int(state_dict.get("global_step", 0))
        self.engine.set_aside_after_resume()
        self.engine.begin_step(self.global_step)

    def __enter__(self) -> GradientSpectrumTracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.engine.close()
            self.events.close()
            self._closed = True
