"""The stability benchmark's own rules: when a run broke, and which warnings and peer fires can be about it."""

from __future__ import annotations

import math
from typing import Any

import pytest

from reference import load_benchmark


@pytest.fixture(scope="module")
def bench() -> Any:
    return load_benchmark("stability")


def test_a_loss_back_at_chance_for_good_is_a_break_noisy_steps_are_not(bench: Any) -> None:
    start = [0.69, 0.68, 0.66, 0.6, 0.5]
    learned = [0.2, 0.3, 0.25, 0.1, 0.35, 0.2, 0.3, 0.15, 0.25, 0.2] * 3
    noisy = learned[:]
    for t in (3, 4, 12, 20):  # single bad steps, even near chance, are not a break
        noisy[t] = 0.72
    assert bench.break_step(start + noisy) is None
    broken = start + learned + [0.69, 0.7, 0.68, 0.71, 0.69, 0.7, 0.72, 0.69, 0.7, 0.69]
    assert bench.break_step(broken) == len(start) + len(learned)
    # non-finite losses count as above the bar
    assert bench.break_step(start + learned + [math.nan] * 10) == len(start) + len(learned)
    assert bench.break_step(start + learned + [None] * 10) == len(start) + len(learned)
    # a pretrained model that stays at its level: twice its best is the bar, not its start
    flat = [0.27, 0.3, 0.25, 0.28, 0.26] + [0.3, 0.26, 0.28, 0.33, 0.25] * 6
    assert bench.break_step(flat) is None
    assert bench.break_step([*flat, 1.0, 2.0, 2.8, 2.1, 1.9, 1.5, 1.2, 1.4, 1.3, 1.1]) == len(flat)


def test_which_warnings_can_be_about_the_break(bench: Any) -> None:
    assert bench.valid_from("ramp1.2", 60) == bench.RAMP_START  # before the ramp, the run is the stable one
    assert bench.valid_from("hot", 100) == 100 - bench.EARLY
    assert bench.valid_from("stable", None) > 10**6  # a run that did not break: every warning is false
    run = bench.RunResult(
        name="minilm-ramp1.2-s3",
        model="minilm",
        setting="ramp1.2",
        seed=3,
        steps=70,
        broke=60,
        warned=30,
        message="",
        peers={},
        peer_false={},
    )
    assert run.false_warning
    run.warned = 55
    assert not run.false_warning


def test_the_minilmhf_model_is_transformers_classifier_with_a_new_head(bench: Any) -> None:
    import torch

    from gradspectra.demo.data import review_batches
    from gradspectra.demo.models import TokenizedBatches, load_tokenizer

    module = bench.hf_classifier()
    head = module.model.classifier.weight
    assert head.shape == (2, 384) and 0.01 < float(head.std()) < 0.03  # new, at transformers' std 0.02
    planned = review_batches(1, batch_size=4, corrupt_fraction=0.0, seed=0)
    batch = TokenizedBatches(planned, load_tokenizer(), max_length=bench.MAX_LENGTH)[0]
    loss = module.training_step(batch, 0)
    assert loss.ndim == 0 and 0.5 < float(loss) < 0.9  # about ln 2 for a new 2-class head
    loss.backward()
    assert all(p.grad is not None for p in module.model.classifier.parameters())
    assert torch.isfinite(module.model.bert.encoder.layer[0].attention.self.query.weight.grad).all()
