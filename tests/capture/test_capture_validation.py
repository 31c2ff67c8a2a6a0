"""Selection arguments are checked when the monitor is built, not at fit() (issue 16, item 9)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from torch import nn

from gradspectra import GradientSpectrumMonitor
from gradspectra.capture import check_selection_args, select_parameters
from gradspectra.monitoring import MonitorConfig

BAD = [
    ({"include": []}, ValueError, "`include` must hold at least one glob (use None for no filter), got []"),
    ({"include": 5}, TypeError, "`include` must be a glob string or a sequence of glob strings, got 5"),
    ({"exclude": [3]}, TypeError, "`exclude` must be a glob string or a sequence of glob strings, got [3]"),
    (
        {"module_types": ["Linear"]},
        TypeError,
        "`module_types` must be a sequence of nn.Module subclasses, got ['Linear']",
    ),
    (
        {"module_types": []},
        ValueError,
        "`module_types` must hold at least one type (use None for the defaults), got []",
    ),
    (
        {"regex": "("},
        ValueError,
        "`regex` does not compile (missing ), unterminated subpattern at position 0), got '('",
    ),
    ({"regex": 5}, TypeError, "`regex` must be a str or a compiled re.Pattern, got 5"),
    ({"predicate": 3}, TypeError, "`predicate` must be a callable (name, param, module) -> bool, got 3"),
    ({"include_embeddings": "yes"}, TypeError, "`include_embeddings` must be a bool, got 'yes'"),
    ({"gradients": "lora"}, ValueError, "`gradients` can be auto, implied, parameters, got 'lora'"),
]

FRONT_DOORS: dict[str, Callable[..., Any]] = {
    "GradientSpectrumMonitor": GradientSpectrumMonitor,
    "MonitorConfig": MonitorConfig,
    "check_selection_args": check_selection_args,
    "select_parameters": lambda **kw: select_parameters(nn.Linear(2, 2), **kw),
}


@pytest.mark.parametrize("door", list(FRONT_DOORS))
@pytest.mark.parametrize(("kwargs", "error", "message"), BAD)
def test_bad_selection_argument_fails_at_construction(
    door: str, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    # the same error and message everywhere: at construction now, as select_parameters raised at fit()
    with pytest.raises(error, match=re.escape(message)):
        FRONT_DOORS[door](**kwargs)


def test_good_selection_arguments_are_accepted() -> None:
    kwargs: dict[str, Any] = {
        "include": ["*.q_proj.weight", "*.v_proj.weight"],
        "exclude": "model.layers.0.*",
        "regex": re.compile(r"layers\.\d+\."),
        "module_types": nn.Linear,
        "predicate": lambda name, param, module: True,
        "include_embeddings": True,
        "gradients": "implied",
    }
    check_selection_args(**kwargs)
    assert MonitorConfig(**kwargs).selection_kwargs == kwargs
    GradientSpectrumMonitor(include="*.weight", exclude=[], module_types=[nn.Linear, nn.Conv2d])
