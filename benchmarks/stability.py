"""Fine-tuning stability: does the monitor warn before a run breaks, and stay quiet on runs that do not?

Real Lightning fine-tunes on CPU with the default ``GradientSpectrumMonitor()`` (``spectra="auto"``,
every linear layer, the 3 % budget), of three models:

- ``minilm``: the pretrained MiniLM-L6 ``ReviewClassifier`` on templated reviews (16 x 24 tokens), AdamW
  at 3e-5;
- ``minilmhf``: the same encoder as transformers' ``AutoModelForSequenceClassification`` builds it for a
  new task (a new [CLS] pooler and head at std 0.02: the gradients start small and grow while the head
  learns), the same data and rate; added after a false warning on such a run, so none of its runs were read
  while the detector was tuned;
- ``llama``: a tiny Llama (``TinyCausalLM``, 4 layers, hidden 64) on chain-of-thought arithmetic, after
  300 unmonitored clean steps at 1e-3, then monitored at 1e-3.

Settings (each with seeds 0 to 4):

- ``ramp1.1``, ``ramp1.2``, ``ramp1.35``: the learning rate multiplied by 1.1, 1.2 or 1.35 each step
  from step 40, until the run breaks (made to break);
- ``hot``: a linear warm-up over 20 steps to a learning rate that breaks the run after the warm-up
  (:data:`HOT`: 40x the base rate for MiniLM, 5x for the Llama);
- ``stable``: the base rate, constant; ``high``: 4x the base rate after a 20-step warm-up, noisy
  but not breaking.

A run breaks (:func:`break_step`) at the first step whose loss, and the median of 10 from it, are
above both 0.8x the run's starting level and twice its best 10-step median so far (non-finite: above).
Training stops 10 steps after that, or at :data:`MAX_STEPS`.

For each run: the step the monitor first warns (an ``instability`` event in the records), the step
each peer rule first fires on the same run (Lightning's ``SpikeDetection`` rule on the loss, llm-foundry's
``KillLossSpike`` rule, a ZClip-style grad-norm z rule: :mod:`gradspectra.evaluation.peers`), and the
lead of the warning over each. A warning on a stable run, before a ramp's start, or more than
:data:`EARLY` steps before the break of another run, is a false warning (:func:`valid_from`); the
peers' fires are judged alike.

The split was fixed before any tuning: seed 0 of every setting is the tuning half
(:data:`TUNING_SEEDS`), seeds 1 and 2 were the held-out half. Their first report showed false warnings
right after learning-rate warm-ups, and the detector's 40-step warm-up was added after reading it:
seeds 1 and 2 are reported apart (:data:`READ_SEEDS`), and seeds 3 and 4, run only once the detector was
final, are the held-out half (:data:`HELD_OUT_SEEDS`). The report shows the held-out half first.
The loss allowance (``StabilityDetector(loss_fall=)``) was made for a false warning seen outside this
benchmark; ``minilmhf`` was added with it, and the collapse limit was raised from 2.5 to 3.5 on seeds 0-2 of
every model, kept by a rule fixed beforehand (fewer false warnings, no fewer breaking runs warned) on runs no
earlier choice had looked at: seeds 3-4 of ``minilmhf`` and :data:`FRESH_SEEDS` (seeds 5 and 6: the stable and
high runs of both MiniLM models, seed 5 of the tiny Llama's, ``minilmhf-ramp1.2-s5`` and ``minilmhf-hot-s5``,
each run by ``--run NAME --records DIR``).
Each run is its own process; runs already in ``--records`` are kept (the benchmark resumes)::

    python benchmarks/stability.py --records /tmp/stab              # 90 runs (3 models), ~70 min on 2 cores
    python benchmarks/stability.py --report /tmp/stab               # the table from kept records
    python benchmarks/stability.py --report /tmp/stab --replay      # re-run the detector on them (tuning)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = ("minilm", "llama", "minilmhf")
BASE_LR = {"minilm": 3e-5, "llama": 1e-3, "minilmhf": 3e-5}
RAMPS = {"ramp1.1": 1.1, "ramp1.2": 1.2, "ramp1.35": 1.35}
RAMP_START = 40
HOT = {"minilm": 40.0, "llama": 5.0, "minilmhf": 40.0}  # x the base rate after the warm-up: breaks the run
HIGH = 4.0  # x the base rate: noisy, does not break
WARMUP = 20
SETTINGS = (*RAMPS, "hot", "stable", "high")
BREAKING = (*RAMPS, "hot")
SEEDS = (0, 1, 2, 3, 4)
TUNING_SEEDS = (0,)
READ_SEEDS = (1, 2)  # held out at first, read once before the detector's warm-up was added
HELD_OUT_SEEDS = (3, 4)
FRESH_SEEDS = (5, 6)  # stable and high runs (and two of minilmhf's breaking ones), run after the loss allowance
MAX_STEPS = 220
AFTER_BREAK = 10
EARLY = 60  # a warning more than this many steps before the break is not about it
MAX_LENGTH = 24
LM_PRETRAIN = 300
LM_MAX_LENGTH = 224


def run_names(models: Sequence[str] = MODELS, seeds: Sequence[int] = SEEDS) -> list[str]:
    return [f"{m}-{s}-s{seed}" for m in models for s in SETTINGS for seed in seeds]


def parse_name(name: str) -> tuple[str, str, int]:
    model, setting, seed = name.rsplit("-", 2)
    return model, setting, int(seed[1:])


def lr_factor(model: str, setting: str) -> Callable[[int], float]:
    """The learning-rate multiplier at each optimizer step of ``setting``."""
    if setting in RAMPS:
        rate = RAMPS[setting]
        return lambda step: 1.0 if step < RAMP_START else rate ** (step - RAMP_START + 1)
    top = {"hot": HOT[model], "high": HIGH, "stable": 1.0}[setting]
    if top == 1.0:
        return lambda step: 1.0
    return lambda step: top * min(1.0, (step + 1) / WARMUP)


def break_step(losses: Sequence[float | None], start: int = 5, span: int = 10) -> int | None:
    """The index of the first loss at which the run breaks (module docstring), or ``None``.

    Broken at ``t``: the loss of ``t`` and the median of the ``span`` losses from ``t`` are above both 0.8x
    the run's starting level (the median of its first ``start`` losses) and twice its best level so far
    (the lowest median of ``span`` consecutive losses before ``t``); a non-finite loss counts as above. A
    classifier whose loss climbs back to chance and stays there has broken; noisy steps have not.
    """
    values = [math.inf if v is None or not math.isfinite(float(v)) else float(v) for v in losses]
    first = [v for v in values[:start] if math.isfinite(v)]
    if len(values) < start + span or not first:
        return None
    level = statistics.median(first)
    best = math.inf
    for t in range(start, len(values) - span + 1):
        if t >= span:
            best = min(best, statistics.median(values[t - span : t]))
        if not math.isfinite(best):
            continue
        bar = max(0.8 * level, 2.0 * best)
        if values[t] > bar and statistics.median(values[t : t + span]) > bar:
            return t
    return None


# ---------------------------------------------------------------------------------------------- training


def run_one(name: str, out: Path, spectra: str = "auto") -> None:
    """One run: its records (with ``lr``) written to ``out``."""
    import lightning.pytorch as pl
    import torch
    from detection import lm_tensors, pretrain_lm
    from torch.utils.data import DataLoader

    from gradspectra import GradientSpectrumMonitor
    from gradspectra.demo.data import arithmetic_batches, review_batches
    from gradspectra.demo.models import CharTokenizer, ReviewClassifier, TinyCausalLM, TokenizedBatches, load_tokenizer

    model_name, setting, seed = parse_name(name)
    factor = lr_factor(model_name, setting)
    pl.seed_everything(seed, verbose=False)
    if model_name == "llama":
        module: Any = TinyCausalLM(CharTokenizer().vocab_size, lr=BASE_LR["llama"])
        pretrain_lm(module, LM_PRETRAIN, seed, LM_MAX_LENGTH)
        planned = arithmetic_batches(MAX_STEPS, batch_size=16, corrupt_fraction=0.0, seed=seed)
        data: Any = lm_tensors(planned, LM_MAX_LENGTH)
    else:
        planned = review_batches(MAX_STEPS, batch_size=16, corrupt_fraction=0.0, seed=seed)
        data = TokenizedBatches(planned, load_tokenizer(), max_length=MAX_LENGTH)
        module = ReviewClassifier(lr=BASE_LR["minilm"]) if model_name == "minilm" else hf_classifier()

    def configure_optimizers() -> Any:
        optimizer = torch.optim.AdamW(module.parameters(), lr=BASE_LR[model_name])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    module.configure_optimizers = configure_optimizers
    losses: list[float | None] = []

    class StopAfterBreak(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            losses.append(float(loss) if loss is not None else None)
            broke = break_step(losses)
            if broke is not None and len(losses) - 1 >= broke + AFTER_BREAK:
                trainer.should_stop = True

    with tempfile.TemporaryDirectory() as tmp:
        monitor = GradientSpectrumMonitor(output_dir=tmp, figure_every_n_steps=0, verbose=False, spectra=spectra)
        trainer = pl.Trainer(
            max_steps=MAX_STEPS,
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            callbacks=[monitor, StopAfterBreak()],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, DataLoader(data, batch_size=None, shuffle=False))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "batches.jsonl", out)
    from gradspectra.reporting import read_records, record_to_json

    records = read_records(out)
    with open(out, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(record_to_json({**r, "lr": BASE_LR[model_name] * factor(int(r["step"]))}) + "\n")


def hf_classifier() -> Any:
    """``minilmhf``: MiniLM-L6 as transformers' ``AutoModelForSequenceClassification`` builds it for a new task
    (the [CLS] pooler and a 2-class head, both new, initialised at std 0.02), as a user's first fine-tune does:
    its gradients start small and grow several-fold while the new head learns."""
    import lightning.pytorch as pl
    from transformers import AutoModelForSequenceClassification
    from transformers import logging as hf_logging

    from gradspectra.demo.models import minilm_path

    class HFClassifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # ("newly initialized" pooler and head: expected here)
            try:
                self.model = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2)
            finally:
                hf_logging.set_verbosity(verbosity)
            self.model.train()

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
            return self.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss

    return HFClassifier()


def run_all(args: argparse.Namespace) -> None:
    from detection import run_each

    def command(name: str) -> list[str]:
        return [sys.executable, __file__, "--run", name, "--records", str(args.records), "--spectra", args.spectra]

    run_each("stability", run_names(args.models, args.seeds), args.records, command, args.jobs)


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class RunResult:
    name: str
    model: str
    setting: str
    seed: int
    steps: int
    broke: int | None  # step of the break (None: did not break)
    warned: int | None  # step of the monitor's first instability warning
    message: str
    peers: dict[str, int | None]  # rule -> first step it fired that is not a false fire (:func:`valid_from`)
    peer_false: dict[str, int]  # rule -> fires before :func:`valid_from` (false fires)

    @property
    def breaking(self) -> bool:
        return self.setting in BREAKING

    @property
    def false_warning(self) -> bool:
        return self.warned is not None and (self.broke is None or self.warned < valid_from(self.setting, self.broke))


def valid_from(setting: str, broke: int | None) -> int:
    """The first step at which a warning (or a peer's fire) can be about the break: from the ramp's start
    (before it, a ramped run is the stable run of its seed, step for step), else :data:`EARLY` steps
    before the break; on a run that does not break, never."""
    if broke is None:
        return 1 << 30
    if setting in RAMPS:
        return RAMP_START
    return max(0, broke - EARLY)


PEERS = ("spike_detection", "kill_loss_spike", "grad_norm_z")


def peer_steps(records: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """The steps each peer rule fires at on the records' loss and gradient norm."""
    from gradspectra.evaluation import GradNormZRule, KillLossSpikeRule, SpikeDetectionRule, global_grad_norm

    rules: dict[str, Any] = {
        "spike_detection": SpikeDetectionRule(),
        "kill_loss_spike": KillLossSpikeRule(),
        "grad_norm_z": GradNormZRule(),
    }
    fired: dict[str, list[int]] = {name: [] for name in PEERS}
    for r in records:
        values = {
            "spike_detection": r.get("loss"),
            "kill_loss_spike": r.get("loss"),
            "grad_norm_z": global_grad_norm(r["metrics"]),
        }
        for name, rule in rules.items():
            if rule.update(values[name]):
                fired[name].append(int(r["step"]))
    return fired


def warned_step(records: Sequence[dict[str, Any]]) -> tuple[int | None, str]:
    for r in records:
        for e in r.get("events", []):
            if e.get("kind") == "instability":
                return int(r["step"]), str(e.get("message", ""))
    return None, ""


def replay(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with the events of a fresh :class:`StabilityDetector` (the live one's settings)."""
    from gradspectra.scoring import StabilityDetector

    detector = StabilityDetector()
    out = []
    for r in records:
        events = [e for e in r.get("events", []) if e.get("kind") != "instability"]
        found = detector.update(r["metrics"], r.get("detection"), r.get("loss"))
        out.append({**r, "events": events + found.events})
    return out


def evaluate(name: str, records: Sequence[dict[str, Any]]) -> RunResult:
    model, setting, seed = parse_name(name)
    broke_at = break_step([r.get("loss") for r in records])
    broke = None if broke_at is None else int(records[broke_at]["step"])
    warned, message = warned_step(records)
    start = valid_from(setting, broke)
    fired = peer_steps(records)
    return RunResult(
        name=name,
        model=model,
        setting=setting,
        seed=seed,
        steps=len(records),
        broke=broke,
        warned=warned,
        message=message,
        peers={name: next((s for s in steps if s >= start), None) for name, steps in fired.items()},
        peer_false={name: sum(s < start for s in steps) for name, steps in fired.items()},
    )


def _fmt(step: int | None) -> str:
    return "-" if step is None else str(step)


def table(results: Sequence[RunResult], title: str) -> str:
    lines = [f"### {title}", ""]
    lines += [
        "| run | steps | broke | warned | lead vs break | SpikeDetection | KillLossSpike | grad-norm z | "
        "peers' false fires |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lead = "-" if r.warned is None or r.broke is None else str(r.broke - r.warned)
        false = ", ".join(f"{k} {v}" for k, v in r.peer_false.items() if v) or "-"
        lines.append(
            f"| {r.name} | {r.steps} | {_fmt(r.broke)} | {_fmt(r.warned)}{' (false)' if r.false_warning else ''} | "
            f"{lead} | {_fmt(r.peers['spike_detection'])} | {_fmt(r.peers['kill_loss_spike'])} | "
            f"{_fmt(r.peers['grad_norm_z'])} | {false} |"
        )
    lines += ["", *summary(results)]
    return "\n".join(lines)


def _first(*steps: int | None) -> int | None:
    present = [s for s in steps if s is not None]
    return min(present) if present else None


def summary(results: Sequence[RunResult]) -> list[str]:
    """The issue's targets over ``results``: breaking runs warned before the loss rules, lead, false warnings."""
    breaking = [r for r in results if r.breaking]
    stable = [r for r in results if not r.breaking]
    not_broken = [r.name for r in breaking if r.broke is None]
    broken_stable = [r.name for r in stable if r.broke is not None]
    leads: list[int] = []
    zlags: list[int] = []
    break_leads: list[int] = []
    before = warned = 0
    for r in breaking:
        loss_rule = _first(r.peers["spike_detection"], r.peers["kill_loss_spike"])
        if r.warned is None or r.false_warning:
            continue
        warned += 1
        if r.broke is not None:
            break_leads.append(r.broke - r.warned)
        if loss_rule is None or r.warned < loss_rule:
            before += 1
        if loss_rule is not None:
            leads.append(loss_rule - r.warned)
        if r.peers["grad_norm_z"] is not None:
            zlags.append(r.warned - r.peers["grad_norm_z"])
    false_stable = [r.name for r in stable if r.warned is not None]
    false_early = [r.name for r in breaking if r.false_warning]
    n = len(breaking)
    out = [
        f"- breaking runs warned (not falsely early): {warned}/{n}; lead over the break: median "
        + (f"{statistics.median(break_leads):.0f}, worst {min(break_leads)}" if break_leads else "-"),
        f"- breaking runs warned before the first loss-spike rule (or where none fired): {before}/{n}"
        + (f" ({100 * before / n:.0f} %; target 80 %)" if n else ""),
        "- lead over the first loss-spike rule, where one fired (optimizer steps): median "
        + (f"{statistics.median(leads):.0f}, worst {min(leads)} over {len(leads)} runs" if leads else "-")
        + " (target: median >= 10)",
        "- warning minus grad-norm z step, where it fired: median "
        + (f"{statistics.median(zlags):.0f}, worst {max(zlags)} over {len(zlags)} runs" if zlags else "-")
        + " (target: median <= 0)",
        f"- warnings on stable runs: {len(false_stable)}/{len(stable)} {false_stable or ''} (target 0)",
        f"- warnings too early to be about the break: {len(false_early)} {false_early or ''}",
        "- peers' false fires (before a ramp's start, or on a run that did not break): "
        + ", ".join(f"{p} in {sum(r.peer_false[p] > 0 for r in results)} runs" for p in PEERS),
    ]
    if not_broken or broken_stable:
        out.append(f"- settings that did not behave: did not break {not_broken}, broke {broken_stable}")
    return out


def report(directory: Path, do_replay: bool, models: Sequence[str], seeds: Sequence[int]) -> str:
    from gradspectra.reporting import read_records

    results = []
    for name in run_names(models, seeds):
        path = directory / f"{name}.jsonl"
        if not path.exists():
            continue
        records = read_records(path)
        results.append(evaluate(name, replay(records) if do_replay else records))
    parts = []
    for title, group in (
        ("Held-out half (seeds 3, 4)", HELD_OUT_SEEDS),
        ("Fresh seeds 5, 6 (run after the loss allowance was fixed)", FRESH_SEEDS),
        ("Seeds 1, 2 (held out at first, read before the detector's warm-up was added)", READ_SEEDS),
        ("Tuning half (seed 0)", TUNING_SEEDS),
    ):
        chosen = [r for r in results if r.seed in group]
        if chosen:
            parts.append(table(chosen, title))
    return "\n\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--records", type=Path, default=None, help="run every setting, keep its records here")
    parser.add_argument("--report", type=Path, default=None, help="the table from the records kept here")
    parser.add_argument("--replay", action="store_true", help="with --report: re-run the detector on the records")
    parser.add_argument("--models", default=",".join(MODELS), help=f"of: {', '.join(MODELS)}")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="default 0,1,2,3,4")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument(
        "--spectra",
        choices=("auto", "exact"),
        default="auto",
        help="the monitor's spectra: the default constructor's 'auto' (default) or exact spectra of every layer",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the report here (.md)")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one run, in its own process
    args = parser.parse_args(argv)
    from detection import comma_list

    args.models = comma_list(parser, "--models", args.models, MODELS)
    args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if args.records is None and args.report is None:
        parser.error("give --records DIR (run) or --report DIR (read)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    import torch

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    if args.run is not None:
        run_one(args.run, args.records / f"{args.run}.jsonl", args.spectra)
        return 0
    if args.records is not None:
        run_all(args)
    text = report(args.report or args.records, args.replay, args.models, args.seeds)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"report": text}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
