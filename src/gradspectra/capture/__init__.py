"""Which parameters are watched and how their gradients are read: selection, layer names, gradient matrices."""

from gradspectra.capture.factors import FactorCapture
from gradspectra.capture.naming import LAYER_CONTAINERS, WRAPPER_SEGMENTS, parse_layer_name, parse_layer_names
from gradspectra.capture.samples import SampleCapture
from gradspectra.capture.selection import DEFAULT_MODULE_TYPES, Selection, check_selection_args, select_parameters
from gradspectra.capture.watched import WatchedParameter, group_by_component

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "LAYER_CONTAINERS",
    "WRAPPER_SEGMENTS",
    "FactorCapture",
    "SampleCapture",
    "Selection",
    "WatchedParameter",
    "check_selection_args",
    "group_by_component",
    "parse_layer_name",
    "parse_layer_names",
    "select_parameters",
]
