"""The README's demo as a script: fine-tune the pretrained MiniLM-L6 on generated reviews with injected bad batches.

Run: python examples/demo.py [--steps 100] [--out gradspectra_runs]
"""

import argparse

from gradspectra.demo.run import run_demo

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--out", default="gradspectra_runs")
parser.add_argument("--max-length", type=int, default=64)
args = parser.parse_args()

result = run_demo(out_dir=args.out, steps=args.steps, max_length=args.max_length)
