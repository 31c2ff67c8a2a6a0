"""Bad-batch detection, side by side: our score against a loss z-score and a gradient-norm z-score detector.

For each corruption kind, one real Lightning fine-tune on CPU with ``GradientSpectrumMonitor`` attached
(default settings except ``spectra="exact"``: every step, every watched layer's exact spectrum, warm-up 20)
and about 12 % of the batches corrupted
with that kind (the first 25 batches clean):

- review kinds (``label_noise``, ``random_tokens``, ``unrelated_words``, ``duplicate``, ``near_duplicate``,
  ``truncated``, see :func:`gradspectra.demo.data.review_batches`): the pretrained MiniLM-L6 ``ReviewClassifier``;
- ``irrelevant_response``: a tiny Llama (``TinyCausalLM``, random init) learning chain-of-thought
  arithmetic, with batches whose responses are assembled from other samples' responses with a
  mismatched final answer (:func:`gradspectra.demo.data.arithmetic_batches`).

Then, over the scored steps (after the monitor's warm-up), per kind: the AUROC of the monitor's live
``score``, of a loss z-score detector and of a global gradient-norm z-score detector (the peers,
:class:`gradspectra.evaluation.ZScoreDetector` on the same steps' loss and
``sqrt(sum_l frobenius_norm_l^2)``), and the share of clean steps the monitor flagged. Peers get the
benefit of the doubt: each peer's AUROC is the better of its one-sided ("high", what spike detectors
do) and two-sided form, per kind.

    python benchmarks/detection.py                          # everything, ~20-25 min on 2 busy cores
    python benchmarks/detection.py --kinds duplicate --steps 80
    python benchmarks/detection.py --records /tmp/recs      # also keep each run's batch records
    python benchmarks/detection.py --rescore /tmp/recs      # no training: re-score kept records
    python benchmarks/detection.py --lora --records /tmp/lora   # the review kinds, MiniLM-L6 with LoRA adapters

``--rescore`` replays kept records through a fresh ``BatchScorer`` with the monitor's settings (the
score is a pure function of the stream of per-step metrics and losses), for tuning the scorer.

``--lora`` runs the review kinds (the default ``--kinds`` becomes the review kinds; the causal-LM kind
and ``--grid`` are not available with it) on MiniLM-L6 with peft LoRA adapters (needs peft, the
``gradspectra[lora]`` extra): ``r=8, lora_alpha=16`` on ``query`` and ``value``, no adapter dropout,
the encoder frozen but for the adapters, the classification head fully trained, AdamW at ``--lora-lr``
(default 5e-4: adapters need a larger rate than the full fine-tune's 2e-5). The monitor is unchanged: the
frozen base weights it watches (with ``--watch attention``: query, key, value and ``output.dense`` of
every layer, matched by the explicit include) are measured by their implied full-weight gradient
``D^T X`` under the same names as in the full fine-tune (``attention.self.query/layer_00``), so the
two runs measure the same layers. The peers' gradient norm is the norm over those watched layers, so
under LoRA it is the norm of the implied gradients too. The report, the table's model column and the
``--out`` JSON (``"lora"``) say whether a run was LoRA; ``--rescore`` tells LoRA records apart by their
``implied_layers`` (an adapter named for some layer).

``--grid`` runs the settings the scorer must hold on, not only the one it was tuned on: 4 tasks
(``reviews``: sentiment, ``topics``: 4-class topic, ``pairs``: whether two reviews agree, all three
on the pretrained MiniLM-L6 at 24 tokens; ``arithmetic``: chain-of-thought answers on a tiny Llama
after 300 clean pre-training steps) x 3 learning-rate schedules (``constant``; ``warmup_decay``: 10 %
linear warm-up then linear decay to 10 %; ``high``: constant at 4x the base rate, noisy but not
breaking) x corrupted fractions 0, 5 and 20 % (every kind of the task mixed in one run, in turn) x
2 seeds: 72 runs of 150 steps, the default constructor watching every linear layer (``--spectra``
picks auto or exact). The split is fixed before any tuning (:data:`TUNING_TASKS`,
:data:`HELD_OUT_TASKS`); the report shows the held-out half first. Per half: clean-only runs (share of
scored steps flagged, worst run, longest run of false flags) and mixed runs (per-kind AUROC against
the clean batches of the same run, ours and the peers', share of clean and of corrupted batches
flagged, shift events). Each run is its own process; runs already in ``--records`` are kept (the
grid resumes), ``--rescore DIR --grid`` replays them::

    python benchmarks/detection.py --grid --spectra auto --records /tmp/grid/auto     # ~65 min on 2 cores
    python benchmarks/detection.py --grid --spectra exact --records /tmp/grid/exact --tasks topics,pairs
    python benchmarks/detection.py --grid --rescore /tmp/grid/auto
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

REVIEW_KINDS = ("label_noise", "random_tokens", "unrelated_words", "duplicate", "near_duplicate", "truncated")
LM_KINDS = ("irrelevant_response",)
ALL_KINDS = REVIEW_KINDS + LM_KINDS
WARMUP = 20  # the monitor's default warm-up; the peers get the same
CLEAN_PREFIX = 25


@dataclass
class KindResult:
    kind: str
    model: str
    steps: int
    scored: int
    corrupted: int
    auroc_ours: float
    auroc_loss: float
    auroc_grad_norm: float
    false_flag_rate: float
    recall: float
    seconds: float
    lora: bool = False


# ---------------------------------------------------------------------------------------------- training


def _trainer(steps: int, monitor: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=steps,
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _monitor(out_dir: Path, include: str | None, spectra: str) -> Any:
    from gradspectra import GradientSpectrumMonitor

    return GradientSpectrumMonitor(
        include=include,
        spectra=spectra,  # "auto" is the default constructor's; "exact": every layer's spectrum every step
        output_dir=out_dir,
        sample_id_key="sample_id",
        figure_every_n_steps=0,
        warmup_steps=WARMUP,
        verbose=False,
    )


#: ``--lora``: the adapters put on MiniLM-L6's encoder (peft ``LoraConfig`` arguments).
LORA_CONFIG: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "lora_dropout": 0.0}
LORA_LR = 5e-4
FULL_LR = 2e-5  # ReviewClassifier's default


def with_lora(model: Any) -> Any:
    """``model`` (a ``ReviewClassifier``) with its encoder wrapped in peft LoRA adapters (:data:`LORA_CONFIG`).

    peft freezes the encoder but for the adapters; the head stays fully trainable. The optimizer gets
    every parameter (``_optimizers``: ``AdamW(module.parameters())``); AdamW skips the frozen ones, which
    never get a ``.grad``.
    """
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("--lora needs peft: pip install peft (or `pip install 'gradspectra[lora]'`)") from err
    model.encoder = peft.get_peft_model(model.encoder, peft.LoraConfig(**LORA_CONFIG))
    if not all(p.requires_grad for p in model.head.parameters()):
        raise RuntimeError("--lora: the classification head must stay trainable")
    return model


def run_review(
    kind: str,
    steps: int,
    max_length: int,
    seed: int,
    work: Path,
    watch: str,
    spectra: str = "exact",
    lora: bool = False,
    lora_lr: float = LORA_LR,
) -> tuple[list[dict[str, Any]], dict[int, bool]]:
    """Fine-tune MiniLM-L6 on reviews with ``kind`` injected; the monitor's records and batch -> corrupted.

    ``lora``: LoRA adapters on the encoder (:func:`with_lora`), trained at ``lora_lr``, instead of the full
    fine-tune at :data:`FULL_LR`.
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from gradspectra.demo.data import review_batches
    from gradspectra.demo.models import ReviewClassifier, TokenizedBatches, load_tokenizer

    pl.seed_everything(seed, verbose=False)
    planned = review_batches(steps, batch_size=16, corruptions=(kind,), clean_prefix=CLEAN_PREFIX, seed=seed)
    data = TokenizedBatches(planned, load_tokenizer(), max_length=max_length)
    model = ReviewClassifier(lr=lora_lr) if lora else ReviewClassifier()
    if lora:
        model = with_lora(model)
    monitor = _monitor(work, "*.attention.*" if watch == "attention" else None, spectra)
    _trainer(steps, monitor).fit(model, DataLoader(data, batch_size=None, shuffle=False))
    return list(monitor.batch_records), {b.index: b.corruption is not None for b in planned}


def lm_tensors(planned: Sequence[Any], max_length: int) -> list[dict[str, Any]]:
    """Planned causal-LM batches as tensors (loss on the responses only), with their sample ids."""
    import torch

    from gradspectra.demo.models import CharTokenizer, lm_batch

    tokenizer = CharTokenizer()
    data = []
    for b in planned:
        batch = lm_batch(tokenizer, [s.prompt for s in b.samples], [s.response for s in b.samples], max_length)
        batch["sample_id"] = torch.tensor([s.sample_id for s in b.samples])
        data.append(batch)
    return data


def pretrain_lm(model: Any, steps: int, seed: int, max_length: int) -> None:
    """``steps`` unmonitored optimizer steps of ``model`` on clean chain-of-thought arithmetic."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from gradspectra.demo.data import arithmetic_batches

    clean = arithmetic_batches(steps, batch_size=16, corrupt_fraction=0.0, seed=seed + 1_000)
    pl.Trainer(
        max_steps=steps,
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(
        model, DataLoader(cast(Any, lm_tensors(clean, max_length)), batch_size=None, shuffle=False)
    )  # a list is a map-style dataset


def run_causal_lm(
    kind: str,
    steps: int,
    max_length: int,
    seed: int,
    work: Path,
    watch: str,
    pretrain_steps: int,
    spectra: str = "exact",
) -> tuple[list[dict[str, Any]], dict[int, bool]]:
    """Train a tiny Llama on clean chain-of-thought arithmetic, then go on, monitored, with ``kind`` injected.

    The unmonitored first phase stands in for pretraining: the papers measure trained models, and a
    response that does not fit its prompt is only unusual to a model that has learned what fits.
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from gradspectra.demo.data import arithmetic_batches
    from gradspectra.demo.models import CharTokenizer, TinyCausalLM

    pl.seed_everything(seed, verbose=False)
    model = TinyCausalLM(CharTokenizer().vocab_size)
    if pretrain_steps > 0:
        pretrain_lm(model, pretrain_steps, seed, max_length)
    planned = arithmetic_batches(steps, batch_size=16, corruptions=(kind,), clean_prefix=CLEAN_PREFIX, seed=seed)
    monitor = _monitor(work, "*.self_attn.*" if watch == "attention" else None, spectra)
    data = cast(Any, lm_tensors(planned, max_length))
    _trainer(steps, monitor).fit(model, DataLoader(data, batch_size=None, shuffle=False))
    return list(monitor.batch_records), {b.index: b.corruption is not None for b in planned}


# ---------------------------------------------------------------------------------------------- evaluation


def peer_scores(records: Sequence[dict[str, Any]], name: str) -> tuple[list[float | None], list[float | None]]:
    """One-sided (high) and two-sided scores of a peer z-score detector on the records' loss or grad norm."""
    from gradspectra.evaluation import ZScoreDetector, global_grad_norm

    high = ZScoreDetector(name=name, side="high", warmup_steps=WARMUP)
    both = ZScoreDetector(name=name, side="both", warmup_steps=WARMUP)
    out_high: list[float | None] = []
    out_both: list[float | None] = []
    for r in records:
        value = r["loss"] if name == "loss" else global_grad_norm(r["metrics"])
        value = math.nan if value is None else float(value)
        out_high.append(high.score(value).score)
        out_both.append(both.score(value).score)
    return out_high, out_both


def rescore(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with ``score``/``flagged`` recomputed by fresh scorers with the monitor's settings. As in the
    monitor: where the run had light steps (``"light": true``), a light scorer sees every step's Frobenius norms
    and the loss and scores the light steps, and its score stands on a full step while the main scorer, fed the
    full steps only, still warms up. One optimizer's records (the grid's runs have one)."""
    from gradspectra.functional import DETECTION_METRIC
    from gradspectra.monitoring.config import MonitorConfig

    config = MonitorConfig(warmup_steps=WARMUP, false_flag_rate=0.01)
    scorer = config.make_scorer()
    light = config.make_light_scorer() if any(r.get("light") for r in records) else None
    assert scorer is not None
    out = []
    for r in records:
        light_result = None
        if light is not None:
            norms = {
                k: {"frobenius_norm": _value(v["frobenius_norm"])}
                for k, v in r["metrics"].items()
                if "frobenius_norm" in v
            }
            light_result = light.score(norms, r["loss"])
        if r.get("light"):
            result = light_result
            scorer.forget_flag()  # as the monitor: a step the scorer does not see
        else:
            # what the monitor scored: the metrics and each layer's detection value
            seen = {layer: {m: _value(v) for m, v in values.items()} for layer, values in r["metrics"].items()}
            for layer, value in (r.get("detection") or {}).items():
                seen.setdefault(layer, {})[DETECTION_METRIC] = value
            result = scorer.score(seen, r["loss"])
            if result.in_warmup and light_result is not None and not light_result.in_warmup:
                result = light_result
            elif light is not None and not result.flagged:
                light.forget_flag()  # as the monitor: the light scorer's flag was not the record's
        assert result is not None
        out.append(
            {**r, "score": result.score, "flagged": result.flagged, "reasons": result.reasons, "events": result.events}
        )
    return out


def _value(v: float | None) -> float:
    """A record's metric value as the monitor scored it: ``null`` is a non-finite value (an absent one has no key)."""
    return math.nan if v is None else v


def _auroc(scores: Sequence[float | None], labels: Sequence[bool]) -> float:
    from gradspectra.evaluation import auroc

    return auroc([math.inf if s is None or math.isnan(s) else s for s in scores], labels)


def is_lora(records: Sequence[dict[str, Any]]) -> bool:
    """Whether the records come from a run with adapters: some layer measured by its implied gradient has an
    adapter named (``implied_layers``)."""
    return any(a is not None for r in records for a in (r.get("implied_layers") or {}).values())


def evaluate(
    kind: str,
    model: str,
    records: Sequence[dict[str, Any]],
    corrupted: dict[int, bool],
    seconds: float,
    lora: bool = False,
) -> KindResult:
    loss_high, loss_both = peer_scores(records, "loss")
    norm_high, norm_both = peer_scores(records, "grad_norm")
    # the steps every detector scores: after warm-up (ours and the peers' warm-ups end together on a
    # stream without non-finite values; a step a peer could not score counts as most anomalous)
    keep = [i for i, r in enumerate(records) if r["score"] is not None]
    labels = [corrupted[int(records[i]["batch_idx"])] for i in keep]
    ours = [float(records[i]["score"]) for i in keep]

    def pick(values: Sequence[float | None]) -> list[float | None]:
        return [values[i] for i in keep]

    clean_flags = [bool(records[i]["flagged"]) for i, bad in zip(keep, labels) if not bad]
    bad_flags = [bool(records[i]["flagged"]) for i, bad in zip(keep, labels) if bad]
    return KindResult(
        kind=kind,
        model=model,
        steps=len(records),
        scored=len(keep),
        corrupted=sum(labels),
        auroc_ours=_auroc(ours, labels),
        auroc_loss=max(_auroc(pick(loss_high), labels), _auroc(pick(loss_both), labels)),
        auroc_grad_norm=max(_auroc(pick(norm_high), labels), _auroc(pick(norm_both), labels)),
        false_flag_rate=sum(clean_flags) / max(1, len(clean_flags)),
        recall=sum(bad_flags) / max(1, len(bad_flags)),
        seconds=seconds,
        lora=lora,
    )


def signal_row(kind: str, records: Sequence[dict[str, Any]], corrupted: dict[int, bool]) -> str:
    """Per-batch AUROC of single signals for one kind: where the information is (an oracle, see below).

    The peers' one-sided z-scores of the loss and the global gradient norm; the level of the nuclear
    norm and of the effective rank (the median over layers of ``log(value / median of the layer's
    last 24 clean values)``, AUROC in the better direction, which is named); and the shape of the
    nuclear-norm layer profile (the squared deviations of those per-layer log ratios from their
    median). The clean baseline uses the labels: nothing corrupted enters it, which a live detector
    cannot know.
    """
    import numpy as np

    from gradspectra.evaluation import auroc

    labels = [corrupted[int(r["batch_idx"])] for r in records]
    layers = [k for k in records[0]["metrics"] if all(k in r["metrics"] for r in records)]
    scored = labels[WARMUP:]

    def column(metric: str) -> Any:
        values = [[r["metrics"][k].get(metric, math.nan) for k in layers] for r in records]
        return np.log(np.maximum(np.asarray(values, dtype=np.float64), 1e-300))

    def oracle(metric: str) -> tuple[list[float], list[float]]:
        x = column(metric)
        level, shape = [], []
        for t in range(WARMUP, len(records)):
            clean = [s for s in range(t) if not labels[s]][-24:]
            d = x[t] - np.nanmedian(x[clean], axis=0)
            level.append(float(np.nanmedian(d)))
            shape.append(float(np.nansum((d - np.nanmedian(d)) ** 2)))
        return level, shape

    def directed(values: Sequence[float]) -> str:
        a = auroc([0.0 if math.isnan(v) else v for v in values], scored)
        return f"{max(a, 1 - a):.2f}, {'up' if a >= 0.5 else 'down'}"

    loss_high, _ = peer_scores(records, "loss")
    norm_high, _ = peer_scores(records, "grad_norm")
    nuclear_level, nuclear_shape = oracle("nuclear_norm")
    erank_level, _ = oracle("effective_rank")
    return (
        f"| {kind} | {_auroc(loss_high[WARMUP:], scored):.2f} | {_auroc(norm_high[WARMUP:], scored):.2f} "
        f"| {directed(nuclear_level)} | {directed(erank_level)} | {_auroc(nuclear_shape, scored):.2f} |"
    )


def table(results: Sequence[KindResult]) -> str:
    lines = [
        "| kind | model | scored steps (corrupted) | AUROC ours | AUROC loss z | AUROC grad-norm z "
        "| false-flag rate ours | corrupted flagged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.kind} | {r.model} | {r.scored} ({r.corrupted}) | {r.auroc_ours:.3f} | {r.auroc_loss:.3f} "
            f"| {r.auroc_grad_norm:.3f} | {100 * r.false_flag_rate:.1f} % | {100 * r.recall:.0f} % |"
        )
    if results:
        mean = statistics.fmean
        lines.append(
            f"| **macro average** | | {sum(r.scored for r in results)} ({sum(r.corrupted for r in results)}) "
            f"| **{mean(r.auroc_ours for r in results):.3f}** | {mean(r.auroc_loss for r in results):.3f} "
            f"| {mean(r.auroc_grad_norm for r in results):.3f} "
            f"| {100 * mean(r.false_flag_rate for r in results):.1f} % "
            f"| {100 * mean(r.recall for r in results):.0f} % |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the grid

#: ``--grid``: tasks, learning-rate schedules, corrupted fractions and seeds, every combination one run.
GRID_TASKS = ("reviews", "topics", "pairs", "arithmetic")
#: The split, fixed before any tuning: the scorer is tuned on these tasks' runs ...
TUNING_TASKS = ("reviews", "arithmetic")
#: ... and these are reported as held out (never looked at while choosing anything).
HELD_OUT_TASKS = ("topics", "pairs")
GRID_SCHEDULES = ("constant", "warmup_decay", "high")
GRID_FRACTIONS = (0.0, 0.05, 0.2)
GRID_SEEDS = (0, 1)
#: Mixed runs cycle through every kind of their task.
GRID_TEXT_KINDS = (*REVIEW_KINDS, "short", "one_template")
GRID_LM_KINDS = ("irrelevant_response", "answer_only", "duplicate", "random_tokens")
GRID_LR = {"minilm": 3e-5, "llama": 1e-3}  # "high" multiplies these by GRID_HIGH
GRID_HIGH = 4.0
GRID_STEPS = 150
GRID_MAX_LENGTH = 24  # MiniLM tokens per sample (a pair shares them)
GRID_LM_PRETRAIN = 300
GRID_LM_MAX_LENGTH = 224  # characters per arithmetic sample


def grid_names(tasks: Sequence[str], seeds: Sequence[int]) -> list[str]:
    return [
        f"{task}-{schedule}-{round(100 * fraction):02d}-s{seed}"
        for task in tasks
        for schedule in GRID_SCHEDULES
        for fraction in GRID_FRACTIONS
        for seed in seeds
    ]


def parse_grid_name(name: str) -> tuple[str, str, float, int]:
    task, schedule, fraction, seed = name.split("-")
    return task, schedule, int(fraction) / 100, int(seed[1:])


def grid_run(name: str, spectra: str, out: Path) -> None:
    """One run of the grid, its records (labelled with each batch's corruption) written to ``out``."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from gradspectra.demo.data import arithmetic_batches, text_batches
    from gradspectra.demo.models import CharTokenizer, ReviewClassifier, TinyCausalLM, TokenizedBatches, load_tokenizer

    task, schedule, fraction, seed = parse_grid_name(name)
    lr_schedule = "warmup_decay" if schedule == "warmup_decay" else "constant"
    boost = GRID_HIGH if schedule == "high" else 1.0
    pl.seed_everything(seed, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        monitor = _monitor(work, None, spectra)
        if task == "arithmetic":
            vocab = CharTokenizer().vocab_size
            model: Any = TinyCausalLM(vocab, lr=GRID_LR["llama"] * boost, schedule=lr_schedule, total_steps=GRID_STEPS)
            pretrain = TinyCausalLM(vocab, lr=GRID_LR["llama"])  # the base rate, whatever the run's schedule
            pretrain.model = model.model
            pretrain_lm(pretrain, GRID_LM_PRETRAIN, seed, GRID_LM_MAX_LENGTH)
            planned: Sequence[Any] = arithmetic_batches(
                GRID_STEPS, corrupt_fraction=fraction, corruptions=GRID_LM_KINDS, clean_prefix=CLEAN_PREFIX, seed=seed
            )
            data: Any = lm_tensors(planned, GRID_LM_MAX_LENGTH)
        else:
            from gradspectra.demo.data import TEXT_TASKS

            planned = text_batches(
                task,
                GRID_STEPS,
                corrupt_fraction=fraction,
                corruptions=GRID_TEXT_KINDS,
                clean_prefix=CLEAN_PREFIX,
                seed=seed,
            )
            data = TokenizedBatches(planned, load_tokenizer(), max_length=GRID_MAX_LENGTH)
            model = ReviewClassifier(
                lr=GRID_LR["minilm"] * boost,
                num_labels=TEXT_TASKS[task],
                schedule=lr_schedule,
                total_steps=GRID_STEPS,
            )
        _trainer(GRID_STEPS, monitor).fit(model, DataLoader(data, batch_size=None, shuffle=False))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / "batches.jsonl", out)
    _add_labels(out, {b.index: b.corruption for b in planned})


def run_grid(args: argparse.Namespace) -> None:
    """Every run of the grid not yet in ``--records``, ``--jobs`` at a time, each in its own process."""

    def command(name: str) -> list[str]:
        cmd = [sys.executable, __file__, "--grid-run", name, "--spectra", args.spectra, "--records", str(args.records)]
        return [*cmd, "--threads", str(args.threads)]

    run_each("grid", grid_names(args.tasks, args.seeds), args.records, command, args.jobs)


def run_each(label: str, names: Sequence[str], records: Path, command: Any, jobs: int) -> None:
    """Each run of ``names`` without ``records/<name>.jsonl`` yet, ``jobs`` at a time, each in its own
    process (``command(name)``: its argv); a line on stderr per run (shared with ``stability.py``)."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    todo = [n for n in names if not (records / f"{n}.jsonl").exists()]
    print(f"{label}: {len(names)} runs, {len(todo)} to do, {jobs} at a time", file=sys.stderr, flush=True)

    def one(name: str) -> None:
        t0 = time.perf_counter()
        done = subprocess.run(command(name), capture_output=True, text=True)
        status = "ok" if done.returncode == 0 else f"FAILED ({done.stderr.strip().splitlines()[-3:]})"
        print(f"{name}: {status} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))


@dataclass
class RunSummary:
    name: str
    task: str
    fraction: float
    scored_clean: int
    false_flags: int
    longest_false_run: int
    corrupted: int
    caught: int
    shifts: int
    kinds: dict[str, tuple[float, float, float]]  # kind -> AUROC ours, loss z, grad-norm z (better side)


def summarize_run(name: str, records: Sequence[dict[str, Any]]) -> RunSummary:
    """False flags, their longest run, recall and per-kind AUROC of one run's records."""
    task, _, fraction, _ = parse_grid_name(name)
    peers = {p: peer_scores(records, p) for p in ("loss", "grad_norm")}
    keep = [i for i, r in enumerate(records) if r["score"] is not None]
    kind_of = [records[i].get("corruption") for i in keep]
    flags = [bool(records[i]["flagged"]) for i in keep]
    clean_flags = [f for f, k in zip(flags, kind_of) if k is None]
    longest = current = 0
    for f in clean_flags:  # corrupted steps between clean ones neither break nor extend a run
        current = current + 1 if f else 0
        longest = max(longest, current)
    kinds: dict[str, tuple[float, float, float]] = {}
    for kind in sorted({k for k in kind_of if k is not None}):
        rows = [j for j, k in enumerate(kind_of) if k in (None, kind)]
        labels = [kind_of[j] == kind for j in rows]
        ours = [records[keep[j]]["score"] for j in rows]
        best = []
        for high, both in peers.values():
            one_sided = _auroc([high[keep[j]] for j in rows], labels)
            best.append(max(one_sided, _auroc([both[keep[j]] for j in rows], labels)))
        kinds[kind] = (_auroc(ours, labels), best[0], best[1])
    shifts = sum(1 for r in records for e in (r.get("events") or []) if e.get("kind") == "shift")
    return RunSummary(
        name=name,
        task=task,
        fraction=fraction,
        scored_clean=len(clean_flags),
        false_flags=sum(clean_flags),
        longest_false_run=longest,
        corrupted=sum(k is not None for k in kind_of),
        caught=sum(f for f, k in zip(flags, kind_of) if k is not None),
        shifts=shifts,
        kinds=kinds,
    )


def grid_table(summaries: Sequence[RunSummary], title: str) -> str:
    """One half of the grid: clean-only runs, mixed runs per kind, worst cases."""
    if not summaries:
        return f"### {title}\n\n(no runs)\n"
    mean = statistics.fmean
    clean = [s for s in summaries if s.fraction == 0.0]
    mixed = [s for s in summaries if s.fraction > 0.0]

    def rate(s: RunSummary) -> float:
        return s.false_flags / max(1, s.scored_clean)

    lines = [f"### {title}", ""]
    if clean:
        worst = max(clean, key=rate)
        lines.append(
            f"Clean-only runs ({len(clean)}): flagged {100 * mean(rate(s) for s in clean):.1f} % of scored steps on "
            f"average, worst {100 * rate(worst):.1f} % ({worst.name}); longest run of false flags "
            f"{max(s.longest_false_run for s in clean)}; shift events {sum(s.shifts for s in clean)}."
        )
    if mixed:
        worst = max(mixed, key=rate)
        caught = sum(s.caught for s in mixed) / max(1, sum(s.corrupted for s in mixed))
        lines.append(
            f"Mixed runs ({len(mixed)}): clean batches flagged {100 * mean(rate(s) for s in mixed):.1f} % on average, "
            f"worst {100 * rate(worst):.1f} % ({worst.name}); corrupted batches flagged {100 * caught:.0f} %; "
            f"longest run of false flags {max(s.longest_false_run for s in mixed)}; "
            f"shift events {sum(s.shifts for s in mixed)}."
        )
        lines += ["", "| kind | runs | AUROC ours (mean) | worst run | loss z | grad-norm z |"]
        lines += ["|---|---|---|---|---|---|"]
        macro = []
        for kind in sorted({k for s in mixed for k in s.kinds}):
            vals = [(s.kinds[kind], s.name) for s in mixed if kind in s.kinds]
            ours = [v[0][0] for v in vals]
            worst_val, worst_name = min((v[0][0], v[1]) for v in vals)
            macro.append(mean(ours))
            lines.append(
                f"| {kind} | {len(vals)} | {mean(ours):.3f} | {worst_val:.3f} ({worst_name}) "
                f"| {mean(v[0][1] for v in vals):.3f} | {mean(v[0][2] for v in vals):.3f} |"
            )
        lines.append(f"| **macro** | | **{mean(macro):.3f}** | | | |")
    lines.append("")
    return "\n".join(lines)


def grid_report(directory: Path, rescore_records: bool) -> str:
    from gradspectra.reporting import read_records

    summaries = []
    for path in sorted(directory.glob("*.jsonl")):
        records = read_records(path)
        if rescore_records:
            records = rescore(records)
        summaries.append(summarize_run(path.stem, records))
    held = [s for s in summaries if s.task in HELD_OUT_TASKS]
    tuned = [s for s in summaries if s.task in TUNING_TASKS]
    return (
        grid_table(held, "Held-out tasks: " + ", ".join(HELD_OUT_TASKS))
        + "\n"
        + grid_table(tuned, "Tuning tasks: " + ", ".join(TUNING_TASKS))
    )


# ---------------------------------------------------------------------------------------------- main


def comma_list(parser: argparse.ArgumentParser, option: str, text: str, allowed: Sequence[str]) -> list[str]:
    """``text``'s comma-separated names, each one of ``allowed`` and at least one, else a parser error."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(t not in allowed for t in names):
        parser.error(f"{option} can be any of {', '.join(allowed)}, got {text!r}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--kinds",
        default=None,
        help=f"comma-separated, of: {', '.join(ALL_KINDS)} (default all; with --lora the review kinds)",
    )
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per MiniLM run (default 150)")
    parser.add_argument("--lm-steps", type=int, default=300, help="optimizer steps of the causal-LM run (default 300)")
    parser.add_argument(
        "--max-length", type=int, default=32, help="review tokens per sample (default 32; the longest review has 20)"
    )
    parser.add_argument(
        "--lm-pretrain-steps",
        type=int,
        default=500,
        help="unmonitored steps on clean data before the causal-LM run (default 500)",
    )
    parser.add_argument("--lm-max-length", type=int, default=224, help="causal-LM characters per sample (default 224)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--watch",
        choices=("attention", "all"),
        default="attention",
        help="weights the monitor watches: the attention projections q/k/v/o, as the papers do (default), "
        "or every linear layer (the monitor's default; 3x the spectral cost on MiniLM)",
    )
    parser.add_argument(
        "--spectra",
        choices=("auto", "exact"),
        default="exact",
        help="the monitor's spectra: exact spectra of every watched layer every step (default), or the default "
        "constructor's budgeted 'auto' (the cheap tier every step, full spectra in rotation)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a busy 2-core machine 2 threads ran 4-10x slower, waiting on each other)",
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help="review kinds only: MiniLM-L6 with peft LoRA adapters (r 8, alpha 16, on query and value, no dropout; "
        "the head fully trained) instead of the full fine-tune; the monitor measures the frozen watched weights by "
        "their implied gradient D^T X under the full fine-tune's names. Needs peft (`gradspectra[lora]`)",
    )
    parser.add_argument(
        "--lora-lr",
        type=float,
        default=LORA_LR,
        help=f"AdamW learning rate of the --lora runs (default {LORA_LR:g}; the full fine-tune uses {FULL_LR:g})",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the table here (.md) and the numbers (.json)")
    parser.add_argument("--records", type=Path, default=None, help="keep each run's batch records as <kind>.jsonl here")
    parser.add_argument("--rescore", type=Path, default=None, help="re-score the <kind>.jsonl records kept here")
    parser.add_argument(
        "--grid",
        action="store_true",
        help="the grid instead: tasks x schedules x corrupted fractions x seeds, mixed kinds, every linear layer; "
        "needs --records (runs already there are kept: the grid resumes) or --rescore",
    )
    parser.add_argument("--tasks", default=",".join(GRID_TASKS), help=f"grid tasks, of: {', '.join(GRID_TASKS)}")
    parser.add_argument("--seeds", default=",".join(map(str, GRID_SEEDS)), help="grid seeds (default 0,1)")
    parser.add_argument("--jobs", type=int, default=2, help="grid runs at a time (default 2)")
    parser.add_argument("--grid-run", default=None, help=argparse.SUPPRESS)  # one run, in its own process
    args = parser.parse_args(argv)
    args.tasks = comma_list(parser, "--tasks", args.tasks, GRID_TASKS)
    args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if (args.grid or args.grid_run) and args.records is None and args.rescore is None:
        parser.error("--grid needs --records DIR (where the runs' records go) or --rescore DIR")
    if args.kinds is None:
        args.kinds = ",".join(REVIEW_KINDS if args.lora else ALL_KINDS)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown or not kinds:
        parser.error(f"--kinds can be any of {', '.join(ALL_KINDS)}, got {args.kinds!r}")
    if args.lora and (args.grid or args.grid_run):
        parser.error("--lora runs the single-kind review runs, not --grid")
    if args.lora and any(k in LM_KINDS for k in kinds):
        parser.error(f"--lora runs the review kinds ({', '.join(REVIEW_KINDS)}), got {args.kinds!r}")
    if args.lora_lr <= 0:
        parser.error(f"--lora-lr must be positive, got {args.lora_lr}")
    if args.steps <= CLEAN_PREFIX + 10 or args.lm_steps <= CLEAN_PREFIX + 10:
        parser.error(f"--steps and --lm-steps must exceed {CLEAN_PREFIX + 10}")
    args.kinds = kinds
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    import torch

    from gradspectra.reporting import read_records

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    torch.set_num_threads(args.threads)
    if args.grid_run is not None:
        grid_run(args.grid_run, args.spectra, args.records / f"{args.grid_run}.jsonl")
        return 0
    if args.grid:
        if args.rescore is None:
            run_grid(args)
        text = grid_report(args.rescore or args.records, rescore_records=args.rescore is not None)
        print(text)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
        return 0
    started = time.perf_counter()
    results = []
    signals = [
        "| kind | loss z (high) | gradient-norm z (high) | level of the nuclear norm | level of the effective rank "
        "| shape of the nuclear-norm layer profile |",
        "|---|---|---|---|---|---|",
    ]
    lora_runs: list[bool] = []
    for kind in args.kinds:
        is_lm = kind in LM_KINDS
        t0 = time.perf_counter()
        if args.rescore is not None:
            records = rescore(read_records(args.rescore / f"{kind}.jsonl"))
            corrupted = {int(r["batch_idx"]): bool(r["corrupted"]) for r in records}
            lora = is_lora(records)  # what the records say, whatever --lora says
            if lora != args.lora:
                print(
                    f"{kind}: the kept records are {'' if lora else 'not '}from a LoRA run "
                    f"({'no ' if lora else ''}--lora given); reported as {'LoRA' if lora else 'full fine-tune'}",
                    file=sys.stderr,
                    flush=True,
                )
        else:
            lora = args.lora
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                if is_lm:
                    records, corrupted = run_causal_lm(
                        kind,
                        args.lm_steps,
                        args.lm_max_length,
                        args.seed,
                        work,
                        args.watch,
                        args.lm_pretrain_steps,
                        args.spectra,
                    )
                else:
                    records, corrupted = run_review(
                        kind,
                        args.steps,
                        args.max_length,
                        args.seed,
                        work,
                        args.watch,
                        args.spectra,
                        lora=args.lora,
                        lora_lr=args.lora_lr,
                    )
                if args.records is not None:
                    args.records.mkdir(parents=True, exist_ok=True)
                    shutil.copy(work / "batches.jsonl", args.records / f"{kind}.jsonl")
                    _add_labels(args.records / f"{kind}.jsonl", corrupted)
        if is_lm:
            model = "tiny Llama (random init + clean pre-run)"
        else:
            model = "MiniLM-L6 (pretrained) + LoRA r 8 (query, value)" if lora else "MiniLM-L6 (pretrained)"
        lora_runs.append(lora)
        result = evaluate(kind, model, records, corrupted, time.perf_counter() - t0, lora=lora)
        results.append(result)
        signals.append(signal_row(kind, records, corrupted))
        print(
            f"{kind}: {result.steps} steps in {result.seconds:.0f} s, AUROC ours {result.auroc_ours:.3f}, "
            f"loss z {result.auroc_loss:.3f}, grad-norm z {result.auroc_grad_norm:.3f}, "
            f"false flags {100 * result.false_flag_rate:.1f} %" + (" (LoRA)" if lora else ""),
            file=sys.stderr,
            flush=True,
        )
    seconds = time.perf_counter() - started
    watched = (
        "the attention projections q/k/v/o (`--watch attention`)"
        if args.watch == "attention"
        else "every linear layer (`--watch all`)"
    )
    any_lora = any(lora_runs)
    if any_lora:
        mode = (
            "Mode: **LoRA** (peft adapters r 8, alpha 16, on query and value, no dropout; encoder frozen but for the "
            f"adapters, classification head fully trained; AdamW lr {args.lora_lr:g}"
            + (", as given by --lora-lr: the records do not keep it" if args.rescore else "")
            + "). The frozen watched weights are measured by their implied full-weight gradient D^T X under the "
            "full fine-tune's layer names."
        )
        review = f"LoRA, AdamW, lr {args.lora_lr:g}"
    else:
        mode = "Mode: full fine-tune (every weight trained)."
        review = f"AdamW, lr {FULL_LR:g}"
    if any_lora and not all(lora_runs):
        mode += " Mixed: only " + ", ".join(k for k, x in zip(args.kinds, lora_runs) if x) + " are LoRA runs."
    settings = (
        f"Settings: seed {args.seed}; batches of 16, about 12 % corrupted after {CLEAN_PREFIX} clean ones; "
        f"MiniLM-L6 ReviewClassifier runs {args.steps} steps at {args.max_length} tokens per review ({review}, "
        f"base label noise 0.1); TinyCausalLM (4 layers, hidden 64) runs {args.lm_pretrain_steps} unmonitored "
        f"clean steps, then {args.lm_steps} monitored steps at {args.lm_max_length} characters (AdamW, lr 1e-3); "
        f"GradientSpectrumMonitor watching {watched}, "
        + ("exact spectra" if args.spectra == "exact" else "spectra='auto' (the default, max_overhead 0.03)")
        + ", all seven metrics, "
        + f"warm-up {WARMUP}, false_flag_rate 0.01; "
        "peers: ZScoreDetector (window 200, warm-up 20) on the loss and on the global gradient norm of the "
        "watched layers, each the better of its one-sided (high) and two-sided form per kind; "
        + ("scores re-computed from kept records" if args.rescore else "our scores as the monitor gave them live")
        + f"; CPU, {args.threads} torch thread(s); total {seconds / 60:.1f} min."
    )
    text = (
        mode
        + "\n\n"
        + table(results)
        + "\n\n"
        + settings
        + "\n\nSingle signals, per-batch AUROC (levels and profile against the last 24 clean steps, an oracle "
        + "baseline that knows the labels; see `signal_row`):\n\n"
        + "\n".join(signals)
    )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
        payload = {
            "settings": vars(args),
            "lora": any_lora,
            "lora_config": LORA_CONFIG if any_lora else None,
            "seconds": seconds,
            "results": [asdict(r) for r in results],
        }
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


def _add_labels(path: Path, corruption: dict[int, str | None] | dict[int, bool]) -> None:
    """Store whether each record's batch was corrupted, and with which kind, in the kept records."""
    from gradspectra.reporting import read_records, record_to_json

    records = read_records(path)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            kind = corruption[int(r["batch_idx"])]
            label: dict[str, Any] = {"corrupted": bool(kind)}
            if not isinstance(kind, bool):
                label["corruption"] = kind
            fh.write(record_to_json({**r, **label}) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
