"""The `gradspectra` command: `demo` runs the MiniLM fine-tune demo; `report` prints the worst batches of a run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradspectra", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fine-tune MiniLM-L6 on generated reviews with injected bad batches")
    demo.add_argument("--out", default="gradspectra_runs", help="folder for TensorBoard logs and records")
    demo.add_argument("--steps", type=_positive, default=100, help="optimizer steps (default 100)")
    demo.add_argument("--batch-size", type=_positive, default=16)
    demo.add_argument("--max-length", type=_positive, default=64, help="tokens per sample")
    demo.add_argument("--corrupt-fraction", type=float, default=0.12)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress-bar", action="store_true")

    report = sub.add_parser("report", help="print the highest-scoring batches of a batches.jsonl file")
    report.add_argument("path", help="a gradspectra batches.jsonl")
    report.add_argument("--top", type=_positive, default=10)
    return parser


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
    from gradspectra.reporting import flagged_table, read_records

    records = read_records(args.path)
    flagged = sum(bool(r.get("flagged")) for r in records)
    print(f"{args.path}: {len(records)} records, {flagged} flagged")
    print(flagged_table(records, args.top))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
