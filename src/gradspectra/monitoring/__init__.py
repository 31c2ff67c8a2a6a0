"""The framework-free monitoring engine behind every front door (Lightning, transformers, a plain loop)."""

from gradspectra.monitoring.budget import OverheadBudget, Plan
from gradspectra.monitoring.config import (
    ACTIONS,
    INSTABILITY_ACTIONS,
    SPECTRA,
    Action,
    InstabilityAction,
    MonitorConfig,
    Spectra,
)
from gradspectra.monitoring.distributed import Processes, all_reduce_sum, default_process_group, layer_owners
from gradspectra.monitoring.engine import (
    Collected,
    GradientAnomalyError,
    InstabilityError,
    MonitorEngine,
    Outputs,
    StepInputs,
)
from gradspectra.monitoring.planner import Planner
from gradspectra.monitoring.records import BatchRecord, HostTable, assemble_record
from gradspectra.monitoring.samples import PER_SAMPLE, PerSample, SampleResult, SampleStage
from gradspectra.monitoring.sources import SpectrumSource
from gradspectra.monitoring.spectra import SpectraResult, SpectraRunner

__all__ = [
    "ACTIONS",
    "INSTABILITY_ACTIONS",
    "PER_SAMPLE",
    "SPECTRA",
    "Action",
    "BatchRecord",
    "Collected",
    "GradientAnomalyError",
    "HostTable",
    "InstabilityAction",
    "InstabilityError",
    "MonitorConfig",
    "MonitorEngine",
    "Outputs",
    "OverheadBudget",
    "PerSample",
    "Plan",
    "Planner",
    "Processes",
    "SampleResult",
    "SampleStage",
    "Spectra",
    "SpectraResult",
    "SpectraRunner",
    "SpectrumSource",
    "StepInputs",
    "all_reduce_sum",
    "assemble_record",
    "default_process_group",
    "layer_owners",
]
