"""The contract frozen before the engine refactor: record keys and TensorBoard tags of short real runs.

Later issues add keys, metrics and tags: this file's data is then updated on purpose, in the same commit
(regenerate with ``GRADSPECTRA_UPDATE_GOLDEN=1 pytest tests/callbacks/test_golden.py``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradspectra import GradientSpectrumMonitor
from gradspectra.reporting import read_records

from .conftest import TinyBert, loader, trainer_kwargs

GOLDEN = Path(__file__).parent / "data" / "golden_contract.json"


def _contract(tmp_path: Path, spectra: str) -> dict[str, Any]:
    monitor = GradientSpectrumMonitor(
        spectra=spectra, figure_every_n_steps=3, warmup_steps=5, sample_id_key="sample_id"  # type: ignore[arg-type]
    )
    logger = TensorBoardLogger(str(tmp_path / spectra), name="tb")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, logger=logger), callbacks=[monitor])
    trainer.fit(TinyBert(), loader())
    records = read_records(Path(logger.log_dir) / "gradspectra" / "batches.jsonl")
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    # monitor_ms and the record's values vary run to run; which keys and tags exist does not
    return {
        "record_keys": sorted({k for r in records for k in r}),
        "first_record_keys": sorted(records[0]),
        "layer_keys": sorted(records[0]["metrics"]),
        "scalar_tags": sorted(t for t in tags["scalars"] if not re.match(r"^(train_loss|epoch)$", t)),
        "image_tags": sorted(tags["images"]),
        "text_tags": sorted(tags["tensors"]),
        "state_keys": sorted(monitor.state_dict()),
        "state_key": monitor.state_key,
    }


@pytest.mark.parametrize("spectra", ["exact", "estimate"])
def test_record_keys_and_tags_are_the_frozen_contract(tmp_path: Path, spectra: str) -> None:
    got = _contract(tmp_path, spectra)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("GRADSPECTRA_UPDATE_GOLDEN"):
        golden[spectra] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert got == golden[spectra]


def test_state_key_survives_a_longer_default_metric_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """A metric added to the defaults by a later release must not orphan the checkpoints of default monitors."""
    from gradspectra.functional import spectral

    frozen = json.loads(GOLDEN.read_text())["exact"]["state_key"]
    assert GradientSpectrumMonitor().state_key == frozen
    monkeypatch.setattr(spectral, "METRIC_NAMES", (*spectral.METRIC_NAMES, "participation_ratio"))
    grown = GradientSpectrumMonitor()
    assert grown.metric_names[-1] == "participation_ratio"
    assert grown.state_key == frozen
    # an explicit list still names its metrics, so two monitors with different lists can coexist
    assert "['effective_rank']" in GradientSpectrumMonitor(metrics=["effective_rank"]).state_key
