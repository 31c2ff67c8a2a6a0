"""BatchScorer on synthetic streams: detection both ways, layer profiles, calibration on clean data, slow and fast
drift, regime changes, poisoning, warm-up."""

from __future__ import annotations

import numpy as np
import pytest

from gradspectra.evaluation import auroc
from gradspectra.scoring import BatchScorer, ScoreResult

from .streams import METRICS, SyntheticRun, finetune_drift

WARMUP = 20
TERMS = {*METRICS, "loss", "nuclear_norm_profile"}


def warmed_up(run: SyntheticRun, scorer: BatchScorer, steps: int = 150) -> None:
    for _ in range(steps):
        scorer.score(run.step(), loss=run.loss())
    assert not scorer.in_warmup


def test_warmup_gives_no_score_and_no_flag() -> None:
    run = SyntheticRun(seed=0)
    scorer = BatchScorer(warmup_steps=WARMUP)
    results = []
    for t in range(WARMUP):
        # even a huge shift during warm-up is not flagged: there is no baseline to judge it by
        shift = {"effective_rank": 20.0} if t == 10 else None
        results.append(scorer.score(run.step(shift), loss=run.loss()))
    assert all(r.in_warmup and r.score is None and not r.flagged and not r.reasons for r in results)
    assert all(r.threshold is None for r in results)
    after = scorer.score(run.step(), loss=run.loss())
    assert not after.in_warmup and after.score is not None and after.threshold is not None
    assert set(after.z) == TERMS


@pytest.mark.parametrize(("k", "direction"), [(6.0, "high"), (-6.0, "low")])
def test_effective_rank_shift_in_all_layers_is_flagged_with_direction(k: float, direction: str) -> None:
    run = SyntheticRun(seed=1)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer)
    result = scorer.score(run.step({"effective_rank": k}), loss=run.loss())
    assert result.flagged
    assert result.score is not None and result.threshold is not None and result.score > result.threshold
    assert result.reasons[0].startswith(f"effective_rank {direction} in ")
    assert result.reasons[0].endswith(f"/{run.n_layers} layers (z={result.z['effective_rank']:.1f})")
    assert np.sign(result.z["effective_rank"]) == np.sign(k)
    # the other metrics were not moved, and are not blamed
    assert all(not r.startswith(m) for r in result.reasons for m in METRICS if m != "effective_rank")


def test_layer_count_in_reason_counts_shifted_layers() -> None:
    run = SyntheticRun(seed=2, common=0.0)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer)
    shifted = np.zeros(run.n_layers, dtype=bool)
    shifted[:9] = True  # 9 of 12 layers, by 20 sigma: each of them is far beyond layer_threshold
    result = scorer.score(run.step({"stable_rank": 20.0}, layers=shifted), loss=run.loss())
    assert result.flagged
    assert result.reasons[0].startswith(f"stable_rank high in 9/{run.n_layers} layers")


def test_a_single_wild_layer_is_not_a_level_anomaly() -> None:
    run = SyntheticRun(seed=3)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer)
    one = np.zeros(run.n_layers, dtype=bool)
    one[4] = True
    flagged = [scorer.score(run.step({"stable_rank": 50.0}, layers=one), loss=run.loss()).flagged for _ in range(50)]
    # the interquartile mean ignores one layer out of twelve (stable rank has no profile term):
    # flags stay at the clean rate
    assert sum(flagged) <= 2


def test_a_changed_layer_profile_is_flagged_and_names_the_layers() -> None:
    # some layers' nuclear norm up, others down, the cross-layer level unchanged: only the shape moved
    run = SyntheticRun(seed=13)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer)
    up = np.zeros(run.n_layers, dtype=bool)
    down = np.zeros(run.n_layers, dtype=bool)
    up[[1, 6]] = True
    down[[3, 9]] = True
    step = run.step({"nuclear_norm": 8.0}, layers=up)
    shifted = run.step({"nuclear_norm": -8.0}, layers=down)
    for i in np.flatnonzero(down):
        step[run.layer_names[i]]["nuclear_norm"] = shifted[run.layer_names[i]]["nuclear_norm"]
    result = scorer.score(step, loss=run.loss())
    assert result.flagged
    assert result.reasons[0].startswith("nuclear_norm layer profile unusual (z=")
    named = result.reasons[0].split(": ", 1)[1].split(", ")
    assert {name.rsplit(" ", 1)[0] for name in named} <= {run.layer_names[i] for i in (1, 3, 6, 9)}
    assert all(name.endswith(" high" if int(name.split("layer_")[1][:2]) in (1, 6) else " low") for name in named)
    assert not any(r.startswith("nuclear_norm high") or r.startswith("nuclear_norm low") for r in result.reasons)
    assert result.z["nuclear_norm_profile"] > result.threshold  # type: ignore[operator]


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_clean_stream_false_flag_rate(seed: int) -> None:
    run = SyntheticRun(seed=seed)
    scorer = BatchScorer(warmup_steps=WARMUP, false_flag_rate=0.01)
    flags = [scorer.score(run.step(), loss=run.loss()).flagged for _ in range(2000)]
    assert not any(flags[:WARMUP])
    assert np.mean(flags[WARMUP:]) <= 0.02


def test_slow_drift_is_tracked_not_flagged() -> None:
    # nuclear norm decays 3x (log scale: linearly) over 2000 steps, in every layer; the loss falls too
    run = SyntheticRun(seed=20)
    scorer = BatchScorer(warmup_steps=WARMUP)
    n = 2000
    flags = []
    for t in range(n):
        decay = -np.log(3.0) * t / n
        result = scorer.score(run.step(offset={"nuclear_norm": decay}), loss=run.loss(np.exp(decay)))
        flags.append(result.flagged)
    assert np.mean(flags[WARMUP:]) <= 0.02


@pytest.mark.parametrize("seed", [14, 15, 16])
def test_fast_drift_of_a_finetune_is_followed_and_shifts_still_caught(seed: int) -> None:
    # gradient norms fall ten-fold within a few dozen steps, the loss halves (as measured on MiniLM-L6);
    # 12 % of the steps also have effective rank 4 sigma low in every layer
    run = SyntheticRun(seed=seed)
    scorer = BatchScorer(warmup_steps=WARMUP)
    rng = np.random.default_rng(seed)
    scores: list[float] = []
    labels: list[bool] = []
    clean_flags: list[bool] = []
    for t in range(400):
        offsets, loss_factor = finetune_drift(t, tau=15.0 + 10.0 * (seed - 14))
        bad = t >= WARMUP + 5 and rng.random() < 0.12
        result = scorer.score(
            run.step({"effective_rank": -4.0} if bad else None, offset=offsets), loss=run.loss(loss_factor)
        )
        if result.score is None:
            continue
        scores.append(result.score)
        labels.append(bad)
        if not bad:
            clean_flags.append(result.flagged)
    assert np.mean(clean_flags) <= 0.02
    assert auroc(scores, labels) > 0.98


def test_step_change_is_flagged_three_times_then_adopted_as_a_shift() -> None:
    # a permanent jump (e.g. a new learning-rate phase): flagged while new, then one shift event, and the
    # baseline follows the new level from there (no run of more than shift_after flags)
    run = SyntheticRun(seed=21)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer)
    results = [scorer.score(run.step({"frobenius_norm": 10.0}), loss=run.loss()) for _ in range(150)]
    assert [r.flagged for r in results[:4]] == [True, True, True, False]
    events = [(i, e) for i, r in enumerate(results) for e in r.events]
    assert [(i, e["kind"]) for i, e in events] == [(3, "shift")]
    message = events[0][1]["message"]
    assert message.startswith("shift: frobenius_norm high in ") and "for 4 steps in a row" in message
    assert results[3].score is not None and results[3].score > results[3].threshold  # scored, not flagged
    assert not results[3].reasons
    assert np.mean([r.flagged for r in results[4:]]) <= 0.03
    assert longest_run([r.flagged for r in results]) <= 3
    assert not any("baseline restarted" in reason for r in results for reason in r.reasons)


def test_a_loss_level_shift_also_widens_the_loss_scale() -> None:
    # the loss jumps ten-fold and stays (on linear scale its spread grows with it): one shift, then quiet
    run = SyntheticRun(seed=25)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer, steps=60)
    results = [scorer.score(run.step(), loss=run.loss(factor=10.0)) for _ in range(100)]
    assert [r.flagged for r in results[:4]] == [True, True, True, False]
    assert [e["message"].split(" for ")[0] for r in results for e in r.events] == ["shift: loss high"]
    assert np.mean([r.flagged for r in results[4:]]) <= 0.03


def test_step_change_without_shifts_is_followed_by_the_trend() -> None:
    # shift_after=None: the trends' level includes flagged steps, so the new level becomes the baseline
    # once it fills half the trend window, without a restart
    run = SyntheticRun(seed=21)
    trend_half = 16
    # (aftermath off too: as the trend takes the new level in, the steps' z fall, and from half the latest flag's
    # they would be the latest flag's aftermath, not flags)
    scorer = BatchScorer(warmup_steps=WARMUP, trend_window=2 * trend_half, shift_after=None, aftermath_steps=None)
    warmed_up(run, scorer)
    results = [scorer.score(run.step({"frobenius_norm": 10.0}), loss=run.loss()) for _ in range(150)]
    assert all(r.flagged for r in results[:10])
    assert not any(r.events for r in results)
    assert np.mean([r.flagged for r in results[trend_half + 10 :]]) <= 0.03


def test_spikes_of_alternating_kinds_in_a_row_stay_flagged() -> None:
    # several bad steps in a row that move different things (norms up, then rank down, ...) are not a shift
    run = SyntheticRun(seed=23)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer, steps=60)
    shifts = [{"frobenius_norm": 10.0}, {"effective_rank": -10.0}] * 4
    results = [scorer.score(run.step(shift), loss=run.loss()) for shift in shifts]
    assert all(r.flagged for r in results)
    assert not any(r.events for r in results)


def test_a_level_that_moved_for_good_is_adopted_though_noise_carries_a_step_under_the_threshold() -> None:
    # the norms jump by 10 sigma and stay; one step of the new regime happens to land just under the threshold
    # (a lower draw): the change goes on in it, so it does not end the run, and the fourth flag is the shift
    run = SyntheticRun(seed=31)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer)
    results = [scorer.score(run.step({"frobenius_norm": k}), loss=run.loss()) for k in (10, 10, 1, 10, 10, 10)]
    under = results[2]
    assert not under.flagged and 1.0 <= under.z["frobenius_norm"] < under.threshold  # the premise of the test
    assert [r.flagged for r in results] == [True, True, False, True, False, False]
    assert [(i, e["kind"]) for i, r in enumerate(results) for e in r.events] == [(4, "shift")]
    assert "for 4 of the last 5 steps" in results[4].events[0]["message"]


def test_bad_batches_of_one_kind_between_clean_steps_stay_flagged() -> None:
    # the same kind of bad batch every other step is not a level that moved: the clean steps between them are
    # back at the old level, so they end each run of flags and no shift is ever confirmed
    run = SyntheticRun(seed=31)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer)
    pattern = [10, 0, 10, 0, 10, 0, 10, 10, 0, 10, 0, 10]
    results = [scorer.score(run.step({"frobenius_norm": k}), loss=run.loss()) for k in pattern]
    assert [r.flagged for r in results] == [k > 0 for k in pattern]
    assert not any(r.events for r in results)


def _profile_noise_step(
    run: SyntheticRun, rng: np.random.Generator, k: float = 6.0, moved: int = 3
) -> dict[str, dict[str, float]]:
    """A clean step whose nuclear norm is ``k`` sigma up or down in ``moved`` random layers (other layers each step)."""
    layers = np.zeros(run.n_layers, dtype=bool)
    layers[rng.choice(run.n_layers, moved, replace=False)] = True
    step = run.step()
    shifted = run.step({"nuclear_norm": float(rng.choice([-k, k]))}, layers=layers)
    for i in np.flatnonzero(layers):
        step[run.layer_names[i]]["nuclear_norm"] = shifted[run.layer_names[i]]["nuclear_norm"]
    return step


def test_a_noisier_layer_profile_becomes_the_new_normal_and_bad_batches_are_still_flagged() -> None:
    # from some step on, the nuclear-norm profile is unusual in other layers each step: no two steps share a
    # pattern, so only persistence can confirm the change. The first shift shortens the trends, which does not
    # quiet a noisier profile; the second soon after moves the profile term's baseline up, and from there the
    # noisier profile is the new normal while bad batches (effective rank down; a profile far more unusual)
    # still stand out
    run = SyntheticRun(seed=7)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer)
    rng = np.random.default_rng(1)
    rank_bad, profile_bad = (30, 45), (38, 52)
    results = []
    for t in range(60):
        step = _profile_noise_step(run, rng, k=25.0, moved=6) if t in profile_bad else _profile_noise_step(run, rng)
        if t in rank_bad:
            step = {layer: {**v, "effective_rank": v["effective_rank"] * 0.3} for layer, v in step.items()}
        results.append(scorer.score(step, loss=run.loss()))
    events = [(t, e["message"]) for t, r in enumerate(results) for e in r.events]
    assert len(events) == 2 and events[-1][0] < 15
    assert all("nuclear_norm layer profile unusual in other layers each step" in m for _, m in events)
    assert "its noise changed" in events[-1][1] and "its noise changed" not in events[0][1]
    assert all(results[t].flagged for t in rank_bad + profile_bad)
    assert results[profile_bad[0]].reasons[0].startswith("nuclear_norm layer profile unusual")
    quiet = [r.flagged for t, r in enumerate(results) if t > events[-1][0] and t not in rank_bad + profile_bad]
    assert np.mean(quiet) <= 0.05
    assert longest_run([r.flagged for r in results]) <= 3


def test_one_burst_of_unusual_profiles_does_not_blind_the_profile_term() -> None:
    # four bad batches in a row whose profiles are unusual in other layers each time make one shift (persistence
    # alone); the profile's own baseline stays, so the next such batches, alone among clean ones, are flagged
    run = SyntheticRun(seed=3)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer)
    rng = np.random.default_rng(3)
    results = []
    for t in range(80):
        bad = t < 4 or (t >= 20 and t % 10 == 0)
        results.append(scorer.score(_profile_noise_step(run, rng, k=7.0) if bad else run.step(), loss=run.loss()))
    assert [t for t, r in enumerate(results) if r.events] == [3]
    assert all(results[t].flagged for t in range(20, 80, 10))
    assert np.mean([r.flagged for t, r in enumerate(results) if t >= 4 and t % 10]) <= 0.03


def test_without_shifts_the_same_noisier_profile_is_flagged_step_after_step() -> None:
    # the premise of the test above: the change is real for the scorer (shifts off, most steps are flagged)
    run = SyntheticRun(seed=7)
    scorer = BatchScorer(warmup_steps=WARMUP, shift_after=None)
    warmed_up(run, scorer)
    rng = np.random.default_rng(1)
    results = [scorer.score(_profile_noise_step(run, rng), loss=run.loss()) for _ in range(20)]
    assert np.mean([r.flagged for r in results]) >= 0.5


def test_a_run_of_flags_survives_a_checkpoint_and_an_older_checkpoint_starts_a_new_run() -> None:
    run = SyntheticRun(seed=31)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer)
    steps = [(run.step({"frobenius_norm": k}), run.loss()) for k in (10, 10, 1, 10, 10, 10)]
    for values, loss in steps[:3]:
        scorer.score(values, loss=loss)
    state = scorer.state_dict()
    assert len(state["flag_run"]) == len(state["flag_times"]) >= 2
    restored = BatchScorer(warmup_steps=WARMUP)
    restored.load_state_dict(state)
    went_on = [scorer.score(values, loss=loss) for values, loss in steps[3:]]
    again = [restored.score(values, loss=loss) for values, loss in steps[3:]]
    assert [(r.flagged, r.events) for r in again] == [(r.flagged, r.events) for r in went_on]
    assert [bool(r.events) for r in again] == [False, True, False]
    # a checkpoint written before runs had their steps and values: the run starts over, nothing fails
    older = {k: v for k, v in state.items() if k not in ("flag_times", "flag_values", "noise_shifts")}
    old = BatchScorer(warmup_steps=WARMUP)
    old.load_state_dict(older)
    assert old.state_dict()["flag_run"] == []
    assert [r.flagged for r in (old.score(values, loss=loss) for values, loss in steps[3:])] == [True, True, True]
    # a scorer with other metrics (other level-2 rows) continues from it: the run's marks are dropped
    fewer = BatchScorer(warmup_steps=WARMUP, metrics=("frobenius_norm",), profile_metrics=())
    fewer.load_state_dict(state)
    assert fewer.state_dict()["flag_run"] == []
    assert not fewer.score(run.step(), loss=run.loss()).flagged  # an accepted step reads the run: no IndexError
    assert [r.flagged for r in (fewer.score(values, loss=loss) for values, loss in steps[3:])] == [True, True, True]


def test_a_shift_keeps_the_trends_from_the_first_flag_of_its_run_on_steps_with_nothing_measured_between() -> None:
    # two steps with nothing measured inside a run push no trend row: the trends keep the rows from the run's
    # first flag on (by step), not as many rows as the run spans (which would reach back before it)
    run = SyntheticRun(seed=31)
    scorer = BatchScorer(warmup_steps=WARMUP, shift_after=5)  # a run of 6 flags: more rows than the 5 kept at least
    warmed_up(run, scorer)
    first = scorer.steps
    results = []
    for k in (10, 10, None, None, 10, 10, 10, 10):
        step = {} if k is None else run.step({"frobenius_norm": k})
        results.append(scorer.score(step, loss=None if k is None else run.loss()))
    assert [bool(r.events) for r in results] == [False] * 7 + [True]
    assert "for 6 of the last 8 steps" in results[7].events[0]["message"]
    kept = scorer.state_dict()["trend_values"]["steps"]
    assert kept == [first, first + 1, first + 4, first + 5, first + 6, first + 7]


def test_a_noisier_profile_early_in_a_run_stays_adopted_while_young_windows_are_rebuilt() -> None:
    # right after warm-up the windows are young and every clean step rebuilds level 2 in-sample; the level a
    # noise shift moved the profile term to must survive those rebuilds, or the shifts repeat every few steps
    run = SyntheticRun(seed=7)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer, steps=25)
    rng = np.random.default_rng(1)
    results = [scorer.score(_profile_noise_step(run, rng, k=15.0), loss=run.loss()) for _ in range(80)]
    assert sum(bool(r.events) for r in results) == 2
    assert np.mean([r.flagged for r in results]) <= 0.1
    assert not any(r.flagged for r in results[40:])


def test_a_shift_needs_the_same_layers() -> None:
    # the same metric up four times in a row, but in disjoint halves of the layers: not one change
    run = SyntheticRun(seed=24)
    scorer = BatchScorer(warmup_steps=WARMUP, layer_trim=0.0)
    warmed_up(run, scorer, steps=60)
    n = run.n_layers
    halves = [np.arange(n // 2), np.arange(n // 2, n)] * 3
    results = [scorer.score(run.step({"frobenius_norm": 20.0}, layers=half), loss=run.loss()) for half in halves]
    assert all(r.flagged for r in results)
    assert not any(r.events for r in results)


def test_a_layer_first_seen_during_a_run_of_flags_does_not_break_the_shift() -> None:
    run = SyntheticRun(seed=26)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer, steps=60)
    results = []
    for i in range(6):
        step = run.step({"frobenius_norm": 10.0})
        if i >= 2:  # a new layer joins at the third flagged step (its patterns are one longer from then on)
            step["self_attn.new_proj/layer_00"] = dict(step["self_attn.q_proj/layer_00"])
        results.append(scorer.score(step, loss=run.loss()))
    assert [r.flagged for r in results[:4]] == [True, True, True, False]
    assert [e["kind"] for r in results for e in r.events] == ["shift"]


def test_a_checkpoint_taken_during_a_run_of_flags_continues_it_exactly() -> None:
    run = SyntheticRun(seed=27)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer, steps=60)
    steps = [(run.step({"frobenius_norm": 10.0}), run.loss()) for _ in range(8)]
    for values, loss in steps[:2]:
        assert scorer.score(values, loss=loss).flagged
    restored = BatchScorer(warmup_steps=WARMUP)
    restored.load_state_dict(scorer.state_dict())
    went_on = [scorer.score(values, loss=loss) for values, loss in steps[2:]]
    again = [restored.score(values, loss=loss) for values, loss in steps[2:]]
    assert [(r.flagged, r.events) for r in again] == [(r.flagged, r.events) for r in went_on]
    assert [r.flagged for r in again[:2]] == [True, False] and again[1].events[0]["kind"] == "shift"


def test_a_non_finite_step_breaks_a_run_and_a_shift_of_norms_leaves_the_loss_spread_alone() -> None:
    run = SyntheticRun(seed=28, loss_sigma=0.4)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer, steps=60)
    nan_step = run.step({"frobenius_norm": 10.0})
    nan_step["self_attn.q_proj/layer_00"]["nuclear_norm"] = float("nan")
    flags = [scorer.score(run.step({"frobenius_norm": 10.0}), loss=run.loss()).flagged for _ in range(2)]
    assert flags == [True, True] and scorer.score(nan_step, loss=run.loss()).flagged
    spread = np.subtract(*np.percentile(scorer.state_dict()["loss_residuals"], [75, 25]))
    results = [scorer.score(run.step({"frobenius_norm": 10.0}), loss=run.loss()) for _ in range(4)]
    # the non-finite step said nothing about the change: a new run of three flags starts after it
    assert [r.flagged for r in results] == [True, True, True, False]
    assert results[3].events[0]["message"].startswith("shift: frobenius_norm high")
    after = np.subtract(*np.percentile(scorer.state_dict()["loss_residuals"], [75, 25]))
    assert after == pytest.approx(spread, rel=1e-3)  # re-centred, not rescaled: the loss did not move


def test_shift_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="shift_after"):
        BatchScorer(shift_after=1)
    with pytest.raises(ValueError, match="shift_agreement"):
        BatchScorer(shift_agreement=1.5)


def longest_run(flags: list[bool]) -> int:
    best = current = 0
    for f in flags:
        current = current + 1 if f else 0
        best = max(best, current)
    return best


def test_rebaseline_after_consecutive_flags() -> None:
    run = SyntheticRun(seed=22)
    scorer = BatchScorer(warmup_steps=WARMUP, rebaseline_after=5, shift_after=None)
    warmed_up(run, scorer)
    results = [scorer.score(run.step({"frobenius_norm": 10.0}), loss=run.loss()) for _ in range(5 + WARMUP + 60)]
    assert all(r.flagged for r in results[:5])
    restart = "baseline restarted after 5 consecutive steps over the threshold"
    assert any(restart in reason for reason in results[4].reasons)
    assert all(r.in_warmup and r.score is None for r in results[5 : 5 + WARMUP])
    assert np.mean([r.flagged for r in results[5 + WARMUP :]]) <= 0.05


def test_rebaseline_can_be_disabled() -> None:
    run = SyntheticRun(seed=22)
    scorer = BatchScorer(warmup_steps=WARMUP, rebaseline_after=None, shift_after=None)
    warmed_up(run, scorer)
    results = [scorer.score(run.step({"frobenius_norm": 10.0}), loss=run.loss()) for _ in range(150)]
    assert not any(r.in_warmup or any("restarted" in reason for reason in r.reasons) for r in results)


def test_burst_of_bad_steps_does_not_poison_the_baseline() -> None:
    run = SyntheticRun(seed=30)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer, steps=100)
    rng = np.random.default_rng(0)
    flagged_bad: list[bool] = []
    flagged_clean: list[bool] = []
    for _ in range(600):  # 30 % of the steps shift nuclear norm up by 4 sigma in every layer
        bad = rng.random() < 0.3
        result = scorer.score(run.step({"nuclear_norm": 4.0} if bad else None), loss=run.loss())
        (flagged_bad if bad else flagged_clean).append(result.flagged)
    # still caught at the end of the burst as well as at its start: the flagged steps never entered the baseline
    assert np.mean(flagged_bad[:40]) >= 0.9
    assert np.mean(flagged_bad[-40:]) >= 0.9
    assert np.mean(flagged_clean) <= 0.02


def test_loss_only_anomaly_is_flagged() -> None:
    run = SyntheticRun(seed=40)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer)
    result = scorer.score(run.step(), loss=run.loss(factor=4.0))
    assert result.flagged
    assert result.reasons[0] == f"loss high (z={result.z['loss']:.1f})"
    assert result.z["loss"] > 0


def test_loss_ignored_without_use_loss() -> None:
    run = SyntheticRun(seed=40)
    scorer = BatchScorer(warmup_steps=WARMUP, use_loss=False)
    warmed_up(run, scorer)
    result = scorer.score(run.step(), loss=run.loss(factor=4.0))
    assert "loss" not in result.z
    assert not any(r.startswith("loss") for r in result.reasons)
    nan_loss = scorer.score(run.step(), loss=float("nan"))
    assert not any("loss" in r for r in nan_loss.reasons)


@pytest.mark.parametrize("log_loss", [True, False])
def test_low_loss_counts_only_with_loss_side_both(log_loss: bool) -> None:
    run = SyntheticRun(seed=41)
    both = BatchScorer(warmup_steps=WARMUP, log_loss=log_loss, loss_side="both")
    high = BatchScorer(warmup_steps=WARMUP, log_loss=log_loss)
    for _ in range(150):
        step, loss = run.step(), run.loss()
        both.score(step, loss=loss)
        high.score(step, loss=loss)
    step, loss = run.step(), run.loss(factor=0.2)
    low_both, low_high = both.score(step, loss=loss), high.score(step, loss=loss)
    assert low_both.flagged and low_both.reasons[0].startswith("loss low")
    assert not low_high.flagged and low_high.z["loss"] < -low_high.threshold  # type: ignore[operator]


def test_auroc_of_score_on_a_corruption_mix() -> None:
    # three kinds of bad batch, each shifting one metric by 3 sigma in most (10 of 12) layers
    run = SyntheticRun(seed=50)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer, steps=60)
    rng = np.random.default_rng(1)
    kinds = [{"effective_rank": 3.0}, {"effective_rank": -3.0}, {"nuclear_norm": 3.0}]
    scores: list[float] = []
    labels: list[bool] = []
    for _ in range(700):
        bad = rng.random() < 0.12
        layers = rng.permutation(run.n_layers) < 10
        result = scorer.score(run.step(kinds[rng.integers(3)] if bad else None, layers=layers), loss=run.loss())
        assert result.score is not None
        scores.append(result.score)
        labels.append(bad)
    assert auroc(scores, labels) > 0.95


def test_score_is_the_largest_term_and_flag_follows_threshold() -> None:
    run = SyntheticRun(seed=60)
    scorer = BatchScorer(warmup_steps=WARMUP)
    warmed_up(run, scorer)
    one_sided = {"loss", "nuclear_norm_profile"}
    for k in (0.0, 2.0, 5.0, -5.0):
        result = scorer.score(run.step({"stable_rank": k}), loss=run.loss())
        assert result.score is not None and result.threshold is not None
        strengths = [max(v, 0.0) if name in one_sided else abs(v) for name, v in result.z.items()]
        assert result.score == pytest.approx(max(strengths))
        assert result.flagged == (result.score > result.threshold)
        assert result.threshold >= scorer.min_threshold


def test_threshold_floor_on_a_perfectly_steady_stream() -> None:
    # identical values every step, up to rounding: nothing to flag
    scorer = BatchScorer(warmup_steps=WARMUP, min_threshold=3.0)
    rng = np.random.default_rng(0)
    results = []
    for _ in range(200):
        jitter = 1.0 + 1e-9 * rng.standard_normal()
        step = {f"l{i}": {m: (i + 1.0) * jitter for m in METRICS} for i in range(8)}
        results.append(scorer.score(step, loss=0.5 * jitter))
    assert not any(r.flagged for r in results)
    assert results[-1].threshold == 3.0


def test_result_type() -> None:
    run = SyntheticRun(seed=61)
    result = BatchScorer().score(run.step(), loss=run.loss())
    assert isinstance(result, ScoreResult)
