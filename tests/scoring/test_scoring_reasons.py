"""The reasons of a flagged step say what happened, in words that are true as written.

A level reason counts the layers past ``layer_threshold`` over the layers that were scored, and says
how many watched layers were not measured that step (a spectral budget defers most of them); a level
that moved in many layers together without any one layer crossing is said to be just that, never
"in 0/N layers".
"""

from __future__ import annotations

import re

import numpy as np

from gradspectra.scoring import BatchScorer

from .streams import METRICS, SyntheticRun

STABLE = METRICS.index("stable_rank")
EFFECTIVE = METRICS.index("effective_rank")


def warmed(run: SyntheticRun, steps: int = 120, **kwargs: object) -> BatchScorer:
    scorer = BatchScorer(warmup_steps=20, **kwargs)  # type: ignore[arg-type]
    for _ in range(steps):
        scorer.score(run.step(), loss=run.loss())
    return scorer


def test_a_level_shift_that_no_single_layer_carries_is_not_counted_as_zero_layers() -> None:
    # every layer's stable rank exactly 2 sigma above its usual level: each layer's own z is about 2,
    # under layer_threshold (3), while the level term (their mean) is far outside its clean spread
    run = SyntheticRun(seed=7, common=0.0)
    scorer = warmed(run)
    step = run.step()
    for i, layer in enumerate(run.layer_names):
        step[layer]["stable_rank"] = float(np.exp(run.base[i, STABLE] + 2.0 * run.sigma))
    result = scorer.score(step, loss=run.loss())
    assert result.flagged
    reason = next(r for r in result.reasons if r.startswith("stable_rank"))
    assert not re.search(r" 0/\d+ ", reason), reason
    assert reason == (
        f"stable_rank high across {run.n_layers} layers together, no single layer past z=+3 "
        f"(z={result.z['stable_rank']:.1f})"
    )


def test_a_reason_says_how_many_layers_were_measured_when_most_were_deferred() -> None:
    # 38 watched layers; on the flagged step the budget measured effective rank in one of them only
    # (the others report just their Frobenius norm), and that one is far too high
    run = SyntheticRun(seed=8, n_layers=38)
    scorer = warmed(run)
    step = run.step()
    for i, layer in enumerate(run.layer_names):
        if i == 5:
            step[layer]["effective_rank"] = float(np.exp(run.base[i, EFFECTIVE] + 30.0 * run.sigma))
        else:
            step[layer] = {"frobenius_norm": step[layer]["frobenius_norm"]}
    result = scorer.score(step, loss=run.loss())
    assert result.flagged
    reason = next(r for r in result.reasons if r.startswith("effective_rank"))
    assert reason == (
        "effective_rank high in 1/1 measured layers (37 of 38 not measured this step; "
        f"z={result.z['effective_rank']:.1f})"
    )


def test_a_fully_measured_step_keeps_the_short_form() -> None:
    run = SyntheticRun(seed=9)
    scorer = warmed(run)
    result = scorer.score(run.step({"effective_rank": -20.0}), loss=run.loss())
    assert result.flagged
    assert result.reasons[0] == (
        f"effective_rank low in {run.n_layers}/{run.n_layers} layers (z={result.z['effective_rank']:.1f})"
    )


def test_non_finite_and_new_layers_are_told_apart_from_unmeasured_ones() -> None:
    run = SyntheticRun(seed=10)
    scorer = warmed(run)
    step = run.step({"effective_rank": -20.0})
    step[run.layer_names[0]]["effective_rank"] = float("nan")  # non-finite
    del step[run.layer_names[1]]  # not measured
    step["brand_new/layer_00"] = dict(step[run.layer_names[2]])  # no baseline yet
    result = scorer.score(step, loss=run.loss())
    assert result.flagged and result.reasons[0].startswith("non-finite gradient in 1 layer")
    reason = next(r for r in result.reasons if r.startswith("effective_rank"))
    n = run.n_layers + 1
    assert reason.startswith(f"effective_rank low in 10/10 scored layers (1 of {n} not measured this step; ")
    assert f"1 of {n} non-finite; 1 of {n} without a baseline yet; z=" in reason


def test_a_profile_reason_says_how_many_layers_were_measured() -> None:
    run = SyntheticRun(seed=13)
    scorer = warmed(run)
    step = run.step()
    up, down = run.layer_names[1], run.layer_names[3]
    step[up]["nuclear_norm"] *= float(np.exp(20 * run.sigma))
    step[down]["nuclear_norm"] *= float(np.exp(-20 * run.sigma))
    for layer in run.layer_names[8:]:
        del step[layer]["nuclear_norm"]
    result = scorer.score(step, loss=run.loss())
    assert result.flagged
    reason = next(r for r in result.reasons if r.startswith("nuclear_norm layer profile"))
    assert reason.startswith(f"nuclear_norm layer profile unusual (4 of {run.n_layers} not measured this step; z=")
