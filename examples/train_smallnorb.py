#!/usr/bin/env python
"""Matrix capsules with EM routing (Hinton, Sabour & Frosst, ICLR 2018) on smallNORB.

    python examples/train_smallnorb.py            # CUDA: the paper's network; CPU only: a bounded demo
    python examples/train_smallnorb.py --small    # the paper's small network (A=64, B=8, C=D=16, 68K)
    python examples/train_smallnorb.py --data-dir ~/data    # reads ~/data/smallNORB/*.mat[.gz]
    python examples/train_smallnorb.py --help

Data: the official smallNORB files, never downloaded: fetch the six *.mat.gz files from
https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/ into <data-dir>/smallNORB/ (see
``capstriton.data.smallnorb``: the files are checked, a missing or damaged one ends the run
with one line and exit status 1 before anything is written).  Preprocessing as the paper's §5:
96x96 -> 48x48, each image standardised; training on random 32x32 crops with random brightness
and contrast, testing on the centre 32x32 crop.  --cameras 1 (default) uses the first image of
each stereo pair, --cameras 2 both as two input channels.

Model: ``capstriton.MatrixCapsNet`` (ReLU conv 5x5/2 -> primary capsules -> ConvCaps 3x3/2 ->
ConvCaps 3x3/1 -> class capsules with coordinate addition, EM routing), A=B=C=D=32 (316K
parameters) or --small A=64, B=8, C=D=16 (67K).  Recipe (spec section 9, the authors' OpenReview
answers): spread loss with the margin raised linearly from 0.2 to 0.9 over the run, Adam with lr
3e-3 decayed x0.96 every 20,000 steps (continuously), batch 64, weight decay 2e-7 (Adam's L2 term:
the gradient of 2e-7 x sum(w^2) / 2), 3 EM iterations.  The paper states no step count: the full
run is 50,000 steps (132 epochs); the CPU demo trains the small network within a time budget
(the margin then follows the fraction of the budget used).

The test set (centre crops) is scored every --eval-every steps to monitor the run (nothing is
selected on it: the reported accuracy is the last step's).

Outputs in --out-dir: checkpoint.pt (model, optimizer, configuration, history), metrics.csv,
summary.json, results.md, smallnorb_examples.png (test centre crops and training crops),
confusion.png.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from capstriton import training  # noqa: E402
from capstriton.data import DataIntegrityError  # noqa: E402
from capstriton.data.smallnorb import (  # noqa: E402
    SMALLNORB_BRIGHTNESS,
    SMALLNORB_CLASSES,
    SMALLNORB_CONTRAST,
    SMALLNORB_CROP,
    SMALLNORB_PAIRS,
    SMALLNORB_URL,
    center_crop,
    random_crops,
    smallnorb_dir,
    smallnorb_tensors,
)
from capstriton.experiments import figures  # noqa: E402
from capstriton.loss import spread_loss, spread_margin  # noqa: E402
from capstriton.models import MatrixCapsNet  # noqa: E402
from capstriton.training.cli import HelpFormatter, run_cli  # noqa: E402

# The paper's recipe (spec section 9): Adam 3e-3 x0.96 every 20k steps, batch 64, weight decay
# 2e-7, spread loss with a linear margin 0.2 -> 0.9, 3 iterations.
RECIPE = {"lr": 3e-3, "lr_decay": 0.96, "decay_steps": 20_000, "batch_size": 64, "weight_decay": 2e-7,
          "margin": (0.2, 0.9), "iterations": 3}
PAPER_MODEL = {"A": 32, "B": 32, "C": 32, "D": 32}
SMALL_MODEL = {"A": 64, "B": 8, "C": 16, "D": 16}
FULL = {"steps": 50_000, "batch_size": RECIPE["batch_size"], "eval_every": 2_000, "time_budget": None,
        "eval_pairs": None, "test_pairs": None}
# The small network trains at about 6 images/s (and tests at about 18) on one busy CPU core with
# the plain-PyTorch backend: smaller batches give the demo more steps within its budget, and fewer
# test pairs keep its evaluations short.
DEMO = {"steps": 100_000, "batch_size": 16, "eval_every": 100, "time_budget": 600.0, "eval_pairs": 200,
        "test_pairs": 1_000}
SUBSET_SEED = 0
METRIC_FIELDS = ["step", "epoch", "seconds", "lr", "margin", "train_loss", "train_acc", "test_acc", "images_per_s"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="the full run (50,000 steps, every test pair) even without CUDA (without it and without "
                        "CUDA: the CPU demo)")
    p.add_argument("--small", action="store_true",
                   help="the paper's small network A=64, B=8, C=D=16 (default: A=B=C=D=32 in the full run, the small "
                        "network in the CPU demo)")
    p.add_argument("--cameras", type=int, choices=(1, 2), default=1,
                   help="input channels: 1 = the first image of each stereo pair, 2 = both")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps at most (default: full {FULL['steps']}, demo {DEMO['steps']}: the time "
                        "budget ends it)")
    p.add_argument("--time-budget", type=float, default=None,
                   help=f"seconds of training at most (default: full none, demo {DEMO['time_budget']:.0f})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per training step (default: full {FULL['batch_size']}, the recipe's; demo "
                        f"{DEMO['batch_size']})")
    p.add_argument("--lr", type=float, default=RECIPE["lr"],
                   help=f"Adam's learning rate; decayed x{RECIPE['lr_decay']} every {RECIPE['decay_steps']} steps")
    p.add_argument("--weight-decay", type=float, default=RECIPE["weight_decay"],
                   help="L2 weight decay (Adam's weight_decay: the gradient of wd x sum(w^2) / 2)")
    p.add_argument("--iterations", type=int, default=RECIPE["iterations"], help="EM routing iterations")
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"steps between test-set evaluations (default: full {FULL['eval_every']}, demo "
                        f"{DEMO['eval_every']})")
    p.add_argument("--eval-pairs", type=int, default=None,
                   help=f"test pairs scored at each evaluation (a fixed random subset; default: full all, demo "
                        f"{DEMO['eval_pairs']})")
    p.add_argument("--test-pairs", type=int, default=None,
                   help=f"test pairs scored at the end (a fixed random subset; default: full all {SMALLNORB_PAIRS}, "
                        f"demo {DEMO['test_pairs']})")
    p.add_argument("--train-subset", type=int, default=None,
                   help="train on the first N training pairs only (default: all)")
    p.add_argument("--pairs", type=int, default=SMALLNORB_PAIRS,
                   help="image pairs each file must hold: the official count; 0 accepts any count (cut-down copies "
                        "of the files, as the tests write)")
    training.add_run_flags(p, out_dir="runs/smallnorb")
    for action in p._actions:  # the shared flags, as they apply to smallNORB
        if action.dest == "data_dir":
            action.help = ("folder holding smallNORB/ with the six official files smallnorb-*-{training,testing}-"
                           "{dat,cat,info}.mat, optionally .gz (or holding the files themselves); never downloaded: "
                           f"get them from {SMALLNORB_URL} (default: $CAPSTRITON_DATA_DIR, else ./data under the "
                           "working directory)")
        elif action.dest == "no_download":
            action.help = "accepted for symmetry with the other scripts: smallNORB is never downloaded"
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    training.require_positive(p, args, ints=("steps", "batch_size", "iterations", "eval_every", "eval_pairs",
                                             "test_pairs", "train_subset", "threads", "eval_batch_size"),
                              floats=("time_budget",))
    if args.pairs < 0:
        p.error(f"--pairs must be >= 0, got {args.pairs}")
    if args.weight_decay < 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    return args


def resolve(args, device: torch.device) -> dict:
    demo = device.type != "cuda" and not args.full
    base = DEMO if demo else FULL
    pick = lambda value, key: value if value is not None else base[key]  # noqa: E731
    small = args.small or demo
    return {"mode": "cpu-demo" if demo else "full", "device": str(device), "dataset": "smallnorb",
            "experiment": "smallnorb", "network": "small" if small else "paper",
            "model": {**(SMALL_MODEL if small else PAPER_MODEL), "classes": len(SMALLNORB_CLASSES),
                      "in_channels": args.cameras, "iterations": args.iterations},
            "cameras": args.cameras, "crop": SMALLNORB_CROP, "brightness": SMALLNORB_BRIGHTNESS,
            "contrast": list(SMALLNORB_CONTRAST), "steps": pick(args.steps, "steps"),
            "time_budget": pick(args.time_budget, "time_budget"), "batch_size": pick(args.batch_size, "batch_size"),
            "lr": args.lr,
            "lr_decay": RECIPE["lr_decay"], "decay_steps": RECIPE["decay_steps"], "weight_decay": args.weight_decay,
            "margin": list(RECIPE["margin"]), "eval_every": pick(args.eval_every, "eval_every"),
            "eval_pairs": pick(args.eval_pairs, "eval_pairs"), "test_pairs": pick(args.test_pairs, "test_pairs"),
            "train_subset": args.train_subset, "pairs": args.pairs or None, "subset_seed": SUBSET_SEED,
            "seed": args.seed, "threads": torch.get_num_threads()}


def load_data(args, cfg: dict) -> dict:
    """Both splits read, checked and preprocessed; SystemExit (one line) when a file is missing or bad."""
    try:
        return smallnorb_tensors(args.data_dir, cameras=cfg["cameras"], pairs=cfg["pairs"])
    except FileNotFoundError as e:
        raise SystemExit(f"{e} (the folder is --data-dir's smallNORB/; default --data-dir: $CAPSTRITON_DATA_DIR, "
                         "else ./data)") from None
    except DataIntegrityError as e:
        raise SystemExit(f"smallNORB: {e}") from None


def build_model(cfg: dict, backend: str) -> torch.nn.Module:
    return MatrixCapsNet(**cfg["model"], backend=backend)


def subset(n: int, k: int | None, seed: int) -> torch.Tensor:
    """A fixed random subset of k of n indices, in order (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


@torch.no_grad()
def predict(model, images: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    """Predicted classes of the centre crops of (N, C, 48, 48) images."""
    model.eval()
    out = [model(center_crop(images[i:i + batch_size]).to(device)).argmax(1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _display(x: torch.Tensor) -> torch.Tensor:
    """Standardised (n, H, W) images to [0, 1] for figures, each by its own range."""
    lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


def write_figures(out, data: dict, cfg: dict, predicted: torch.Tensor,
                  test_idx: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """smallnorb_examples.png (test centre crops, training crops) and confusion.png; the file names
    and the confusion matrix [true, predicted] of the final test."""
    n = min(12, data["train_x"].shape[0], data["test_x"].shape[0])
    gen = torch.Generator().manual_seed(cfg["seed"])
    rows = [_display(center_crop(data["test_x"][:n, 0])), _display(random_crops(data["train_x"][:n].cpu(), gen)[:, 0])]
    figures.save_image_rows(out / "smallnorb_examples.png", rows, ["test (centre)", "training crops"],
                            title="smallNORB 32x32 inputs (first camera; standardised, each shown by its own range)")
    k = len(SMALLNORB_CLASSES)
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((data["test_y"][test_idx], predicted), torch.ones_like(predicted), accumulate=True)
    figures.save_confusion_matrix(out / "confusion.png", confusion,
                                  title="smallNORB test confusion (" + ", ".join(SMALLNORB_CLASSES) + ")")
    return ["smallnorb_examples.png", "confusion.png"], confusion


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = training.resolve_device(args.device)
    training.check_backend(args.backend, device)
    cfg = resolve(args, device)
    out = args.out_dir
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out-dir {out}: exists and is not a folder")
    t0 = time.perf_counter()
    data = load_data(args, cfg)  # before anything is written
    limits = f"at most {cfg['steps']} steps" + (f" or {cfg['time_budget']:.0f} s, whichever comes first"
                                                 if cfg["time_budget"] else "")
    m = cfg["model"]
    network = f"MatrixCapsNet A={m['A']}, B={m['B']}, C={m['C']}, D={m['D']}"
    if cfg["mode"] == "cpu-demo":
        scored = min(cfg["test_pairs"], data["test_y"].numel())
        print(f"CPU demo mode: {network} trained for {limits}, scored on {scored} test pairs. Its numbers "
              "are not the paper's; run on a CUDA machine or pass --full for the full run.", flush=True)
    else:
        print(f"full run: {network} trained for {limits}", flush=True)
    print("config: " + json.dumps(cfg), flush=True)

    train_x, train_y = data["train_x"], data["train_y"]
    if cfg["train_subset"]:
        train_x, train_y = train_x[:cfg["train_subset"]], train_y[:cfg["train_subset"]]
    on = device if device.type == "cuda" else torch.device("cpu")
    train_x, train_y = train_x.to(on), train_y.to(on)
    test_x, test_y = data["test_x"], data["test_y"]
    eval_idx = subset(test_x.shape[0], cfg["eval_pairs"], SUBSET_SEED)
    test_idx = subset(test_x.shape[0], cfg["test_pairs"], SUBSET_SEED)
    print(f"data: {train_x.shape[0]} training pairs, {test_x.shape[0]} test pairs ({eval_idx.numel()} scored at each "
          f"evaluation, {test_idx.numel()} at the end); files in {smallnorb_dir(args.data_dir)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, args.backend).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {network}, {params:,} parameters", flush=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    batches = training.ShuffledBatches(train_x, train_y, min(cfg["batch_size"], train_x.shape[0]), drop_last=True,
                                       prepare=lambda x, gen: random_crops(x, gen))
    steps_per_epoch = max(1, batches.steps_per_epoch)
    state = {"margin": spread_margin(0.0)}

    def schedule(step: int, elapsed: float) -> float:
        progress = step / cfg["steps"]
        if cfg["time_budget"]:
            progress = max(progress, elapsed / cfg["time_budget"])
        state["margin"] = float(spread_margin(min(progress, 1.0)))
        return training.paper_lr(cfg["lr"], step, cfg["lr_decay"], cfg["decay_steps"])

    def loss_fn(x, y):
        acts = model(x)
        return spread_loss(acts, y, state["margin"]), (acts.detach().argmax(1) == y).sum()

    def evaluate(stats: dict) -> dict:
        predicted = predict(model, test_x[eval_idx], device, args.eval_batch_size)
        return {"step": stats["step"], "epoch": stats["step"] / steps_per_epoch, "seconds": stats["elapsed"],
                "lr": stats["lr"], "margin": state["margin"], "train_loss": stats["train_loss"],
                "train_acc": stats["train_acc"], "images_per_s": stats["images_per_s"],
                "test_acc": float((predicted == test_y[eval_idx]).float().mean())}

    def save(step: int) -> None:
        training.save_checkpoint(out / "checkpoint.pt", model=model, optimizer=optimizer,
                                 epoch=int(step // steps_per_epoch), step=step, args=cfg, history=loop.history)

    def record(row: dict, stats: dict) -> None:
        training.write_metrics_csv(out / "metrics.csv", loop.history, METRIC_FIELDS)
        save(row["step"])
        print(f"step {row['step']} ({row['epoch']:.2f} epochs, {row['seconds']:.0f} s, {row['images_per_s']:.0f} "
              f"images/s): train loss {row['train_loss']:.4f}, train accuracy {row['train_acc']:.4f}, margin "
              f"{row['margin']:.3f}, test accuracy {row['test_acc']:.4f} ({eval_idx.numel()} pairs)", flush=True)

    loop = training.Loop(model, optimizer, training.make_step(loss_fn, optimizer), batches,
                         total_steps=cfg["steps"], seed=cfg["seed"], schedule=schedule,
                         time_budget=cfg["time_budget"], evaluate=evaluate, eval_every=cfg["eval_every"],
                         on_record=record, progress=not args.no_progress, desc="smallnorb")
    run = loop.run()
    save(run["steps"])
    stopped = (f"the time budget ({cfg['time_budget']:.0f} s)" if run["reason"] == "time"
               else f"--steps ({run['steps']} steps done)")
    t_test = time.perf_counter()
    predicted = predict(model, test_x[test_idx], device, args.eval_batch_size)
    test_seconds = time.perf_counter() - t_test
    accuracy = float((predicted == test_y[test_idx]).float().mean()) if test_idx.numel() else 0.0
    files, confusion = write_figures(out, data, cfg, predicted, test_idx)
    summary = {"config": cfg, "parameters": params, "steps": run["steps"], "epochs": run["steps"] / steps_per_epoch,
               "train_seconds": run["seconds"], "images_seen": run["steps"] * batches.batch_size,
               "train_images_per_s": run["steps"] * batches.batch_size / max(run["seconds"], 1e-9),
               "stopped_by": stopped, "test_pairs": int(test_idx.numel()), "test_accuracy": accuracy,
               "test_error": 1.0 - accuracy, "test_images_per_s": test_idx.numel() / max(test_seconds, 1e-9),
               "confusion": confusion.tolist(), "files": files, "data_files": data["files"],
               "seconds": time.perf_counter() - t0}
    training.write_json(out / "summary.json", summary)
    md = (f"# smallNORB ({cfg['mode']}, {cfg['device']})\n\n{network} ({params:,} parameters), {cfg['cameras']} "
          f"camera(s), {cfg['model']['iterations']} EM iterations; {run['steps']} steps of {batches.batch_size} "
          f"({summary['epochs']:.1f} epochs, {run['seconds']:.0f} s, {summary['train_images_per_s']:.0f} images/s; "
          f"stopped by {stopped}).\n\n**Test accuracy {100 * accuracy:.2f}% (error {100 * (1 - accuracy):.2f}%)** on "
          f"{test_idx.numel()} test pairs, centre 32x32 crops of the last step's weights.\n\nThe paper: 1.8% test "
          "error (A=B=C=D=32), 2.2% (A=64, B=8, C=D=16).\n")
    training.write_text(out / "results.md", md)
    print(md, flush=True)
    print(f"done ({cfg['mode']}) in {summary['seconds']:.0f} s; outputs in {out}/", flush=True)
    return summary


if __name__ == "__main__":
    run_cli(main)
