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
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_mnist.py"
CPU_EPOCHS, GPU_EPOCHS = 5, 50


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help=f"default: {GPU_EPOCHS} on CUDA, {CPU_EPOCHS} on CPU")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/reproduce"))
    p.add_argument("--tag", default=None, help="file name stem (default: <mode>-<card>-<date>)")
    p.add_argument("train_args", nargs="*", help="after --: more flags for train_mnist.py")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def machine() -> dict:
    """The card (GPU name, or CPU model and core count) and the software versions."""
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if torch.cuda.is_available():
        card = torch.cuda.get_device_name()
    else:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor() or "CPU") \
            if Path("/proc/cpuinfo").exists() else (platform.processor() or "CPU")
        card = f"{model}, {os.cpu_count()} cores"
    import capstriton
    return {"card": card, "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "capstriton": capstriton.__version__, "platform": platform.platform()}


def summarize(runs: list[dict]) -> dict:
    """Statistics of the final test error over the seeds, and the speed."""
    errors = [100 * (1 - r["test_accuracy"]) for r in runs]
    epochs = [row for r in runs for row in r["history"]]
    return {
        "test_error_percent": {"mean": statistics.fmean(errors), "std": statistics.stdev(errors) if len(errors) > 1
                               else 0.0, "best": min(errors), "worst": max(errors)},
        "seconds_per_epoch": statistics.fmean(row["seconds"] for row in epochs),
        "images_per_s": statistics.fmean(row["images_per_s"] for row in epochs),
    }


def markdown(report: dict) -> str:
    s, m, cfg = report["summary"], report["machine"], report["config"]
    err = s["test_error_percent"]
    lines = [
        f"# Reproduction: {cfg['mode']} recipe, {len(report['runs'])} seeds x {cfg['epochs']} epochs",
        "",
        f"{report['date']} on {m['card']}; python {m['python']}, torch {m['torch']}, triton {m['triton']}, "
        f"capstriton {m['capstriton']}. Load average before / after: {report['load_before']} / "
        f"{report['load_after']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Model: {json.dumps(cfg['model'])} ({cfg['parameters']:,} parameters), batch {cfg['batch_size']}, "
        f"lr {cfg['lr']} ({cfg['schedule']} schedule), backend {cfg['backend']}, amp {cfg['amp']}, "
        f"{cfg['world_size']} process(es) on {cfg['device']}.",
        "",
        "| | test error (%) |",
        "|---|---|",
        f"| mean ± std | **{err['mean']:.2f} ± {err['std']:.2f}** |",
        f"| best / worst | {err['best']:.2f} / {err['worst']:.2f} |",
        "",
        "| seed | test error (%) | best epoch's error (%) | seconds / epoch | images / s |",
        "|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        hist = r["history"]
        lines.append(f"| {r['seed']} | {100 * (1 - r['test_accuracy']):.2f} | "
                     f"{min(100 * h['test_error'] for h in hist):.2f} | "
                     f"{sum(h['seconds'] for h in hist) / len(hist):.1f} | "
                     f"{sum(h['images_per_s'] for h in hist) / len(hist):.0f} |")
    lines += ["", f"Mean: {s['seconds_per_epoch']:.1f} s per epoch (training only), {s['images_per_s']:.0f} "
              "training images/s. The test error is the last epoch's, on the full 10,000-image test set "
              "unless the command says otherwise.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    info = machine()
    import torch

    epochs = args.epochs or (GPU_EPOCHS if torch.cuda.is_available() else CPU_EPOCHS)
    date = dt.datetime.now(dt.timezone.utc)
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs, config = [], None
    for seed in args.seeds:
        out = args.runs_dir / f"seed-{seed}"
        cmd = [sys.executable, str(TRAIN), "--seed", str(seed), "--epochs", str(epochs), "--time-budget", "0",
               "--no-progress", "--out-dir", str(out), *args.train_args]
        print(f"[reproduce] seed {seed}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
        summary = json.loads((out / "summary.json").read_text())
        config = json.loads((out / "config.json").read_text())
        runs.append({"seed": seed, "test_accuracy": summary["test_accuracy"], "history": summary["history"],
                     "seconds": summary["seconds"]})
    report = {"date": date.strftime("%Y-%m-%d %H:%M UTC"), "machine": info, "config": config,
              "command": " ".join(["python examples/reproduce.py", *(argv if argv is not None else sys.argv[1:])]),
              "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
              "summary": summarize(runs), "runs": runs}
    card = re.sub(r"[^a-z0-9]+", "-", info["card"].split(",")[0].lower()).strip("-")
    tag = args.tag or f"{config['mode']}-{card}-{date:%Y%m%d}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.results / f"{tag}.md").write_text(markdown(report))
    err = report["summary"]["test_error_percent"]
    print(f"[reproduce] test error over seeds {args.seeds}: {err['mean']:.2f}% ± {err['std']:.2f} "
          f"(best {err['best']:.2f}%); written to {args.results / tag}.md/.json", flush=True)
    return report


if __name__ == "__main__":
    main()
