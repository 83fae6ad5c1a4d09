#!/usr/bin/env python
"""CapsNet on MultiMNIST (Sabour et al. 2017, section 6): segmenting highly overlapping digits.

    python examples/train_multimnist.py            # CUDA: the paper's model; CPU only: a bounded demo
    python examples/train_multimnist.py --full     # full size on any device
    python examples/train_multimnist.py --help

Each image overlays two MNIST training digits of different classes, each shifted by up to 4
pixels on a 36x36 canvas (pixel-wise sum clipped to 1); pairs are drawn afresh on the
training device for every batch (``capstriton.data.multimnist``).  CapsNet for 36x36 inputs
is trained with the margin loss with both labels present plus 0.0005 x the sum of the two
reconstruction losses, each shifted source digit reconstructed from its own class's capsule.
Prediction: the two longest capsules; error: the fraction of test images whose predicted pair
differs from the true pair.  Test set: ``MULTIMNIST_TEST_SIZE`` (10,000) pairs of MNIST test
digits from a CPU generator with a fixed seed (the CPU demo scores its first 2,000).

Outputs in --out-dir: checkpoint.pt, metrics.csv (training loss and the pair error on 1,000
fixed validation pairs of training digits at every evaluation), summary.json, results.md,
multimnist_reconstructions.png and multimnist_errors.png (the paper's Figure 5: inputs above
the two reconstructions overlaid in red (longest capsule) and green (second longest)).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import capstriton as ct  # noqa: E402
from capstriton import training  # noqa: E402
from capstriton.data import (  # noqa: E402
    MULTIMNIST_CANVAS,
    MULTIMNIST_SHIFT,
    MULTIMNIST_TEST_SEED,
    MULTIMNIST_TEST_SIZE,
    as_model_input,  # noqa: E402
    multimnist_batch,
    multimnist_test_set,
)
from capstriton.experiments import figures  # noqa: E402
from capstriton.experiments.decoding import decode_capsule  # noqa: E402
from capstriton.experiments.evaluation import predict  # noqa: E402
from capstriton.experiments.multimnist import multimnist_loss, pair_errors, top2  # noqa: E402

VAL_SEED, VAL_SIZE = 4321, 1000
FULL, DEMO = training.MULTIMNIST_FULL, training.MULTIMNIST_CPU_DEMO
METRIC_FIELDS = ["step", "seconds", "lr", "train_loss", "val_pair_error"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the paper's model and schedule even without CUDA")
    p.add_argument("--steps", type=int, default=None, help="training steps (full: 468750 = 60M pairs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam; decayed x0.96 every 2000 steps")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation evaluations")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training (demo: 480)")
    p.add_argument("--test-size", type=int, default=None,
                   help=f"score the first N of the {MULTIMNIST_TEST_SIZE} test images (demo: 2000)")
    p.add_argument("--recon-weight", type=float, default=0.0005)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--conv-channels", type=int, default=None)
    p.add_argument("--primary-caps", type=int, default=None)
    training.add_run_flags(p, out_dir="runs/multimnist")
    args = p.parse_args(argv)
    training.require_positive(p, args, ints=("steps", "batch_size", "eval_every", "test_size", "iterations",
                                             "conv_channels", "primary_caps", "threads", "eval_batch_size"),
                              floats=("time_budget",))
    if args.test_size is not None and args.test_size > MULTIMNIST_TEST_SIZE:
        p.error(f"--test-size must be at most {MULTIMNIST_TEST_SIZE}, got {args.test_size}")
    return args


def resolve(args, device: torch.device) -> dict:
    demo = device.type != "cuda" and not args.full
    base = DEMO if demo else FULL
    pick = lambda value, key: value if value is not None else base[key]  # noqa: E731
    return {"mode": "cpu-demo" if demo else "full", "device": str(device), "dataset": "multimnist",
            "canvas": MULTIMNIST_CANVAS, "shift": MULTIMNIST_SHIFT, "test_seed": MULTIMNIST_TEST_SEED,
            "test_size": pick(args.test_size, "test_size"),
            "model": {"conv_channels": pick(args.conv_channels, "conv_channels"),
                      "primary_caps": pick(args.primary_caps, "primary_caps"), "iterations": args.iterations,
                      "detach": False, "image_size": MULTIMNIST_CANVAS},
            "steps": pick(args.steps, "steps"), "batch_size": args.batch_size, "lr": args.lr,
            "eval_every": pick(args.eval_every, "eval_every"), "time_budget": pick(args.time_budget, "time_budget"),
            "recon_weight": args.recon_weight, "seed": args.seed, "threads": torch.get_num_threads()}


@torch.no_grad()
def save_overlays(model, path: Path, test: dict, pred: torch.Tensor, capsules: torch.Tensor, idx: torch.Tensor,
                  device, title: str) -> None:
    """Inputs above the reconstructions of the two predicted classes (red: longest, green: second)."""
    side = MULTIMNIST_CANVAS
    v = capsules[idx].to(device)
    first = decode_capsule(model, v, pred[idx, 0].to(device)).float().cpu().view(-1, side, side)
    second = decode_capsule(model, v, pred[idx, 1].to(device)).float().cpu().view(-1, side, side)
    tags = ["L {},{}\nR {},{}".format(*test["labels"][i].tolist(), *pred[i].tolist()) for i in idx]
    figures.save_pair_overlays(path, test["x"][idx] / 255.0, first, second, tags, title)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = training.resolve_device(args.device)
    cfg = resolve(args, device)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if cfg["mode"] == "cpu-demo":
        print(f"CPU demo mode: a narrowed CapsNet (conv1 {cfg['model']['conv_channels']} channels, "
              f"{cfg['model']['primary_caps']} primary capsule types) trained for {cfg['time_budget']:.0f} s, "
              f"scored on the first {cfg['test_size']} of the {MULTIMNIST_TEST_SIZE} test images. Its numbers are "
              "not the paper's; run on a CUDA machine or pass --full for the paper's model.", flush=True)
    print("config: " + json.dumps(cfg), flush=True)
    t0 = time.perf_counter()
    mnist = training.load_classification_data(args.data_dir, "mnist", training.Distributed(),
                                              download=not args.no_download)
    test = multimnist_test_set(mnist["test_x"], mnist["test_y"])
    test = {k: v[:cfg["test_size"]] for k, v in test.items()}
    val = multimnist_test_set(mnist["train_x"], mnist["train_y"], VAL_SIZE, seed=VAL_SEED)
    train_x, train_y = mnist["train_x"].to(device), mnist["train_y"].to(device)

    torch.manual_seed(cfg["seed"])
    m = cfg["model"]
    model = ct.CapsNet(image_size=MULTIMNIST_CANVAS, conv_channels=m["conv_channels"], primary_caps=m["primary_caps"],
                       iterations=m["iterations"], backend=args.backend).to(device)
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

    def record(row: dict, stats: dict) -> None:
        training.write_metrics_csv(out / "metrics.csv", loop.history, METRIC_FIELDS)
        training.save_checkpoint(out / "checkpoint.pt", model=model, optimizer=optimizer, epoch=0, step=row["step"],
                                 args=cfg, history=loop.history)
        print(f"step {row['step']} ({row['seconds']:.0f} s): train loss {row['train_loss']:.4f}, "
              f"validation pair error {100 * row['val_pair_error']:.2f}%", flush=True)

    loop = training.Loop(model, optimizer, training.make_step(loss_fn, optimizer),
                         training.DrawnBatches(draw, steps_per_epoch=cfg["steps"]), total_steps=cfg["steps"],
                         seed=cfg["seed"], schedule=lambda step, elapsed: training.paper_lr(cfg["lr"], step),
                         time_budget=cfg["time_budget"], evaluate=evaluate, eval_every=cfg["eval_every"],
                         on_record=record, progress=not args.no_progress, desc="multimnist")
    run = loop.run()
    run["stopped_by"] = {None: "steps", "time": "time budget"}[run["reason"]]
    lengths, capsules = predict(model, test["x"], device, args.eval_batch_size)
    pred = top2(lengths)
    wrong = pair_errors(pred, test["labels"])
    error = float(wrong.float().mean())
    save_overlays(model, out / "multimnist_reconstructions.png", test, pred, capsules, torch.arange(min(10, len(pred))),
                  device, "MultiMNIST test inputs; reconstructions of the two longest capsules in red and green")
    if bool(wrong.any()):
        save_overlays(model, out / "multimnist_errors.png", test, pred, capsules, wrong.nonzero().squeeze(1)[:10],
                      device, "misclassified pairs (L: true, R: the two longest capsules)")
    summary = {"config": cfg, "parameters": params, "steps": run["steps"], "train_seconds": run["seconds"],
               "images_seen": run["steps"] * cfg["batch_size"], "stopped_by": run["stopped_by"],
               "test_images": len(pred), "test_pair_error": error, "test_pairs_wrong": int(wrong.sum()),
               "seconds": time.perf_counter() - t0}
    training.write_json(out / "summary.json", summary)
    md = (f"# MultiMNIST ({cfg['mode']}, {cfg['device']})\n\nCapsNet {cfg['model']}, {params:,} parameters, "
          f"{run['steps']} steps of {cfg['batch_size']} pairs ({run['seconds']:.0f} s).\n\n"
          f"**Pair error: {100 * error:.2f}%** ({int(wrong.sum())} of {len(pred)} test images; test seed "
          f"{MULTIMNIST_TEST_SEED}).\n")
    training.write_text(out / "results.md", md)
    print(f"done ({cfg['mode']}): {run['steps']} steps in {run['seconds']:.0f} s; test pair error "
          f"{100 * error:.2f}% on {len(pred)} images; outputs in {out}/", flush=True)
    return summary


if __name__ == "__main__":
    main()
