"""Every script in examples/ runs, shortened by its arguments, in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gradspectra.reporting import read_records

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_every_example_is_tested() -> None:
    tested = {"minimal.py", "demo.py", "fast_vs_slow_thinking.py", "hf_trainer.py", "plain_loop.py", "lora.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_minimal(tmp_path: Path) -> None:
    out = run("minimal.py", cwd=tmp_path)
    assert "layer" in out or "nuclear_norm" in out
    records = read_records(next(tmp_path.glob("gradspectra_runs/minimal/**/batches.jsonl")))
    assert len(records) == 20


def test_demo_short(tmp_path: Path) -> None:
    out = run("demo.py", "--steps", "26", "--max-length", "16", "--out", "runs", cwd=tmp_path)
    assert "tensorboard --logdir" in out
    assert "Most suspicious batches" in out
    records = read_records(next(tmp_path.glob("runs/demo/version_0/gradspectra/batches.jsonl")))
    assert len(records) == 26
    assert any(path.name.startswith("events.out.tfevents") for path in (tmp_path / "runs/demo/version_0").iterdir())


@pytest.mark.timeout(400)
def test_fast_vs_slow_thinking(tmp_path: Path) -> None:
    out = run("fast_vs_slow_thinking.py", "--steps", "4", "--layers", "2", "--out", "fs", cwd=tmp_path)
    assert "self_attn.q_proj" in out
    assert (tmp_path / "fs" / "nuclear_norm_by_layer.png").stat().st_size > 1000


def test_hf_trainer_short(tmp_path: Path) -> None:
    out = run("hf_trainer.py", "--steps", "8", "--max-length", "16", "--out", "hf", cwd=tmp_path)
    assert "tensorboard --logdir" in out
    records = read_records(tmp_path / "hf" / "gradspectra" / "batches.jsonl")
    assert [r["step"] for r in records] == list(range(8))
    assert "attention.self.query/layer_05" in records[0]["metrics"]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "hf" / "gradspectra").iterdir())


def test_plain_loop_short(tmp_path: Path) -> None:
    out = run("plain_loop.py", "--steps", "8", "--max-length", "16", "--out", "plain", cwd=tmp_path)
    assert "tensorboard --logdir" in out
    records = read_records(tmp_path / "plain" / "gradspectra" / "batches.jsonl")
    assert [r["step"] for r in records] == list(range(8))
    assert records[0]["sample_ids"] == list(range(16))
    assert all(r["loss"] > 0 for r in records)


def test_lora_short(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    out = run("lora.py", "--steps", "6", "--max-length", "16", "--out", "lr", cwd=tmp_path)
    assert "24 frozen layers measured by D^T X, 12 of them adapted" in out
    records = read_records(tmp_path / "lr" / "lora" / "version_0" / "gradspectra" / "batches.jsonl")
    assert [r["step"] for r in records] == list(range(6))
    assert records[0]["implied_layers"]["attention.self.query/layer_05"] == "default"
    assert records[0]["implied_layers"]["attention.output.dense/layer_05"] is None
    assert records[-1]["metrics"]["attention.self.query/layer_03"]["effective_rank"] > 8
