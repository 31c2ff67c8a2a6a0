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


def test_a_sample_the_loss_pulls_on_hardest_ranks_first_with_a_true_reason() -> None:
    """The output gradient's norm (a classifier head's ``p - y``) is scored upwards against the batch, on a log
    scale: the sample it pulls on five times as hard as the median ranks first, its reason gives the ratio."""
    rng = np.random.default_rng(6)
    metrics = batch(rng)
    pull = rng.lognormal(-3.0, 0.1, 16)
    pull[11] = 5.0 * np.median(np.delete(pull, 11))
    out = SampleScorer().score(metrics, output_gradient=pull)
    ranked = sorted(out, key=lambda e: -e["score"])
    assert ranked[0]["index"] == 11 and ranked[1]["score"] < 3.5
    reason = out[11]["reasons"][0]
    ratio = re.fullmatch(r"output gradient ([\d.]+)x the batch median: the loss pulls hard on it \(z=[\d.]+\)", reason)
    assert ratio is not None and float(ratio.group(1)) == pytest.approx(pull[11] / np.median(pull), rel=0.05)
    assert out[11]["metrics"]["output_gradient"] == pull[11]
    assert all(e["reasons"] == [] for e in out if e["index"] != 11)
    # without it, the same layers say nothing about sample 11
    assert max(SampleScorer().score(metrics), key=lambda e: e["score"])["score"] < 3.5
    # a small pull is a sample the model fits: not scored
    low = pull.copy()
    low[11] = np.median(pull) / 5.0
    assert max(e["score"] for e in SampleScorer().score(metrics, output_gradient=low)) < 3.5


def test_output_gradient_zero_nan_and_wrong_shape() -> None:
    """A zero or non-finite pull is left out of the term (a NaN sample still scores inf from its layers); a
    wrong number of values is an error that names the argument."""
    rng = np.random.default_rng(7)
    metrics = batch(rng, b=8)
    next(iter(metrics.values()))["frobenius_norm"][2] = np.nan
    pull = rng.lognormal(-3.0, 0.1, 8)
    pull[2], pull[4], pull[6] = np.nan, 0.0, np.inf
    out = SampleScorer().score(metrics, output_gradient=pull)
    assert out[2]["score"] == np.inf
    assert out[6]["score"] < 3.5 and not any(r.startswith("output gradient") for r in out[6]["reasons"])
    assert out[4]["score"] < 3.5 and np.isnan(out[2]["metrics"]["output_gradient"])
    with pytest.raises(ValueError, match=r"`output_gradient` must give 8 values, got shape \(3,\)"):
        SampleScorer().score(metrics, output_gradient=np.ones(3))


def test_with_the_output_gradient_a_large_gradient_at_an_ordinary_pull_is_not_a_reason() -> None:
    """Where the output gradient is given, the whole gradient's norm is not scored: it is the pull times what the
    layers below make of it (a short clean text: a large gradient at an ordinary loss). Without it, it is."""
    rng = np.random.default_rng(8)
    metrics = batch(rng)
    for layer in metrics.values():
        layer["frobenius_norm"][5] *= 12.0
    pull = rng.lognormal(-3.0, 0.1, 16)
    with_pull = SampleScorer().score(metrics, output_gradient=pull)
    assert max(e["score"] for e in with_pull) < 3.5 and all(e["reasons"] == [] for e in with_pull)
    without = SampleScorer().score(metrics)
    assert max(without, key=lambda e: e["score"])["index"] == 5 and without[5]["score"] > 3.5


def test_a_batch_the_loss_pulls_on_as_a_whole_is_seen_against_recent_samples() -> None:
    """Every sample pulled on 10x as hard as the samples of earlier batches: nobody stands out in the batch, the
    running baseline of output gradients names them all; it is kept in the state."""
    rng = np.random.default_rng(9)
    scorer = SampleScorer(min_history=32)
    for _ in range(4):
        scorer.score(batch(rng), output_gradient=rng.lognormal(-3.0, 0.1, 16))
    probe = batch(rng)
    pull = 10.0 * rng.lognormal(-3.0, 0.1, 16)
    copy = SampleScorer(min_history=32)
    copy.load_state_dict(scorer.state_dict())
    out = copy.score(probe, output_gradient=pull)
    assert all(e["score"] > 10 for e in out)
    assert all(any(r.startswith("output gradient") and "recent samples" in r for r in e["reasons"]) for e in out)
    assert max(e["score"] for e in SampleScorer(min_history=32).score(probe, output_gradient=pull)) < 3.5
    # one baseline per layer read at: pulls read at another layer are not compared with these
    other = copy.score(probe, output_gradient=pull, output_layer="classifier")
    assert max(e["score"] for e in other) < 3.5
    named = SampleScorer(min_history=32)
    for _ in range(4):
        named.score(batch(rng), output_gradient=rng.lognormal(-3.0, 0.1, 16), output_layer="classifier")
    out = named.score(probe, output_gradient=pull, output_layer="classifier")
    assert all(any(r.startswith("output gradient at classifier") for r in e["reasons"]) for e in out)
