"""The `gradspectra` command run as a user runs it (a subprocess): clear errors with exit status 2 for paths it
cannot read, `--version`, help text, and the report's views (non-finite steps first, flagged, skipped, ids)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import gradspectra
from gradspectra.reporting import RecordWriter


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradspectra.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def record(step: int, score: float | None, **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "step": step,
        "epoch": 0,
        "batch_idx": step,
        "score": score,
        "flagged": False,
        "reasons": [],
        "loss": 0.5,
        "metrics": {},
        "sample_ids": None,
        "z": {},
        "threshold": None,
        "nonfinite_layers": [],
        "missing_layers": [],
    }
    base.update(extra)
    return base


def write_run(path: Path) -> Path:
    """A run with a NaN step in warm-up (score None), an Inf step after it (written as null), a skipped
    flagged step with twelve sample ids, and clean steps."""
    writer = RecordWriter(path)
    nan_reason = "non-finite gradient in 1 layer: fc/layer_01"
    writer.write(record(0, None))
    writer.write(record(1, None, flagged=True, reasons=[nan_reason], nonfinite_layers=["fc/layer_01"]))
    writer.write(record(2, 1.5))
    writer.write(
        record(
            3,
            9.0,
            flagged=True,
            skipped=True,
            reasons=["nuclear_norm high in 2/4 layers (z=6.1)"],
            sample_ids=list(range(100, 112)),
        )
    )
    writer.write(record(4, float("inf"), flagged=True, reasons=["non-finite loss (nan)"]))
    writer.write(record(5, 0.5))
    writer.close()
    return path


def assert_clear_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("gradspectra report: ")
    for fragment in fragments:
        assert fragment in result.stderr


def test_missing_path_and_folders_give_clear_errors(tmp_path: Path) -> None:
    assert_clear_error(run_cli("report", str(tmp_path / "missing.jsonl")), "missing.jsonl: no such file or folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clear_error(
        run_cli("report", str(empty)),
        "is a folder without a records file",
        str(empty / "batches.jsonl"),
        str(empty / "gradspectra" / "batches.jsonl"),
    )
    # a log root with a run further down: the message points to it
    deep = tmp_path / "logs" / "demo" / "version_0" / "gradspectra"
    deep.mkdir(parents=True)
    write_run(deep / "batches.jsonl")
    assert_clear_error(run_cli("report", str(tmp_path / "logs")), str(deep / "batches.jsonl"))


def test_a_folder_finds_its_records(tmp_path: Path) -> None:
    # the run's log folder (<log dir>/gradspectra/batches.jsonl) and the gradspectra folder itself
    records = write_run(tmp_path / "version_0" / "gradspectra" / "batches.jsonl")
    for folder in (tmp_path / "version_0", records.parent):
        result = run_cli("report", str(folder))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(
            f"{records}: 6 records, 3 flagged, 2 with non-finite gradients or loss, 1 skipped"
        )


def test_damaged_or_foreign_files_give_clear_errors(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text('{"step": 0}\nnot json\n{"step": 2}\n', encoding="utf-8")
    assert_clear_error(run_cli("report", str(damaged)), "cannot read", "line 2")
    foreign = tmp_path / "list.jsonl"
    foreign.write_text("[1, 2]\n", encoding="utf-8")
    assert_clear_error(run_cli("report", str(foreign)), "line 1 is not a JSON record")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    assert_clear_error(run_cli("report", str(binary)), "cannot read")


def test_version_and_help() -> None:
    version = run_cli("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"gradspectra {gradspectra.__version__}"
    help_text = run_cli("report", "--help").stdout
    for option, words in [
        ("--top", "rows to show"),
        ("--flagged", "only flagged steps"),
        ("--skipped", "skipped"),
        ("--ids", "every sample id"),
    ]:
        line = next(line for line in help_text.splitlines() if line.strip().startswith(option))
        assert words in line + help_text.split(line, 1)[1][:200], option


def _rows(stdout: str) -> list[list[str]]:
    """The table rows (after the dashed line) as split columns."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip() or line.startswith("("):
            break
        rows.append(line.split())
    return rows


def test_report_puts_nonfinite_steps_first(tmp_path: Path) -> None:
    result = run_cli("report", str(write_run(tmp_path / "batches.jsonl")), "--top", "4")
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    # the NaN step of the warm-up and the Inf step (null in the file) head the table, then the top scores
    assert [row[0] for row in rows] == ["1", "4", "3", "2"]
    assert rows[0][3] == rows[1][3] == "NaN/Inf"
    assert "non-finite gradient in 1 layer: fc/layer_01" in result.stdout
    assert "non-finite loss (nan)" in result.stdout
    assert rows[2][3:6] == ["9.00", "yes", "yes"]  # score, flag, skip
    assert rows[3][3:6] == ["1.50", "no", "no"]


def test_report_flagged_skipped_and_ids(tmp_path: Path) -> None:
    path = str(write_run(tmp_path / "batches.jsonl"))
    flagged = run_cli("report", path, "--flagged")
    assert [row[0] for row in _rows(flagged.stdout)] == ["1", "4", "3"]
    skipped = run_cli("report", path, "--skipped")
    assert [row[0] for row in _rows(skipped.stdout)] == ["3"]
    # the table shows six ids; --ids lists all twelve of the row
    assert "samples: 100, 101, 102, 103, 104, 105, ... (+6)" in skipped.stdout
    ids = run_cli("report", path, "--skipped", "--ids")
    assert ids.returncode == 0
    assert "step 3: " + ", ".join(str(i) for i in range(100, 112)) in ids.stdout
    none_skipped = tmp_path / "clean.jsonl"
    writer = RecordWriter(none_skipped)
    writer.write(record(0, 1.0))
    writer.close()
    result = run_cli("report", str(none_skipped), "--skipped", "--ids")
    assert result.returncode == 0 and "(no skipped steps)" in result.stdout
    assert "no sample ids" in run_cli("report", str(none_skipped), "--ids").stdout


@pytest.mark.parametrize("bad", ["0", "x"])
def test_top_must_be_positive(tmp_path: Path, bad: str) -> None:
    result = run_cli("report", str(write_run(tmp_path / "batches.jsonl")), "--top", bad)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_report_lists_stability_warnings_apart_from_the_table(tmp_path: Path) -> None:
    path = tmp_path / "batches.jsonl"
    writer = RecordWriter(path)
    message = "instability: the gradients are growing: gradient norm up 5.1x in 11 steps (...)"
    for step in range(8):
        # the warning's step has a low batch score: the table of the top 2 would not show it
        events = [{"kind": "instability", "message": message}] if step == 6 else []
        writer.write(record(step, 0.1 if step == 6 else float(step), events=events))
    writer.close()
    result = run_cli("report", str(path), "--top", "2")
    assert result.returncode == 0, result.stderr
    assert f"stability warnings:\n  step 6: {message}" in result.stdout
    assert [row[0] for row in _rows(result.stdout)] == ["7", "5"]


def test_report_samples_view_lists_the_highest_scoring_samples(tmp_path: Path) -> None:
    path = tmp_path / "batches.jsonl"
    writer = RecordWriter(path)
    entries = [
        {"index": 0, "id": "a", "score": 1.2, "reasons": [], "metrics": {}},
        {"index": 1, "id": "b", "score": 7.5, "reasons": ["gradient norm 9x the batch median (z=7.5)"], "metrics": {}},
        {"index": 2, "id": None, "score": 4.0, "reasons": ["effective rank 0.3x the batch median"], "metrics": {}},
    ]
    writer.write(record(0, 9.0, flagged=True, samples=entries))
    writer.write(record(1, 0.5))
    writer.close()
    result = run_cli("report", str(path), "--samples", "2")
    assert result.returncode == 0, result.stderr
    view = result.stdout.split("samples (highest score first):", 1)[1].splitlines()
    assert view[1:4] == [
        "step 0:",
        "  sample 1 id b: score 7.5: gradient norm 9x the batch median (z=7.5)",
        "  sample 2: score 4.0: effective rank 0.3x the batch median",
    ]
    assert "per_sample" in run_cli("report", str(write_run(tmp_path / "old.jsonl")), "--samples").stdout
