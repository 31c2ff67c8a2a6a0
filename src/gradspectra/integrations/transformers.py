"""``GradientSpectrumCallback``: the transformers ``Trainer`` front door of the monitoring engine.

Needs the ``hf`` extra (``pip install "gradspectra[hf]"``: transformers >= 4.45, whose ``Trainer`` calls
``on_pre_optimizer_step``, and accelerate).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradspectra.monitoring import MonitorConfig, MonitorEngine, Processes, StepInputs, all_reduce_sum
from gradspectra.monitoring.events import EventFiles
from gradspectra.monitoring.records import BatchRecord
from gradspectra.reporting import RECORD_FILENAME, RecordBuffer

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ExportableState
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "gradspectra.integrations.transformers needs the `hf` extra (transformers>=4.45 and accelerate): "
        'pip install "gradspectra[hf]"'
    ) from err

_STATE_ATTRIBUTE = "saved_state"


class GradientSpectrumCallback(TrainerCallback, ExportableState):  # type: ignore[misc]
    """Gradient spectra of every watched layer in a transformers ``Trainer`` run.

    Takes the options of :class:`gradspectra.GradientSpectrumMonitor`, with the same defaults and checks.
    Gradients are read in ``on_pre_optimizer_step``: accumulated over ``gradient_accumulation_steps``,
    all-reduced under DDP, unscaled under fp16, and **after** the Trainer's clipping (``max_grad_norm``,
    default 1.0): a clipped step's gradient is the unclipped one times ``max_grad_norm / norm``, so its
    norms (nuclear, spectral, Frobenius) are scaled down by that factor while its ranks and ratios
    (effective and stable rank, top-sv ratio) are unchanged. Set ``max_grad_norm=0`` to read unclipped values.

    Where things go: records to ``<output_dir>/gradspectra/batches.jsonl`` (``output_dir`` of the
    ``TrainingArguments``, or this callback's ``output_dir=`` option as the folder), TensorBoard event
    files to the same folder (world process zero only), so ``tensorboard --logdir <output_dir>`` shows
    them beside the Trainer's own.

    The loss: a ``TrainerCallback`` is not given it, so the callback reads it from the model's own output
    (``outputs.loss`` of each training forward: a hook on the model, removed at the end of training). A
    step's loss is the mean of its micro-batches' losses, or their sum where the Trainer passes
    ``num_items_in_batch``, which is what the Trainer back-propagates and reports (a causal LM divides by
    the whole step's token count, so the sum is the step's mean; transformers' classifiers take the argument
    and ignore it, so under accumulation the record, like the Trainer, has the sum of the micro-batches'
    means); under DDP each rank's is combined as in the other doors. Where the model returns no loss (a
    ``compute_loss_func``, label smoothing, ``return_dict=False``) or the Trainer runs ``nn.DataParallel``
    (``n_gpu > 1``), the score rests on the gradients alone and each record says ``"loss_seen": false``. A
    ``compute_loss`` override that calls the model with labels gets the model's own loss in the record, not
    what the override returns. The batch is not seen: ``sample_ids`` stay ``None``.

    Resume: the callback's state travels in the checkpoint's ``trainer_state.json`` (transformers'
    stateful callbacks) and is restored at ``on_train_begin`` of
    ``trainer.train(resume_from_checkpoint=...)``.
    """

    def __init__(self, **options: Any) -> None:
        self.options = dict(options)
        self.config = MonitorConfig(**options)
        if isinstance(self.config.stability, Mapping):  # the checked options, a copy (saved with the state)
            self.options["stability"] = dict(self.config.stability)
        if self.config.sample_id_key is not None:
            warnings.warn(
                "`sample_id_key` has no effect in the transformers callback: Trainer callbacks do not see the batch",
                stacklevel=2,
            )
        # (light steps' records made at once: a TrainerCallback hears of no exception, so records waiting would be
        # lost when training raises)
        self.engine = MonitorEngine(self.config)
        self.saved_state: str | None = None  # set by transformers when it rebuilds the callback from a checkpoint
        self._events: EventFiles | None = None
        self._procs = Processes()
        self._loss_tap: _LossTap | None = None

    @property
    def batch_records(self) -> RecordBuffer:
        return self.engine.batch_records

    @property
    def record_path(self) -> Path | None:
        return self.engine.record_path

    # ------------------------------------------------------------------ transformers hooks

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("`GradientSpectrumCallback` needs the model: the Trainer passes it to on_train_begin")
        self._procs = Processes(int(args.process_index), int(args.world_size), all_reduce_sum)
        self.engine.attach(model, self._procs.world, owner=type(self).__name__)
        if self._loss_tap is not None:
            self._loss_tap.remove()
        # (with num_items_in_batch counted over every rank, each rank's sum is its share of the global mean:
        # times the world, the engine's mean over ranks is that mean)
        across = bool(getattr(args, "average_tokens_across_devices", False)) and self._procs.world > 1
        # (nn.DataParallel's replicas would all report to one hook, each on its own device: no loss then)
        single = int(getattr(args, "n_gpu", 1) or 1) <= 1
        self._loss_tap = _LossTap(model, float(self._procs.world) if across else 1.0) if single else None
        chosen = self.config.output_dir
        base = Path(chosen) if chosen is not None else Path(args.output_dir or "trainer_output") / "gradspectra"
        self.engine.open(base / RECORD_FILENAME, bool(state.is_world_process_zero), model)
        self._events = EventFiles(base, bool(state.is_world_process_zero))
        saved = self.saved_state or _saved_state(state, type(self).__name__)
        if saved is not None and state.global_step > 0:
            self.engine.load_state_dict(_decode(saved))
            self.engine.set_aside_after_resume()
        self.saved_state = None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.engine.begin_step(state.global_step)
        if self._loss_tap is not None:
            self._loss_tap.reset()  # (nothing from before this step's first forward)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = kwargs.get("optimizer")
        _unscale(optimizer)
        loss = self._loss_tap.take() if self._loss_tap is not None else None
        inputs = StepInputs(step=state.global_step, epoch=int(state.epoch or 0), loss=loss, loss_seen=loss is not None)
        model = kwargs.get("model")

        def params() -> Any:
            if optimizer is not None:
                return (p for group in optimizer.param_groups for p in group["params"])
            return model.parameters() if model is not None else ()

        outputs = self._events.outputs() if self._events is not None else None
        self.engine.step(inputs, self._procs, outputs, params)
        if self.engine.stop_requested:
            control.should_training_stop = True  # instability_action="stop": after this step

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        outputs = self._events.outputs() if self._events is not None else None
        self.engine.finish(max(0, state.global_step - 1), outputs, bool(state.is_world_process_zero))
        self._close()

    def _close(self) -> None:
        if self._loss_tap is not None:
            self._loss_tap.remove()
            self._loss_tap = None
        self.engine.close()
        if self._events is not None:
            self._events.close()

    # ------------------------------------------------------------------ checkpoint state

    def state(self) -> dict[str, Any]:
        """transformers' stateful-callback format: JSON-safe ``args`` (the options that are) and the
        engine's state, serialised, under ``attributes``."""
        return {
            "args": {k: v for k, v in self.options.items() if _json_safe(v)},
            "attributes": {_STATE_ATTRIBUTE: _encode(self.engine.state_dict())},
        }

    def summary(self, top: int = 10) -> str:
        return self.engine.summary(top)


class _LossTap:
    """The loss of each training forward of ``model``, read from its output (``outputs["loss"]``), for the
    step it belongs to. Evaluation forwards (``no_grad`` or eval mode) are left out; a failure to read is
    no loss, never an error in the user's training."""

    def __init__(self, model: nn.Module, summed_scale: float = 1.0) -> None:
        self.summed_scale = summed_scale
        # a running sum and count (not a list): after an exception the Trainer tells no callback, and the
        # hooks stay until the next on_train_begin; what they keep meanwhile stays one number
        self._total: Tensor | None = None
        self._count = 0
        self._summed = False  # the Trainer passed num_items_in_batch: the micro-batches' losses add up
        self._items = False
        self._failed = False  # a loss of this step could not be added: the step has none
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after),
        ]

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._items = kwargs.get("num_items_in_batch") is not None

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or not isinstance(output, Mapping):
            return
        loss = output.get("loss")
        if not (isinstance(loss, Tensor) and loss.numel() == 1 and loss.is_floating_point()):
            return
        try:  # (a forward hook that raised would stop the user's training)
            value = loss.detach().reshape(()).float()
            self._total = value if self._total is None else self._total + value.to(self._total.device)
            self._count += 1
            self._summed = self._summed or self._items
        except Exception:  # the step then has no loss; the training goes on
            self._failed = True

    def take(self) -> Tensor | None:
        """The step's loss (on the model's device; no host sync here) and a fresh start; ``None`` if none."""
        total, count, summed, failed = self._total, self._count, self._summed, self._failed
        self.reset()
        if total is None or failed:
            return None
        return total * self.summed_scale if summed else total / count

    def reset(self) -> None:
        self._total, self._count, self._summed, self._failed = None, 0, False, False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _unscale(optimizer: Any) -> None:
    """Undo the fp16 loss scale if the Trainer has not (older transformers without clipping).

    ``GradScaler.unscale_`` refuses a second call for the same step, which is how we know it was done.
    """
    scaler = getattr(optimizer, "scaler", None)  # accelerate's optimizer wrapper keeps the GradScaler
    inner = getattr(optimizer, "optimizer", None)
    if scaler is None or inner is None or not scaler.is_enabled():
        return
    with contextlib.suppress(RuntimeError):  # already unscaled for this step
        scaler.unscale_(inner)


def _saved_state(state: TrainerState, name: str) -> str | None:
    entry = (getattr(state, "stateful_callbacks", None) or {}).get(name)
    if isinstance(entry, list):  # several instances of the callback: the first one's
        entry = entry[0] if entry else None
    if not isinstance(entry, dict):
        return None
    saved = (entry.get("attributes") or {}).get(_STATE_ATTRIBUTE)
    return saved if isinstance(saved, str) else None


def _encode(state: dict[str, Any]) -> str:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode(text: str) -> dict[str, Any]:
    # our own checkpoint (numpy arrays in the scorer's state need the full unpickler)
    state = torch.load(io.BytesIO(base64.b64decode(text)), weights_only=False)
    return dict(state)


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(os.fspath(value) if isinstance(value, os.PathLike) else value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, os.PathLike)


__all__ = ["BatchRecord", "GradientSpectrumCallback"]
