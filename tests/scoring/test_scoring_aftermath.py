"""BatchScorer's aftermath rule: the steps right after a far-out flagged batch, moved the same way and fading, are
that batch's aftermath (an event, not a flag); a bad batch repeated, another kind of bad batch, or a change after a
step back to normal is still flagged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gradspectra.scoring import BatchScorer, ScoreResult

from .streams import SyntheticRun

WARMUP = 20


def scorer_after_warmup(seed: int, **options: object) -> tuple[SyntheticRun, BatchScorer]:
    run = SyntheticRun(seed=seed)
    scorer = BatchScorer(warmup_steps=WARMUP, **options)  # type: ignore[arg-type]
    for _ in range(120):
        scorer.score(run.step(), loss=run.loss())
    assert not scorer.in_warmup
    return run, scorer


def feed(run: SyntheticRun, scorer: BatchScorer, shifts: list[dict[str, float] | None]) -> list[ScoreResult]:
    return [scorer.score(run.step(shift), loss=run.loss()) for shift in shifts]


def kinds(result: ScoreResult) -> list[str]:
    return [e["kind"] for e in result.events]


# a far-out batch (norms 40 sigma up), then the model returning: the norms 14 and 12 sigma up, then back to normal
# (a third step still out would make four in a row: a shift, see the last tests)
SPIKE_AND_RETURN = [{"frobenius_norm": 40.0}, {"frobenius_norm": 14.0}, {"frobenius_norm": 12.0}]


def test_the_fading_steps_after_a_far_out_batch_are_its_aftermath_not_flags() -> None:
    run, scorer = scorer_after_warmup(seed=51)
    results = feed(run, scorer, [*SPIKE_AND_RETURN, *[None] * 40])
    spike, *after = results[:3]
    assert spike.flagged and spike.reasons[0].startswith("frobenius_norm high in")
    for r in after:
        # the premise: each is far over the threshold, in the same term and the same way
        assert r.score is not None and r.threshold is not None and r.score > r.threshold
        assert r.z["frobenius_norm"] > 0
        assert not r.flagged and not r.reasons and kinds(r) == ["aftermath"]
    first = after[0].events[0]["message"]
    assert first.startswith("aftermath: frobenius_norm high 1 step after a flagged batch")
    assert "not flagged" in first
    assert after[1].events[0]["message"].startswith("aftermath: frobenius_norm high 2 steps after")
    # no shift (the change faded) and the aftermath did not teach the baseline: the clean steps after are quiet
    assert not any(e["kind"] == "shift" for r in results for e in r.events)
    assert np.mean([r.flagged for r in results[3:]]) <= 0.05


def test_without_the_rule_the_same_steps_are_flagged() -> None:
    # the premise of the test above: the steps after the spike are anomalous for the scorer
    run, scorer = scorer_after_warmup(seed=51, aftermath_steps=None)
    results = feed(run, scorer, SPIKE_AND_RETURN)
    assert results[0].flagged and results[1].flagged and results[2].flagged
    assert not any(kinds(r) == ["aftermath"] for r in results)


def test_a_bad_batch_repeated_as_strongly_is_still_flagged() -> None:
    # a second batch of the same kind moves the same term as far again: not a fading aftermath
    run, scorer = scorer_after_warmup(seed=52)
    results = feed(run, scorer, [{"frobenius_norm": 40.0}, {"frobenius_norm": 36.0}, {"frobenius_norm": 40.0}])
    assert all(r.flagged for r in results)
    assert not any(r.events for r in results)


def test_another_kind_of_bad_batch_in_the_aftermath_is_flagged() -> None:
    run, scorer = scorer_after_warmup(seed=53)
    results = feed(run, scorer, [{"frobenius_norm": 40.0}, {"frobenius_norm": 12.0}, {"effective_rank": -12.0}])
    assert results[0].flagged and kinds(results[1]) == ["aftermath"]
    assert results[2].flagged and any(reason.startswith("effective_rank low") for reason in results[2].reasons)


def test_a_step_back_to_normal_ends_the_aftermath() -> None:
    # a clean step between: the next far-out step is judged on its own, as a new bad batch
    run, scorer = scorer_after_warmup(seed=54)
    results = feed(run, scorer, [{"frobenius_norm": 40.0}, None, {"frobenius_norm": 12.0}])
    assert abs(results[1].z["frobenius_norm"]) < 2.0  # the premise: back to normal
    assert results[0].flagged and not results[1].flagged and results[2].flagged
    assert not any(r.events for r in results)


def test_the_aftermath_lasts_aftermath_steps() -> None:
    run, scorer = scorer_after_warmup(seed=55, aftermath_steps=1)
    results = feed(run, scorer, SPIKE_AND_RETURN)
    assert kinds(results[1]) == ["aftermath"]
    assert results[2].flagged and not results[2].events  # 2 steps after: a flag again


def test_a_lasting_change_after_a_far_out_batch_is_still_adopted_as_a_shift() -> None:
    # the aftermath steps stay in the run of flags: a level that stays (here 12 sigma up for good) becomes a shift
    run, scorer = scorer_after_warmup(seed=56)
    results = feed(run, scorer, [{"frobenius_norm": 40.0}, *[{"frobenius_norm": 12.0}] * 40])
    assert results[0].flagged
    assert [kinds(r) for r in results[1:3]] == [["aftermath"], ["aftermath"]]
    assert kinds(results[3]) == ["shift"]
    assert np.mean([r.flagged for r in results[4:]]) <= 0.05


def test_a_checkpoint_in_the_aftermath_continues_it_exactly() -> None:
    run, scorer = scorer_after_warmup(seed=57)
    feed(run, scorer, SPIKE_AND_RETURN[:2])
    state = json.loads(json.dumps(scorer.state_dict()))  # as a checkpoint stores it
    assert state["spike"] is not None
    restored = BatchScorer(warmup_steps=WARMUP)
    restored.load_state_dict(state)
    step = run.step({"frobenius_norm": 12.0})
    loss = run.loss()
    a, b = scorer.score(step, loss=loss), restored.score(step, loss=loss)
    assert kinds(a) == kinds(b) == ["aftermath"]
    assert a.score == pytest.approx(b.score) and a.events == b.events


def test_an_older_checkpoint_without_a_spike_loads_and_flags() -> None:
    run, scorer = scorer_after_warmup(seed=58)
    feed(run, scorer, SPIKE_AND_RETURN[:1])
    state = scorer.state_dict()
    del state["spike"]
    restored = BatchScorer(warmup_steps=WARMUP)
    restored.load_state_dict(state)
    result = restored.score(run.step({"frobenius_norm": 14.0}), loss=run.loss())
    assert result.flagged and not result.events  # no spike known: judged on its own


@pytest.mark.parametrize("value", [0, -1, 1001, 2.5, True])
def test_aftermath_steps_out_of_range_is_rejected_by_name(value: object) -> None:
    with pytest.raises((ValueError, TypeError), match="aftermath_steps"):
        BatchScorer(aftermath_steps=value)  # type: ignore[arg-type]


ARITHMETIC = Path(__file__).parent / "data" / "arithmetic_aftermath.npz"


def replay_arithmetic(scorer: BatchScorer) -> tuple[list[bool], list[bool], int]:
    """The flags of clean and of corrupted steps, and the aftermath events, of the recorded causal-LM run."""
    data = np.load(ARITHMETIC)
    layers = [str(n) for n in data["layer_names"]]
    metrics = [str(n) for n in data["metric_names"]]
    clean: list[bool] = []
    bad: list[bool] = []
    events = 0
    for values, loss, kind in zip(data["metrics"], data["loss"], data["corruption"]):
        step = {layer: dict(zip(metrics, map(float, row))) for layer, row in zip(layers, values)}
        result = scorer.score(step, loss=float(loss))
        if result.score is None:
            continue
        (bad if str(kind) else clean).append(result.flagged)
        events += kinds(result).count("aftermath")
    return clean, bad, events


def test_a_recorded_causal_lm_run_loses_its_false_flags_after_bad_batches_not_the_bad_ones() -> None:
    # data/arithmetic_aftermath.npz: what the monitor recorded (exact spectra, float32) in the detection grid's
    # arithmetic-high-05-s0 run (`benchmarks/detection.py --grid`, a tuning-half run): a tiny Llama pretrained on
    # clean arithmetic, 150 steps at the "high" learning rate, 8 of them corrupted batches of mixed kinds;
    # the 29 linear layers' Frobenius norm, nuclear norm and effective rank, and the loss. A corrupted batch with
    # a loss 15x the clean one's moves the model, and the clean batches after it come out flagged without the rule
    clean_off, bad_off, events_off = replay_arithmetic(BatchScorer(warmup_steps=WARMUP, aftermath_steps=None))
    clean_on, bad_on, events_on = replay_arithmetic(BatchScorer(warmup_steps=WARMUP))
    assert len(clean_on) == len(clean_off) > 100 and len(bad_on) == len(bad_off) == 8
    assert events_off == 0 and events_on >= 3
    assert sum(clean_off) >= sum(clean_on) + 3
    assert sum(bad_on) == sum(bad_off) >= 4


def test_a_step_still_out_between_keeps_the_aftermath_going() -> None:
    # the step between is under the threshold but still >= 2 out the same way: the change goes on in it
    run, scorer = scorer_after_warmup(seed=59)
    results = feed(run, scorer, [{"frobenius_norm": 40.0}, {"frobenius_norm": 1.5}, {"frobenius_norm": 12.0}])
    between = results[1]
    assert not between.flagged and 2.0 <= between.z["frobenius_norm"] < between.threshold  # the premise
    assert results[0].flagged and kinds(results[2]) == ["aftermath"]


def test_a_term_that_turned_the_other_way_is_no_aftermath() -> None:
    # effective rank far up, then far (less) down: not the same change
    run, scorer = scorer_after_warmup(seed=60)
    results = feed(run, scorer, [{"effective_rank": 40.0}, {"effective_rank": -12.0}])
    assert results[0].flagged and results[1].flagged and not results[1].events


def test_a_term_moved_further_than_at_the_flag_is_no_aftermath() -> None:
    # the loss (the flagged step's strongest term) fell to a tenth, but the norms went further than then
    run, scorer = scorer_after_warmup(seed=61)
    first = scorer.score(run.step({"frobenius_norm": 12.0}), loss=run.loss(factor=20.0))
    second = scorer.score(run.step({"frobenius_norm": 30.0}), loss=run.loss())
    assert first.flagged and first.z["loss"] > first.z["frobenius_norm"]  # the premise: the loss was strongest
    assert second.flagged and not second.events


def test_a_strongest_term_not_measured_now_has_not_fallen() -> None:
    # the flagged step's loss was its strongest term; a step without a loss says nothing of its fall
    run, scorer = scorer_after_warmup(seed=62)
    first = scorer.score(run.step({"frobenius_norm": 40.0}), loss=run.loss(factor=20.0))
    second = scorer.score(run.step({"frobenius_norm": 36.0}))
    assert first.flagged and first.z["loss"] > first.z["frobenius_norm"]
    assert second.flagged and not second.events
    assert all("nan" not in e["message"] for e in second.events)


def test_a_non_finite_step_or_forget_flag_ends_the_aftermath() -> None:
    for end in ("nonfinite", "forget"):
        run, scorer = scorer_after_warmup(seed=63)
        assert scorer.score(run.step({"frobenius_norm": 40.0}), loss=run.loss()).flagged
        if end == "nonfinite":
            bad = run.step()
            bad[next(iter(bad))]["frobenius_norm"] = float("nan")
            assert scorer.score(bad, loss=run.loss()).flagged
        else:
            scorer.forget_flag()  # e.g. the flagged batch's optimizer step was skipped: it moved nothing
        result = scorer.score(run.step({"frobenius_norm": 12.0}), loss=run.loss())
        assert result.flagged and not result.events, end


def test_a_shift_ends_the_aftermath() -> None:
    # four steps of a lasting change make a shift; a fading step after it is judged against the new level
    run, scorer = scorer_after_warmup(seed=64, shift_after=2)
    results = feed(run, scorer, [{"frobenius_norm": 30.0}] * 3)
    assert kinds(results[2]) == ["shift"]
    after = scorer.score(run.step({"frobenius_norm": 60.0}), loss=run.loss())
    assert after.flagged and not after.events
