"""Streaming Metric classes against numpy statistics of numpy metric values, per batch, accumulated and under DDP."""

from __future__ import annotations

import math
import os
import pickle
import socket
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from gradspectra.functional import METRIC_NAMES
from gradspectra.functional.streaming import STAT_NAMES
from gradspectra.metrics import (
    EffectiveRank,
    FrobeniusNorm,
    GradientSpectrum,
    NuclearNorm,
    SpectralNorm,
    StableRank,
    TopSVRatio,
)
from reference import ref_metrics, ref_stream_stats, spectra, to_numpy64, with_spectrum

SINGLE_CLASSES = {
    "nuclear_norm": NuclearNorm,
    "spectral_norm": SpectralNorm,
    "frobenius_norm": FrobeniusNorm,
    "stable_rank": StableRank,
    "top_sv_ratio": TopSVRatio,
    "effective_rank": EffectiveRank,
}


@pytest.fixture(autouse=True)
def _quiet_compute_before_update() -> None:
    # torchmetrics warns when compute() runs on a metric that was never updated; some tests do that on purpose
    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")


def make_matrices(seed: int, count: int, shape: tuple[int, int] = (14, 9)) -> list[Tensor]:
    """Gradient-like fp32 matrices: mixed spectra, scales spread over two decades."""
    rng = np.random.default_rng(seed)
    kinds = list(spectra(min(shape)).values())
    out = []
    for i in range(count):
        scale = 10 ** rng.uniform(-1, 1)
        out.append(torch.from_numpy(with_spectrum(rng, *shape, kinds[i % len(kinds)] * scale)).float())
    return out


def bad_matrix(value: float, shape: tuple[int, int] = (14, 9)) -> Tensor:
    a = torch.ones(shape)
    a[1, 2] = value
    return a


def observations(matrices: list[Tensor]) -> list[dict[str, float]]:
    """Each matrix's metrics from numpy; non-finite matrices observe NaN (Frobenius: inf or nan)."""
    obs = []
    for m in matrices:
        a = to_numpy64(m)
        if np.isfinite(a).all():
            obs.append(ref_metrics(a))
        else:
            fro = float(np.sqrt(np.sum(a * a)))  # inf, or nan when any entry is nan
            obs.append({name: fro if name == "frobenius_norm" else float("nan") for name in METRIC_NAMES})
    return obs


def expected_stats(matrices: list[Tensor], names: tuple[str, ...] = METRIC_NAMES) -> dict[str, float]:
    obs = observations(matrices)
    out = {}
    for name in names:
        stats = ref_stream_stats([o[name] for o in obs])
        out.update({f"{name}/{stat}": value for stat, value in stats.items()})
    return out


def assert_stats_equal(got: dict[str, Tensor], want: dict[str, float], rtol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key].item()
        assert got[key].dtype == torch.float64, key
        if math.isnan(w):
            assert math.isnan(g), f"{key}: got {g}, want nan"
        elif key.endswith(("/count", "/nonfinite")):
            assert g == w, f"{key}: got {g}, want {w}"
        else:
            assert g == pytest.approx(w, rel=rtol, abs=1e-300), key


def test_output_keys() -> None:
    metric = GradientSpectrum()
    metric.update(make_matrices(0, 1)[0])
    assert list(metric.compute()) == [f"{name}/{stat}" for name in METRIC_NAMES for stat in STAT_NAMES]
    assert STAT_NAMES == ("mean", "std", "min", "max", "last", "count", "nonfinite")


@pytest.mark.parametrize("method", ["svd", "gram", "auto"])
def test_compute_after_updates_matches_numpy(method: str) -> None:
    mats = make_matrices(1, 9)
    seen = [*mats[:3], bad_matrix(float("nan")), *mats[3:5], bad_matrix(float("inf")), *mats[5:]]
    metric = GradientSpectrum(method=method)  # type: ignore[arg-type]
    for m in seen[:6]:
        metric.update(m)
    metric.update(torch.stack(seen[6:9]))  # a batch: each matrix is one observation, in order
    for m in seen[9:]:
        metric.update(m)
    got = metric.compute()
    want = expected_stats(seen)
    assert_stats_equal(got, want)
    # the bad observations are counted and kept out of the moments
    assert got["nuclear_norm/nonfinite"].item() == 2
    assert got["nuclear_norm/count"].item() == 9
    assert got["frobenius_norm/nonfinite"].item() == 2


def test_nan_as_last_observation_and_all_bad() -> None:
    mats = make_matrices(2, 3)
    metric = GradientSpectrum()
    for m in [*mats, bad_matrix(float("nan"))]:
        metric.update(m)
    got = metric.compute()
    assert_stats_equal(got, expected_stats([*mats, bad_matrix(float("nan"))]))
    assert math.isnan(got["effective_rank/last"].item())
    assert math.isfinite(got["effective_rank/mean"].item())

    only_bad = NuclearNorm()
    only_bad.update(bad_matrix(float("inf")))
    out = only_bad.compute()
    assert out["nuclear_norm/count"].item() == 0
    assert out["nuclear_norm/nonfinite"].item() == 1
    for stat in ("mean", "std", "min", "max", "last"):
        assert math.isnan(out[f"nuclear_norm/{stat}"].item()), stat


def test_never_updated_metric_reports_nan_and_zero_counts() -> None:
    out = GradientSpectrum(metrics=["stable_rank"]).compute()
    assert out["stable_rank/count"].item() == 0
    assert out["stable_rank/nonfinite"].item() == 0
    for stat in ("mean", "std", "min", "max", "last"):
        assert math.isnan(out[f"stable_rank/{stat}"].item()), stat


@pytest.mark.parametrize("name", list(SINGLE_CLASSES))
def test_single_metric_classes(name: str) -> None:
    cls = SINGLE_CLASSES[name]
    mats = [*make_matrices(3, 5), torch.zeros(14, 9), bad_matrix(float("nan")), *make_matrices(4, 2)]
    metric = cls()
    assert metric.metric_names == (name,)
    for m in mats:
        metric.update(m)
    assert_stats_equal(metric.compute(), expected_stats(mats, (name,)))
    assert cls.is_differentiable is False
    assert cls.full_state_update is False


def test_subset_of_metrics_and_update_values() -> None:
    mats = make_matrices(5, 6)
    names = ("effective_rank", "nuclear_norm")
    metric = GradientSpectrum(metrics=list(names))
    for m in mats:
        metric.update(m)
    assert_stats_equal(metric.compute(), expected_stats(mats, names))

    # already computed values go through the same statistics
    rows = np.array([[o[n] for n in names] for o in observations(mats)])
    direct = GradientSpectrum(metrics=list(names))
    direct.update_values(torch.from_numpy(rows[:4]))
    direct.update_values(torch.from_numpy(rows[4:]))
    direct.update_values(torch.zeros(0, 2))  # nothing observed: changes nothing, `last` included
    assert_stats_equal(direct.compute(), expected_stats(mats, names))


def _equal_outputs(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=0.0, equal_nan=True, msg=key)


def test_forward_returns_the_batch_and_accumulates() -> None:
    mats = make_matrices(6, 8)
    batches = [
        mats[0],
        torch.stack(mats[1:4]),
        torch.zeros(0, 14, 9),  # an empty batch: nothing observed, the running `last` survives
        bad_matrix(float("nan")),
        torch.stack([mats[4], bad_matrix(float("inf")), mats[5]]),
        mats[6],
        mats[7],
    ]
    metric = GradientSpectrum()
    seen: list[Tensor] = []
    for batch in batches:
        value = metric(batch)
        fresh = GradientSpectrum()
        fresh.update(batch)
        _equal_outputs(value, fresh.compute())
        seen.extend(batch if batch.ndim == 3 else [batch])
        # after every step the accumulated state covers everything seen so far
        assert_stats_equal(metric.compute(), expected_stats(seen))
    assert metric.compute()["nuclear_norm/count"].item() == 8


def test_reset() -> None:
    metric = GradientSpectrum()
    for m in make_matrices(7, 3):
        metric.update(m)
    metric.reset()
    out = metric.compute()
    assert out["spectral_norm/count"].item() == 0
    assert math.isnan(out["spectral_norm/last"].item())
    later = make_matrices(8, 2)
    for m in later:
        metric.update(m)
    assert_stats_equal(metric.compute(), expected_stats(later))


def test_pickle_round_trip() -> None:
    mats = make_matrices(9, 6)
    metric = GradientSpectrum(metrics=["nuclear_norm", "effective_rank"], method="svd")
    for m in mats[:4]:
        metric.update(m)
    restored = pickle.loads(pickle.dumps(metric))
    assert restored.method == "svd"
    _equal_outputs(restored.compute(), metric.compute())
    for m in mats[4:]:
        restored.update(m)
    assert_stats_equal(restored.compute(), expected_stats(mats, ("nuclear_norm", "effective_rank")))


def test_clone_is_independent() -> None:
    mats = make_matrices(10, 5)
    metric = StableRank()
    for m in mats[:3]:
        metric.update(m)
    copy = metric.clone()
    for m in mats[3:]:
        copy.update(m)
    assert_stats_equal(metric.compute(), expected_stats(mats[:3], ("stable_rank",)))
    assert_stats_equal(copy.compute(), expected_stats(mats, ("stable_rank",)))


def test_merge_state() -> None:
    first, second = make_matrices(11, 4), [*make_matrices(12, 3), bad_matrix(float("nan"))]
    a, b = GradientSpectrum(), GradientSpectrum()
    for m in first:
        a.update(m)
    for m in second:
        b.update(m)
    # the metric merged into counts as the newer one: `last` stays its own
    want = expected_stats(second + first)
    a.merge_state(b)
    assert_stats_equal(a.compute(), want)

    # into a metric that has seen nothing, `last` comes from the incoming state
    empty = GradientSpectrum()
    empty.merge_state(b)
    assert_stats_equal(empty.compute(), expected_stats(second))

    # a state dict works too
    c = GradientSpectrum()
    for m in first:
        c.update(m)
    c.merge_state(b.metric_state)
    assert_stats_equal(c.compute(), want)


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`method` can be auto, svd, gram, got 'eig'"):
        GradientSpectrum(method="eig")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`method` can be"):
        EffectiveRank(method="eig")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`metrics` can be any of .*got \['rank'\]"):
        GradientSpectrum(metrics=["rank"])
    metric = GradientSpectrum()
    with pytest.raises(ValueError, match="`matrix` must have at least 2 dimensions"):
        metric.update(torch.ones(5))
    with pytest.raises(TypeError, match=r"`grad_matrix` must be a torch\.Tensor, got list"):
        metric.update([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`values` must be shaped \(N, 7\)"):
        metric.update_values(torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"`values` must be shaped \(N, 7\)"):
        metric.update_values(torch.ones(6))


# --- DDP: two real processes, gloo on CPU ---------------------------------------------------------

WORLD_SIZE = 2


def _rank_matrices(rank: int) -> list[Tensor]:
    mats = make_matrices(100 + rank, 3 + 2 * rank)
    if rank == 0:
        mats.insert(1, bad_matrix(float("nan")))
    return mats


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        full, nuclear, only_rank0 = GradientSpectrum(), NuclearNorm(), EffectiveRank()
        for m in _rank_matrices(rank):
            full.update(m)
            nuclear.update(m)
            if rank == 0:
                only_rank0.update(m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = {
                "full": {k: v.item() for k, v in full.compute().items()},
                "nuclear": {k: v.item() for k, v in nuclear.compute().items()},
                "only_rank0": {k: v.item() for k, v in only_rank0.compute().items()},
                # compute() must leave the local state local, so accumulation goes on per rank
                "local_count_after": full.count.tolist(),
            }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(90)
def test_ddp_sync_matches_one_process_that_saw_everything(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    per_rank = [_rank_matrices(r) for r in range(WORLD_SIZE)]
    everything = [m for mats in per_rank for m in mats]  # rank order: the highest rank's last comes last
    single = GradientSpectrum()
    for m in everything:
        single.update(m)
    want = {k: v.item() for k, v in single.compute().items()}
    reference = expected_stats(everything)
    highest_rank_last = observations(per_rank[-1])[-1]

    for rank, res in enumerate(results):
        assert set(res["full"]) == set(want)
        for key, value in res["full"].items():
            if math.isnan(want[key]):
                assert math.isnan(value), (rank, key)
            else:
                # sums are added in another order than one process adds them: equal to rounding
                assert value == pytest.approx(want[key], rel=1e-12), (rank, key)
                assert value == pytest.approx(reference[key], rel=1e-6), (rank, key)
        for name in METRIC_NAMES:
            assert res["full"][f"{name}/last"] == pytest.approx(highest_rank_last[name], rel=1e-6)
            assert res["full"][f"{name}/count"] == len(everything) - 1
            assert res["full"][f"{name}/nonfinite"] == 1
        assert res["nuclear"] == {k: v for k, v in res["full"].items() if k.startswith("nuclear_norm/")}
        # a rank that saw nothing does not wipe `last`: it comes from the highest rank that has one
        want_rank0 = expected_stats(per_rank[0], ("effective_rank",))
        assert res["only_rank0"] == pytest.approx(want_rank0, rel=1e-6, nan_ok=True)
        assert res["local_count_after"] == [float(sum(m.isfinite().all().item() for m in per_rank[rank]))] * len(
            METRIC_NAMES
        )
