"""The batch record: one JSON object per monitored optimizer step, appended to ``batches.jsonl``."""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, overload

RECORD_FILENAME = "batches.jsonl"


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None`` (JSON has no NaN), tensors/numpy scalars become floats."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    return value


def record_to_json(record: Mapping[str, Any]) -> str:
    """One line of ``batches.jsonl`` (strict JSON: NaN and Inf written as ``null``)."""
    try:  # most records are plain and finite: one pass, no copy (on a fast step the copy is what costs)
        return json.dumps(record, allow_nan=False, separators=(", ", ": "))
    except (ValueError, TypeError):  # a non-finite float, a tensor or a numpy scalar: cleaned first
        return json.dumps(_clean(record), allow_nan=False, separators=(", ", ": "))


class RecordWriter:
    """Appends records to a JSONL file, each line flushed as it is written (or with the few records made together),
    so the file can be tailed live.

    The file is opened in append mode: a resumed run continues the same file (see
    :func:`set_aside_records_after` for the records of steps the resume runs again).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fh: IO[str] | None = None

    def write(self, record: Mapping[str, Any], flush: bool = True) -> None:
        """One line; ``flush=False`` leaves it buffered until :meth:`flush` (records written together)."""
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across steps
        self._fh.write(record_to_json(record) + "\n")
        if flush:
            self._fh.flush()

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class RecordBuffer:
    """The newest ``maxlen`` records in memory (the file on disk keeps them all)."""

    def __init__(self, maxlen: int) -> None:
        self._records: deque[dict[str, Any]] = deque(maxlen=maxlen)

    def append(self, record: dict[str, Any]) -> None:
        self._records.append(record)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, i: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        """A record by position (negative from the newest), or a list of them for a slice."""
        if isinstance(i, slice):
            return list(self._records)[i]
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"records are indexed by an int or a slice, got {type(i).__name__}")
        return self._records[i]

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        self._records.extend(records)


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a ``batches.jsonl`` file, in order.

    A truncated last line (a run killed mid-write) is ignored; a malformed line anywhere else, or a line
    that is JSON but not an object, raises ``ValueError`` naming the line, since that is damage (or not a
    records file), not an interrupted write.
    """
    with open(path, encoding="utf-8") as fh:
        lines = [line.strip() for line in fh]
    while lines and not lines[-1]:
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not a JSON record: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is not a JSON record: a {type(record).__name__}, not an object")
        out.append(record)
    return out


def set_aside_records_after(path: str | os.PathLike[str], step: int) -> Path | None:
    """Move the records of steps after ``step`` from ``path`` to a sibling file; return it (or ``None``).

    A run resumed from a checkpoint taken after step ``step`` runs the later steps again: their
    records in the file come from a timeline that was abandoned. They are moved, not deleted, to
    ``<stem>.after-step-<step>.jsonl`` next to ``path`` (appended if it exists), so the main file
    holds each step once and nothing is lost. A line that is not a JSON record (a write cut short by
    the crash) is moved too. The main file is replaced atomically.
    """
    path = Path(path)
    if not path.exists():
        return None
    keep: list[str] = []
    moved: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            text = line.rstrip("\n")
            if not text.strip():
                continue
            try:
                record_step = json.loads(text).get("step")
            except (json.JSONDecodeError, AttributeError):
                record_step = None
            if isinstance(record_step, int) and record_step <= step:
                keep.append(text)
            else:
                moved.append(text)
    if not moved:
        return None
    aside = path.with_name(f"{path.stem}.after-step-{step}{path.suffix}")
    with open(aside, "a", encoding="utf-8") as fh:
        fh.writelines(t + "\n" for t in moved)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(t + "\n" for t in keep)
    os.replace(tmp, path)
    return aside
