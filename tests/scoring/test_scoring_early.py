"""BatchScorer's early margin: while the baseline is young, a step is flagged only over a raised threshold; the
scorer learns from every step exactly as without the margin, so only what is reported changes."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from gradspectra.scoring import BatchScorer

from .streams import SyntheticRun, finetune_drift

WARMUP = 20


def twin_runs(margin: float, seed: int = 61, steps: int = 160) -> tuple[list, list, BatchScorer, BatchScorer]:
    """The same stream (a settling fine-tune, moderate and far-out bad steps early and late) through a scorer
    with the margin and one without."""
    run = SyntheticRun(seed=seed)
    rng = np.random.default_rng(seed)
    stream = []
    for t in range(steps):
        offsets, loss_factor = finetune_drift(t)
        shift = None
        if WARMUP <= t < WARMUP + 40 and t % 3 == 0:  # early, of every size: some between the two thresholds
            shift = {"effective_rank": 0.5 + 0.25 * (t - WARMUP)}
        elif t >= WARMUP + 40 and rng.random() < 0.12:
            metric = str(rng.choice(["nuclear_norm", "effective_rank", "frobenius_norm"]))
            shift = {metric: float(rng.choice([-1.0, 1.0]) * rng.uniform(3.0, 12.0))}
        loss = run.loss(loss_factor * (rng.uniform(1.5, 3.0) if t % 29 == 28 else 1.0))
        stream.append((run.step(shift, offset=offsets), loss))
    with_margin = BatchScorer(warmup_steps=WARMUP, early_margin=margin)
    without = BatchScorer(warmup_steps=WARMUP, early_margin=0.0)
    a = [with_margin.score(step, loss=loss) for step, loss in stream]
    b = [without.score(step, loss=loss) for step, loss in stream]
    return a, b, with_margin, without


def test_the_margin_changes_what_is_flagged_early_and_nothing_the_scorer_learns() -> None:
    a, b, with_margin, without = twin_runs(0.5)
    held = 0
    factors = []
    for t, (ra, rb) in enumerate(zip(a, b)):
        # every score and z is what it would be without the margin: the windows learnt the same
        assert ra.score == rb.score and ra.z == rb.z, t
        if rb.threshold is None:
            assert ra.threshold is None and ra.in_warmup
            continue
        assert ra.threshold is not None
        factor = ra.threshold / rb.threshold
        factors.append(factor)
        assert ra.flagged <= rb.flagged, t  # the margin only takes flags away
        if rb.flagged and not ra.flagged:
            held += 1
            assert rb.score is not None and rb.threshold < rb.score <= ra.threshold, t
            assert not ra.reasons and not ra.events, t
        elif ra.flagged:
            assert ra.reasons == rb.reasons and ra.score is not None and ra.score > ra.threshold, t
        else:
            assert ra.events == rb.events or not ra.events, t
    assert held >= 1  # the premise: some step over the plain threshold was not flagged
    # the first scored step: the windows hold 15 of 60 clean steps (5 warm-up steps only start the trends)
    assert factors[0] == pytest.approx(1.0 + 0.5 * (1.0 - 15 / 60), rel=1e-12)
    assert all(x >= y - 1e-12 for x, y in pairwise(factors))  # it only fades
    assert factors[-1] == 1.0  # and is gone once the windows took 60 clean steps
    late = next(t for t, f in enumerate(factors) if f == 1.0)
    assert late < 100
    # after that, the same flags
    scored = [(ra, rb) for ra, rb in zip(a, b) if rb.threshold is not None]
    assert [ra.flagged for ra, _ in scored[late:]] == [rb.flagged for _, rb in scored[late:]]
    assert any(ra.flagged for ra, _ in scored[late:])
    # and the same state
    sa, sb = with_margin.state_dict(), without.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if key not in ("flagged_steps", "held_at"):  # what was reported, not what was learnt
            assert np.array_equal(np.asarray(sa[key], dtype=object), np.asarray(sb[key], dtype=object)), key


def test_the_public_threshold_is_the_one_a_flag_must_exceed() -> None:
    run = SyntheticRun(seed=62)
    scorer = BatchScorer(warmup_steps=WARMUP, early_margin=1.0)
    for _ in range(WARMUP):
        scorer.score(run.step(), loss=run.loss())
    announced = scorer.threshold
    result = scorer.score(run.step(), loss=run.loss())
    assert announced is not None and result.threshold == announced
    plain = BatchScorer(warmup_steps=WARMUP, early_margin=0.0)
    run = SyntheticRun(seed=62)
    for _ in range(WARMUP):
        plain.score(run.step(), loss=run.loss())
    assert plain.threshold is not None
    assert announced == pytest.approx(plain.threshold * (1.0 + 1.0 * (1.0 - 15 / 60)), rel=1e-12)


@pytest.mark.parametrize("bad", [-0.1, 10.5, float("nan"), "0.5", True])
def test_early_margin_out_of_range_is_named(bad: object) -> None:
    with pytest.raises(ValueError, match="early_margin"):
        BatchScorer(early_margin=bad)  # type: ignore[arg-type]


def test_a_flag_under_the_margin_gives_the_reasons_it_would_give_without_it() -> None:
    # a far-out effective rank with a nuclear norm just over the plain threshold: that term is a reason either way
    between = 0
    for k in np.arange(2.0, 6.0, 0.25):
        results = []
        for margin in (0.5, 0.0):
            run = SyntheticRun(seed=5)
            scorer = BatchScorer(warmup_steps=WARMUP, early_margin=margin)
            for _ in range(WARMUP):
                scorer.score(run.step(), loss=run.loss())
            results.append(scorer.score(run.step({"effective_rank": -12.0, "nuclear_norm": float(k)}), loss=run.loss()))
        ra, rb = results
        assert ra.flagged and rb.flagged and ra.reasons == rb.reasons, k
        assert ra.threshold is not None and rb.threshold is not None
        if rb.threshold < ra.z["nuclear_norm"] <= ra.threshold:
            between += 1
            assert any(r.startswith("nuclear_norm high") for r in ra.reasons), k
    assert between >= 1  # the premise: a reason whose term lies between the two thresholds


def test_a_restart_of_the_baseline_is_reported_under_the_margin() -> None:
    run = SyntheticRun(seed=8)
    scorer = BatchScorer(warmup_steps=WARMUP, rebaseline_after=3, shift_after=None, aftermath_steps=None)
    for _ in range(WARMUP):
        scorer.score(run.step(), loss=run.loss())
    results = [scorer.score(run.step({"effective_rank": -2.7}), loss=run.loss()) for _ in range(3)]
    # the premise: each over the plain threshold (3.5 here) and under the raised one
    assert all(r.score is not None and r.threshold is not None and 3.5 < r.score <= r.threshold for r in results)
    assert [r.flagged for r in results] == [False, False, True]
    assert results[-1].reasons[-1] == "baseline restarted after 3 consecutive steps over the threshold (regime change?)"
    assert scorer.in_warmup and scorer.flagged_steps == 1


def test_the_margin_survives_a_checkpoint() -> None:
    a, _, scorer, _ = twin_runs(0.5, steps=40)  # still young: 40 steps, 15 + ~18 clean in the windows
    state = scorer.state_dict()
    assert state["held_at"] is None or isinstance(state["held_at"], float)
    clone = BatchScorer(warmup_steps=WARMUP, early_margin=0.5)
    clone.load_state_dict(state)
    assert clone.threshold == scorer.threshold and scorer.threshold is not None
    assert a[-1].threshold is not None and a[-1].threshold > scorer.threshold / 1.5  # a raised one, not 1.0 of it
    run = SyntheticRun(seed=99)
    for _ in range(30):
        step, loss = run.step(), run.loss()
        assert clone.score(step, loss=loss) == scorer.score(step, loss=loss)
