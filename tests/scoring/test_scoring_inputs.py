"""BatchScorer on awkward inputs: non-finite values, absent and new layers or metrics, checkpoints, bad arguments."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradspectra.scoring import POSITIVE_METRICS, BatchScorer

from .streams import METRICS, SyntheticRun

WARMUP = 20


def feed(run: SyntheticRun, scorer: BatchScorer, steps: int) -> None:
    for _ in range(steps):
        scorer.score(run.step(), loss=run.loss())


WINDOWS = ("trend_values", "trend_loss", "residuals", "profile_residuals", "loss_residuals", "bases", "terms", "scores")


def windows(scorer: BatchScorer) -> dict[str, Any]:
    """The data windows; of the profile bases only their rows (the directions are a cache of the rows,
    computed when a step first needs them)."""
    state = scorer.state_dict()
    out = {k: state[k] for k in (*WINDOWS, "accepted")}
    out["bases"] = [b["rows"] for b in state["bases"]]
    return out


def same(a: Any, b: Any) -> bool:
    """Equality of nested lists of floats where NaN equals NaN."""
    return pickle.dumps(np.nan_to_num(np.asarray(a, dtype=float), nan=-7.0)) == pickle.dumps(
        np.nan_to_num(np.asarray(b, dtype=float), nan=-7.0)
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_metric_is_flagged_named_and_kept_out_of_the_baseline(bad: float) -> None:
    run = SyntheticRun(seed=0)
    scorer = BatchScorer(warmup_steps=WARMUP)
    feed(run, scorer, 60)
    before = windows(scorer)
    step = run.step()
    step["self_attn.q_proj/layer_03"]["effective_rank"] = bad
    step["self_attn.q_proj/layer_07"]["nuclear_norm"] = bad
    result = scorer.score(step, loss=run.loss())
    assert result.flagged
    assert result.score == math.inf
    assert result.reasons[0] == (
        "non-finite gradient in 2 layers: self_attn.q_proj/layer_03, self_attn.q_proj/layer_07"
    )
    after = windows(scorer)
    assert before == after  # not even the trends saw the step
    assert all(same(before[k], after[k]) for k in ("residuals", "terms", "scores"))
    assert all(math.isfinite(v) for v in result.z.values())  # the finite layers were still scored


def test_nonfinite_during_warmup_is_flagged_and_many_layers_are_abbreviated() -> None:
    run = SyntheticRun(seed=1)
    scorer = BatchScorer(warmup_steps=WARMUP)
    feed(run, scorer, 3)
    step = run.step()
    for layer in step:
        step[layer]["frobenius_norm"] = math.nan
    result = scorer.score(step, loss=run.loss())
    assert result.flagged and result.in_warmup and result.score is None
    assert result.reasons[0].startswith(f"non-finite gradient in {run.n_layers} layers: ")
    assert result.reasons[0].endswith(", ...")
    assert scorer.state_dict()["accepted"] == 3


def test_nonfinite_loss_is_flagged() -> None:
    run = SyntheticRun(seed=2)
    scorer = BatchScorer(warmup_steps=WARMUP)
    feed(run, scorer, 40)
    result = scorer.score(run.step(), loss=math.nan)
    assert result.flagged and result.reasons == ["non-finite loss (nan)"]


def test_absent_layers_and_metrics_are_not_anomalies() -> None:
    run = SyntheticRun(seed=3)
    scorer = BatchScorer(warmup_steps=WARMUP)
    feed(run, scorer, 60)
    flags = []
    for t in range(100):
        step = run.step()
        del step[run.layer_names[t % run.n_layers]]  # one layer missing each step
        step[run.layer_names[(t + 1) % run.n_layers]].pop("stable_rank")  # and one metric of another
        result = scorer.score(step, loss=None if t % 2 else run.loss())
        flags.append(result.flagged)
        assert not any("non-finite" in r for r in result.reasons)
    assert sum(flags) <= 3
    assert scorer.score({}, loss=None).score is None


@pytest.mark.parametrize("seed", [0, 4])
def test_the_layer_profile_does_not_depend_on_which_layers_were_measured(seed: int) -> None:
    # after warm-up a spectral budget measures the full spectrum of 3 of 29 layers per step, in turn
    # (the others give their Frobenius norm only); the layers' levels differ by far more than their
    # noise, so a profile taken from the values would jump with the subset (37 and 56 of 150 flagged)
    run = SyntheticRun(seed=seed, n_layers=29)
    scorer = BatchScorer(warmup_steps=WARMUP)
    feed(run, scorer, 40)
    flags = []
    for t in range(150):
        step = run.step()
        measured = {(3 * t + j) % run.n_layers for j in range(3)}
        for i, layer in enumerate(run.layer_names):
            if i not in measured:
                step[layer] = {"frobenius_norm": step[layer]["frobenius_norm"]}
        result = scorer.score(step, loss=run.loss())
        flags.append(result.flagged and result.reasons[0].startswith("nuclear_norm layer profile"))
    assert sum(flags) <= 2


def test_none_values_count_as_absent() -> None:
    run = SyntheticRun(seed=4)
    scorer = BatchScorer(warmup_steps=WARMUP)
    feed(run, scorer, 40)
    step: dict[str, dict[str, Any]] = run.step()
    step[run.layer_names[0]]["nuclear_norm"] = None
    result = scorer.score(step, loss=None)
    assert not any("non-finite" in r for r in result.reasons)


def test_new_layer_and_new_metric_join_after_their_own_warmup() -> None:
    run = SyntheticRun(seed=5)
    scorer = BatchScorer(warmup_steps=WARMUP)
    rng = np.random.default_rng(0)
    feed(run, scorer, 50)
    assert scorer.metrics == METRICS
    flags = []
    for _ in range(100):
        step = run.step()
        step["mlp.fc1/layer_00"] = {m: float(np.exp(rng.normal(0, 0.1))) for m in METRICS}
        step[run.layer_names[0]]["layer_mad"] = float(rng.normal(5.0, 0.5))  # linear scale: not in log_metrics
        result = scorer.score(step, loss=run.loss())
        flags.append(result.flagged)
    assert scorer.layers[-1] == "mlp.fc1/layer_00"
    assert scorer.metrics == (*METRICS, "layer_mad")
    assert "layer_mad" in result.z  # scored once the metric had warmup_steps values at both levels
    assert sum(flags) <= 4


def test_fixed_metrics_ignore_others() -> None:
    run = SyntheticRun(seed=6)
    scorer = BatchScorer(warmup_steps=WARMUP, metrics=["effective_rank", "nuclear_norm"])
    feed(run, scorer, 40)
    result = scorer.score(run.step({"stable_rank": 30.0}), loss=run.loss())
    assert set(result.z) == {"effective_rank", "nuclear_norm", "loss", "nuclear_norm_profile"}
    assert not result.flagged


def test_zero_gradient_in_every_layer_is_flagged_low() -> None:
    # the functional layer reports 0 for every metric of a zero matrix; log(0) is floored, not NaN
    run = SyntheticRun(seed=7)
    scorer = BatchScorer(warmup_steps=WARMUP)
    feed(run, scorer, 40)
    zero = {layer: dict.fromkeys(METRICS, 0.0) for layer in run.layer_names}
    result = scorer.score(zero, loss=run.loss())
    assert result.flagged
    # the norms count only upwards (an easy batch is not a bad one); a zero gradient is flagged by its
    # effective rank, which is 0 for a zero matrix and is scored either way
    assert any(r.startswith("effective_rank low in 12/12 layers") for r in result.reasons), result.reasons


def test_state_dict_round_trip_continues_identically() -> None:
    run = SyntheticRun(seed=8)
    scorer = BatchScorer(warmup_steps=WARMUP, window=50)
    rng = np.random.default_rng(0)
    for t in range(120):  # past the window, with some flagged steps in between
        scorer.score(run.step({"nuclear_norm": 8.0} if t % 17 == 0 else None), loss=run.loss())
    state = pickle.loads(pickle.dumps(scorer.state_dict()))
    assert isinstance(state["residuals"], list) and isinstance(state["residuals"][0][0][0], float)
    assert state["version"] == 2
    clone = BatchScorer(warmup_steps=WARMUP, window=50)
    clone.load_state_dict(state)
    assert clone.layers == scorer.layers and clone.metrics == scorer.metrics
    for t in range(150):
        step = run.step({"effective_rank": float(rng.choice([0.0, 0.0, 5.0, -5.0]))})
        loss = run.loss()
        a, b = scorer.score(step, loss=loss), clone.score(step, loss=loss)
        assert a == b, t
    a_state, b_state = scorer.state_dict(), clone.state_dict()
    assert a_state.keys() == b_state.keys()
    arrays = ("residuals", "profile_residuals", "loss_residuals", "terms", "scores")
    assert all(same(a_state[k], b_state[k]) for k in arrays)
    assert all(a_state[k] == b_state[k] for k in a_state if k not in arrays)


def test_state_dict_during_warmup_and_states_without_level_two_or_from_version_one() -> None:
    run = SyntheticRun(seed=9)
    scorer = BatchScorer(warmup_steps=WARMUP)
    feed(run, scorer, 10)
    clone = BatchScorer(warmup_steps=WARMUP)
    clone.load_state_dict(scorer.state_dict())
    assert clone.in_warmup and clone.state_dict() == scorer.state_dict()
    # a checkpoint without level two (the terms and scores): rebuilt as at the end of warm-up
    feed(run, scorer, 30)
    state = {k: v for k, v in scorer.state_dict().items() if k not in ("terms", "term_names", "scores")}
    late = BatchScorer(warmup_steps=WARMUP)
    late.load_state_dict(state)
    assert not late.in_warmup
    assert late.score(run.step(), loss=run.loss()).score is not None
    # a version-1 checkpoint (another score): names and counters kept, the baseline warms up again
    old = {
        "layers": list(scorer.layers),
        "metrics": list(scorer.metrics),
        "steps": 40,
        "flagged_steps": 2,
        "values": [[[0.0] * 30] * len(METRICS)] * run.n_layers,
        "accepted": 30,
    }
    restarted = BatchScorer(warmup_steps=WARMUP)
    restarted.load_state_dict(old)
    assert restarted.layers == scorer.layers and restarted.metrics == scorer.metrics
    assert restarted.in_warmup and restarted.steps == 40 and restarted.flagged_steps == 2
    empty = BatchScorer(warmup_steps=WARMUP)
    empty.load_state_dict({})
    assert empty.in_warmup and empty.layers == ()


def test_load_state_dict_rejects_inconsistent_values() -> None:
    with pytest.raises(ValueError, match=r"state\['residuals'\]"):
        BatchScorer().load_state_dict(
            {"version": 2, "layers": ["a"], "metrics": ["x", "y"], "residuals": [[[1.0, 2.0]]]}
        )


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"window": 5}, r"`window` must be an integer in \[10, 100000\], got 5"),
        ({"window": 200.0}, r"`window` must be an integer"),
        ({"warmup_steps": 4}, r"`warmup_steps` must be an integer in \[5, window=100\], got 4"),
        ({"warmup_steps": 300}, r"`warmup_steps` .* got 300"),
        ({"trend_window": 3}, r"`trend_window` must be an integer in \[4, 10000\], got 3"),
        ({"loss_side": "low"}, r"`loss_side` can be high, both, got 'low'"),
        ({"profile_metrics": "nuclear_norm"}, r"`profile_metrics` must be a sequence of metric names"),
        ({"profile_components": 11}, r"`profile_components` must be an integer in \[0, 10\], got 11"),
        ({"warmup_steps": True}, r"`warmup_steps` .* got True"),
        ({"false_flag_rate": 0.0}, r"`false_flag_rate` must be a finite number in \(0.0, 0.05\], got 0.0"),
        ({"false_flag_rate": 0.1}, r"`false_flag_rate` .* got 0.1"),
        ({"false_flag_rate": math.nan}, r"`false_flag_rate` .* got nan"),
        ({"min_threshold": -1.0}, r"`min_threshold` must be a finite number in \(0.0, inf\), got -1.0"),
        ({"layer_threshold": 0}, r"`layer_threshold` .* got 0"),
        ({"layer_trim": 0.5}, r"`layer_trim` must be a finite number in \[0.0, 0.5\), got 0.5"),
        ({"min_scale": 0.0}, r"`min_scale` .* got 0.0"),
        ({"rebaseline_after": 0}, r"`rebaseline_after` must be an integer in \[1, inf\), got 0"),
        ({"threshold_window": 10}, r"`threshold_window` must be an integer in \[warmup_steps=20, 1000000\], got 10"),
        ({"use_loss": 1}, r"`use_loss` must be True or False, got 1"),
        ({"log_loss": "yes"}, r"`log_loss` must be True or False"),
        ({"metrics": []}, r"`metrics` must name at least one metric"),
        ({"metrics": "nuclear_norm"}, r"`metrics` must be a sequence of metric names"),
        ({"metrics": ["a", "a"]}, r"`metrics` must not repeat a name"),
        ({"log_metrics": [1]}, r"`log_metrics` must contain only non-empty strings"),
    ],
)
def test_bad_arguments_name_argument_range_and_value(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        BatchScorer(**kwargs)


def test_positive_metrics_match_the_functional_names() -> None:
    from gradspectra.functional import DETECTION_METRIC, METRIC_NAMES

    assert set(POSITIVE_METRICS) == set(METRIC_NAMES) | {DETECTION_METRIC}


def test_scoring_imports_neither_lightning_nor_torch() -> None:
    code = "import sys, gradspectra.scoring; print(sorted(m for m in ('lightning', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_shortest_trend_window_and_a_state_with_shorter_trends() -> None:
    run = SyntheticRun(seed=10)
    short = BatchScorer(warmup_steps=WARMUP, trend_window=4)
    feed(run, short, 40)
    assert short.score(run.step(), loss=run.loss()).score is not None
    # a state from a scorer with a 4-step trend, loaded by one that starts its trends with 5 steps:
    # no score until the trends are long enough again, and no crash
    longer = BatchScorer(warmup_steps=WARMUP, trend_window=32)
    longer.load_state_dict(short.state_dict())
    results = [longer.score(run.step(), loss=run.loss()) for _ in range(3)]
    assert results[0].score is None and not results[0].flagged
    assert results[-1].score is not None


STATE_FROM_0_1 = Path(__file__).parent / "data" / "state_v2_from_0_1.json"
THREE = ("nuclear_norm", "stable_rank", "effective_rank")


def three_metrics(step: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {layer: {m: values[m] for m in THREE} for layer, values in step.items()}


def test_a_checkpoint_written_by_0_1_loads_and_goes_on_scoring() -> None:
    # written by gradspectra 0.1.0 (one window per block, the loss's a list, a trend of the profile) after
    # 60 steps of SyntheticRun(seed=77, n_layers=4) with three metrics; this version keeps the clean
    # residuals and terms in one window, and no profile trend
    state = json.loads(STATE_FROM_0_1.read_text())
    scorer = BatchScorer(warmup_steps=10, window=20, trend_window=8, threshold_window=30)
    scorer.load_state_dict(state)
    assert scorer.layers == tuple(state["layers"]) and scorer.metrics == THREE
    assert scorer.steps == 60 and not scorer.in_warmup
    restored = scorer.state_dict()
    for key in ("residuals", "profile_residuals", "loss_residuals", "terms", "scores"):
        assert same(restored[key], state[key]), key
    for key in ("trend_values", "trend_loss"):
        assert same(restored[key]["values"], state[key]["values"]) and restored[key]["steps"] == state[key]["steps"]
    assert [b["rows"] for b in restored["bases"]] == [b["rows"] for b in state["bases"]]
    assert restored["trend_profile"] is None  # no longer kept; the stored one is ignored
    run = SyntheticRun(seed=77, n_layers=4)
    for _ in range(60):  # the stream the checkpoint saw
        run.step()
        run.loss()
    flags = [
        scorer.score(three_metrics(run.step({"effective_rank": 12.0} if t == 20 else None)), loss=run.loss()).flagged
        for t in range(40)
    ]
    assert flags[20] and sum(flags) <= 4  # 0.1.0 itself flagged 4 of these 40 (a 20-step window of 4 layers)


def test_the_loss_alone_is_scored() -> None:
    # no layer metrics at all (or layers without any): the loss is still scored, from a 5-step warm-up,
    # and through a checkpoint (0.1.0 failed with a shape error after restoring one)
    rng = np.random.default_rng(9)
    for empty in ({}, {"a": {}, "b": {}}):
        scorer = BatchScorer(warmup_steps=5, window=10)
        results = [scorer.score(dict(empty), loss=1.0 + 0.05 * rng.standard_normal()) for _ in range(20)]
        state = json.loads(json.dumps(scorer.state_dict()))
        scorer = BatchScorer(warmup_steps=5, window=10)
        scorer.load_state_dict(state)
        results += [scorer.score(dict(empty), loss=1.0 + 0.05 * rng.standard_normal()) for _ in range(20)]
        spike = scorer.score(dict(empty), loss=3.0)
        assert all(r.score is not None for r in results[5:])
        assert sum(r.flagged for r in results) <= 2
        assert spike.flagged and spike.reasons[0].startswith("loss high")


def test_a_layer_without_a_baseline_yet_leaves_the_profile_out() -> None:
    # layers join one at a time (2, then 3, then 4): while the newest has no baseline, the others' profile
    # alone would lie in the directions their own profiles took; level 2 must not learn that as usual
    rng = np.random.default_rng(0)
    scorer = BatchScorer(warmup_steps=5, window=12)
    flags = []
    for t in range(60):
        step = {f"l{i}": {"nuclear_norm": float(np.exp(i + rng.normal(0.0, 0.1)))} for i in range(2 + t // 20)}
        flags.append(scorer.score(step, loss=1.0).flagged)
    assert sum(flags) <= 4
