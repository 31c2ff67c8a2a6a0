"""The monitor's options, checked in one place: every front door takes the same arguments and errors."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from torch import nn

from gradspectra.capture.selection import Gradients, check_selection_args
from gradspectra.functional import METRIC_NAMES, Method, check_method, check_metric_names
from gradspectra.monitoring.budget import OverheadBudget
from gradspectra.monitoring.samples import PER_SAMPLE, PerSample
from gradspectra.scoring import BatchScorer, StabilityDetector

Action = Literal["log", "skip", "raise"]
ACTIONS: tuple[str, ...] = get_args(Action)
InstabilityAction = Literal["log", "raise", "stop"]
INSTABILITY_ACTIONS: tuple[str, ...] = get_args(InstabilityAction)
Spectra = Literal["auto", "exact", "estimate"]
SPECTRA: tuple[str, ...] = get_args(Spectra)


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ``ValueError`` naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


def nonnegative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0, got {value!r}")
    return value


def choice(name: str, value: Any, allowed: Sequence[str]) -> Any:
    if value not in allowed:
        raise ValueError(f"`{name}` can be {', '.join(allowed)}, got {value!r}")
    return value


@dataclass(frozen=True)
class MonitorConfig:
    """Every option of the monitor (see :class:`gradspectra.GradientSpectrumMonitor` for their meaning).

    Built and checked once; a bad value raises ``ValueError``/``TypeError`` naming the argument, the
    allowed values and what was received.

    Example:
        >>> MonitorConfig(spectra="exact").metric_names[:2]
        ('nuclear_norm', 'spectral_norm')
        >>> MonitorConfig(every_n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: `every_n_steps` must be a positive int, got 0
    """

    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    regex: str | re.Pattern[str] | None = None
    module_types: Sequence[type[nn.Module]] | None = None
    predicate: Callable[[str, nn.Parameter, nn.Module], bool] | None = None
    include_embeddings: bool = False
    gradients: Gradients = "auto"
    metrics: Sequence[str] | None = None
    method: Method = "auto"
    spectra: Spectra = "auto"
    max_overhead: float = 0.03
    every_n_steps: int = 1
    log_every_n_steps: int = 1
    figure_every_n_steps: int = 100
    heatmap_steps: int = 200
    output_dir: str | os.PathLike[str] | None = None
    max_records_in_memory: int = 10_000
    scoring: bool = True
    warmup_steps: int = 20
    false_flag_rate: float = 0.01
    action: Action = "log"
    sample_id_key: str | None = None
    summary_top_k: int = 10
    verbose: bool = True
    distribute: bool = True
    cpu_threads: int | None = 1
    factored: bool = True
    layer_runs: bool = False
    cheap_spectra: bool = True
    stability: bool | Mapping[str, Any] = True
    instability_action: InstabilityAction = "log"
    per_sample: PerSample | None = None
    metric_names: tuple[str, ...] = field(init=False, default=METRIC_NAMES)

    def __post_init__(self) -> None:
        check_selection_args(**self.selection_kwargs)  # the errors select_parameters would raise at fit()
        set_ = object.__setattr__
        set_(self, "metric_names", check_metric_names(self.metrics))
        check_method(self.method)
        choice("spectra", self.spectra, SPECTRA)
        OverheadBudget([], self.max_overhead)  # the budget's own checks of max_overhead
        set_(self, "max_overhead", float(self.max_overhead))
        choice("action", self.action, ACTIONS)
        if self.action != "log" and not self.scoring:
            raise ValueError(f"`action={self.action!r}` needs `scoring=True`, got scoring={self.scoring!r}")
        nonnegative_int("figure_every_n_steps", self.figure_every_n_steps)
        if self.sample_id_key is not None and not isinstance(self.sample_id_key, str):
            raise TypeError(f"`sample_id_key` must be a str or None, got {self.sample_id_key!r}")
        for name in ("every_n_steps", "log_every_n_steps", "heatmap_steps", "max_records_in_memory", "summary_top_k"):
            positive_int(name, getattr(self, name))
        if self.cpu_threads is not None:
            positive_int("cpu_threads", self.cpu_threads)
        set_(self, "distribute", bool(self.distribute))
        set_(self, "factored", bool(self.factored))
        set_(self, "layer_runs", bool(self.layer_runs))
        if not isinstance(self.cheap_spectra, bool):
            raise TypeError(f"`cheap_spectra` must be a bool, got {self.cheap_spectra!r}")
        if isinstance(self.stability, Mapping):
            set_(self, "stability", _stability_options(self.stability))
        elif not isinstance(self.stability, bool):
            raise TypeError(
                f"`stability` must be a bool or a dict of StabilityDetector options, got {self.stability!r}"
            )
        choice("instability_action", self.instability_action, INSTABILITY_ACTIONS)
        if self.instability_action != "log" and self.stability is False:
            raise ValueError(
                f"`instability_action={self.instability_action!r}` needs the stability detector "
                "(`stability=True` or a dict of its options), got stability=False"
            )
        if self.per_sample is not None:
            if self.per_sample not in PER_SAMPLE:
                raise ValueError(f"`per_sample` can be None, {', '.join(PER_SAMPLE)}, got {self.per_sample!r}")
            if self.per_sample == "flagged" and not self.scoring:
                raise ValueError(
                    "`per_sample='flagged'` needs `scoring=True` (the flags come from the scorer), got scoring=False"
                )
        if self.output_dir is not None:
            set_(self, "output_dir", Path(self.output_dir))
        self.make_scorer()  # the scorer checks its own arguments, so a bad value fails here too

    @property
    def selection_kwargs(self) -> dict[str, Any]:
        """The arguments of :func:`gradspectra.capture.select_parameters`."""
        return {
            "include": self.include,
            "exclude": self.exclude,
            "regex": self.regex,
            "module_types": self.module_types,
            "predicate": self.predicate,
            "include_embeddings": self.include_embeddings,
            "gradients": self.gradients,
        }

    def make_scorer(self) -> BatchScorer | None:
        if not self.scoring:
            return None
        return BatchScorer(warmup_steps=self.warmup_steps, false_flag_rate=self.false_flag_rate)

    def make_light_scorer(self) -> BatchScorer | None:
        """The light steps' scorer (``spectra="auto"`` on a fast step): every layer's Frobenius norm and the loss,
        fed every step, with the main scorer's warm-up and false-flag rate and no layer profile."""
        if not self.scoring:
            return None
        return BatchScorer(
            warmup_steps=self.warmup_steps,
            false_flag_rate=self.false_flag_rate,
            metrics=("frobenius_norm",),
            profile_metrics=(),
        )

    def make_stability(self) -> StabilityDetector | None:
        if self.stability is False:
            return None
        return StabilityDetector(**(self.stability if isinstance(self.stability, Mapping) else {}))


def _stability_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``stability={...}``: the options of :class:`StabilityDetector`, checked now (the errors name them)."""
    known = [n for n, p in inspect.signature(StabilityDetector).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted((k for k in options if k not in known), key=repr)
    if unknown:
        raise TypeError(
            f"`stability` has no option {', '.join(map(repr, unknown))}; its options are {', '.join(known)}"
        )
    out = dict(options)
    try:
        StabilityDetector(**out)
    except ValueError as err:
        raise ValueError(f"`stability`: {err}") from err
    return out
