"""Which parameters are watched and how their gradients are read: selection, layer names, gradient matrices."""

from gradspectra.capture.factors import FactorCapture
from gradspectra.capture.implied import ImpliedGradients
from gradspectra.capture.naming import LAYER_CONTAINERS, WRAPPER_SEGMENTS, parse_layer_name, parse_layer_names
from gradspectra.capture.samples import SampleCapture
from gradspectra.capture.selection import (
    DEFAULT_MODULE_TYPES,
    GRADIENTS,
    Gradients,
    Selection,
    adapter_wrappers,
    base_path,
    check_selection_args,
    peft_models,
    select_parameters,
)
from gradspectra.capture.watched import WatchedParameter, group_by_component

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "GRADIENTS",
    "LAYER_CONTAINERS",
    "WRAPPER_SEGMENTS",
    "FactorCapture",
    "Gradients",
    "ImpliedGradients",
    "SampleCapture",
    "Selection",
    "WatchedParameter",
    "adapter_wrappers",
    "base_path",
    "check_selection_args",
    "group_by_component",
    "parse_layer_name",
    "parse_layer_names",
    "peft_models",
    "select_parameters",
]
