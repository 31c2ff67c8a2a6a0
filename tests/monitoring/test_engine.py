"""MonitorEngine on a plain ``nn.Sequential`` and a hand-written loop: no Lightning, no trainer.

Per-layer metrics are checked against numpy float64 SVDs of the gradients the loop produced; the
record file against the records kept in memory.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from gradspectra.functional import METRIC_NAMES
from gradspectra.monitoring import (
    GradientAnomalyError,
    MonitorConfig,
    MonitorEngine,
    Outputs,
    Processes,
    StepInputs,
    layer_owners,
)
from gradspectra.reporting import read_records, record_to_json
from gradspectra.reporting.tags import aggregate_tag, layer_tag
from reference import RTOL, assert_metric_close, ref_metrics, to_numpy64

KEYS = ["0", "2", "3"]  # the Linear layers of `mlp()` (the ReLU at index 1 has no weight)
QUIET: dict[str, Any] = {"figure_every_n_steps": 0, "verbose": False}


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Linear(4, 3))


def batch(step: int) -> Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(100 + step))


def linear(model: nn.Sequential, index: int) -> nn.Linear:
    layer = model[index]
    assert isinstance(layer, nn.Linear)
    return layer


def grad_of(model: nn.Sequential, index: int) -> Tensor:
    grad = linear(model, index).weight.grad
    assert grad is not None
    return grad


def grads(model: nn.Sequential) -> dict[str, np.ndarray]:
    """The watched layers' gradients as the engine sees them (float64 numpy), those that have one."""
    out = {}
    for key in KEYS:
        grad = linear(model, int(key)).weight.grad
        if grad is not None:
            out[key] = to_numpy64(grad)
    return out


def make_engine(tmp_path: Path, model: nn.Module, name: str = "batches.jsonl", **options: Any) -> MonitorEngine:
    engine = MonitorEngine(MonitorConfig(**{**QUIET, **options}))
    engine.attach(model)
    engine.open(tmp_path / name, write=True)
    return engine


def train_step(
    engine: MonitorEngine,
    model: nn.Sequential,
    optimizer: torch.optim.Optimizer,
    step: int,
    tamper: Callable[[nn.Sequential], None] | None = None,
    loss_scale: float | None = None,
    outputs: Outputs | None = None,
) -> tuple[dict[str, Any] | None, dict[str, np.ndarray], float]:
    """One step of a plain loop: the engine measures between ``backward()`` and ``optimizer.step()``
    (skipped when a gradient is not finite, so one poisoned step does not poison the weights)."""
    engine.begin_step(step)
    optimizer.zero_grad()
    loss = model(batch(step)).pow(2).mean()
    (loss * (loss_scale or 1.0)).backward()
    if loss_scale:
        for p in model.parameters():
            assert p.grad is not None
            p.grad /= loss_scale  # unscaled gradients, the loss still scaled (as under AMP before unscale)
    if tamper is not None:
        tamper(model)
    seen = grads(model)
    scaled_loss = loss.detach() * (loss_scale or 1.0)
    inputs = StepInputs(step=step, epoch=0, batch_idx=step, loss=scaled_loss, loss_scale=loss_scale)
    record = engine.step(inputs, outputs=outputs, params=model.parameters)
    if all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters()):
        optimizer.step()  # as a loss scaler would: a non-finite step is not applied
    return (None if record is None else dict(record)), seen, float(loss.detach())


def check_metrics(record: dict[str, Any], seen: dict[str, np.ndarray]) -> None:
    assert set(record["metrics"]) == set(seen)
    for key, grad in seen.items():
        ref = ref_metrics(grad)
        for name in METRIC_NAMES:
            assert_metric_close(name, record["metrics"][key][name], ref[name], RTOL, context=(record["step"], key))


def test_records_every_n_steps_file_equals_memory(tmp_path: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(tmp_path, model, spectra="exact", every_n_steps=2)
    assert engine.watched and [w.key for w in engine.watched] == KEYS
    for step in range(6):
        record, seen, loss = train_step(engine, model, optimizer, step, loss_scale=8.0 if step == 4 else None)
        assert (record is not None) == (step % 2 == 0)
        if record is None:
            continue
        check_metrics(record, seen)
        assert record["loss"] == pytest.approx(loss, rel=1e-6)  # the AMP scale of step 4 divided out
        assert (record["step"], record["epoch"], record["batch_idx"]) == (step, 0, step)
        assert record["nonfinite_layers"] == [] and record["missing_layers"] == []
        assert "spectra" not in record  # spectra="exact": no per-layer sources
        assert record["monitor_ms"] >= 0
    engine.close()
    assert engine.steps_monitored == 3 and engine.last_step == 4
    on_disk = read_records(tmp_path / "batches.jsonl")
    assert [r["step"] for r in on_disk] == [0, 2, 4]
    assert on_disk == [json.loads(record_to_json(r)) for r in engine.batch_records]
    assert len(engine.batch_records) == 3


def test_nonfinite_and_missing_gradients_are_recorded_and_training_goes_on(tmp_path: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(tmp_path, model, spectra="exact")

    def poison(m: nn.Sequential) -> None:
        grad_of(m, 2)[1, 3] = float("nan")

    def drop(m: nn.Sequential) -> None:
        linear(m, 3).weight.grad = None

    train_step(engine, model, optimizer, 0)
    record, seen, _ = train_step(engine, model, optimizer, 1, tamper=poison)
    assert record is not None
    assert record["nonfinite_layers"] == ["2"] and record["missing_layers"] == []
    assert record["flagged"]  # a non-finite gradient is flagged even in warm-up
    assert all(np.isnan(v) for v in record["metrics"]["2"].values())
    check_metrics(
        {**record, "metrics": {k: v for k, v in record["metrics"].items() if k != "2"}},
        {k: v for k, v in seen.items() if k != "2"},
    )
    # action="log": the gradients are left as they were for the optimizer
    assert all(p.grad is not None for p in model.parameters())

    record, seen, _ = train_step(engine, model, optimizer, 2, tamper=drop)
    assert record is not None
    assert record["missing_layers"] == ["3"] and record["nonfinite_layers"] == []
    check_metrics(record, seen)

    record, seen, _ = train_step(engine, model, optimizer, 3)
    assert record is not None and not record["nonfinite_layers"]
    check_metrics(record, seen)
    assert (engine.nonfinite_total, engine.missing_grad_total, engine.error_total) == (1, 1, 0)
    assert engine.steps_monitored == 4
    # the streaming state: the NaN step counts as non-finite for layer "2", the missing layer "3" is left out
    assert engine.spectrum is not None
    n_metrics = len(METRIC_NAMES)
    assert engine.spectrum.count.tolist() == [[4.0] * n_metrics, [3.0] * n_metrics, [3.0] * n_metrics]
    assert engine.spectrum.nonfinite.tolist() == [[0.0] * n_metrics, [1.0] * n_metrics, [0.0] * n_metrics]
    engine.close()
    on_disk = read_records(tmp_path / "batches.jsonl")
    assert on_disk[1]["metrics"]["2"]["nuclear_norm"] is None  # NaN written as null


def test_a_measurement_failure_is_recorded_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(tmp_path, model, spectra="exact")
    train_step(engine, model, optimizer, 0)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.runner, "run", boom)
    with pytest.warns(UserWarning, match="could not measure step 1: RuntimeError: boom"):
        record, _, loss = train_step(engine, model, optimizer, 1)
    assert record is not None
    assert record["error"] == "RuntimeError: boom"
    assert engine.error_total == 1 and engine.steps_monitored == 2
    assert record["loss"] == pytest.approx(loss, rel=1e-6)  # the loss still reported
    assert all(metrics == {} for metrics in record["metrics"].values())  # nothing measured, nothing invented
    assert record["nonfinite_layers"] == [] and not record["flagged"]

    monkeypatch.undo()
    record, seen, _ = train_step(engine, model, optimizer, 2)  # the next step is measured as usual
    assert record is not None and "error" not in record
    check_metrics(record, seen)
    engine.close()
    on_disk = read_records(tmp_path / "batches.jsonl")
    assert [r.get("error") for r in on_disk] == [None, "RuntimeError: boom", None]


def test_state_dict_round_trip_continues_counters_and_sets_aside(tmp_path: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = make_engine(tmp_path, model, spectra="exact")

    def poison(m: nn.Sequential) -> None:
        grad_of(m, 0)[0, 0] = float("inf")

    for step in range(3):
        train_step(first, model, optimizer, step, tamper=poison if step == 1 else None)
    state = copy.deepcopy(first.state_dict())
    assert first.spectrum is not None and first.scorer is not None
    count_then = first.spectrum.count.clone()
    scored_then = first.scorer.steps
    for step in (3, 4):  # steps after the checkpoint: this timeline is abandoned
        train_step(first, model, optimizer, step)
    first.close()

    second = make_engine(tmp_path, model, spectra="exact")
    second.load_state_dict(state)
    for name in ("steps_monitored", "flagged_total", "nonfinite_total", "missing_grad_total", "error_total"):
        assert getattr(second, name) == state[name], name
    assert (second.steps_monitored, second.nonfinite_total, second.last_step) == (3, 1, 2)
    aside = second.set_aside_after_resume()
    assert aside is not None and [r["step"] for r in read_records(aside)] == [3, 4]
    assert [r["step"] for r in read_records(tmp_path / "batches.jsonl")] == [0, 1, 2]

    record, seen, _ = train_step(second, model, optimizer, 3)
    assert record is not None
    check_metrics(record, seen)
    assert second.steps_monitored == 4 and second.nonfinite_total == 1 and second.last_step == 3
    assert second.spectrum is not None and second.scorer is not None
    # the streaming state went on from the checkpoint: one more finite observation per layer and metric
    torch.testing.assert_close(second.spectrum.count, count_then + 1)
    assert second.scorer.steps == scored_then + 1
    second.close()
    assert [r["step"] for r in read_records(tmp_path / "batches.jsonl")] == [0, 1, 2, 3]


def test_auto_spectra_record_how_each_layer_was_measured(tmp_path: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(tmp_path, model, spectra="auto")
    for step in range(4):
        record, seen, _ = train_step(engine, model, optimizer, step)
        assert record is not None
        spectra, deferred = record["spectra"], record["deferred_layers"]
        assert set(spectra) | set(deferred) == set(KEYS) and not set(spectra) & set(deferred)
        assert set(spectra.values()) <= {"exact", "estimate", "exact+audit", "cheap"}
        assert set(record["estimate_error"]) == {k for k, v in spectra.items() if v in ("estimate", "cheap")}
        for key in deferred:  # no spectrum this step: the exact Frobenius norm only
            assert set(record["metrics"][key]) == {"frobenius_norm"}
            want = float(np.linalg.norm(seen[key]))
            assert record["metrics"][key]["frobenius_norm"] == pytest.approx(want, rel=RTOL)
        cheap = {"frobenius_norm", "spectral_norm", "stable_rank", "participation_ratio"}
        for key, how in spectra.items():
            assert set(record["metrics"][key]) == (cheap if how == "cheap" else set(METRIC_NAMES))
        # the detection value where the cheap tier ran (every layer when the budget covers it)
        assert set(record.get("detection", {})) >= {k for k, v in spectra.items() if v == "cheap"}
        # these small layers are measured exactly by both tiers (up to rounding)
        ref = {key: ref_metrics(seen[key]) for key in spectra}
        for key in spectra:
            for name in record["metrics"][key]:
                assert_metric_close(name, record["metrics"][key][name], ref[key][name], 1e-4, context=(step, key))
    assert engine.planner is not None and engine.planner.budget is not None
    engine.close()


def test_skip_drops_the_gradients_and_raise_raises(tmp_path: Path) -> None:
    def poison(m: nn.Sequential) -> None:
        grad_of(m, 3).fill_(float("nan"))

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    skipping = make_engine(tmp_path, model, name="skip.jsonl", spectra="exact", action="skip")
    train_step(skipping, model, optimizer, 0)
    before = [p.detach().clone() for p in model.parameters()]
    record, _, _ = train_step(skipping, model, optimizer, 1, tamper=poison)
    assert record is not None and record["flagged"] and record["skipped"] is True
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the optimizer left them alone
    assert skipping.skipped_total == 1
    skipping.close()

    raising = make_engine(tmp_path, model, name="raise.jsonl", spectra="exact", action="raise")
    with pytest.raises(GradientAnomalyError, match="flagged step 0") as info:
        train_step(raising, model, optimizer, 0, tamper=poison)
    assert info.value.record["nonfinite_layers"] == ["3"]
    raising.close()
    assert read_records(tmp_path / "raise.jsonl")[0]["flagged"] is True  # written before raising


def test_scalars_are_finite_and_per_layer_on_their_cadence(tmp_path: Path) -> None:
    logged: list[tuple[int, dict[str, float]]] = []
    outputs = Outputs(log_scalars=lambda scalars, step: logged.append((step, dict(scalars))))
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(tmp_path, model, spectra="exact", log_every_n_steps=2)

    def poison(m: nn.Sequential) -> None:
        grad_of(m, 0)[0, 0] = float("nan")

    for step in range(4):
        train_step(engine, model, optimizer, step, outputs=outputs, tamper=poison if step == 2 else None)
    engine.close()
    assert [step for step, _ in logged] == [0, 1, 2, 3]
    for step, scalars in logged:
        assert all(np.isfinite(v) for v in scalars.values())
        has_layers = any(tag.startswith("grad_spectrum/") for tag in scalars)
        assert has_layers == (step % 2 == 0), step  # per-layer tags every log_every_n_steps measured steps
        # a NaN layer takes the cross-layer aggregates of step 2 with it (not a mean over the other layers)
        assert (aggregate_tag("nuclear_norm", "mean") in scalars) == (step != 2), step
    assert layer_tag("nuclear_norm", "0") not in logged[2][1] and layer_tag("nuclear_norm", "2") in logged[2][1]


class _Collective:
    """A sum all-reduce between threads that stand for ranks (a barrier, then every rank reads the sum)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.parts: dict[int, Tensor] = {}
        self.calls = [0] * world

    def reduce_sum(self, rank: int) -> Callable[[Tensor], Tensor]:
        def reduce(tensor: Tensor) -> Tensor:
            self.calls[rank] += 1
            self.parts[rank] = tensor.clone()
            self.barrier.wait()
            total = torch.stack([self.parts[r] for r in range(self.world)]).sum(0)
            self.barrier.wait()  # every rank has read the parts before the next collective writes them
            return total

        return reduce


def _ranks(tmp_path: Path, world: int) -> tuple[_Collective, list[nn.Module], list[MonitorEngine]]:
    """``world`` data-parallel ranks (threads): a collective, one model and one engine each (rank 0 writes)."""
    collective = _Collective(world)
    models = [mlp(seed=0) for _ in range(world)]
    engines = []
    for rank, model in enumerate(models):
        engine = MonitorEngine(MonitorConfig(**QUIET, spectra="exact", cpu_threads=None))
        engine.attach(model, world=world)
        engine.open(tmp_path / "ddp.jsonl", write=rank == 0)
        engines.append(engine)
    return collective, models, engines


def test_two_ranks_split_the_layers_and_agree(tmp_path: Path) -> None:
    """Two data-parallel ranks (threads) with the same averaged gradients: each measures its own layers,
    one all-reduce per step assembles the table; both records equal a single process's."""
    world, steps = 2, 3
    collective, models, engines = _ranks(tmp_path, world)
    records: list[list[dict[str, Any]]] = [[] for _ in range(world)]
    seen: list[dict[str, np.ndarray]] = []
    failures: list[BaseException] = []
    for step in range(steps):
        for model in models:  # the gradients DDP leaves on every rank: the same
            model.zero_grad()
            model(batch(step)).pow(2).mean().backward()
        seen.append(grads(models[0]))

        def run(rank: int, step: int = step) -> None:
            try:
                procs = Processes(rank=rank, world=world, reduce_sum=collective.reduce_sum(rank))
                # each rank's own loss: the record has their mean
                record = engines[rank].step(StepInputs(step=step, loss=float(rank + 1)), procs=procs)
                assert record is not None
                records[rank].append(dict(record))
            except BaseException as err:  # reported by the main thread
                failures.append(err)
                collective.barrier.abort()

        threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not failures, failures
    for engine in engines:
        engine.close()

    assert collective.calls == [steps] * world  # one all-reduce per step on every rank
    owners = layer_owners([(5, 6), (4, 5), (3, 4)], world)
    for rank in range(world):
        for step, record in enumerate(records[rank]):
            check_metrics(record, seen[step])
            assert record["layers_per_rank"] == [owners.count(r) for r in range(world)]
            assert record["loss"] == pytest.approx(1.5)
    assert engines[0].layers_computed_here + engines[1].layers_computed_here == steps * len(KEYS)
    assert [r["step"] for r in read_records(tmp_path / "ddp.jsonl")] == list(range(steps))  # rank 0 only writes


def test_event_files_carry_scalars_figures_and_summary(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradspectra.monitoring.events import EventFiles

    silent = EventFiles(tmp_path / "rank1", is_zero=False)
    assert silent.outputs() == Outputs()  # other ranks: no scalars, no writer
    silent.close()
    assert not (tmp_path / "rank1").exists()

    metrics = ["nuclear_norm", "effective_rank"]
    events = EventFiles(tmp_path / "tb", is_zero=True)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(tmp_path, model, spectra="exact", metrics=metrics, figure_every_n_steps=2)
    outputs = events.outputs()
    for step in range(3):
        train_step(engine, model, optimizer, step, outputs=outputs)
    summary = engine.finish(2, outputs, is_zero=True)
    assert engine.finish(2, outputs, is_zero=False) is None
    assert summary is not None and "3 steps monitored, 0 flagged" in summary
    engine.close()
    events.close()

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars(layer_tag("nuclear_norm", "2"))] == [0, 1, 2]
    assert [e.step for e in acc.Scalars(aggregate_tag("effective_rank", "max"))] == [0, 1, 2]
    assert [e.step for e in acc.Scalars("gradspectra/flagged_total")] == [0, 1, 2]
    # drawn at the second measured step (step 1) and once more at the end
    assert [e.step for e in acc.Images("grad_spectrum_heatmap/nuclear_norm")] == [1, 2]
    assert "gradspectra/summary/text_summary" in acc.Tags()["tensors"]
    assert len(acc.Tensors("custom_scalars__config__")) == 1


def test_a_failure_on_one_rank_does_not_hang_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1's spectral work raises: it still joins the all-reduce, and every rank records the step as an error."""
    world = 2
    collective, models, engines = _ranks(tmp_path, world)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory (planted)")

    monkeypatch.setattr(engines[1].runner, "run", broken)
    for model in models:
        model(batch(0)).pow(2).mean().backward()
    records: dict[int, dict[str, Any]] = {}
    failures: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            procs = Processes(rank=rank, world=world, reduce_sum=collective.reduce_sum(rank))
            record = engines[rank].step(StepInputs(step=0, loss=1.0), procs=procs)
            assert record is not None
            records[rank] = dict(record)
        except BaseException as err:
            failures.append(err)
            collective.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    with pytest.warns(UserWarning, match="could not measure step 0"):
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not failures, failures
    assert collective.calls == [1, 1]
    for rank in range(world):
        assert "measurement failed on 1 of 2 ranks" in records[rank]["error"]
        assert engines[rank].error_total == 1
        assert all(not values for values in records[rank]["metrics"].values())
    assert "planted" in records[1]["error"]


def test_a_fit_under_ddp_after_a_one_process_fit_of_the_same_layers_has_no_light_steps() -> None:
    # the planner (and what its budget learned) is kept across fits of the same layers; whether light steps may
    # happen is this fit's: under DDP every rank must make the same steps
    engine = MonitorEngine(MonitorConfig(**QUIET, max_overhead=1e-3))
    model = mlp(seed=0)
    engine.attach(model, world=1)
    planner = engine.planner
    assert planner is not None and planner.light
    planner.plan(list(range(len(engine.watched))))  # the budget, as the first step makes it
    budget = planner.budget
    assert budget is not None and budget.light
    budget.observe_step(0.01)
    budget.period = 8  # as learned on a fast step: one full step in 8
    engine.attach(model, world=2)
    assert engine.planner is planner and planner.budget is budget  # kept
    assert not planner.light and not budget.light and budget.period == 1
    assert all(budget.full_step() for _ in range(20))
    engine.attach(model, world=1)  # one process again: light steps allowed again
    assert planner.light and budget.light
