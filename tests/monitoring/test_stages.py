"""The engine's stages on plain tensors: spectra runner, planner, distributed helpers, records, sources, config.

Expectations come from numpy float64 references (tests/reference.py), known spectra, brute force or
the documented contracts, not from the stages' own output.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from gradspectra.capture import select_parameters
from gradspectra.functional import (
    ENTRY_METRICS,
    METRIC_NAMES,
    estimate_spectral_metrics_many,
    spectral_metrics,
)
from gradspectra.monitoring import (
    BatchRecord,
    HostTable,
    MonitorConfig,
    Plan,
    Planner,
    Processes,
    SpectraResult,
    SpectraRunner,
    SpectrumSource,
    all_reduce_sum,
    assemble_record,
    default_process_group,
    layer_owners,
)
from gradspectra.monitoring import budget as budget_module
from gradspectra.monitoring.budget import DETECT, work_flops
from gradspectra.monitoring.distributed import gather_ids, pack, unpack
from gradspectra.monitoring.spectra import source_columns
from gradspectra.reporting import record_to_json
from gradspectra.scoring import ScoreResult
from reference import RTOL, assert_metric_close, ref_metrics, to_numpy64

COL = {name: j for j, name in enumerate(METRIC_NAMES)}
CPU = torch.device("cpu")


def known_spectrum(m: int, n: int, s: list[float], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``U diag(s) V^T`` with Haar-random orthogonal ``U`` (m x m) and ``V`` (n x n) from scipy."""
    u = ortho_group.rvs(m, random_state=seed)[:, : len(s)]
    v = ortho_group.rvs(n, random_state=seed + 1)[:, : len(s)]
    return torch.from_numpy((u * np.asarray(s, dtype=np.float64)) @ v.T).to(dtype)


def erank_of(s: list[float]) -> float:
    """Effective rank from a known spectrum: ``exp(-sum p_i ln p_i)``, ``p_i = s_i / sum s`` (zeros dropped)."""
    p = np.asarray([x for x in s if x > 0], dtype=np.float64)
    p = p / p.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


# --------------------------------------------------------------------------- SpectraRunner


def test_runner_exact_matches_functional_and_float64_svd() -> None:
    spectra = {
        "geometric": [3.0, 1.5, 0.75, 0.375, 0.1875],
        "flat": [2.0, 2.0, 2.0, 2.0],
        "rank_two": [5.0, 1.0],
    }
    matrices = [
        known_spectrum(9, 5, spectra["geometric"], seed=1),
        known_spectrum(4, 11, spectra["flat"], seed=3),
        known_spectrum(7, 7, spectra["rank_two"], seed=5),
        known_spectrum(7, 7, spectra["geometric"], seed=7),  # same shape as the one before: a batched call
        torch.randn(13, 6, generator=torch.Generator().manual_seed(0)),  # float32
        torch.zeros(6, 4),
        torch.full((5, 5), float("nan")),
    ]
    rows = [0, 2, 3, 5, 6, 7, 8]  # among 10 layers: 1, 4 and 9 are another rank's (or absent)
    runner = SpectraRunner(METRIC_NAMES)
    out = runner.run(matrices, rows, 10, CPU, plan=None, seed=0)

    assert out.values.shape == (10, len(METRIC_NAMES)) and out.values.dtype == torch.float64
    assert out.computed == len(rows)
    assert out.codes[rows].tolist() == [SpectrumSource.EXACT.code] * len(rows)
    for row in (1, 4, 9):
        assert out.values[row].abs().sum() == 0 and out.errors[row].abs().sum() == 0
        assert out.codes[row] == SpectrumSource.DEFERRED.code
    assert out.errors.abs().sum() == 0  # exact rows carry no error
    assert [(kind, sorted(r)) for kind, r, _ in out.work] == [(SpectrumSource.EXACT, rows)]
    assert out.seconds == pytest.approx(sum(sec for *_, sec in out.work)) and out.seconds >= 0

    for row, matrix in zip(rows, matrices):
        functional = spectral_metrics(matrix, METRIC_NAMES)
        want = torch.stack([functional[name].reshape(()) for name in METRIC_NAMES])
        torch.testing.assert_close(out.values[row], want, rtol=1e-12, atol=0.0, equal_nan=True)

    # the known spectra, from first principles
    for row, s in ((0, spectra["geometric"]), (2, spectra["flat"]), (3, spectra["rank_two"])):
        got = out.values[row]
        assert got[COL["nuclear_norm"]].item() == pytest.approx(sum(s), rel=1e-10)
        assert got[COL["spectral_norm"]].item() == pytest.approx(max(s), rel=1e-10)
        assert got[COL["frobenius_norm"]].item() == pytest.approx(math.sqrt(sum(x * x for x in s)), rel=1e-10)
        assert got[COL["effective_rank"]].item() == pytest.approx(erank_of(s), rel=1e-9)
    # every finite matrix against numpy's float64 SVD of the same entries
    for row, matrix in zip(rows[:6], matrices[:6]):
        ref = ref_metrics(to_numpy64(matrix))
        for name in METRIC_NAMES:
            assert_metric_close(name, out.values[row, COL[name]].item(), ref[name], RTOL, context=row)
    # the zero matrix: every metric 0 (effective rank 0 by convention); the NaN matrix: NaN spectral metrics
    assert out.values[7].tolist() == [0.0] * len(METRIC_NAMES)
    assert torch.isnan(out.values[8]).all()


def _estimate_case() -> tuple[list[torch.Tensor], list[int], Plan]:
    g = torch.Generator().manual_seed(11)
    big = [torch.randn(160, 120, generator=g) for _ in range(3)]  # min dim > the estimator's rank: a tail
    small = [torch.randn(6, 5, generator=g) for _ in range(3)]
    # rows 0..6 of 9 layers; 7 and 8 are not this rank's
    rows = [0, 1, 2, 3, 4, 5, 6]
    matrices = [small[0], big[0], big[1], torch.zeros(4, 4), big[2], small[1], small[2]]
    plan = Plan(exact=[0, 2, 3], estimate=[1, 4, 8], audit=[2], deferred=[5, 6, 7])  # 7, 8 not in rows
    return matrices, rows, plan


def test_runner_plan_rows_get_their_source() -> None:
    matrices, rows, plan = _estimate_case()
    at = {r: k for k, r in enumerate(rows)}
    runner = SpectraRunner(METRIC_NAMES)
    out = runner.run(matrices, rows, 9, CPU, plan, seed=3)

    want_codes = {
        0: SpectrumSource.EXACT,
        1: SpectrumSource.ESTIMATE,
        2: SpectrumSource.AUDIT,
        3: SpectrumSource.EXACT,
        4: SpectrumSource.ESTIMATE,
        5: SpectrumSource.DEFERRED,
        6: SpectrumSource.DEFERRED,
        7: SpectrumSource.DEFERRED,
        8: SpectrumSource.DEFERRED,
    }
    assert [SpectrumSource.from_code(c) for c in out.codes.tolist()] == [want_codes[r] for r in range(9)]
    assert out.codes.tolist() == [want_codes[r].code for r in range(9)]
    # exact 0, 2 (audit), 3 and estimates 1, 4: five layers got a spectrum
    assert out.computed == 5
    timed = {(kind, tuple(sorted(r))) for kind, r, _ in out.work}
    assert timed == {(SpectrumSource.EXACT, (0, 2, 3)), (SpectrumSource.ESTIMATE, (1, 2, 4))}
    assert out.seconds == pytest.approx(sum(sec for *_, sec in out.work))
    assert sorted(runner.bases) == [1, 2, 4]  # the warm starts of the estimated layers

    # exact and audited rows: exact values (numpy float64 SVD), no error on exact rows
    for row in (0, 2, 3):
        ref = ref_metrics(to_numpy64(matrices[at[row]]))
        for name in METRIC_NAMES:
            assert_metric_close(name, out.values[row, COL[name]].item(), ref[name], RTOL, context=row)
    assert out.errors[[0, 3]].abs().sum() == 0
    # deferred rows: the Frobenius norm only; the other columns stay 0, no error
    for row in (5, 6):
        want_fro = float(np.linalg.norm(to_numpy64(matrices[at[row]])))
        for name in METRIC_NAMES:
            got = out.values[row, COL[name]].item()
            if name in ENTRY_METRICS:
                assert got == pytest.approx(want_fro, rel=RTOL)
            else:
                assert got == 0.0
        assert out.errors[row].abs().sum() == 0
    # rows outside `rows` stay zero even when the plan names them
    for row in (7, 8):
        assert out.values[row].abs().sum() == 0 and out.errors[row].abs().sum() == 0

    # estimated and audited rows against the estimator run on its own (same matrices, order and seed)
    est = estimate_spectral_metrics_many([matrices[at[r]] for r in (1, 4, 2)], METRIC_NAMES, seed=3)
    for k, row in enumerate((1, 4)):
        torch.testing.assert_close(out.values[row], est.values[k], rtol=0.0, atol=0.0)
        torch.testing.assert_close(out.errors[row], est.rel_error[k], rtol=0.0, atol=0.0)
    exact_audit = ref_metrics(to_numpy64(matrices[at[2]]))
    for name in METRIC_NAMES:
        exact = exact_audit[name]
        want = abs(est.values[2, COL[name]].item() - exact) / abs(exact)
        assert out.errors[2, COL[name]].item() == pytest.approx(want, rel=1e-3, abs=1e-7), name
    assert out.errors[2, COL["nuclear_norm"]].item() > 0  # a 160 x 120 estimate is not exact


def test_runner_without_spectral_metrics_measures_entries_exactly() -> None:
    runner = SpectraRunner(["frobenius_norm"])
    matrix = torch.ones(3, 4)
    out = runner.run([matrix], [1], 2, CPU, Plan(deferred=[1]), seed=0)
    # nothing needs a spectrum: the plan does not apply, the only column is exact
    assert out.values[:, 0].tolist() == [0.0, math.sqrt(12.0)]
    assert SpectrumSource.from_code(out.codes[1].item()) is SpectrumSource.EXACT
    assert runner.run([], [], 3, CPU, None, seed=0).values.abs().sum() == 0


def test_source_columns_say_which_metrics_each_source_measures() -> None:
    table = source_columns(METRIC_NAMES, CPU)
    assert table[int(SpectrumSource.DEFERRED.code)].tolist() == [name == "frobenius_norm" for name in METRIC_NAMES]
    cheap = {"frobenius_norm", "spectral_norm", "stable_rank", "participation_ratio"}
    assert table[int(SpectrumSource.CHEAP.code)].tolist() == [name in cheap for name in METRIC_NAMES]
    for source in (SpectrumSource.EXACT, SpectrumSource.ESTIMATE, SpectrumSource.AUDIT):
        assert table[int(source.code)].all()


# --------------------------------------------------------------------------- Planner


SHAPES = [(8, 8), (8, 8), (16, 4), (32, 32), (4, 4)]


def _result(work: list[tuple[SpectrumSource, list[int], float]]) -> SpectraResult:
    zeros = torch.zeros(len(SHAPES), 2, dtype=torch.float64)
    flat = torch.zeros(len(SHAPES), dtype=torch.float64)
    return SpectraResult(
        zeros, flat.clone(), zeros.clone(), flat.clone(), flat.clone(), work=work, seconds=sum(w[2] for w in work)
    )


def covered(plan: Plan) -> list[int]:
    assert not set(plan.exact) & set(plan.estimate) and set(plan.audit) <= set(plan.exact)
    assert not (set(plan.exact) | set(plan.estimate)) & set(plan.deferred)
    return sorted(plan.exact + plan.estimate + plan.deferred)


def test_planner_fixed_modes() -> None:
    exact = Planner("exact", 0.03, SHAPES)
    assert exact.begin() is None and exact.plan([0, 2, 4]) is None and exact.budget is None
    estimate = Planner("estimate", 0.03, SHAPES)
    assert estimate.begin() is None
    assert estimate.plan([0, 2, 4]) == Plan(estimate=[0, 2, 4])
    assert estimate.budget is None


def test_planner_auto_builds_and_rebuilds_its_budget() -> None:
    planner = Planner("auto", 0.03, SHAPES)
    assert planner.begin() is None  # no budget before the first measured step
    first = planner.plan([0, 1, 3])
    assert first is not None and covered(first) == [0, 1, 3]
    budget = planner.budget
    assert budget is not None and planner.rows == [0, 1, 3]
    assert budget.shapes == [SHAPES[0], SHAPES[1], SHAPES[3]]

    pending = planner.begin()
    assert pending is not None and covered(pending) == [0, 1, 3]  # in watched-layer rows, not budget indices
    assert planner.plan([0, 1, 3]) == pending and planner.pending is None  # the step's plan is the one begun
    assert planner.budget is budget

    subset = planner.plan([1, 3])
    assert subset is not None and covered(subset) == [1, 3] and planner.budget is budget

    wider = planner.plan([0, 2, 3])  # row 2 is new: the budget is rebuilt over the union
    assert wider is not None and covered(wider) == [0, 2, 3]
    assert planner.budget is not budget and planner.rows == [0, 1, 2, 3]
    assert planner.budget.shapes == [SHAPES[i] for i in (0, 1, 2, 3)]

    planner.begin()
    outside = planner.plan([3, 4])  # the begun plan does not cover row 4: not used
    assert outside is not None and covered(outside) == [3, 4] and planner.rows == [0, 1, 2, 3, 4]


def test_planner_learn_feeds_the_budget() -> None:
    planner = Planner("auto", 0.03, SHAPES)
    planner.plan([0, 1, 3])
    budget = planner.budget
    assert budget is not None
    prior = budget.cost(budget_module.EXACT, 0)
    planner.learn(_result([(SpectrumSource.EXACT, [0, 1], 1.0)]), planned=False)
    assert budget.cost(budget_module.EXACT, 0) == prior  # an unplanned step teaches nothing
    planner.learn(_result([(SpectrumSource.EXACT, [0, 1], 1.0)]), planned=True)
    # two layers of one shape shared one second: half a second each, the first measurement of the shape
    assert budget.cost(budget_module.EXACT, 0) == pytest.approx(0.5)
    assert budget.cost(budget_module.EXACT, 1) == pytest.approx(0.5)
    assert budget.cost(budget_module.EXACT, 2) != pytest.approx(0.5)  # row 3 (32 x 32) not measured
    planner.learn(_result([(SpectrumSource.ESTIMATE, [3], 0.25)]), planned=True)
    assert budget.cost(budget_module.ESTIMATE, 2) == pytest.approx(0.25)  # row 3 is the budget's layer 2
    assert budget.cost(budget_module.ESTIMATE, 0) != pytest.approx(0.25)


def test_planner_learns_one_observation_per_kind_and_step() -> None:
    # under sharding a kind's work comes in two parts (the gathered layers', the blocks'): the budget sees their
    # sum once, as a step's whole detection time, not each part as if it were the step's
    planner = Planner("auto", 0.03, SHAPES)
    planner.plan([0, 1, 3])
    budget = planner.budget
    assert budget is not None
    planner.learn(_result([(budget_module.DETECT, [0], 0.005), (budget_module.DETECT, [1], 0.020)]), planned=True)
    assert budget.detect_seconds == pytest.approx(0.025)
    planner.learn(_result([(SpectrumSource.EXACT, [0], 0.5), (SpectrumSource.EXACT, [1], 0.5)]), planned=True)
    assert budget.cost(budget_module.EXACT, 0) == pytest.approx(0.5)  # one second for two layers of one shape


def test_planner_step_times() -> None:
    planner = Planner("auto", 0.03, SHAPES)
    planner.step_ended(1.0, 0, 0.0)  # no budget yet: remembered, nothing learned
    planner.plan([0, 1])
    budget = planner.budget
    assert budget is not None and budget.step_seconds is None
    planner.step_ended(100.0, 4, 0.2)
    assert budget.fixed_seconds > 0
    planner.step_started(100.5, 4)  # the same step again: no training step in between
    assert budget.step_seconds is None
    planner.step_started(106.0, 6)  # two training steps in 6 s
    assert budget.step_seconds == pytest.approx(3.0)
    assert Planner("auto", 0.03, SHAPES).figure_period(7, 4) == 7  # no budget: the configured spacing


# --------------------------------------------------------------------------- distributed


def _makespan(costs: list[float], owners: list[int], world: int) -> float:
    load = [0.0] * world
    for c, r in zip(costs, owners):
        load[r] += c
    return max(load)


@pytest.mark.parametrize("seed", range(6))
def test_layer_owners_within_graham_bound_of_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, world = int(rng.integers(3, 8)), int(rng.integers(2, 4))
    shapes = [(int(rng.integers(2, 200)), int(rng.integers(2, 200))) for _ in range(n)]
    costs = [work_flops(budget_module.EXACT, shape) for shape in shapes]
    owners = layer_owners(shapes, world)
    assert len(owners) == n and set(owners) <= set(range(world))
    assert owners == layer_owners(list(shapes), world)  # deterministic
    optimum = min(_makespan(costs, list(a), world) for a in itertools.product(range(world), repeat=n))
    # longest-processing-time first is within 4/3 - 1/(3 world) of the optimum (Graham 1969)
    assert _makespan(costs, owners, world) <= (4 / 3 - 1 / (3 * world)) * optimum * (1 + 1e-12)


def test_layer_owners_small_cases() -> None:
    assert layer_owners([(64, 64), (8, 8), (64, 64), (8, 8)], 2) == [0, 0, 1, 1]
    assert layer_owners([(5, 5)] * 3, 1) == [0, 0, 0]
    assert sorted(layer_owners([(5, 5)] * 3, 3)) == [0, 1, 2]  # equal work: one each
    assert layer_owners([], 2) == []
    # the cost model: an (m, n) and an (n, m) layer cost the same
    assert work_flops("exact", (30, 7)) == work_flops("exact", (7, 30))


def test_pack_unpack_round_trip_mixed_shapes_and_dtypes() -> None:
    parts = [
        torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
        torch.tensor([1e300, -2.5, 0.0], dtype=torch.float64),
        torch.tensor([[True, False], [False, True]]),
        torch.tensor([3, -4, 2**40], dtype=torch.int64),
        torch.tensor(1.5, dtype=torch.float16),
        torch.zeros(0, 3),
        torch.tensor([float("nan"), float("inf")]),
    ]
    flat = pack(parts)
    assert flat.dtype == torch.float64 and flat.ndim == 1
    assert flat.numel() == sum(p.numel() for p in parts)
    back = unpack(flat, parts)
    assert len(back) == len(parts)
    for got, want in zip(back, parts):
        assert got.shape == want.shape and got.dtype == torch.float64
        torch.testing.assert_close(got, want.to(torch.float64), rtol=0.0, atol=0.0, equal_nan=True)
    assert back[2].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert (back[2] > 0).tolist() == parts[2].tolist()


def test_processes_defaults_and_no_process_group() -> None:
    procs = Processes()
    assert (procs.rank, procs.world, procs.is_zero) == (0, 1, True)
    assert procs.reduce_sum is all_reduce_sum
    assert not Processes(rank=1, world=2).is_zero
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]  # no process group: nothing to sum with
    assert default_process_group() == (0, 1)
    ids: list[Any] = ["a", 3, None]
    assert gather_ids(ids, 1) is ids
    assert gather_ids(ids, 4) is ids  # a world size without an initialised group: the ids as they are


# --------------------------------------------------------------------------- records

KEYS = ["fc/layer_00", "fc/layer_01", "head", "out/layer_00", "out/layer_01"]
NAMES = ("nuclear_norm", "frobenius_norm", "effective_rank")
REQUIRED = {
    "step",
    "epoch",
    "batch_idx",
    "score",
    "flagged",
    "reasons",
    "loss",
    "metrics",
    "sample_ids",
    "z",
    "threshold",
    "nonfinite_layers",
    "missing_layers",
    "events",
}


def host_table(audit: bool = True) -> HostTable:
    """Five layers: exact, estimated, missing (no gradient), deferred, audited with a NaN value."""
    nan = float("nan")
    values = np.array(
        [
            [3.0, 2.0, 1.5],
            [4.0, 3.0, 2.5],
            [nan, nan, nan],
            [nan, 1.0, nan],
            [nan, 5.0, 2.0],
        ]
    )
    valid = np.array([[True] * 3, [True] * 3, [False] * 3, [False, True, False], [True] * 3])
    errors = np.array([[0.0] * 3, [0.01, 0.0, nan], [0.0] * 3, [0.0] * 3, [0.2, 0.0, 0.05]])
    sources = [
        SpectrumSource.EXACT,
        SpectrumSource.ESTIMATE,
        SpectrumSource.DEFERRED,
        SpectrumSource.DEFERRED,
        SpectrumSource.AUDIT if audit else SpectrumSource.EXACT,
    ]
    return HostTable(values, valid, errors, sources, present=[4, 0, 1, 3], loss=0.75)


def test_host_table_layer_metrics_and_sources() -> None:
    table = host_table()
    metrics = table.layer_metrics(KEYS, NAMES)
    assert list(metrics) == ["fc/layer_00", "fc/layer_01", "out/layer_00", "out/layer_01"]  # present, row order
    assert metrics["fc/layer_00"] == {"nuclear_norm": 3.0, "frobenius_norm": 2.0, "effective_rank": 1.5}
    assert metrics["out/layer_00"] == {"frobenius_norm": 1.0}  # deferred: the entry metric only
    assert math.isnan(metrics["out/layer_01"]["nuclear_norm"])

    fields = table.source_fields(KEYS, NAMES)
    assert fields["spectra"] == {"fc/layer_00": "exact", "fc/layer_01": "estimate", "out/layer_01": "exact+audit"}
    assert fields["deferred_layers"] == ["out/layer_00"]
    # spectral metrics only, finite errors only
    assert fields["estimate_error"] == {"fc/layer_01": {"nuclear_norm": 0.01}}
    assert fields["audit_error"] == {"out/layer_01": {"nuclear_norm": 0.2, "effective_rank": 0.05}}
    assert "audit_error" not in host_table(audit=False).source_fields(KEYS, NAMES)


def test_host_table_unmeasured() -> None:
    table = HostTable.unmeasured(3, 2, [0, 2])
    assert table.values.shape == (3, 2) and np.isnan(table.values).all()
    assert not table.valid.any() and (table.errors == 0).all()
    assert table.sources == [SpectrumSource.DEFERRED] * 3 and table.present == [0, 2]
    assert table.layer_metrics(["a", "b", "c"], ["nuclear_norm", "frobenius_norm"]) == {"a": {}, "c": {}}


def test_assemble_record_required_keys_only_by_default() -> None:
    record = assemble_record(
        step=7,
        epoch=None,
        batch_idx=None,
        table=host_table(),
        keys=KEYS,
        metric_names=NAMES,
        result=None,
        sample_ids=[],
        with_sources=False,
    )
    assert set(record) == REQUIRED == set(BatchRecord.__required_keys__)
    assert record["step"] == 7 and record["loss"] == 0.75 and record["sample_ids"] is None
    assert (record["score"], record["flagged"], record["reasons"], record["z"], record["threshold"]) == (
        None,
        False,
        [],
        {},
        None,
    )
    assert record["nonfinite_layers"] == ["out/layer_01"]
    assert record["missing_layers"] == ["head"]
    assert record["events"] == []
    assert list(record["metrics"]) == ["fc/layer_00", "fc/layer_01", "out/layer_00", "out/layer_01"]

    # strict JSON: NaN written as null
    text = record_to_json(record)
    assert "NaN" not in text
    back = json.loads(text)
    assert back["metrics"]["out/layer_01"] == {"nuclear_norm": None, "frobenius_norm": 5.0, "effective_rank": 2.0}
    assert back["metrics"]["out/layer_00"] == {"frobenius_norm": 1.0}


def test_assemble_record_optional_keys_when_due() -> None:
    table = host_table()
    table.layers_per_rank = [3, 2]
    score = ScoreResult(score=6.5, flagged=True, reasons=["nuclear_norm high"], z={"nuclear_norm": 6.5}, threshold=4.0)
    record = assemble_record(
        step=3,
        epoch=1,
        batch_idx=12,
        table=table,
        keys=KEYS,
        metric_names=NAMES,
        result=score,
        sample_ids=[5, 6],
        with_sources=True,
        factored_rows=[3, 0],
        error="RuntimeError: boom",
        loss_seen=False,
    )
    optional = {
        "spectra",
        "deferred_layers",
        "estimate_error",
        "audit_error",
        "layers_per_rank",
        "factored_layers",
        "error",
        "loss_seen",
    }
    assert set(record) == REQUIRED | optional
    assert optional <= set(BatchRecord.__optional_keys__)
    assert (record["score"], record["flagged"], record["threshold"]) == (6.5, True, 4.0)
    assert record["reasons"] == ["nuclear_norm high"] and record["z"] == {"nuclear_norm": 6.5}
    assert (record["epoch"], record["batch_idx"], record["sample_ids"]) == (1, 12, [5, 6])
    assert record["layers_per_rank"] == [3, 2]
    assert record["factored_layers"] == ["fc/layer_00", "out/layer_00"]
    assert record["error"] == "RuntimeError: boom" and record["loss_seen"] is False
    assert record["deferred_layers"] == ["out/layer_00"]
    back = json.loads(record_to_json(record))
    assert back["audit_error"] == {"out/layer_01": {"nuclear_norm": 0.2, "effective_rank": 0.05}}
    assert back["spectra"]["out/layer_01"] == "exact+audit"


def test_assemble_record_inf_is_nonfinite_and_missing_layers_in_row_order() -> None:
    values = np.array([[1.0], [np.inf], [2.0]])
    table = HostTable(values, np.ones((3, 1), bool), np.zeros((3, 1)), [SpectrumSource.EXACT] * 3, present=[1])
    record = assemble_record(
        step=0,
        epoch=0,
        batch_idx=0,
        table=table,
        keys=["a", "b", "c"],
        metric_names=["nuclear_norm"],
        result=None,
        sample_ids=[],
        with_sources=False,
    )
    assert record["nonfinite_layers"] == ["b"] and record["missing_layers"] == ["a", "c"]
    assert json.loads(record_to_json(record))["metrics"] == {"b": {"nuclear_norm": None}}


# --------------------------------------------------------------------------- SpectrumSource


def test_spectrum_source_vocabulary() -> None:
    assert [s.value for s in SpectrumSource] == ["deferred", "exact", "estimate", "exact+audit", "cheap"]
    assert [s.is_full for s in SpectrumSource] == [False, True, True, True, False]
    for source in SpectrumSource:
        assert SpectrumSource.from_code(source.code) is source
        assert str(source) == source.value and f"{source}" == source.value
        assert SpectrumSource(source.value) is source
        assert source == source.value  # a str enum: compares equal to the record string
    # codes are summed across ranks (zeros from the ranks that do not own a layer): "deferred" must be 0
    assert SpectrumSource.DEFERRED.code == 0.0
    assert len({s.code for s in SpectrumSource}) == len(SpectrumSource)
    assert [s for s in SpectrumSource if s.is_exact] == [SpectrumSource.EXACT, SpectrumSource.AUDIT]
    assert budget_module.EXACT == "exact" and budget_module.ESTIMATE == "estimate"
    assert json.dumps({"k": SpectrumSource.AUDIT}) == '{"k": "exact+audit"}'


# --------------------------------------------------------------------------- MonitorConfig


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"every_n_steps": True}, ValueError, "every_n_steps"),
        ({"log_every_n_steps": 1.5}, ValueError, "log_every_n_steps"),
        ({"heatmap_steps": 0}, ValueError, "heatmap_steps"),
        ({"max_records_in_memory": -1}, ValueError, "max_records_in_memory"),
        ({"summary_top_k": 0}, ValueError, "summary_top_k"),
        ({"spectra": "x"}, ValueError, "spectra"),
        ({"method": "x"}, ValueError, "method"),
        ({"action": "x"}, ValueError, "action"),
        ({"action": "skip", "scoring": False}, ValueError, "action"),
        ({"action": "raise", "scoring": False}, ValueError, "scoring"),
        ({"figure_every_n_steps": -1}, ValueError, "figure_every_n_steps"),
        ({"max_overhead": 0}, ValueError, "max_overhead"),
        ({"max_overhead": float("nan")}, ValueError, "max_overhead"),
        ({"max_overhead": 11.0}, ValueError, "max_overhead"),
        ({"max_overhead": "3%"}, TypeError, "max_overhead"),
        ({"cpu_threads": 0}, ValueError, "cpu_threads"),
        ({"sample_id_key": 3}, TypeError, "sample_id_key"),
        ({"metrics": ["bogus"]}, ValueError, "metrics"),
        ({"metrics": []}, ValueError, "metrics"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
    ],
)
def test_config_rejects_bad_arguments_by_name(kwargs: dict[str, Any], error: type[Exception], name: str) -> None:
    with pytest.raises(error, match=f"`{name}") as info:
        MonitorConfig(**kwargs)
    bad = next(iter(kwargs.values())) if len(kwargs) == 1 else kwargs["action"]
    if not (isinstance(bad, float) and math.isnan(bad)):
        assert repr(bad) in str(info.value)  # what was received is shown


def test_config_defaults_and_conversions(tmp_path: Path) -> None:
    config = MonitorConfig()
    assert config.metric_names == METRIC_NAMES
    assert (config.spectra, config.method, config.action, config.every_n_steps) == ("auto", "auto", "log", 1)
    assert MonitorConfig(metrics=["effective_rank", "nuclear_norm"]).metric_names == ("effective_rank", "nuclear_norm")
    assert MonitorConfig(metrics="spectral_norm").metric_names == ("spectral_norm",)
    overhead = MonitorConfig(max_overhead=1).max_overhead
    assert overhead == 1.0 and isinstance(overhead, float)
    assert MonitorConfig(output_dir=str(tmp_path)).output_dir == tmp_path
    assert MonitorConfig(scoring=False).make_scorer() is None and config.make_scorer() is not None
    assert MonitorConfig(figure_every_n_steps=0, cpu_threads=None, sample_id_key="idx").cpu_threads is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.every_n_steps = 2  # type: ignore[misc]


def test_config_selection_kwargs_are_select_parameters_arguments() -> None:
    def keep(name: str, param: torch.nn.Parameter, module: torch.nn.Module) -> bool:
        return True

    config = MonitorConfig(include="fc", regex=r"\d", module_types=[torch.nn.Linear], predicate=keep)
    kwargs = config.selection_kwargs
    accepted = set(inspect.signature(select_parameters).parameters)
    assert set(kwargs) <= accepted
    assert kwargs == {
        "include": "fc",
        "exclude": None,
        "regex": r"\d",
        "module_types": [torch.nn.Linear],
        "predicate": keep,
        "include_embeddings": False,
        "gradients": "auto",
    }
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    assert [w.key for w in select_parameters(model, **MonitorConfig(exclude="1.*").selection_kwargs).watched] == ["0"]


# --------------------------------------------------------------------------- the cheap tier in the runner


def test_runner_cheap_tier_fills_its_columns_and_the_detection_value() -> None:
    g = torch.Generator().manual_seed(21)
    decay = torch.tensor([0.8**k for k in range(96)])
    mats = [
        (torch.linalg.qr(torch.randn(200, 96, generator=g))[0] * decay)
        @ torch.linalg.qr(torch.randn(96, 96, generator=g))[0].T
        for _ in range(4)
    ]
    mats = [m.float() for m in mats]
    rows = [0, 1, 2, 3]  # of 5 layers; 4 is absent
    plan = Plan(exact=[1], estimate=[2], deferred=[0, 3], cheap=[0, 1, 2], detect=[0, 3])
    runner = SpectraRunner(METRIC_NAMES)
    out = runner.run(mats, rows, 5, CPU, plan=plan, seed=0)
    assert out.codes.tolist() == [
        SpectrumSource.CHEAP.code,
        SpectrumSource.EXACT.code,
        SpectrumSource.ESTIMATE.code,
        SpectrumSource.DEFERRED.code,
        SpectrumSource.DEFERRED.code,
    ]
    assert out.detected.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]  # the anchors' (detect), not the cheap tier's
    kinds = [kind for kind, _, _ in out.work]
    assert kinds == [SpectrumSource.CHEAP, DETECT, SpectrumSource.EXACT, SpectrumSource.ESTIMATE]
    assert out.cheap_seconds > 0
    assert out.seconds == pytest.approx(sum(s for k, _, s in out.work if k not in ("cheap", DETECT)))
    ref = ref_metrics(to_numpy64(mats[0]))
    for name in ("spectral_norm", "stable_rank", "participation_ratio"):
        got, err = out.values[0, COL[name]].item(), out.errors[0, COL[name]].item()
        assert abs(got - ref[name]) <= max(3 * err * abs(ref[name]), 1e-5 * abs(ref[name])), name
        assert 0 < err < 0.05
    # the cheap row has no full-spectrum values; the exact row's cheap error estimates are gone
    assert out.values[0, COL["nuclear_norm"]] == 0 and out.errors[1].abs().sum() == 0
    # the detection value: coarse, of the effective rank's order
    for row in (0, 3):
        erank = ref_metrics(to_numpy64(mats[row]))["effective_rank"]
        assert 0.3 * erank < out.detection[row].item() < 3 * erank
    # warm starts are kept per layer for the next step
    assert set(runner.cheap_bases) == {0, 1, 2}
    again = runner.run(mats, rows, 5, CPU, plan=plan, seed=1)
    torch.testing.assert_close(
        again.values[0, COL["spectral_norm"]], out.values[0, COL["spectral_norm"]], rtol=1e-3, atol=0
    )


def test_runner_sends_a_flat_layer_to_the_gram_route_and_retries_the_sketch() -> None:
    g = torch.Generator().manual_seed(22)
    flat = (torch.linalg.qr(torch.randn(300, 200, generator=g))[0] * torch.linspace(1.0, 0.6, 200)) @ torch.linalg.qr(
        torch.randn(200, 200, generator=g)
    )[0].T
    mats = [flat.float()]
    runner = SpectraRunner(METRIC_NAMES)
    plan = Plan(deferred=[0], cheap=[0])
    # two sketches above the tolerance in a row (the route is chosen from the errors a step later)
    for seed in range(2):
        out = runner.run(mats, [0], 1, CPU, plan=plan, seed=seed)
        assert out.errors[0, COL["spectral_norm"]] > 0.02 and 0 not in runner.gram_steps
    ref = ref_metrics(to_numpy64(mats[0]))
    for step in range(2, 22):
        out = runner.run(mats, [0], 1, CPU, plan=plan, seed=step)
        # (a top this flat, 0.2 % between neighbours, is the Gram route's worst case: still well under 1 %)
        assert out.values[0, COL["spectral_norm"]].item() == pytest.approx(ref["spectral_norm"], rel=5e-3)
        assert out.values[0, COL["participation_ratio"]].item() == pytest.approx(ref["participation_ratio"], rel=1e-5)
    assert runner.gram_steps[0] == 0  # the sketch is tried again next step


def test_runner_keeps_large_layers_on_the_sketch() -> None:
    """The Gram route costs min(m, n) / 64 times the sketch: beyond 4x (min(m, n) > 256) the sketch stays."""
    g = torch.Generator().manual_seed(23)
    flat = torch.randn(400, 300, generator=g)  # a flat spectrum, large
    runner = SpectraRunner(METRIC_NAMES)
    plan = Plan(deferred=[0], cheap=[0])
    for seed in range(4):
        out = runner.run([flat], [0], 1, CPU, plan=plan, seed=seed)
    assert out.errors[0].max() > 0.02 and runner.gram_steps.get(0, 0) == 0
