#!/usr/bin/env python
"""CapsNet on MultiMNIST (Sabour et al. 2017, section 6): segmenting highly overlapping digits.

    python examples/train_multimnist.py            # CUDA: the paper's model; CPU only: a bounded demo
    python examples/train_multimnist.py --full     # full size on any device
    python examples/train_multimnist.py --help

Each image overlays two MNIST training digits of different classes, each shifted by up to 4
pixels on a 36x36 canvas (pixel-wise sum clipped to 1); pairs are drawn afresh on the
training device for every batch (``capstriton.data.multimnist``) from the training digits
minus --val-digits held out (a fixed split): the validation pairs (1,000, fixed) are made of
those held-out digits only.  CapsNet for 36x36 inputs is trained with the margin loss with
both labels present plus 0.0005 x the sum of the two reconstruction losses, each shifted
source digit reconstructed from its own class's capsule.  Prediction: the two longest
capsules; error: the fraction of test images whose predicted pair differs from the true pair.

Test set: the paper's protocol.  Each of the first --test-digits MNIST test digits is the first
digit of --pairs-per-digit pairs (full run: 10,000 x 1,000 = the paper's 10M pairs; CPU demo:
1,000 x 2), generated in seeded chunks and streamed through the model, so it never sits in
memory.  The error is reported with 95% confidence intervals (bootstrap over the base digits,
and the binomial Wilson interval).

Outputs in --out-dir: checkpoint.pt (readable by examples/evaluate.py), metrics.csv (training
loss and the validation pair error at every evaluation), summary.json, results.md,
multimnist_reconstructions.png and multimnist_errors.png (the paper's Figure 5: inputs, the
reconstructions of the longest and second longest capsules, both overlaid in red and green,
and for errors the overlay from the true classes) and pair_confusion.png.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import capstriton as ct  # noqa: E402
from capstriton import training  # noqa: E402
from capstriton.data import (  # noqa: E402
    MULTIMNIST_CANVAS,
    MULTIMNIST_SHIFT,
    MULTIMNIST_TEST_SEED,
    as_model_input,
    held_out_split,
    multimnist_batch,
    multimnist_pairs,
    multimnist_test_set,
)
from capstriton.experiments.evaluation import predict  # noqa: E402
from capstriton.experiments.multimnist import (  # noqa: E402
    bootstrap_interval,
    evaluate_pairs,
    multimnist_loss,
    pair_errors,
    top2,
    wilson_interval,
)
from capstriton.experiments.report import write_pair_figures  # noqa: E402
from capstriton.training.cli import HelpFormatter, run_cli  # noqa: E402

SPLIT_SEED, VAL_SEED, VAL_PAIRS = 0, 4321, 1000
MNIST_TEST_DIGITS, MNIST_TRAIN_DIGITS = 10_000, 60_000
FULL, DEMO = training.MULTIMNIST_FULL, training.MULTIMNIST_CPU_DEMO
METRIC_FIELDS = ["step", "seconds", "lr", "train_loss", "val_pair_error"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--full", action="store_true", help="the paper's model, schedule and test protocol even without "
                   "CUDA (without it and without CUDA: the CPU demo)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default: full {FULL['steps']} = 60M pairs, demo {DEMO['steps']}: "
                        "the time budget ends it)")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per training step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate; decayed x0.96 every 2000 steps")
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"steps between validation evaluations (default: full {FULL['eval_every']}, "
                        f"demo {DEMO['eval_every']})")
    p.add_argument("--time-budget", type=float, default=None,
                   help=f"seconds of training at most (default: full none, demo {DEMO['time_budget']:.0f})")
    p.add_argument("--test-digits", type=int, default=None,
                   help=f"test protocol: the first N MNIST test digits are first digits of pairs (default: full "
                        f"{FULL['test_digits']}, demo {DEMO['test_digits']})")
    p.add_argument("--pairs-per-digit", type=int, default=None,
                   help=f"test protocol: pairs per test digit (default: full {FULL['pairs_per_digit']}, the "
                        f"paper's; demo {DEMO['pairs_per_digit']})")
    p.add_argument("--val-digits", type=int, default=None,
                   help=f"training digits held out of training; the {VAL_PAIRS} validation pairs are made of them "
                        f"(default: {FULL['val_digits']})")
    p.add_argument("--recon-weight", type=float, default=0.0005,
                   help="weight of the summed reconstruction losses of the two digits in the loss")
    p.add_argument("--iterations", type=int, default=3, help="dynamic routing iterations")
    p.add_argument("--conv-channels", type=int, default=None,
                   help=f"channels of CapsNet's first convolution (default: full {FULL['conv_channels']}, demo "
                        f"{DEMO['conv_channels']})")
    p.add_argument("--primary-caps", type=int, default=None,
                   help=f"primary capsule types (default: full {FULL['primary_caps']}, demo {DEMO['primary_caps']})")
    training.add_run_flags(p, out_dir="runs/multimnist")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    training.require_positive(p, args, ints=("steps", "batch_size", "eval_every", "test_digits", "pairs_per_digit",
                                             "val_digits", "iterations", "conv_channels", "primary_caps", "threads",
                                             "eval_batch_size"), floats=("time_budget",))
    if args.test_digits is not None and args.test_digits > MNIST_TEST_DIGITS:
        p.error(f"--test-digits must be at most {MNIST_TEST_DIGITS}, got {args.test_digits}")
    if args.val_digits is not None and args.val_digits >= MNIST_TRAIN_DIGITS:
        p.error(f"--val-digits must be below {MNIST_TRAIN_DIGITS}, got {args.val_digits}")
    return args


def resolve(args, device: torch.device) -> dict:
    demo = device.type != "cuda" and not args.full
    base = DEMO if demo else FULL
    pick = lambda value, key: value if value is not None else base[key]  # noqa: E731
    return {"mode": "cpu-demo" if demo else "full", "device": str(device), "dataset": "multimnist",
            "experiment": "multimnist", "canvas": MULTIMNIST_CANVAS, "shift": MULTIMNIST_SHIFT,
            "test_seed": MULTIMNIST_TEST_SEED, "test_digits": pick(args.test_digits, "test_digits"),
            "pairs_per_digit": pick(args.pairs_per_digit, "pairs_per_digit"),
            "val_digits": pick(args.val_digits, "val_digits"), "val_pairs": VAL_PAIRS, "split_seed": SPLIT_SEED,
            "val_seed": VAL_SEED,
            "model": {"conv_channels": pick(args.conv_channels, "conv_channels"),
                      "primary_caps": pick(args.primary_caps, "primary_caps"), "iterations": args.iterations,
                      "detach": False, "image_size": MULTIMNIST_CANVAS},
            "steps": pick(args.steps, "steps"), "batch_size": args.batch_size, "lr": args.lr,
            "eval_every": pick(args.eval_every, "eval_every"), "time_budget": pick(args.time_budget, "time_budget"),
            "recon_weight": args.recon_weight, "seed": args.seed, "threads": torch.get_num_threads()}


def stopped_by(run: dict, cfg: dict) -> str:
    """What ended the training, from the loop's reason."""
    if run["reason"] == "time":
        return f"the time budget ({cfg['time_budget']:.0f} s) after {run['steps']} steps"
    return f"--steps ({run['steps']} steps done) after {run['seconds']:.0f} s"


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
    limits = f"at most {cfg['steps']} steps" + (f" or {cfg['time_budget']:.0f} s, whichever comes first"
                                                 if cfg["time_budget"] else "")
    protocol = (f"each of the first {cfg['test_digits']} test digits the first digit of {cfg['pairs_per_digit']} "
                f"pairs ({cfg['test_digits'] * cfg['pairs_per_digit']} test pairs)")
    if cfg["mode"] == "cpu-demo":
        print(f"CPU demo mode: a narrowed CapsNet (conv1 {cfg['model']['conv_channels']} channels, "
              f"{cfg['model']['primary_caps']} primary capsule types) trained for {limits}, scored on {protocol}. "
              "Its numbers are not the paper's; run on a CUDA machine or pass --full for the paper's model and "
              "test protocol.", flush=True)
    else:
        print(f"full run: training for {limits}; test protocol: {protocol}", flush=True)
    print("config: " + json.dumps(cfg), flush=True)
    t0 = time.perf_counter()
    try:
        mnist = training.load_classification_data(args.data_dir, "mnist", training.Distributed(),
                                                  download=not args.no_download)
    except SystemExit as e:  # the attempts on one line
        raise SystemExit(" ".join(str(e.code).split())) from None
    train_x, train_y = mnist["train_x"].cpu(), mnist["train_y"].cpu()
    val_idx, train_idx = held_out_split(train_x.shape[0], cfg["val_digits"], SPLIT_SEED)
    val = multimnist_test_set(train_x[val_idx], train_y[val_idx], VAL_PAIRS, seed=VAL_SEED)
    train_x, train_y = train_x[train_idx].to(device), train_y[train_idx].to(device)
    print(f"data: {train_idx.numel()} training digits for the training pairs, {val_idx.numel()} held out for "
          f"{VAL_PAIRS} validation pairs", flush=True)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg["seed"])
    m = cfg["model"]
    model = ct.CapsNet(image_size=MULTIMNIST_CANVAS, conv_channels=m["conv_channels"], primary_caps=m["primary_caps"],
                       iterations=m["iterations"], init_std=0.01, backend=args.backend).to(device)  # paper's init
    params = sum(p.numel() for p in model.parameters())
    print(f"model: CapsNet for {MULTIMNIST_CANVAS}x{MULTIMNIST_CANVAS}, {params:,} parameters", flush=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])

    def draw(gen):  # pairs drawn afresh on the training device for every batch
        batch = multimnist_batch(train_x, train_y, cfg["batch_size"], gen)
        return as_model_input(batch["x"]), batch["sources"].float().div_(255.0), batch["labels"]

    def loss_fn(x, sources, labels):
        return multimnist_loss(model, x, sources, labels, cfg["recon_weight"])[0], None

    def evaluate(stats: dict) -> dict:
        wrong = pair_errors(top2(predict(model, val["x"], device, args.eval_batch_size)[0]), val["labels"])
        return {"step": stats["step"], "seconds": stats["elapsed"], "lr": stats["lr"],
                "train_loss": stats["train_loss"], "val_pair_error": float(wrong.float().mean())}

    def save(step: int) -> None:
        training.save_checkpoint(out / "checkpoint.pt", model=model, optimizer=optimizer, epoch=0, step=step,
                                 args=cfg, history=loop.history)

    def record(row: dict, stats: dict) -> None:
        training.write_metrics_csv(out / "metrics.csv", loop.history, METRIC_FIELDS)
        save(row["step"])
        print(f"step {row['step']} ({row['seconds']:.0f} s): train loss {row['train_loss']:.4f}, "
              f"validation pair error {100 * row['val_pair_error']:.2f}%", flush=True)

    loop = training.Loop(model, optimizer, training.make_step(loss_fn, optimizer),
                         training.DrawnBatches(draw, steps_per_epoch=cfg["steps"]), total_steps=cfg["steps"],
                         seed=cfg["seed"], schedule=lambda step, elapsed: training.paper_lr(cfg["lr"], step),
                         time_budget=cfg["time_budget"], evaluate=evaluate, eval_every=cfg["eval_every"],
                         on_record=record, progress=not args.no_progress, desc="multimnist")
    run = loop.run()
    save(run["steps"])
    stop = stopped_by(run, cfg)
    print(f"training stopped by {stop}; testing on {protocol}", flush=True)
    chunks = multimnist_pairs(mnist["test_x"], mnist["test_y"], cfg["pairs_per_digit"], MULTIMNIST_TEST_SEED,
                              digits=cfg["test_digits"])
    result = evaluate_pairs(model, chunks, device, cfg["test_digits"], args.eval_batch_size)
    wilson = wilson_interval(result["wrong"], result["pairs"])
    boot = bootstrap_interval(result["wrong_per_digit"], result["count_per_digit"])
    files = write_pair_figures(model, out, result, device)
    summary = {"config": cfg, "parameters": params, "steps": run["steps"], "train_seconds": run["seconds"],
               "images_seen": run["steps"] * cfg["batch_size"], "stopped_by": stop,
               "test_pairs": result["pairs"], "test_pair_error": result["error"], "test_pairs_wrong": result["wrong"],
               "test_pair_error_95": {"bootstrap_over_digits": boot, "wilson": wilson},
               "pair_confusion": result["confusion"].tolist(), "files": files, "seconds": time.perf_counter() - t0}
    training.write_json(out / "summary.json", summary)
    md = (f"# MultiMNIST ({cfg['mode']}, {cfg['device']})\n\nCapsNet {cfg['model']}, {params:,} parameters, "
          f"{run['steps']} steps of {cfg['batch_size']} pairs ({run['seconds']:.0f} s; stopped by {stop}).\n\n"
          f"Test protocol: {protocol}, seed {MULTIMNIST_TEST_SEED}.\n\n"
          f"**Pair error: {100 * result['error']:.2f}%** ({result['wrong']} of {result['pairs']} test pairs); "
          f"95% interval {100 * boot[0]:.2f}-{100 * boot[1]:.2f}% (bootstrap over the base digits), "
          f"{100 * wilson[0]:.2f}-{100 * wilson[1]:.2f}% (binomial, Wilson).\n")
    training.write_text(out / "results.md", md)
    print(f"done ({cfg['mode']}): {run['steps']} steps in {run['seconds']:.0f} s, stopped by {stop}; test pair error "
          f"{100 * result['error']:.2f}% (95% interval {100 * boot[0]:.2f}-{100 * boot[1]:.2f}%) on "
          f"{result['pairs']} pairs; outputs in {out}/", flush=True)
    return summary


if __name__ == "__main__":
    run_cli(main)
