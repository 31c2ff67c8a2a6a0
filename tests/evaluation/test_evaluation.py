"""auroc against a brute-force pairwise count; the peer detectors' semantics."""

from __future__ import annotations

import math
import pickle
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradspectra.evaluation import ZScoreDetector, auroc, average_ranks, global_grad_norm


def pairwise_auroc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.sampled_from([-math.inf, -1.0, 0.0, 0.5, 1.0, 2.0, math.inf]) | st.floats(-5, 5), st.booleans()),
        min_size=2,
        max_size=40,
    ).filter(lambda d: any(y for _, y in d) and not all(y for _, y in d))
)
def test_auroc_matches_pairwise_count(data: list[tuple[float, bool]]) -> None:
    scores = [s for s, _ in data]
    labels = [y for _, y in data]
    assert auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)
    assert auroc(scores, [int(y) for y in labels]) == auroc(scores, np.array(labels))


def test_auroc_extremes_and_ties() -> None:
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5


def test_average_ranks_match_scipy() -> None:
    from scipy.stats import rankdata

    x = np.random.default_rng(0).integers(0, 5, size=50).astype(float)
    np.testing.assert_array_equal(average_ranks(x), rankdata(x))


@pytest.mark.parametrize(
    ("scores", "labels", "pattern"),
    [
        ([0.1, 0.2], [0, 1, 1], "same length"),
        ([0.1, math.nan], [0, 1], "NaN"),
        ([0.1, None], [0, 1], "NaN"),
        ([0.1, 0.2], [0, 2], "0/1 or booleans"),
        ([0.1, 0.2], [1, 1], "both classes"),
    ],
)
def test_auroc_rejects_bad_input(scores: list[float], labels: list[int], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        auroc(scores, labels)


def test_zscore_detector_matches_mean_and_stdev_and_keeps_flagged_out() -> None:
    rng = np.random.default_rng(0)
    det = ZScoreDetector(name="loss", warmup_steps=10, window=30)
    accepted: list[float] = []
    for t in range(200):
        value = float(rng.normal(1.0, 0.1)) + (2.0 if t % 25 == 24 else 0.0)
        expected = None
        if len(accepted) >= 10:
            window = accepted[-30:]
            expected = (value - statistics.mean(window)) / statistics.stdev(window)
        result = det.score(value)
        if expected is None:
            assert result.in_warmup and result.score is None and not result.flagged
            accepted.append(value)
            continue
        assert result.z["loss"] == pytest.approx(expected, rel=1e-9)
        assert result.score == pytest.approx(abs(expected), rel=1e-9)
        assert result.flagged == (abs(expected) > 3.0)
        if t % 25 == 24:
            assert result.flagged and result.reasons == [f"loss high (z={expected:.1f})"]
        if not result.flagged:
            accepted.append(value)


@pytest.mark.parametrize(
    ("side", "value", "flagged"), [("high", 5.0, True), ("high", -5.0, False), ("low", -5.0, True)]
)
def test_zscore_detector_one_sided(side: str, value: float, flagged: bool) -> None:
    det = ZScoreDetector(side=side, warmup_steps=5)  # type: ignore[arg-type]
    for v in (0.0, 1.0, -1.0, 0.5, -0.5):
        det.score(v)
    result = det.score(value)
    assert result.flagged == flagged
    assert result.score is not None and (result.score > 0) == flagged


def test_zscore_detector_nonfinite_log_and_state() -> None:
    det = ZScoreDetector(name="grad_norm", warmup_steps=5, log=True)
    nan_warm = det.score(math.nan)
    assert nan_warm.flagged and nan_warm.score is None and nan_warm.reasons == ["non-finite grad_norm (nan)"]
    for v in (1.0, 1.1, 0.9, 1.05, 0.95, 1.0):
        det.score(v)
    assert det.score(math.inf).score == math.inf
    assert det.score(None).score is None
    clone = ZScoreDetector(name="grad_norm", warmup_steps=5, log=True)
    clone.load_state_dict(pickle.loads(pickle.dumps(det.state_dict())))
    assert clone.score(3.0) == det.score(3.0)
    assert det.score(3.0).z["grad_norm"] == pytest.approx(
        (math.log(3.0) - statistics.mean(math.log(v) for v in (1.0, 1.1, 0.9, 1.05, 0.95, 1.0)))
        / statistics.stdev(math.log(v) for v in (1.0, 1.1, 0.9, 1.05, 0.95, 1.0))
    )


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"side": "up"}, r"`side` can be both, high, low, got 'up'"),
        ({"threshold": 0.0}, r"`threshold` must be a finite number in \(0.0, inf\), got 0.0"),
        ({"warmup_steps": 1}, r"`warmup_steps` must be an integer in \[2, window=200\], got 1"),
        ({"window": 1}, r"`window` must be an integer in \[2, inf\), got 1"),
        ({"name": ""}, r"`name` must be a non-empty string"),
    ],
)
def test_zscore_detector_bad_arguments(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ZScoreDetector(**kwargs)  # type: ignore[arg-type]


def test_global_grad_norm() -> None:
    layers = {"a": {"frobenius_norm": 1.0}, "b": {"frobenius_norm": 2.0}, "c": {"nuclear_norm": 9.0}}
    assert global_grad_norm(layers) == pytest.approx(math.sqrt(5.0))
    assert math.isnan(global_grad_norm({"a": {"frobenius_norm": math.nan}}))


def test_the_runtime_scoring_package_does_not_export_the_benchmark_tools() -> None:
    import gradspectra.scoring

    assert not {"ZScoreDetector", "auroc", "average_ranks", "global_grad_norm"} & set(dir(gradspectra.scoring))


# ---------------------------------------------------------------------------------------------- stability peers


def test_spike_detection_rule_is_lightnings_rule() -> None:
    from gradspectra.evaluation import SpikeDetectionRule

    rule = SpikeDetectionRule()  # window 10, warmup 1, rtol 2: a spike is >= 3x the running mean and worse
    assert [rule.update(1.0) for _ in range(10)] == [False] * 10
    assert rule.update(2.9) is False  # |2.9 - 1| < 2 * 1
    rule = SpikeDetectionRule()
    for _ in range(10):
        rule.update(1.0)
    assert rule.update(3.1) is True
    assert rule.update(3.1) is True  # the spike did not enter the window
    assert rule.update(0.5) is False  # better than the last accepted value: never a spike
    assert rule.update(float("nan")) is True
    assert rule.update(None) is False


def test_kill_loss_spike_rule_needs_a_full_window_and_patience() -> None:
    from gradspectra.evaluation import KillLossSpikeRule

    rule = KillLossSpikeRule(window=5, multiplier=2.0, patience=2)
    assert [rule.update(v) for v in [9.0, 9.0, 9.0, 9.0]] == [False] * 4  # window not full: nothing is an outlier
    rule = KillLossSpikeRule(window=5, multiplier=2.0, patience=2)
    fired = [rule.update(v) for v in [1.0] * 5 + [20.0, 20.0, 20.0, 1.0, 20.0]]
    # 3 outliers in a row fire (patience 2); every finite loss enters the window, so its mean rises
    # (4.8, 8.6, then 12.4: the 1.0 breaks the run, and 20 is no longer twice the mean)
    assert fired == [False] * 5 + [False, False, True, False, False]
    rule = KillLossSpikeRule(window=5, multiplier=2.0, patience=2)
    assert [rule.update(v) for v in [1.0] * 5 + [5.0, 5.0, 5.0]] == [False] * 8  # 5 > 3.6, not > 5.2: reset


def test_grad_norm_z_rule() -> None:
    from gradspectra.evaluation import GradNormZRule

    rule = GradNormZRule(warmup=5)
    assert [rule.update(v) for v in [1.0, 1.2, 0.8, 1.1, 0.9]] == [False] * 5
    assert rule.update(1.05) is False
    assert rule.update(10.0) is True  # far above the EMA: fires, and does not move the statistics
    assert rule.update(1.0) is False
    assert rule.update(float("inf")) is True
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number in \(0.0, 1.0\), got 1.0"):
        GradNormZRule(alpha=1.0)
