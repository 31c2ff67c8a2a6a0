"""The batch record file: strict JSON, appends, tolerates only a torn last line; the text table; the CLI report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gradspectra.cli import main
from gradspectra.reporting import (
    RecordBuffer,
    RecordWriter,
    custom_scalars_layout,
    flagged_table,
    read_records,
    set_aside_records_after,
)


def _record(step: int, score: float | None, flagged: bool = False) -> dict[str, object]:
    return {
        "step": step,
        "epoch": 0,
        "batch_idx": step,
        "score": score,
        "flagged": flagged,
        "reasons": ["nuclear_norm high in 3/4 layers (z=5.0)"] if flagged else [],
        "loss": 0.5,
        "metrics": {"fc/layer_00": {"nuclear_norm": float("nan"), "effective_rank": np.float64(2.5)}},
        "sample_ids": [step * 2, step * 2 + 1],
    }


def test_writer_appends_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "g" / "batches.jsonl"
    writer = RecordWriter(path)
    writer.write(_record(0, None))
    writer.write(_record(1, float("inf"), True))
    writer.close()
    again = RecordWriter(path)  # a resumed run appends
    again.write({**_record(2, 1.5), "loss": torch.tensor(0.25)})
    again.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    records = read_records(path)
    assert records[0]["metrics"]["fc/layer_00"] == {"nuclear_norm": None, "effective_rank": 2.5}
    assert records[1]["score"] is None and records[1]["flagged"] is True  # inf is not JSON
    assert records[2]["loss"] == 0.25


def test_lines_written_together_are_on_file_once_flushed(tmp_path: Path) -> None:
    # the light steps' records are written a few at a time, flushed once: a reader of the file (another
    # process tailing it) sees each line whole, the batch once it is flushed
    path = tmp_path / "batches.jsonl"
    writer = RecordWriter(path)
    writer.write(_record(0, 1.0))  # flushed at once
    assert len(read_records(path)) == 1
    for step in (1, 2, 3):
        writer.write(_record(step, 1.0), flush=False)
    writer.flush()
    assert [r["step"] for r in read_records(path)] == [0, 1, 2, 3]
    writer.close()
    writer.flush()  # nothing open: nothing to do


def test_read_records_torn_last_line_and_damage(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "sco')
    assert [r["step"] for r in read_records(path)] == [0, 1]
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_records(path)


def test_buffer_is_bounded() -> None:
    buf = RecordBuffer(3)
    for i in range(5):
        buf.append({"step": i})
    assert [r["step"] for r in buf] == [2, 3, 4]
    assert len(buf) == 3 and buf[-1]["step"] == 4
    # slices work as on a list (monitor.batch_records[-10:])
    assert [r["step"] for r in buf[1:]] == [3, 4]
    assert [r["step"] for r in buf[::-1]] == [4, 3, 2]
    assert buf[5:] == []
    with pytest.raises(IndexError):
        buf[3]
    with pytest.raises(TypeError, match="indexed by an int or a slice, got str"):
        buf["step"]  # type: ignore[call-overload]


def test_flagged_table_orders_by_score() -> None:
    records = [_record(0, None), _record(1, 2.0), _record(2, 9.0, True), _record(3, 4.0)]
    lines = flagged_table(records, top=2).splitlines()
    assert lines[2].split()[0] == "2" and "yes" in lines[2] and "samples: 4, 5" in lines[2]
    assert lines[3].split()[0] == "3"
    assert len(lines) == 4
    assert "warm-up" in flagged_table([_record(0, None)])
    shift = {**_record(4, 12.0), "events": [{"kind": "shift", "message": "shift: loss high for 4 steps in a row"}]}
    row = flagged_table([*records, shift], top=1).splitlines()[2]
    assert row.split()[:5] == ["4", "0", "4", "12.00", "no"] and "shift: loss high for 4 steps in a row" in row


def test_custom_scalars_layout_matches_tags() -> None:
    import re

    layout = custom_scalars_layout(["nuclear_norm"], ["attention.self.query"])
    pattern = layout["gradspectra: nuclear_norm"]["attention.self.query"][1][0]
    assert re.search(pattern, "grad_spectrum/nuclear_norm/attention.self.query/layer_03")
    assert not re.search(pattern, "grad_spectrum/nuclear_norm/attention.self.queryX/layer_03")
    assert not re.search(pattern, "grad_spectrum/effective_rank/attention.self.query/layer_03")


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "batches.jsonl"
    writer = RecordWriter(path)
    for i, score in enumerate([None, 1.0, 7.5]):
        writer.write(_record(i, score, flagged=score is not None and score > 5))
    writer.close()
    assert main(["report", str(path), "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "3 records, 1 flagged" in out
    assert out.index("7.50") < out.index("1.00")


def test_set_aside_moves_later_steps_and_a_cut_line_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "batches.jsonl"
    writer = RecordWriter(path)
    for step in range(6):
        writer.write({"step": step, "loss": float(step)})
    writer.close()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"step": 6, "lo')  # the crash cut this write short
    aside = tmp_path / "batches.after-step-10.jsonl"
    assert set_aside_records_after(path, 10) == aside  # nothing after step 10 but the cut line
    assert aside.read_text(encoding="utf-8") == '{"step": 6, "lo\n'
    assert [r["step"] for r in read_records(path)] == list(range(6))

    moved = set_aside_records_after(path, 3)
    assert moved == tmp_path / "batches.after-step-3.jsonl"
    assert [r["step"] for r in read_records(path)] == [0, 1, 2, 3]
    assert [r["step"] for r in read_records(moved)] == [4, 5]
    # a second resume from the same checkpoint appends to the same file; nothing to move is None
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"step": 4, "loss": 40.0}\n')
    assert set_aside_records_after(path, 3) == moved
    assert [r["loss"] for r in read_records(moved)] == [4.0, 5.0, 40.0]
    assert set_aside_records_after(path, 3) is None
    assert set_aside_records_after(tmp_path / "missing.jsonl", 3) is None


def test_a_plain_record_is_written_in_one_pass_like_a_cleaned_one() -> None:
    from gradspectra.reporting.records import _clean, record_to_json

    plain = {**_record(3, 1.5), "metrics": {"fc/layer_00": {"nuclear_norm": 2.0, "effective_rank": 2.5}}}
    assert record_to_json(plain) == json.dumps(_clean(plain), allow_nan=False, separators=(", ", ": "))
    # a numpy float32 (not JSON by itself) and a NaN take the cleaned route
    odd = {**plain, "loss": np.float32(0.5), "score": float("nan")}
    back = json.loads(record_to_json(odd))
    assert back["loss"] == 0.5 and back["score"] is None
