"""Constructor-argument checks whose messages name the argument, the allowed range and the value received."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def check_int(
    name: str,
    value: Any,
    low: int,
    high: int | None = None,
    high_text: str | None = None,
    low_text: str | None = None,
) -> int:
    """``value`` as an int in ``[low, high]`` (``high=None``: unbounded); bools are refused.

    ``low_text``/``high_text`` name a bound that comes from another argument, e.g. ``"window=200"``.
    """
    upper = "inf)" if high is None else f"{high_text or high}]"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"`{name}` must be an integer in [{low_text or low}, {upper}, got {value!r}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float in the interval; the bracket style of the message follows ``*_open``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo = f"({low}" if low_open else f"[{low}"
        hi = "inf)" if math.isinf(high) else (f"{high})" if high_open else f"{high}]")
        raise ValueError(f"`{name}` must be a finite number in {lo}, {hi}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return value


def check_names(name: str, value: Any, *, allow_empty: bool) -> tuple[str, ...]:
    """A sequence of distinct non-empty strings (a lone string is refused: it would be read letter by letter)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"`{name}` must be a sequence of metric names (strings), got {value!r}")
    names = tuple(value)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"`{name}` must contain only non-empty strings, got {value!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"`{name}` must not repeat a name, got {value!r}")
    if not names and not allow_empty:
        raise ValueError(f"`{name}` must name at least one metric (or be None for all), got {value!r}")
    return names
