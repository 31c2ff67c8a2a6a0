"""The `gradspectra` command: `demo` runs the MiniLM fine-tune demo; `report` prints the worst batches of a run;
`score-data` scores every sample of a data set by its own gradient spectra."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradspectra import __version__
from gradspectra.reporting.records import RECORD_FILENAME

#: where `report` looks inside a folder, in order: the folder a front door writes (`<log dir>/gradspectra`)
#: is the usual one to be handed, then its parent
_IN_FOLDER = (RECORD_FILENAME, f"gradspectra/{RECORD_FILENAME}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradspectra", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gradspectra {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fine-tune MiniLM-L6 on generated reviews with injected bad batches")
    demo.add_argument("--out", default="gradspectra_runs", help="folder for TensorBoard logs and records")
    demo.add_argument("--steps", type=_positive, default=100, help="optimizer steps (default 100)")
    demo.add_argument("--batch-size", type=_positive, default=16)
    demo.add_argument("--max-length", type=_positive, default=64, help="tokens per sample")
    demo.add_argument("--corrupt-fraction", type=float, default=0.12)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress-bar", action="store_true")

    report = sub.add_parser(
        "report",
        help="print the worst batches of a run's batches.jsonl",
        description="Print the worst batches of a run: steps with non-finite (NaN/Inf) gradients or loss "
        "first, then the highest scores.",
    )
    report.add_argument(
        "path",
        help=f"a batches.jsonl file, or a folder holding {_IN_FOLDER[0]} or {_IN_FOLDER[1]} (the run's log folder)",
    )
    report.add_argument(
        "--top",
        type=_positive,
        default=10,
        metavar="N",
        help="rows to show: non-finite steps first, then the highest scores (default 10)",
    )
    report.add_argument("--flagged", action="store_true", help="only flagged steps")
    report.add_argument(
        "--skipped", action="store_true", help='only steps whose optimizer step was skipped (action="skip")'
    )
    report.add_argument(
        "--ids", action="store_true", help="after the table, every sample id of each row (the table shows six)"
    )
    report.add_argument(
        "--samples",
        type=_positive,
        nargs="?",
        const=3,
        default=None,
        metavar="K",
        help="after the table, the K highest-scoring samples of each row with their reasons (records made "
        "with per_sample=; default K 3)",
    )
    _add_score_data(sub)
    return parser


#: what `score-data --sort` accepts (kept here so that `--help` does not import torch)
_SORT_KEYS = (
    "nuclear_norm",
    "spectral_norm",
    "frobenius_norm",
    "stable_rank",
    "top_sv_ratio",
    "effective_rank",
    "participation_ratio",
    "loss",
)


def _add_score_data(sub: Any) -> None:
    score = sub.add_parser(
        "score-data",
        help="score every sample of a data set by its own per-layer gradient spectra (the papers' method, batched)",
        description="Score every sample of a JSONL data set ({prompt, response} or {text, label} rows, optional id) "
        "by the spectra of its own gradient on the attention q/k/v/o projections, at fixed weights, and print "
        "the most suspicious samples first (papers: higher quality = lower nuclear norm, higher effective rank).",
    )
    score.add_argument("model", help="a local transformers model folder (causal LM or encoder)")
    score.add_argument("data", help="a JSONL file: one {prompt, response} or {text, label} object a line")
    score.add_argument("--out", metavar="FILE", help="write every row to FILE (.jsonl, or .parquet with pyarrow)")
    score.add_argument("--batch-size", type=_positive, default=16, metavar="N", help="samples per backward (16)")
    score.add_argument("--max-length", type=_positive, default=512, metavar="N", help="tokens per sample (512)")
    score.add_argument(
        "--include", nargs="+", metavar="PATTERN", help="globs on parameter names (default: q/k/v/o projections)"
    )
    score.add_argument(
        "--sort", choices=_SORT_KEYS, default="effective_rank", help="ranking metric (default effective_rank)"
    )
    score.add_argument("--top", type=_positive, default=20, metavar="N", help="rows to print (default 20)")
    score.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    score.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), help="model dtype (default: as saved)")
    score.add_argument(
        "--reference", action="store_true", help="the papers' loop (one backward and full SVDs per sample), slow"
    )
    score.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _score_data(args: argparse.Namespace) -> int:
    from gradspectra.data_scoring import ranked_table, score_data, write_scores

    try:
        rows = score_data(
            args.model,
            args.data,
            batch_size=args.batch_size,
            max_length=args.max_length,
            include=args.include,
            device=args.device,
            dtype=args.dtype,
            method="reference" if args.reference else "factored",
            progress=not args.no_progress,
        )
        if args.out:
            write_scores(rows, args.out)
    except (OSError, ValueError, TypeError, ImportError, RuntimeError) as err:
        # one line, no traceback: the message names the argument and the value
        print(f"gradspectra score-data: {err}".replace("\n", " "), file=sys.stderr)
        return 2
    print(ranked_table(rows, sort=args.sort, top=args.top))
    if args.out:
        print(f"\nwrote {len(rows)} rows to {args.out}")
    return 0


class _ReportError(Exception):
    """A path `report` cannot read: the message is printed, the exit status is 2."""


def _find_records(path: Path) -> Path:
    """The records file ``path`` names: the file itself, or the one in a folder (see :data:`_IN_FOLDER`)."""
    if not path.exists():
        raise _ReportError(f"{path}: no such file or folder")
    if not path.is_dir():
        return path
    for name in _IN_FOLDER:
        candidate = path / name
        if candidate.is_file():
            return candidate
    looked = " or ".join(str(path / name) for name in _IN_FOLDER)
    deeper = sorted(str(p) for depth in ("*", "*/*", "*/*/*") for p in path.glob(f"{depth}/{RECORD_FILENAME}"))
    hint = f"; record files further down: {', '.join(deeper[:5])}{', ...' if len(deeper) > 5 else ''}" if deeper else ""
    raise _ReportError(f"{path} is a folder without a records file (looked for {looked}){hint}")


def _read(path: Path) -> list[dict[str, Any]]:
    from gradspectra.reporting.records import read_records

    try:
        return read_records(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise _ReportError(f"cannot read {path}: {reason}") from err


def _report(args: argparse.Namespace) -> int:
    from gradspectra.reporting.tensorboard import (
        flagged_table,
        instability_lines,
        is_nonfinite_record,
        table_records,
    )

    try:
        path = _find_records(Path(args.path))
        records = _read(path)
    except _ReportError as err:
        print(f"gradspectra report: {err}", file=sys.stderr)
        return 2
    flagged = sum(bool(r.get("flagged")) for r in records)
    nonfinite = sum(is_nonfinite_record(r) for r in records)
    skipped = sum(bool(r.get("skipped")) for r in records)
    print(
        f"{path}: {len(records)} records, {flagged} flagged, {nonfinite} with non-finite gradients or loss, "
        f"{skipped} skipped"
    )
    chosen = [r for r in records if (not args.flagged or r.get("flagged")) and (not args.skipped or r.get("skipped"))]
    if records and not chosen:
        which = " and ".join(w for w, on in (("flagged", args.flagged), ("skipped", args.skipped)) if on)
        print(f"(no {which} steps)")
        return 0
    warnings_ = instability_lines(records)
    if warnings_:
        print("stability warnings:\n" + "\n".join(f"  {line}" for line in warnings_))
    print(flagged_table(chosen, args.top))
    if args.ids:
        rows = table_records(chosen, args.top)
        with_ids = [r for r in rows if r.get("sample_ids")]
        if not with_ids:
            print("\n(no sample ids in these records: set sample_id_key to record them)")
        else:
            print("\nsample ids:")
            for r in with_ids:
                print(f"step {r.get('step')}: {', '.join(str(i) for i in r['sample_ids'])}")
    if args.samples:
        print(_samples_view(table_records(chosen, args.top), args.samples))
    return 0


def _samples_view(rows: Sequence[Mapping[str, Any]], k: int) -> str:
    """The ``k`` highest-scoring samples of each row's ``samples`` (per_sample=), with id and reasons."""
    with_samples = [r for r in rows if r.get("samples")]
    if not with_samples:
        return "\n(no per-sample entries in these records: run the monitor with per_sample='flagged' or 'always')"
    lines = ["\nsamples (highest score first):"]
    for r in with_samples:
        lines.append(f"step {r.get('step')}:")
        ranked = sorted(r["samples"], key=lambda e: -(e.get("score") if e.get("score") is not None else -1.0))
        for e in ranked[:k]:
            score = e.get("score")
            shown = "null" if score is None else f"{score:.1f}"
            ident = f" id {e['id']}" if e.get("id") is not None else ""
            reasons = "; ".join(e.get("reasons") or []) or "-"
            lines.append(f"  sample {e.get('index')}{ident}: score {shown}: {reasons}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from gradspectra.demo.run import run_demo

        if not 0.0 <= args.corrupt_fraction <= 1.0:
            print(
                f"gradspectra demo: --corrupt-fraction must be in [0, 1], got {args.corrupt_fraction}", file=sys.stderr
            )
            return 2
        run_demo(
            out_dir=args.out,
            steps=args.steps,
            batch_size=args.batch_size,
            max_length=args.max_length,
            corrupt_fraction=args.corrupt_fraction,
            seed=args.seed,
            progress_bar=not args.no_progress_bar,
        )
        return 0
    if args.command == "score-data":
        return _score_data(args)
    return _report(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
