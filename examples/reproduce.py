#!/usr/bin/env python
"""Reproduction protocol: the training recipe over several seeds, a fixed number of epochs
(never a time budget, so the spread measures seeds, not machine load), and a table of the
final test error (mean, standard deviation, best, per seed), seconds per epoch and images/s.

    python examples/reproduce.py                       # CPU: the CPU demo recipe, 3 seeds x 5 epochs
    python examples/reproduce.py --epochs 50           # CUDA: the paper recipe, 3 seeds x 50 epochs
    python examples/reproduce.py --seeds 0 1 2 3 4 -- --amp bf16   # flags after -- go to train_mnist.py

Each seed runs examples/train_mnist.py in its own process (under --runs-dir); the table goes
to --results as <mode>-<card>-<date>.md and .json with the card, date, versions and load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from capstriton.experiments.reproduction import reproduce
from capstriton.training.cli import HelpFormatter, run_cli

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_mnist.py"
CPU_EPOCHS, GPU_EPOCHS = 5, 50


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one training run per seed")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs per run (default: {GPU_EPOCHS} on CUDA, {CPU_EPOCHS} on CPU)")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results",
                   help="folder of the report <tag>.md and <tag>.json")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/reproduce"),
                   help="folder of the runs, one seed-<seed> folder each (a relative path is relative to the "
                        "working directory)")
    p.add_argument("--tag", default=None, help="file name stem of the report (default: <mode>-<card>-<date>)")
    p.add_argument("train_args", nargs="*", default=[],
                   help="after --: more flags for train_mnist.py (its --data-dir and --no-download say where MNIST "
                        "comes from and whether it may be downloaded)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    epochs = args.epochs or (GPU_EPOCHS if torch.cuda.is_available() else CPU_EPOCHS)
    command = " ".join(["python examples/reproduce.py", *(argv if argv is not None else sys.argv[1:])])
    return reproduce(TRAIN, args.seeds, epochs, args.runs_dir, args.results, command, args.tag, args.train_args)


if __name__ == "__main__":
    run_cli(main)
