"""The stability detector on series with known trends: collapse, growth, layers moving apart, non-finite
steps; quiet on stationary noise; one warning per episode; checkpointed; arguments checked."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from gradspectra.scoring import StabilityDetector

LAYERS = [f"encoder.attn/layer_{i:02d}" for i in range(6)]


def step_values(rank: float, norm: float, rng: np.random.Generator, noise: float = 0.2) -> dict[str, dict[str, float]]:
    """Each layer's effective rank and gradient norm, with log-normal noise of ``noise``."""
    return {
        k: {
            "effective_rank": rank * math.exp(noise * rng.standard_normal()),
            "frobenius_norm": norm * math.exp(noise * rng.standard_normal()),
        }
        for k in LAYERS
    }


def run(detector: StabilityDetector, values: list[dict[str, dict[str, float]]]) -> list[list[dict[str, str]]]:
    return [detector.update(v).events for v in values]


def first_warning(events: list[list[dict[str, str]]]) -> int | None:
    return next((i for i, e in enumerate(events) if e), None)


def test_stationary_noise_gives_no_warning() -> None:
    rng = np.random.default_rng(0)
    detector = StabilityDetector()
    events = run(detector, [step_values(20.0, 1.0, rng, noise=0.3) for _ in range(600)])
    assert first_warning(events) is None


def test_a_collapsing_effective_rank_warns_with_what_where_and_how_much() -> None:
    rng = np.random.default_rng(1)
    healthy = [step_values(20.0, 1.0, rng) for _ in range(60)]
    # the effective rank falls 15 % a step from step 60: 4x lower after ~9 steps
    falling = [step_values(20.0 * 0.85 ** (t + 1), 1.0, rng) for t in range(30)]
    detector = StabilityDetector()
    events = run(detector, healthy + falling)
    warned = first_warning(events)
    assert warned is not None and 60 < warned < 75
    (event,) = events[warned]
    assert event["kind"] == "instability"
    message = event["message"]
    assert "collapsing onto few directions" in message and "effective rank down" in message
    assert "encoder.attn layers 0-5" in message or "encoder.attn layers" in message
    factor = float(message.split("effective rank down ")[1].split("x")[0])
    assert factor >= 3.5  # over the limit, as said
    assert "lower the learning rate" in message
    # one warning per episode: the collapse goes on, no second event
    assert sum(bool(e) for e in events) == 1


def test_a_single_low_step_is_not_a_trend() -> None:
    rng = np.random.default_rng(2)
    values = [step_values(20.0, 1.0, rng) for _ in range(80)]
    for t in (50, 60):  # very low steps, apart: the median of the recent 3 does not move
        values[t] = step_values(1.0, 1.0, rng)
    assert first_warning(run(StabilityDetector(), values)) is None


def test_growing_gradients_and_layers_moving_apart() -> None:
    rng = np.random.default_rng(3)
    healthy = [step_values(20.0, 1.0, rng) for _ in range(50)]
    growing = [step_values(20.0, 1.4 ** (t + 1), rng) for t in range(20)]
    events = run(StabilityDetector(), healthy + growing)
    warned = first_warning(events)
    assert warned is not None and 50 < warned < 65
    assert "gradient norm up" in events[warned][0]["message"]

    apart = []
    for t in range(20):  # one layer's gradient grows 30 % a step, the others stay
        v = step_values(20.0, 1.0, rng)
        v[LAYERS[2]]["frobenius_norm"] *= 1.3 ** (t + 1)
        apart.append(v)
    events = run(StabilityDetector(), [step_values(20.0, 1.0, rng) for _ in range(50)] + apart)
    warned = first_warning(events)
    assert warned is not None
    assert "layers are moving apart" in events[warned][0]["message"]
    assert "encoder.attn layer 2" in events[warned][0]["message"]


def _losses(level: float, n: int, rng: np.random.Generator, fall: float = 1.0) -> list[float]:
    """``n`` losses around ``level``, multiplied by ``fall`` each step, with 10 % log-normal noise."""
    return [level * fall**t * math.exp(0.1 * rng.standard_normal()) for t in range(n)]


def test_gradients_growing_while_the_loss_falls_are_learning_not_instability() -> None:
    # a new head: the gradients reaching the pretrained layers grow 6x from step 10 to 42 while the loss
    # falls from 0.69 to 0.3 (a fresh fine-tune leaving its starting plateau): no warning
    rng = np.random.default_rng(10)
    values = [step_values(20.0, 1.06 ** min(32, max(0, t - 10)), rng) for t in range(90)]
    losses = [0.69 * max(0.43, 0.98**t) * math.exp(0.1 * rng.standard_normal()) for t in range(90)]
    detector = StabilityDetector()
    results = [detector.update(v, loss=loss) for v, loss in zip(values, losses)]
    assert all(not r.events for r in results)
    # the same gradients with a loss that does not fall (or with no loss given): a growth warning
    for flat in (_losses(0.69, 90, rng), [None] * 90):
        detector = StabilityDetector()
        events = [detector.update(v, loss=loss).events for v, loss in zip(values, flat)]
        warned = first_warning(events)
        assert warned is not None and "gradient norm up" in events[warned][0]["message"]
    # and a collapse of the effective rank warns even while the loss falls (what precedes a break)
    collapsing = [step_values(20.0 if t < 60 else 3.0, 1.0, rng) for t in range(90)]
    detector = StabilityDetector()
    events = [detector.update(v, loss=loss).events for v, loss in zip(collapsing, _losses(0.5, 90, rng, 0.98))]
    warned = first_warning(events)
    assert warned is not None and 60 < warned < 66 and "collapsing" in events[warned][0]["message"]


def test_the_loss_guard_needs_a_positive_loss_that_fell_by_loss_fall() -> None:
    rng = np.random.default_rng(11)
    healthy = [step_values(20.0, 1.0, rng) for _ in range(50)]
    growing = [step_values(20.0, 1.5 ** (t + 1), rng) for t in range(15)]
    for losses, warns in [
        ([0.5] * 50 + [0.45] * 15, True),  # fell 1.11x: under loss_fall=1.25, the growth counts
        ([0.5] * 50 + [0.38] * 15, False),  # fell 1.32x: learning
        ([-0.5] * 50 + [-2.0] * 15, True),  # not a positive loss: the guard does not apply
    ]:
        detector = StabilityDetector()
        events = [detector.update(v, loss=loss).events for v, loss in zip(healthy + growing, losses)]
        assert (first_warning(events) is not None) is warns, losses[-1]
    detector = StabilityDetector(loss_fall=1.1)
    events = [detector.update(v, loss=loss).events for v, loss in zip(healthy + growing, [0.5] * 50 + [0.45] * 15)]
    assert first_warning(events) is None


def _knocked_run(rng: np.random.Generator, stays: bool) -> tuple[list[dict[str, dict[str, float]]], list[float]]:
    """60 steady steps; then one batch far out of line (loss 20x, gradients 50x) that knocks the model: the
    gradients stay 6x up for 15 steps while it returns and the loss is back at 1.3x (``stays``: the loss stays
    20x and the gradients go on growing, a run that breaks)."""
    values = [step_values(20.0, 1.0, rng) for _ in range(60)] + [step_values(20.0, 50.0, rng)]
    losses = [0.3 * math.exp(0.05 * rng.standard_normal()) for _ in range(60)] + [6.0]
    for t in range(15):
        values.append(step_values(20.0, 6.0 * 1.3**t if stays else 6.0 * 0.9**t, rng))
        losses.append(6.0 if stays else 0.4)
    return values, losses


def test_the_aftermath_of_one_knock_is_not_growth_and_a_break_still_is() -> None:
    rng = np.random.default_rng(14)
    values, losses = _knocked_run(rng, stays=False)
    for knock, warns in ((10.0, False), (None, True), (30.0, True)):  # the premise: without the rule it warns
        detector = StabilityDetector(knock=knock)
        events = [detector.update(v, loss=loss).events for v, loss in zip(values, losses)]
        warned = first_warning(events)
        assert (warned is not None) is warns, knock
        if warned is not None:
            assert "gradient norm up" in events[warned][0]["message"]
    # the knock counts only while it lies in the recent window or the gap: once it is 11 steps back (in the
    # reference window), gradients still 6x up are growth again
    values, losses = _knocked_run(rng, stays=False)
    values[61:] = [step_values(20.0, 6.0, rng) for _ in values[61:]] + [step_values(20.0, 6.0, rng) for _ in range(6)]
    losses += [0.4] * 6
    detector = StabilityDetector()
    events = [detector.update(v, loss=loss).events for v, loss in zip(values, losses)]
    warned = first_warning(events)
    assert warned is not None and 60 + 3 + 8 <= warned < 60 + 3 + 8 + 4, warned
    # spikes again and again are no knock: a loss 12x every 5 steps while the gradients grow, a run in trouble
    values = [step_values(20.0, 1.0, rng) for _ in range(60)] + [step_values(20.0, 1.2**t, rng) for t in range(30)]
    losses = [0.3] * 60 + [3.6 if t % 5 == 0 else 0.35 for t in range(30)]
    for knock in (10.0, None):
        detector = StabilityDetector(knock=knock)
        events = [detector.update(v, loss=loss).events for v, loss in zip(values, losses)]
        warned = first_warning(events)
        assert warned is not None and warned < 80 and "gradient norm up" in events[warned][0]["message"], knock
    # the loss stays up: no knock to return from, the growth warns
    values, losses = _knocked_run(rng, stays=True)
    detector = StabilityDetector()
    events = [detector.update(v, loss=loss).events for v, loss in zip(values, losses)]
    warned = first_warning(events)
    assert warned is not None and 60 < warned < 66 and "gradient norm up" in events[warned][0]["message"]


def test_non_finite_steps_warn_and_never_enter_the_series() -> None:
    rng = np.random.default_rng(4)
    values: list[Any] = [step_values(20.0, 1.0, rng) for _ in range(40)]
    detector = StabilityDetector()
    assert first_warning(run(detector, values)) is None
    bad = {k: {"effective_rank": math.nan, "frobenius_norm": math.inf} for k in LAYERS}
    events = run(detector, [bad, bad, bad])
    assert first_warning(events) == 1  # at once, on the 2nd non-finite step
    assert "non-finite gradients or loss in 2 of the last 3 steps" in events[1][0]["message"]
    # a NaN loss alone counts too
    detector = StabilityDetector(nonfinite=1, persist=1)
    run(detector, values)
    result = detector.update(step_values(20.0, 1.0, rng), loss=math.nan)
    assert result.events and "non-finite" in result.events[0]["message"]


def test_rearms_after_recovery() -> None:
    rng = np.random.default_rng(5)
    values = [step_values(20.0, 1.0, rng) for _ in range(50)]
    values += [step_values(4.0, 1.0, rng) for _ in range(10)]  # a collapse
    values += [step_values(4.0, 1.0, rng) for _ in range(60)]  # the new level, for long: the reference follows
    values += [step_values(0.8, 1.0, rng) for _ in range(10)]  # a second collapse
    events = run(StabilityDetector(), values)
    warned = [i for i, e in enumerate(events) if e]
    assert len(warned) == 2
    assert 50 < warned[0] < 60 and 120 < warned[1] < 130


def test_only_series_with_enough_values_count() -> None:
    # a value that reaches a layer every 50 steps (a rotating full spectrum) never builds a reference
    detector = StabilityDetector()
    for t in range(300):
        metrics = {LAYERS[0]: {"frobenius_norm": 1.0}}
        if t % 50 == 0:
            metrics[LAYERS[1]] = {"top_sv_ratio": 0.1 if t < 200 else 0.9}
        assert detector.update(metrics).events == []


def test_detection_values_are_the_effective_rank_coarse_series() -> None:
    rng = np.random.default_rng(6)
    detector = StabilityDetector()
    for t in range(80):
        rank = 30.0 if t < 60 else 5.0
        detection = {LAYERS[0]: rank * math.exp(0.1 * rng.standard_normal())}
        result = detector.update({LAYERS[0]: {"frobenius_norm": 1.0}}, detection)
        if result.events:
            assert "effective rank (detection value) down" in result.events[0]["message"]
            assert 60 < t < 70
            return
    pytest.fail("no warning")


def test_state_dict_round_trip_continues_identically() -> None:
    rng = np.random.default_rng(7)
    values = [step_values(20.0, 1.0, rng) for _ in range(40)] + [step_values(3.0, 1.0, rng) for _ in range(10)]
    # gradients growing 3x a step at the end while the loss falls: the loss kept in the state keeps it quiet
    values += [step_values(3.0, 3.0**t, rng) for t in range(1, 8)]
    losses = [1.0] * 50 + [0.5] * 7
    whole = StabilityDetector()
    expected = [whole.update(v, loss=loss) for v, loss in zip(values, losses)]
    assert sum(bool(r.events) for r in expected) == 1  # the collapse
    assert all("growth" not in r.severities for r in expected[53:])  # the loss has fallen: not counted
    for cut in (45, 52):
        first = StabilityDetector()
        for v, loss in zip(values[:cut], losses):
            first.update(v, loss=loss)
        second = StabilityDetector()
        second.load_state_dict(first.state_dict())
        resumed = [second.update(v, loss=loss) for v, loss in zip(values[cut:], losses[cut:])]
        assert [r.events for r in resumed] == [r.events for r in expected[cut:]]
        assert [r.score for r in resumed] == pytest.approx([r.score for r in expected[cut:]])
        assert [sorted(r.severities) for r in resumed] == [sorted(r.severities) for r in expected[cut:]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recent": 0}, "`recent` must be an integer in [1, inf), got 0"),
        ({"collapse": 1.0}, "`collapse` must be a finite number in (1.0, inf), got 1.0"),
        ({"growth": math.nan}, "`growth` must be a finite number"),
        ({"nonfinite": 9}, "`nonfinite` must be an integer in [1, recent=3], got 9"),
        ({"persist": True}, "`persist` must be an integer"),
        ({"loss_fall": 0.9}, "`loss_fall` must be a finite number in (1.0, inf), got 0.9"),
        ({"knock": 1.5}, "`knock` must be a finite number in (2.0, inf), got 1.5"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        StabilityDetector(**kwargs)


def test_the_vectorised_median_is_numpys_nanmedian() -> None:
    from gradspectra.scoring.stability import _nanmedian

    rng = np.random.default_rng(8)
    for rows, holes in [(r, h) for r in (1, 2, 3, 7, 30) for h in (True, False)]:
        block = rng.standard_normal((rows, 40))
        if holes:
            block[rng.random(block.shape) < 0.4] = np.nan
            block[:, 0] = np.nan  # a column with no value
        median, count = _nanmedian(block)
        assert np.array_equal(count, np.count_nonzero(~np.isnan(block), axis=0))
        with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            expected = np.nanmedian(block, axis=0)
        assert np.allclose(median, expected, equal_nan=True, rtol=0, atol=1e-15)


class _NeverSkip(dict):  # type: ignore[type-arg]
    """A `_last_put` that says every value is recent: the detector then measures every series every step."""

    def get(self, key: object, default: object = None) -> int:
        return 10**9


def test_series_absent_from_the_recent_steps_are_skipped_without_changing_a_verdict() -> None:
    # light steps carry only the gradient norm; the effective rank comes on full steps (here 2 of every 5,
    # then collapsing): skipping the series with no recent value must not change a score or a warning,
    # also across a checkpoint taken at any step
    rng = np.random.default_rng(8)
    values = []
    for t in range(160):
        v = step_values(20.0 if t < 110 else 2.0, 1.0 * 1.01**t, rng)
        if t % 5 not in (0, 1):
            v = {k: {"frobenius_norm": m["frobenius_norm"]} for k, m in v.items()}
        values.append(v)
    skipping, measuring = StabilityDetector(), StabilityDetector()
    measuring._last_put = _NeverSkip()
    got = [skipping.update(v) for v in values]
    want = [measuring.update(v) for v in values]
    assert [r.events for r in got] == [r.events for r in want]
    assert [r.score for r in got] == pytest.approx([r.score for r in want], nan_ok=True)
    assert any(r.events for r in got)  # the collapse is warned
    for cut in (111, 112, 113, 114):
        first = StabilityDetector()
        for v in values[:cut]:
            first.update(v)
        second = StabilityDetector()
        second.load_state_dict(first.state_dict())
        resumed = [second.update(v) for v in values[cut:]]
        assert [r.events for r in resumed] == [r.events for r in got[cut:]]
        assert [r.score for r in resumed] == pytest.approx([r.score for r in got[cut:]], nan_ok=True)


def test_zero_or_negative_values_are_left_out_and_are_not_non_finite() -> None:
    # a dead layer's gradient norm is 0: no log to store and nothing wrong with the step; other layers go on
    rng = np.random.default_rng(9)
    detector = StabilityDetector(nonfinite=1, persist=1)
    for t in range(45):
        values = step_values(20.0, 1.0, rng)
        values[LAYERS[0]]["frobenius_norm"] = 0.0
        values[LAYERS[1]]["frobenius_norm"] = -1.0 if t % 2 else 0.0
        result = detector.update(values)
        assert not result.events
    stored = detector.state_dict()["values"]["frobenius_norm"]
    column = detector.state_dict()["layers"].index
    assert all(math.isnan(row[column(LAYERS[0])]) and math.isnan(row[column(LAYERS[1])]) for row in stored)
    assert all(math.isfinite(row[column(LAYERS[2])]) for row in stored)
    # an infinite value in one layer of one step is a non-finite step (and is not stored either)
    values = step_values(20.0, 1.0, rng)
    values[LAYERS[3]]["frobenius_norm"] = math.inf
    result = detector.update(values)
    assert result.events and "non-finite" in result.events[0]["message"]
