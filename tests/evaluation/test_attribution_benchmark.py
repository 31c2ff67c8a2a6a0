"""The attribution benchmark's own rules (precision@k, ties, the k + 1 ground truth of a repeated sample,
the stream it trains on) and a short run through its functions, rows and table included."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from reference import load_benchmark


@pytest.fixture(scope="module")
def bench() -> Any:
    return load_benchmark("attribution")


def test_precision_at_k_counts_the_bad_samples_in_the_top_k(bench: Any) -> None:
    p = bench.precision_at_k
    assert p([0.9, 0.1, 0.8, 0.2], bad=[0, 2]) == 1.0
    assert p([0.9, 0.1, 0.8, 0.2], bad=[1, 3]) == 0.0
    assert p([0.9, 0.1, 0.8, 0.2], bad=[0, 1]) == 0.5
    assert p([0.9, 0.1, 0.8, 0.2], bad=[0, 1], k=1) == 1.0  # an explicit k
    # a missing or NaN score ranks lowest
    assert p([None, 0.1, 0.2], bad=[0]) == 0.0
    assert p([math.nan, 0.1, 0.2], bad=[1, 2]) == 1.0
    assert p([None, None, 0.2], bad=[2]) == 1.0
    with pytest.raises(ValueError):
        p([0.1, 0.2], bad=[])
    with pytest.raises(ValueError):
        p([0.1, 0.2], bad=[0], ties="optimistic")


def test_ties_are_pessimistic_by_default_and_seeded_when_random(bench: Any) -> None:
    p = bench.precision_at_k
    assert p([1.0, 1.0, 1.0, 1.0], bad=[0]) == 0.0  # all tied: the clean ones first
    assert p([1.0, 1.0, 0.0], bad=[0, 1]) == 1.0  # a tie wholly inside the top k costs nothing
    assert p([1.0, 0.5, 0.5, 0.0], bad=[0, 2]) == 0.5  # a tie across the cut: the clean one wins it
    assert p([1.0, 0.5, 0.5, 0.0], bad=[0, 1]) == 0.5
    assert p([None] * 16, bad=[3, 7]) == 0.0  # no scores at all is the worst case, not a coin toss
    random_ties = [p([1.0] * 4, bad=[0, 1], ties="random", seed=s) for s in range(200)]
    assert set(random_ties) <= {0.0, 0.5, 1.0}
    assert 0.35 < sum(random_ties) / len(random_ties) < 0.65  # k/n in expectation
    assert random_ties == [p([1.0] * 4, bad=[0, 1], ties="random", seed=s) for s in range(200)]  # seeded


def test_a_repeated_sample_counts_all_its_copies_and_is_scored_at_k_plus_one(bench: Any) -> None:
    samples, bad = bench.bad_batch(random.Random(3), "duplicate", 2, first_id=100)
    assert len(samples) == bench.BATCH
    assert len(bad) == 3 and bad == sorted(bad)  # k + 1 copies
    assert len({(samples[i].text, samples[i].label) for i in bad}) == 1
    assert all(samples[i].text != samples[bad[0]].text for i in range(bench.BATCH) if i not in bad)
    assert len({s.sample_id for s in samples}) == bench.BATCH  # distinct ids for identical copies
    # a scorer that ranks every copy on top gets 1, one that ranks two of three copies on top gets 2/3
    scores = [0.0] * bench.BATCH
    for i in bad:
        scores[i] = 5.0
    assert bench.precision_at_k(scores, bad) == 1.0
    scores[bad[2]] = 1.0
    scores[next(i for i in range(bench.BATCH) if i not in bad)] = 1.0  # ties with a clean sample: lost
    assert bench.precision_at_k(scores, bad) == pytest.approx(2 / 3)


def test_bad_samples_of_each_kind(bench: Any) -> None:
    for kind in ("label_noise", "random_tokens", "truncated"):
        samples, bad = bench.bad_batch(random.Random(5), kind, 4, first_id=0)
        clean = bench._clean_samples(random.Random(5), bench.BATCH, 0, 0.0)  # the same draws, uncorrupted
        assert len(bad) == 4
        for i, (got, before) in enumerate(zip(samples, clean)):
            assert got.sample_id == before.sample_id
            if i not in bad:
                assert (got.text, got.label) == (before.text, before.label)
            elif kind == "label_noise":
                assert (got.text, got.label) == (before.text, 1 - before.label)
            elif kind == "truncated":
                assert got.text == before.text.split()[0] and got.label == before.label
            else:
                assert got.text != before.text and len(got.text.split()) == len(before.text.split())
    with pytest.raises(ValueError):
        bench.bad_batch(random.Random(0), "unrelated_words", 1, 0)
    with pytest.raises(ValueError):
        bench.bad_batch(random.Random(0), "duplicate", 15, 0)


def test_the_stream_warms_up_then_interleaves_bad_and_clean_batches(bench: Any) -> None:
    settings = bench.Settings(ks=(1, 4), batches_per_setting=2, warmup_steps=3, clean_between=1)
    stream = bench.plan(7, settings)
    assert [b.phase for b in stream[:3]] == ["warmup"] * 3
    after = stream[3:]
    assert [b.phase for b in after] == ["bad", "clean"] * (len(bench.KINDS) * 2 * 2)
    settings_seen = [(b.kind, b.k) for b in after if b.phase == "bad"]
    assert sorted(settings_seen) == sorted((kind, k) for kind in bench.KINDS for k in (1, 4) for _ in range(2))
    assert settings_seen != sorted(settings_seen)  # shuffled, not one kind after the other
    for b in after:
        expected = 0 if b.phase == "clean" else b.k + (b.kind == "duplicate")
        assert len(b.bad) == expected
    ids = [s.sample_id for b in stream for s in b.samples]
    assert len(ids) == len(set(ids))
    assert [b.step for b in stream] == list(range(len(stream)))
    assert [(b.kind, b.k, b.bad) for b in bench.plan(7, settings)] == [(b.kind, b.k, b.bad) for b in stream]


def _row(bench: Any, seed: int, batch: int, kind: str | None, k: int, bad: list[int], **scores: Any) -> dict[str, Any]:
    n = bench.BATCH
    row = {"seed": seed, "batch": batch, "kind": kind, "k": k, "bad": bad, "measured": True}
    row["reasons"] = [["high"] if i in bad else [] for i in range(n)]
    for name in ("ours", "loss", "loss_eval", "grad_norm"):
        row[name] = scores.get(name, [0.0] * n)
    return row


def test_the_table_compares_each_kind_with_the_better_peer(bench: Any) -> None:
    def top(bad: list[int]) -> list[float]:
        return [1.0 if i in bad else 0.0 for i in range(bench.BATCH)]

    rows = [
        # label flips: ours and the loss perfect
        _row(bench, 1, 10, "label_noise", 1, [3], ours=top([3]), loss=top([3])),
        _row(bench, 1, 11, None, 0, [], ours=[0.5] * bench.BATCH),
        # truncated: the eval loss beats ours (ours 0.5 on one batch, 1 on the other)
        _row(bench, 1, 12, "truncated", 2, [1, 2], ours=top([1, 5]), loss_eval=top([1, 2])),
        _row(bench, 2, 12, "truncated", 2, [1, 2], ours=top([1, 2]), loss_eval=top([1, 2])),
        _row(bench, 0, 12, "duplicate", 1, [4, 9], ours=top([4, 9])),  # the tuning seed
    ]
    results = bench.evaluate_rows(rows)
    assert len(results) == 4  # clean batches are not scored
    kinds = {s.kind: s for s in bench.summarize([r for r in results if r.seed != 0])}
    assert kinds["label_noise"].ours == 1.0 and kinds["label_noise"].best_peer == 1.0
    assert kinds["truncated"].ours == 0.75 and kinds["truncated"].loss == 1.0
    assert kinds["truncated"].loss_variant.startswith("eval")
    assert kinds["truncated"].worst["ours"].batch == 12 and kinds["truncated"].worst["ours"].seed == 1
    text = bench.report(rows)
    held, tuning = text.split("### Tuning seed")
    assert held.startswith("### Held-out seeds (1, 2)")
    assert "cut to one word" in held and "label flipped" in held and "one sample repeated" not in held
    assert held.index("cut to one word") < held.index("label flipped")  # worst first
    assert "no (cut to one word)" in held
    assert "macro precision@k 0.88" in held and "not met" in held
    assert "one sample repeated" in tuning and "1 (+1 copy: P@2)" in tuning
    assert "bad samples 100 % of 5" in held and "samples of clean batches 0 % of 16" in held


def test_the_fresh_held_out_half_is_reported_first_and_apart(bench: Any) -> None:
    """Seeds 3 and 4 (held out from the output-gradient term on) get their own section, before seeds 1 and 2."""
    top = [1.0 if i == 3 else 0.0 for i in range(bench.BATCH)]
    rows = [
        _row(bench, seed, 10, "label_noise", 1, [3], ours=top if seed != 4 else top[::-1], loss=top)
        for seed in (0, 1, 3, 4)
    ]
    text = bench.report(rows)
    fresh, rest = text.split("### Held-out seeds (1)")
    assert fresh.startswith("### Held-out seeds, fresh (3, 4)") and "Other seeds" not in text
    assert "0.50" in fresh  # seed 4's batch missed, seed 3's found: both and only they are in this section
    assert "### Tuning seed (0)" in rest


def test_overhead_report_states_the_target(bench: Any) -> None:
    result = {
        "rounds": 10,
        "block": 4,
        "warm": 25,
        "ratio_mean": 1.005,
        "ratio_se": 0.004,
        "ratios": [],
        "step_s": {"none": 1.0, "flagged": 1.005},
        "flagged_steps": {"none": 0, "flagged": 1},
    }
    assert "+0.5 % ± 0.4 %" in bench.overhead_report(result) and ": met" in bench.overhead_report(result)
    assert ": not met" in bench.overhead_report({**result, "ratio_mean": 1.05})
    assert ": inconclusive" in bench.overhead_report({**result, "ratio_mean": 1.015, "ratio_se": 0.01})
    assert ": inconclusive" in bench.overhead_report({**result, "ratio_mean": 1.03, "ratio_se": 0.01})
    assert "median of the rounds' ratios +1.0 %" in bench.overhead_report({**result, "ratios": [1.0, 1.01, 1.05]})


@pytest.mark.timeout(240)
def test_a_quick_run_keeps_rows_and_rebuilds_its_table_from_them(
    bench: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = tmp_path / "rows"
    assert bench.main(["--quick", "--seeds", "1", "--records", str(records), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (records / "seed1.jsonl").read_text().splitlines()]
    bad_rows = [r for r in rows if r["kind"] is not None]
    assert sorted(r["kind"] for r in bad_rows) == sorted(bench.KINDS)
    for r in bad_rows:
        assert r["k"] == 1 and len(r["bad"]) == (2 if r["kind"] == "duplicate" else 1)
        for name in ("ours", "loss", "loss_eval", "grad_norm", "reasons"):
            assert len(r[name]) == bench.BATCH, name
        assert all(v > 0 and math.isfinite(v) for v in r["loss"] + r["loss_eval"] + r["grad_norm"])
        # the peers: identical copies have identical eval-mode loss and gradient norm
        if r["kind"] == "duplicate":
            a, b = r["bad"]
            assert r["grad_norm"][a] == pytest.approx(r["grad_norm"][b], rel=1e-5)
            assert r["loss_eval"][a] == pytest.approx(r["loss_eval"][b], rel=1e-5)
        if bench.per_sample_support():
            assert r["measured"] and all(v is not None for v in r["ours"])
    assert json.loads((records / "seed1.json").read_text())["batches_per_setting"] == 1
    assert "### Held-out seeds (1)" in printed and "**macro**" in printed
    assert (tmp_path / "r.md").read_text().strip() == printed.strip()
    # the table again, from the kept rows only
    assert bench.main(["--report", str(records), "--seeds", "1"]) == 0
    assert capsys.readouterr().out.strip() == printed.strip()
    # a seed already there is kept, not run again
    (records / "seed1.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n")
    assert bench.main(["--quick", "--seeds", "1", "--records", str(records)]) == 0
    assert capsys.readouterr().out.count("| **macro** | 1 |") == 1
