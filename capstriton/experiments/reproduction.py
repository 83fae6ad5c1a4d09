"""The reproduction protocol: one training run per seed (each in its own process, a fixed number
of epochs), then a table of the final test error over the seeds (mean, standard deviation, best,
per seed), seconds per epoch and images/s, with the card, date, versions and load."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Sequence

import torch

from ..version import __version__

__all__ = ["machine", "summarize", "markdown", "reproduce"]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def machine() -> dict:
    """The card (GPU name, or CPU model and core count) and the software versions."""
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{_cpu_name()}, {os.cpu_count()} cores"
    return {"card": card, "python": platform.python_version(), "torch": torch.__version__,
            "triton": _version("triton"), "capstriton": __version__, "platform": platform.platform()}


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
    """The report's table as markdown."""
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


def reproduce(train_script: Path, seeds: Sequence[int], epochs: int, runs_dir: Path, results: Path,
              command: str, tag: str | None = None, train_args: Sequence[str] = ()) -> dict:
    """Run ``train_script`` once per seed (``--seed``, ``--epochs``, no time budget, output under
    ``runs_dir/seed-<seed>``, then ``train_args``), read each run's summary.json and config.json,
    and write the report to ``results/<tag>.json`` and ``.md`` (tag default:
    <mode>-<card>-<date>).  ``command``: the command line recorded in the report."""
    info = machine()
    date = dt.datetime.now(dt.timezone.utc)
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs, config = [], None
    for seed in seeds:
        out = runs_dir / f"seed-{seed}"
        cmd = [sys.executable, str(train_script), "--seed", str(seed), "--epochs", str(epochs), "--time-budget", "0",
               "--no-progress", "--out-dir", str(out), *train_args]
        print(f"[reproduce] seed {seed}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
        summary = json.loads((out / "summary.json").read_text())
        config = json.loads((out / "config.json").read_text())
        runs.append({"seed": seed, "test_accuracy": summary["test_accuracy"], "history": summary["history"],
                     "seconds": summary["seconds"]})
    report = {"date": date.strftime("%Y-%m-%d %H:%M UTC"), "machine": info, "config": config, "command": command,
              "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
              "summary": summarize(runs), "runs": runs}
    card = re.sub(r"[^a-z0-9]+", "-", info["card"].split(",")[0].lower()).strip("-")
    tag = tag or f"{config['mode']}-{card}-{date:%Y%m%d}"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / f"{tag}.md").write_text(markdown(report))
    err = report["summary"]["test_error_percent"]
    print(f"[reproduce] test error over seeds {list(seeds)}: {err['mean']:.2f}% ± {err['std']:.2f} "
          f"(best {err['best']:.2f}%); written to {results / tag}.md/.json", flush=True)
    return report
