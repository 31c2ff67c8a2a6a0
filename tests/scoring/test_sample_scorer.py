"""SampleScorer: which samples of a batch stand out, and reasons that are true as written."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gradspectra.scoring import SampleScorer


def batch(rng: np.random.Generator, b: int = 16, layers: int = 6) -> dict[str, dict[str, np.ndarray]]:
    return {
        f"layer_{k}": {
            "nuclear_norm": rng.lognormal(0.0, 0.1, b),
            "frobenius_norm": rng.lognormal(-1.0, 0.1, b),
            "effective_rank": rng.lognormal(2.0, 0.05, b),
            "top_sv_ratio": rng.lognormal(-1.5, 0.05, b),
        }
        for k in range(layers)
    }


def test_a_large_gradient_in_most_layers_ranks_first_with_a_true_reason() -> None:
    rng = np.random.default_rng(0)
    metrics = batch(rng)
    for k, layer in enumerate(metrics.values()):
        if k < 5:  # five of six layers
            layer["frobenius_norm"][4] *= 8.0
    out = SampleScorer().score(metrics)
    ranked = sorted(out, key=lambda e: -e["score"])
    assert ranked[0]["index"] == 4 and ranked[1]["score"] < 3.5
    reason = next(r for r in ranked[0]["reasons"] if r.startswith("gradient norm"))
    pattern = r"gradient norm ([\d.]+)x the batch median \(z=[\d.]+; (\d+)/(\d+) layers at z >= 3.5 against the batch\)"
    ratio, count, measured = re.fullmatch(pattern, reason).groups()
    assert (int(count), int(measured)) == (5, 6)  # exactly the layers that moved, of those measured
    # the ratio is of the whole gradient's norm (root of the sum of squares over layers) to the batch median
    total = np.sqrt(np.sum(np.array([layer["frobenius_norm"] for layer in metrics.values()]) ** 2, axis=0))
    assert float(ratio) == pytest.approx(total[4] / np.median(total), rel=0.05)
    assert all(e["reasons"] == [] for e in out if e["index"] != 4)


def test_a_collapsed_effective_rank_is_a_low_reason() -> None:
    rng = np.random.default_rng(1)
    metrics = batch(rng)
    for layer in metrics.values():
        layer["effective_rank"][9] /= 4.0
    out = SampleScorer().score(metrics)
    assert max(out, key=lambda e: e["score"])["index"] == 9
    assert any(r.startswith("effective rank 0.25x the batch median in 6/6 layers") for r in out[9]["reasons"])


def test_near_identical_gradients_are_named_with_their_partners() -> None:
    rng = np.random.default_rng(2)
    metrics = batch(rng, b=12)
    cos = rng.uniform(0.0, 0.3, (12, 12))
    cos = (cos + cos.T) / 2
    np.fill_diagonal(cos, 1.0)
    for i, j in ((3, 7), (3, 10), (7, 10)):
        cos[i, j] = cos[j, i] = 0.99
    out = SampleScorer().score(metrics, cosines=cos, ids=[f"s{i}" for i in range(12)])
    top = sorted(out, key=lambda e: -e["score"])[:3]
    assert {e["index"] for e in top} == {3, 7, 10}
    assert "gradient almost identical to samples 7 and 10 (cosine 0.99, batch mean removed)" in out[3]["reasons"]
    assert out[3]["id"] == "s3"
    assert all(not r.startswith("gradient almost") for e in out if e["index"] not in (3, 7, 10) for r in e["reasons"])


def test_non_finite_and_zero_gradients_are_reported_not_dropped() -> None:
    rng = np.random.default_rng(3)
    metrics = batch(rng, b=8)
    list(metrics.values())[2]["nuclear_norm"][1] = np.nan
    for layer in metrics.values():
        for name in layer:
            layer[name][5] = 0.0  # a sample whose loss does not reach these layers
    out = SampleScorer().score(metrics, tokens=[4] * 8)
    assert out[1]["score"] == np.inf and out[1]["reasons"][0] == "non-finite gradient in 1/6 layers"
    assert np.isnan(out[1]["metrics"]["nuclear_norm"])
    assert out[5]["reasons"][0].startswith("no gradient") and np.isfinite(out[5]["score"])
    assert len(out) == 8 and out[0]["tokens"] == 4


def test_the_running_baseline_sees_a_batch_that_is_bad_as_a_whole() -> None:
    rng = np.random.default_rng(4)
    scorer = SampleScorer(min_history=32)
    for _ in range(4):
        scorer.score(batch(rng))
    whole = batch(rng)
    for layer in whole.values():
        layer["frobenius_norm"] *= 10.0  # every sample: nobody stands out from the batch
    out = scorer.score(whole)
    assert all(e["score"] > 10 for e in out)
    assert all(any("recent samples" in r for r in e["reasons"]) for e in out)
    fresh = SampleScorer(min_history=32).score(whole)
    assert all(e["score"] < 3.5 for e in fresh)  # without a baseline the batch alone cannot say


def test_state_round_trip_keeps_the_baseline() -> None:
    rng = np.random.default_rng(5)
    scorer = SampleScorer(min_history=16)
    for _ in range(3):
        scorer.score(batch(rng))
    copy = SampleScorer(min_history=16)
    copy.load_state_dict(scorer.state_dict())
    probe = batch(rng)
    for layer in probe.values():
        layer["frobenius_norm"] *= 10.0  # bad as a whole: only the running baseline can say
    want = [e["score"] for e in scorer.score(probe)]
    assert [e["score"] for e in copy.score(probe)] == want
    assert min(want) > 3.5
    assert max(e["score"] for e in SampleScorer(min_history=16).score(probe)) < 3.5  # without the state


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0}, "`threshold` must be a positive number, got 0"),
        ({"duplicate_cosine": 1.5}, r"`duplicate_cosine` must be in \(0, 1\], got 1.5"),
        ({"history": 0}, "`history` must be a positive int, got 0"),
        ({"min_history": 600}, r"`min_history` must be an int in \[1, history=512\], got 600"),
        ({"duplicate_cosine": "high"}, r"`duplicate_cosine` must be in \(0, 1\], got 'high'"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SampleScorer(**kwargs)  # type: ignore[arg-type]


def test_mismatched_metrics_are_an_error() -> None:
    with pytest.raises(ValueError, match="`metrics` must give 3 values of 'nuclear_norm' in every layer"):
        SampleScorer().score({"a": {"nuclear_norm": np.ones(3)}, "b": {"nuclear_norm": np.ones(4)}})
