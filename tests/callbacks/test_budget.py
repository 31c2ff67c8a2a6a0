"""OverheadBudget: plans partition the layers, spending follows the budget, round-robin reaches every layer."""

from __future__ import annotations

import itertools
import math

import pytest

from gradspectra.monitoring.budget import CHEAP, DETECT, DETECT_MAX, ESTIMATE, EXACT, MAX_PERIOD, OverheadBudget, Plan

SHAPES = [(384, 384)] * 24 + [(1536, 384)] * 6 + [(384, 1536)] * 6


def true_cost(kind: str, shape: tuple[int, int]) -> float:
    """A made-up machine: exact 15 ms per 384^2, estimates 2 ms, both proportional to m * n."""
    m, n = shape
    unit = m * n / (384 * 384)
    return (0.015 if kind == EXACT else 0.002) * unit


def spend_full(budget: OverheadBudget, plan: Plan) -> float:
    """Do a plan's full-spectrum work on the made-up machine: teach the budget, charge it, return the seconds."""
    spent = 0.0
    for kind, rows in ((EXACT, plan.exact), (ESTIMATE, plan.estimate + plan.audit)):
        seconds = sum(true_cost(kind, budget.shapes[i]) for i in rows)
        budget.observe_work(kind, rows, seconds)
        spent += seconds
    budget.spend(spent)
    return spent


def simulate(budget: OverheadBudget, steps: int, step_seconds: float = 1.0, fixed: float = 0.005) -> list[Plan]:
    plans = []
    for _ in range(steps):
        budget.observe_step(step_seconds)
        plan = budget.plan()
        spent = spend_full(budget, plan)
        budget.observe_fixed(fixed)
        plans.append(plan)
        plan_cost = spent
        plan.__dict__["cost"] = plan_cost
    return plans


def check_partition(plan: Plan, n: int) -> None:
    assert sorted(plan.exact + plan.estimate + plan.deferred) == list(range(n))
    assert set(plan.audit) <= set(plan.exact)


@pytest.mark.parametrize("max_overhead", [0.01, 0.03, 0.1])
def test_spending_follows_the_budget(max_overhead: float) -> None:
    budget = OverheadBudget(SHAPES, max_overhead)
    plans = simulate(budget, 300)
    for plan in plans:
        check_partition(plan, len(SHAPES))
    allowed = 0.8 * max_overhead * 1.0 - 0.005  # the budget plans to 80 % of max_overhead
    spent = [p.__dict__["cost"] for p in plans[20:]]
    mean = sum(spent) / len(spent)
    # on average at most the budget, and not leaving most of it unused
    assert mean <= allowed * 1.05
    assert mean >= allowed * 0.6


def test_all_exact_when_the_budget_covers_it() -> None:
    budget = OverheadBudget(SHAPES, 2.0)
    plans = simulate(budget, 10)
    assert all(plan.exact == list(range(len(SHAPES))) for plan in plans[2:])
    assert all(not plan.estimate and not plan.deferred for plan in plans[2:])


def test_all_estimated_with_audits_in_turn_when_estimates_fit() -> None:
    # estimates of all 36 layers: 24 * 2 + 12 * 8 = 144 ms; three quarters of 80 % of 30 % of a 1 s
    # step (the rest goes to audits and headroom), 180 ms, cover them
    budget = OverheadBudget(SHAPES, 0.3)
    plans = simulate(budget, 200)
    late = plans[20:]
    assert all(not plan.deferred for plan in late)
    audited = [i for plan in late for i in plan.audit]
    assert len(audited) >= 20
    # audits walk through the layers in order, wrapping around
    assert all((b - a) % len(SHAPES) == 1 for a, b in itertools.pairwise(audited))


def test_round_robin_reaches_every_layer_when_starved() -> None:
    budget = OverheadBudget(SHAPES, 0.02)
    plans = simulate(budget, 200)
    late = plans[20:]
    assert any(plan.deferred for plan in late)
    last_seen = {}
    for t, plan in enumerate(late):
        for i in plan.exact + plan.estimate:
            last_seen.setdefault(i, []).append(t)
    assert set(last_seen) == set(range(len(SHAPES)))
    gaps = [b - a for seen in last_seen.values() for a, b in itertools.pairwise(seen)]
    # a full round of estimates costs 144 ms; three quarters of the 11 ms a step earns (80 % of 20 ms,
    # less 5 ms fixed) go to them
    full_round = sum(true_cost(ESTIMATE, shape) for shape in SHAPES) / (0.75 * (0.8 * 0.02 - 0.005))
    assert max(gaps) <= 1.5 * full_round


def test_first_plan_measures_one_layer_per_shape() -> None:
    budget = OverheadBudget(SHAPES, 0.03)
    plan = budget.plan()  # no step time known yet
    check_partition(plan, len(SHAPES))
    assert sorted({SHAPES[i] for i in plan.estimate}) == sorted(set(SHAPES))
    assert len(plan.estimate) == 3
    assert not plan.exact


def test_costs_are_learned_from_measurements() -> None:
    budget = OverheadBudget([(100, 100), (200, 200)], 0.03)
    budget.observe_work(EXACT, [0], 0.5)
    assert budget.cost(EXACT, 0) == pytest.approx(0.5)
    budget.observe_work(EXACT, [0], 1.0)
    assert 0.5 < budget.cost(EXACT, 0) < 1.0
    # an unmeasured shape is predicted from the learned seconds per flop, larger for the larger shape
    assert budget.cost(EXACT, 1) > budget.cost(EXACT, 0)
    with pytest.raises(ValueError, match="`kind`"):
        budget.observe_work("svd", [0], 1.0)


def test_measurements_that_are_not_times_are_ignored() -> None:
    budget = OverheadBudget(SHAPES, 0.03)
    budget.observe_step(math.nan)
    budget.observe_step(-1.0)
    assert budget.step_seconds is None
    budget.observe_fixed(math.inf)
    assert budget.fixed_seconds == 0.0
    budget.observe_step(2.0)
    assert budget.per_step == pytest.approx(0.8 * 0.06)


@pytest.mark.parametrize("bad", [0, -0.1, 11.0, math.nan])
def test_bad_max_overhead_names_the_argument(bad: float) -> None:
    with pytest.raises(ValueError, match=r"`max_overhead` must be in \(0, 10\], got"):
        OverheadBudget(SHAPES, bad)


@pytest.mark.parametrize("bad", ["0.03", True, None])
def test_max_overhead_of_the_wrong_type_names_the_argument(bad: object) -> None:
    with pytest.raises(TypeError, match="`max_overhead` must be a float"):
        OverheadBudget(SHAPES, bad)  # type: ignore[arg-type]


def test_no_layers_gives_empty_plans() -> None:
    budget = OverheadBudget([], 0.03)
    budget.observe_step(1.0)
    assert budget.plan() == Plan()


def test_exact_where_it_is_no_dearer_than_an_estimate() -> None:
    # tiny matrices: an SVD costs less than the estimator's fixed work
    budget = OverheadBudget([(8, 8)] * 4 + [(384, 384)] * 4, 0.05)
    for i in range(4):
        budget.observe_work(EXACT, [i], 0.0001)
        budget.observe_work(ESTIMATE, [i], 0.001)
        budget.observe_work(EXACT, [4 + i], 0.015)
        budget.observe_work(ESTIMATE, [4 + i], 0.002)
    budget.observe_step(1.0)
    plan = budget.plan()
    check_partition(plan, 8)
    assert set(range(4)) <= set(plan.exact)
    assert not set(range(4)) & set(plan.estimate)


def test_tiny_matrices_do_not_teach_the_flop_rate() -> None:
    # a 2 x 384 head costs call overhead (1 ms), not flops; it must not price a 4096^2 SVD at hours
    budget = OverheadBudget([(2, 384), (4096, 4096)], 0.03)
    before = budget.cost(EXACT, 1)
    budget.observe_work(EXACT, [0], 0.001)
    assert budget.cost(EXACT, 1) == before
    budget.observe_work(EXACT, [1], 20.0)
    assert budget.cost(EXACT, 1) == pytest.approx(20.0)


def test_figures_are_spaced_to_a_quarter_of_the_budget_and_taken_off_the_spectra() -> None:
    budget = OverheadBudget(SHAPES, 0.03)
    assert budget.figure_period(100, 12) == 100  # no step time yet: the user's spacing
    budget.observe_step(1.0)
    before = budget.per_step
    # prior 0.5 s per figure: 6 s; a quarter of 80 % of 30 ms is 6 ms per step -> every 1000 steps
    assert budget.figure_period(100, 12) == 1000
    assert budget.per_step == pytest.approx(before - 6.0 / 1000)
    budget.observe_figures(0.3)  # measured: cheap figures keep the user's spacing
    assert budget.figure_period(100, 12) == 100
    assert budget.per_step == pytest.approx(before - 0.3 / 100)
    budget.observe_figures(math.nan)  # not a time: ignored
    assert budget.figure_seconds == pytest.approx(0.3)
    budget.observe_figures(3.0)  # a dearer drawing moves the average by the moving-average weight
    assert budget.figure_seconds == pytest.approx(0.7 * 0.3 + 0.3 * 3.0)
    assert budget.figure_period(100, 12) == math.ceil(budget.figure_seconds / 0.006)
    with pytest.raises(ValueError, match="`min_steps` must be >= 1, got 0"):
        budget.figure_period(0, 12)


def test_logging_is_spaced_and_paid_for_like_figures() -> None:
    budget = OverheadBudget([(64, 64)] * 4, max_overhead=0.03)
    budget.observe_step(0.020)  # a 20 ms step: 0.8 * 3% = 0.48 ms planned per step
    assert budget.log_period(1) == 1  # nothing measured yet
    before = budget.per_step
    budget.observe_logging(0.004)  # one logging of the per-layer scalars: 4 ms
    period = budget.log_period(1)
    # at most a quarter of the planned 0.48 ms per step: 4 ms / 0.12 ms -> every 34th step
    assert period == 34
    assert budget.per_step == pytest.approx(before - 0.004 / period)
    assert budget.log_period(50) == 50  # the user's own spacing is the floor
    with pytest.raises(ValueError, match="`min_steps` must be >= 1"):
        budget.log_period(0)


# --------------------------------------------------------------------------- the cheap tier

CHEAP_COST = 0.0004  # a made-up 0.4 ms per 384^2 matrix for the three products
DETECT_COST = 0.0009  # and a made-up 0.9 ms per 384^2 anchor for the detection value


def simulate_cheap(budget: OverheadBudget, steps: int, step_seconds: float = 1.0) -> list[tuple[Plan, float, float]]:
    """Like :func:`simulate`, with the cheap tier and the detection value timed apart (paid up front, not
    charged to the credit)."""
    out = []
    for _ in range(steps):
        budget.observe_step(step_seconds)
        plan = budget.plan()
        cheap = sum(CHEAP_COST * budget.shapes[i][0] * budget.shapes[i][1] / 384**2 for i in plan.cheap)
        detect = sum(DETECT_COST * budget.shapes[i][0] * budget.shapes[i][1] / 384**2 for i in plan.detect)
        if plan.cheap:
            budget.observe_work(CHEAP, plan.cheap, cheap)
        if plan.detect:
            budget.observe_work(DETECT, plan.detect, detect)
        cheap += detect
        spent = spend_full(budget, plan)
        budget.observe_fixed(0.002)
        out.append((plan, cheap, spent))
    return out


def test_the_cheap_tier_comes_first_and_full_spectra_rotate_with_the_rest() -> None:
    # the cheap tier of all 36 layers costs 24 * 0.4 + 12 * 1.6 = 28.8 ms, six detection anchors ~6-20 ms;
    # 3 % of a 2.5 s step plans 60 ms
    fresh = OverheadBudget(SHAPES, 0.03, cheap=True)
    first = fresh.plan()
    assert first.cheap == list(range(len(SHAPES)))  # no step time yet: every layer, to calibrate
    assert len(first.detect) == DETECT_MAX
    budget = OverheadBudget(SHAPES, 0.03, cheap=True)
    steps = simulate_cheap(budget, 400, step_seconds=2.5)
    for plan, _, _ in steps[20:]:
        check_partition(plan, len(SHAPES))
        assert plan.cheap == list(range(len(SHAPES)))
        assert plan.detect == budget.anchors and len(plan.detect) == DETECT_MAX
    allowed = 0.8 * 0.03 * 2.5 - 0.002
    total = [cheap + spent for _, cheap, spent in steps[50:]]
    assert sum(total) / len(total) <= allowed * 1.05
    # what is left rotates full spectra through every layer: each gets one within a bounded number of steps
    seen: dict[int, list[int]] = {}
    for t, (plan, _, _) in enumerate(steps[20:]):
        for i in plan.exact + plan.estimate:
            seen.setdefault(i, []).append(t)
    assert set(seen) == set(range(len(SHAPES)))
    gaps = [b - a for ts in seen.values() for a, b in itertools.pairwise(ts)]
    assert max(gaps) <= 200


def test_a_short_budget_rotates_the_cheap_tier_and_keeps_a_share_for_full_spectra() -> None:
    # 3 % of a 0.5 s step plans 12 ms: not the 28.8 ms of the whole cheap tier
    budget = OverheadBudget(SHAPES, 0.03, cheap=True)
    steps = simulate_cheap(budget, 300, step_seconds=0.5)
    counts = [0] * len(SHAPES)
    full = 0
    anchors = budget.anchors
    # the detection anchors: spread over the watched order, the same layers every step (steady series for
    # the scorer), as many as three quarters of the earnings afford
    assert 2 <= len(anchors) <= DETECT_MAX and anchors[-1] - anchors[0] >= 24 // 3
    assert all(SHAPES[i] == (384, 384) for i in anchors)  # the most common shape
    for plan, _, _ in steps[20:]:
        assert plan.detect == anchors and len(plan.cheap) < len(SHAPES)
        for i in plan.cheap:
            counts[i] += 1
        full += len(plan.exact + plan.estimate)
    assert min(counts) > 0 and max(counts) <= 2 * min(counts) + 2  # every layer in turn, oldest first: even
    # full spectra keep a floor: every layer's about once in 200 steps
    assert full / len(steps[20:]) >= 0.8 * len(SHAPES) / 200
    allowed = 0.8 * 0.03 * 0.5 - 0.002
    total = [cheap + spent for _, cheap, spent in steps[50:]]
    assert sum(total) / len(total) <= allowed * 1.1


def test_cheap_plans_map_and_off_means_none() -> None:
    budget = OverheadBudget([(64, 64)] * 3, 1.0)
    budget.observe_step(1.0)
    assert budget.plan().cheap == []
    plan = Plan(exact=[0], cheap=[0, 2])
    assert plan.mapped([5, 6, 7]).cheap == [5, 7]
    assert plan.mapped([5, 6, 7], keep={7}).cheap == [7]


def test_cheap_needs_says_what_covers_every_layer() -> None:
    budget = OverheadBudget(SHAPES, 0.03, cheap=True)
    simulate_cheap(budget, 60, step_seconds=0.5)
    # 28.8 ms of cheap tier + the detection value of six anchors + 2 ms fixed, over 80 % of 0.5 s
    needs = budget.cheap_needs()
    # the anchors are layers of the most common shape (384 x 384 here): six of them at 0.9 ms
    assert all(SHAPES[i] == (384, 384) for i in budget.anchors)
    assert needs == pytest.approx((0.0288 + 6 * DETECT_COST + 0.002) / 0.4, rel=0.05)
    roomy = OverheadBudget(SHAPES, needs * 1.05, cheap=True)
    plans = simulate_cheap(roomy, 60, step_seconds=0.5)
    assert all(plan.cheap == list(range(len(SHAPES))) for plan, _, _ in plans[30:])


def test_the_number_of_anchors_follows_the_measured_cost_of_one_call() -> None:
    """One call computes every anchor's detection value: most of its time is fixed (2.4 ms here, 1.4 ms per
    anchor). The count settles where the call fits in three quarters of the earnings, without flapping, and
    drops when the work gets dearer (a busy machine)."""
    budget = OverheadBudget(SHAPES, 0.03, cheap=True)
    fixed, each = 0.0024, 0.0014

    def run(steps: int) -> list[int]:
        counts = []
        for _ in range(steps):
            budget.observe_step(0.8)
            plan = budget.plan()
            budget.observe_work(DETECT, plan.detect, fixed + each * len(plan.detect))
            budget.observe_fixed(0.004)
            counts.append(len(plan.detect))
        return counts

    # earnings 0.8 x 0.03 x 0.8 s - 4 ms = 15.2 ms, half of it 7.6 ms: 3 anchors (6.6 ms) to 5 (9.4 ms,
    # within the band above the share that does not shrink the set), never 6 (10.8 ms); then no flapping
    counts = run(150)
    assert counts[-60:] == [counts[-1]] * 60 and counts[-1] in (3, 4, 5)
    assert all(SHAPES[i] == (384, 384) for i in budget.anchors)
    first = list(budget.anchors)
    fixed, each = 3 * fixed, 3 * each  # three times slower: 1 anchor (11.4 ms), the least there is
    counts = run(150)  # one fewer every 20 steps at most
    assert counts[-30:] == [1] * 30 and counts == sorted(counts, reverse=True)
    assert set(budget.anchors) <= set(first)  # the smaller set is part of the larger one: its series go on


def test_a_pause_between_steps_earns_nothing() -> None:
    # 20 ms steps, then a 2 s pause (validation, a checkpoint): the step time, and what the monitor may
    # spend, stay those of a 20 ms step
    budget = OverheadBudget(SHAPES, 0.03)
    for _ in range(10):
        budget.observe_step(0.020)
    before = budget.per_step
    budget.observe_step(2.0)
    assert budget.step_seconds == pytest.approx(0.020)
    assert budget.per_step == pytest.approx(before)
    for _ in range(15):  # a lasting change of the step time is followed within the window
        budget.observe_step(0.050)
    assert budget.step_seconds == pytest.approx(0.050)


def light_run(budget: OverheadBudget, steps: int, step: float, fixed: float, light: float) -> list[Plan]:
    """A monitor on a made-up machine: a full step's fixed work costs ``fixed``, a light step ``light``."""
    plans = []
    for _ in range(steps):
        budget.observe_step(step)
        plan = budget.plan()
        if plan.light:
            budget.observe_light(light)
        else:
            if plan.detect:
                budget.observe_work(DETECT, plan.detect, 0.004 * len(plan.detect))
            budget.observe_fixed(fixed)
        plans.append(plan)
    return plans


def test_a_fast_step_gets_light_steps_and_a_full_step_in_period() -> None:
    # a 20 ms step: 3 % is 0.6 ms, less than a full step's fixed work (5 ms) and one anchor (4 ms); a light step
    # (0.3 ms) leaves room: one full step in `period`, the smallest period that pays for it
    shapes = [(128, 128)] * 16
    budget = OverheadBudget(shapes, 0.03, cheap=True, light=True)
    plans = light_run(budget, 1500, step=0.020, fixed=0.005, light=0.0003)  # the averages settle on full steps
    each = 0.8 * 0.03 * 0.020
    expected = math.ceil((0.005 + 0.004 - 0.0003) / (each - 0.0003))
    assert budget.period == expected
    full = [k for k, p in enumerate(plans) if not p.light]
    assert [b - a for a, b in zip(full[-5:], full[-4:])] == [expected] * 4
    for plan in plans:
        if plan.light:  # a light step: every layer's Frobenius norm only
            assert plan.deferred == list(range(len(shapes)))
            assert not (plan.exact or plan.estimate or plan.audit or plan.cheap or plan.detect)
    # the steady state spends about the budget: light steps plus a full step's fixed work and its detection
    steady = plans[750:]
    spent = sum(0.0003 if p.light else 0.005 + 0.004 * len(p.detect) for p in steady) / len(steady)
    assert spent <= 0.03 * 0.020
    assert budget.planned == pytest.approx(expected * each - (expected - 1) * 0.0003)


def test_light_steps_only_where_a_full_step_does_not_fit() -> None:
    shapes = [(128, 128)] * 16
    slow = OverheadBudget(shapes, 0.03, cheap=True, light=True)  # a 1 s step: every step full
    assert not any(p.light for p in light_run(slow, 100, step=1.0, fixed=0.005, light=0.0003))
    assert slow.period == 1
    off = OverheadBudget(shapes, 0.03, cheap=True, light=False)  # light=False (DDP): every step full
    assert not any(p.light for p in light_run(off, 100, step=0.020, fixed=0.005, light=0.0003))
    # a light step dearer than the whole budget: the full steps as rare as allowed, and the light steps go on
    over = OverheadBudget(shapes, 0.03, cheap=True, light=True)
    plans = light_run(over, 300, step=0.005, fixed=0.005, light=0.001)
    assert over.period == MAX_PERIOD
    assert sum(not p.light for p in plans[100:]) <= math.ceil(200 / MAX_PERIOD) + 1
    assert over.planned == pytest.approx(0.8 * 0.03 * 0.005)  # a full step gets at least its own share
