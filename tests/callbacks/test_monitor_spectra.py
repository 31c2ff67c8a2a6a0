"""spectra="auto" / "exact" / "estimate": each record's content, estimates vs exact values, the budget in a real run."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradspectra import GradientSpectrumMonitor
from gradspectra.functional import METRIC_NAMES
from gradspectra.monitoring.budget import DETECT_MAX
from gradspectra.reporting import read_records

from .conftest import TinyBert, loader, trainer_kwargs


def _fit(tmp_path: Path, *monitors: GradientSpectrumMonitor, steps: int = 6, hidden: int = 32) -> None:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=steps, callbacks=list(monitors), logger=False))
    trainer.fit(TinyBert(hidden=hidden), loader(n=4 * steps))


def test_estimates_every_step_match_exact_values_of_the_same_gradients(tmp_path: Path) -> None:
    # two monitors on one run see the same gradients; metric order differs so their state keys differ
    exact = GradientSpectrumMonitor(
        spectra="exact",
        metrics=["nuclear_norm", "effective_rank", "spectral_norm", "frobenius_norm"],
        scoring=False,
        figure_every_n_steps=0,
        output_dir=tmp_path / "exact",
    )
    estimate = GradientSpectrumMonitor(
        spectra="estimate",
        metrics=["frobenius_norm", "spectral_norm", "effective_rank", "nuclear_norm"],
        scoring=False,
        figure_every_n_steps=0,
        output_dir=tmp_path / "estimate",
    )
    _fit(tmp_path, exact, estimate, hidden=64)
    assert len(exact.batch_records) == len(estimate.batch_records) == 6
    errors: dict[str, list[float]] = {"nuclear_norm": [], "effective_rank": [], "spectral_norm": []}
    for a, b in zip(exact.batch_records, estimate.batch_records):
        assert "spectra" not in a
        assert set(b["spectra"].values()) == {"estimate"}
        assert b["deferred_layers"] == []
        assert set(b["estimate_error"]) == set(b["metrics"])
        for layer, values in a["metrics"].items():
            got = b["metrics"][layer]
            # the Frobenius norm is exact in both
            assert got["frobenius_norm"] == pytest.approx(values["frobenius_norm"], rel=1e-6)
            for metric in errors:
                errors[metric].append(abs(got[metric] - values[metric]) / values[metric])
    for metric, errs in errors.items():
        errs.sort()
        assert errs[len(errs) // 2] <= (0.03 if metric == "effective_rank" else 0.01), metric


def test_tiny_budget_defers_spectra_but_keeps_every_record(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(max_overhead=1e-4, figure_every_n_steps=0, warmup_steps=5)
    _fit(tmp_path, monitor, steps=8)
    records = read_records(monitor.record_path)
    assert [r["step"] for r in records] == list(range(8))
    deferred = [r for r in records if r["deferred_layers"]]
    assert len(deferred) >= 6
    for r in records:
        for layer in r["deferred_layers"]:
            # a deferred layer has its exact Frobenius norm and nothing that needs a spectrum
            assert set(r["metrics"][layer]) == {"frobenius_norm"}
            assert layer not in r["spectra"]
        assert set(r["spectra"]) | set(r["deferred_layers"]) == set(r["metrics"])
    # the scorer still scores every step after warm-up from what was measured
    assert all(r["score"] is not None for r in records[5:])
    assert all(not r["nonfinite_layers"] for r in records)


def test_ample_budget_gives_exact_spectra(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(max_overhead=10.0, scoring=False, figure_every_n_steps=0)
    _fit(tmp_path, monitor, steps=6)
    later = monitor.batch_records[-1]
    assert set(later["spectra"].values()) == {"exact"}
    assert later["deferred_layers"] == []
    assert all(len(m) == len(METRIC_NAMES) for m in later["metrics"].values())


def test_audits_record_the_estimators_real_error(tmp_path: Path) -> None:
    # between "everything exact" and "estimates only": at hidden 512 (without the factored route,
    # which makes these few-token gradients cheap to decompose exactly) an estimate is cheaper than
    # an SVD; twice the step time buys a few estimates per step, and a quarter of it pays for audits
    # (the cheap tier off: this is about the full spectra's share of the budget)
    monitor = GradientSpectrumMonitor(
        max_overhead=2.0, factored=False, scoring=False, figure_every_n_steps=0, cheap_spectra=False
    )
    _fit(tmp_path, monitor, steps=12, hidden=512)
    audits = [r["audit_error"] for r in monitor.batch_records if "audit_error" in r]
    assert audits, [r["spectra"] for r in monitor.batch_records]
    for audit in audits:
        for errs in audit.values():
            assert set(errs) >= {"nuclear_norm", "effective_rank"}
            assert all(math.isfinite(e) and e >= 0 for e in errs.values())


def test_tensorboard_gets_the_split_and_no_nan_for_deferred_layers(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    monitor = GradientSpectrumMonitor(max_overhead=1e-4, figure_every_n_steps=0, scoring=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=5, callbacks=[monitor], logger=logger))
    trainer.fit(TinyBert(), loader(n=20))
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "gradspectra/spectra/deferred" in tags
    deferred = [e.value for e in acc.Scalars("gradspectra/spectra/deferred")]
    assert max(deferred) > 0
    for tag in tags:
        assert all(math.isfinite(e.value) for e in acc.Scalars(tag)), tag
    # cross-layer aggregates only over every layer: the Frobenius norm every full step (a light step logs
    # nothing unless flagged), a full-spectrum metric only on steps where every layer had a full spectrum
    # (none deferred, none with the cheap tier only)
    full = [r["step"] for r in monitor.batch_records if not r.get("light")]
    assert [e.step for e in acc.Scalars("grad_spectrum_layers/frobenius_norm/mean")] == full
    cheap_only = {e.step: e.value for e in acc.Scalars("gradspectra/spectra/cheap_only")}
    complete = {e.step for e in acc.Scalars("gradspectra/spectra/deferred") if e.value == 0 and cheap_only[e.step] == 0}
    assert len(complete) < 5
    nuclear_tag = "grad_spectrum_layers/nuclear_norm/mean"
    nuclear = {e.step for e in acc.Scalars(nuclear_tag)} if nuclear_tag in tags else set()
    assert nuclear == complete


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spectra": "fast"}, "`spectra` can be auto, exact, estimate, got 'fast'"),
        ({"max_overhead": 0.0}, r"`max_overhead` must be in \(0, 10\], got 0.0"),
        ({"max_overhead": "3%"}, "`max_overhead` must be a float, got '3%'"),
    ],
)
def test_bad_spectra_arguments_name_themselves(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        GradientSpectrumMonitor(**kwargs)  # type: ignore[arg-type]


def test_factored_route_gives_the_same_exact_metrics(tmp_path: Path) -> None:
    # 2 sequences x 12 tokens = 24 tokens < hidden 64: the T x T route applies to the encoder's linears
    factored = GradientSpectrumMonitor(
        spectra="exact",
        scoring=False,
        figure_every_n_steps=0,
        output_dir=tmp_path / "f",
        metrics=["nuclear_norm", "effective_rank", "spectral_norm", "stable_rank"],
    )
    plain = GradientSpectrumMonitor(
        spectra="exact",
        factored=False,
        scoring=False,
        figure_every_n_steps=0,
        output_dir=tmp_path / "p",
        metrics=["stable_rank", "spectral_norm", "effective_rank", "nuclear_norm"],
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[factored, plain], logger=False))
    trainer.fit(TinyBert(hidden=64), loader(n=6, batch_size=2))
    for a, b in zip(factored.batch_records, plain.batch_records, strict=True):
        assert "factored_layers" not in b
        assert len(a["factored_layers"]) >= 10  # q, k, v, o, intermediate, output of both layers
        assert "head" not in a["factored_layers"]  # 2 rows of the pooled input: min(m, n) = 2, not fewer
        for layer, values in b["metrics"].items():
            for metric, want in values.items():
                assert a["metrics"][layer][metric] == pytest.approx(want, rel=1e-5, abs=1e-9), (layer, metric)


def test_default_cheap_tier_in_a_real_run_matches_exact_values_and_reaches_tensorboard(tmp_path: Path) -> None:
    """Two monitors on one run see the same gradients: the default's cheap values against exact spectra."""
    exact = GradientSpectrumMonitor(
        spectra="exact",
        metrics=["spectral_norm", "stable_rank", "participation_ratio", "effective_rank"],
        scoring=False,
        figure_every_n_steps=0,
        output_dir=tmp_path / "exact",
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    cheap = GradientSpectrumMonitor(max_overhead=5.0, figure_every_n_steps=0, warmup_steps=5)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, callbacks=[exact, cheap], logger=logger))
    trainer.fit(TinyBert(hidden=128), loader(n=32))
    checked = 0
    anchors = set(cheap.batch_records[-1]["detection"])
    assert 1 <= len(anchors) <= DETECT_MAX
    for ex, rec in zip(exact.batch_records, cheap.batch_records):
        # the detection value: on the same few anchor layers every step, coarse, of the order of the papers'
        # effective rank
        assert set(rec["detection"]) == anchors
        for layer, value in rec["detection"].items():
            assert 0.2 < value / ex["metrics"][layer]["effective_rank"] < 5
        for layer, how in rec["spectra"].items():
            if how != "cheap":
                continue
            assert set(rec["metrics"][layer]) == {
                "frobenius_norm",
                "spectral_norm",
                "stable_rank",
                "participation_ratio",
            }
            for name in ("spectral_norm", "stable_rank", "participation_ratio"):
                got, want = rec["metrics"][layer][name], ex["metrics"][layer][name]
                err = rec["estimate_error"][layer][name]
                assert abs(got - want) <= max(3 * err, 1e-4) * want, (layer, name, got, want, err)
                checked += 1
    assert checked > 0
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "gradspectra/spectra/cheap_only" in tags and "gradspectra/detection/effective_rank_coarse_median" in tags
    assert "grad_spectrum/participation_ratio/attention.self.query/layer_00" in tags


def test_a_second_fit_of_the_same_model_keeps_what_the_budget_learned(tmp_path: Path) -> None:
    monitor = GradientSpectrumMonitor(figure_every_n_steps=0, verbose=False)
    model = TinyBert()
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, logger=False), callbacks=[monitor]).fit(model, loader(n=64))
    planner = monitor.engine.planner
    assert planner is not None and planner.budget is not None
    learned = planner.budget.step_seconds
    assert learned is not None
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, logger=False), callbacks=[monitor]).fit(model, loader(n=64))
    assert monitor.engine.planner is planner  # not relearned from nothing on every fit
    assert planner.budget is not None and planner.budget.step_seconds is not None
