#!/usr/bin/env python
"""Train CapsNet (Sabour et al. 2017), Efficient-CapsNet (Mazzia et al. 2021) or matrix capsules
with EM routing (Hinton et al. 2018) on MNIST, on one device or many.

    python examples/train_mnist.py            # CUDA: the paper recipe; CPU only: a bounded demo
    python examples/train_mnist.py --full     # the paper recipe on any device
    python examples/train_mnist.py --model efficient-capsnet    # Efficient-CapsNet, its authors' recipe
    python examples/train_mnist.py --model matrix-capsnet       # MatrixCapsNet, spread loss, EM routing
    torchrun --standalone --nproc-per-node 4 examples/train_mnist.py    # DistributedDataParallel
    python examples/train_mnist.py --resume   # continue exactly where --out-dir's checkpoint stopped

CapsNet paper recipe: Adam (lr 1e-3, decayed x0.96 every 2000 steps), batch 128, random shifts
of up to 2 pixels, 3 routing iterations, margin loss + 0.0005 x sum-of-squares reconstruction
loss; the decoder sees the true class's capsule in training, the longest one at test time.
Efficient-CapsNet: Adam 5e-4 x0.97 per epoch, batch 16, 150 epochs, random rotation, squish,
erased patch and shift (--augment affine).  Matrix capsules: the paper's network (A=B=C=D=32),
3 EM iterations, spread loss with the margin growing from 0.2 to 0.9 over the run, no decoder,
Adam 3e-3 x0.96 every 20k steps, batch 64, weight decay 2e-7; its CPU demo trains the small
network (A=64, B=8, C=D=16) for a wall-clock budget.  The recipes and their CPU demos:
capstriton.training.recipes.  Every epoch is evaluated on the full official 10k test set.

Under torchrun every rank holds the data on its device and takes a disjoint shard of every
global batch (--batch-size is the global batch); evaluation is sharded and reduced exactly;
rank 0 alone prints and writes.  The global batches and their augmentation do not depend on
the number of processes.

Outputs (in --out-dir): metrics.csv, metrics.png, config.json, checkpoint.pt (resume with
--resume), summary.json, reconstructions.png (inputs above their reconstructions; not for
matrix-capsnet, which has no decoder).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy CPU, spinning threads fight with
# other processes and slow training several-fold.  Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import capstriton as ct  # noqa: E402
from capstriton import training  # noqa: E402
from capstriton.files import remove_stale_temporaries  # noqa: E402
from capstriton.training.cli import HelpFormatter  # noqa: E402
from capstriton.training.steps import make_spread_train_step, spread_criterion, spread_margin_at  # noqa: E402

DEMO = training.MNIST_RECIPES["capsnet"]["cpu-demo"]
METRIC_FIELDS = ["epoch", "mode", "train_loss", "train_acc", "test_loss", "test_acc", "test_error", "seconds",
                 "images_per_s", "lr"]
# files written atomically in --out-dir (a killed run may leave their temporaries behind)
OUTPUT_FILES = ("checkpoint.pt", "metrics.csv", "metrics.png", "config.json", "summary.json", "reconstructions.png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", choices=sorted(training.MNIST_RECIPES), default="capsnet",
                   help="the model and its recipe (capstriton.training.MNIST_RECIPES)")
    p.add_argument("--routing", choices=ct.routing_names(), default=None,
                   help="the class capsules' routing, any registered algorithm (default: the model's own, "
                        "capsnet: dynamic, efficient-capsnet: self-attention; another routing gets the class capsules' "
                        "scaled default initialization, not the recipe's); under inverted-attention the "
                        "capsule lengths carry no probability, so the margin loss trains it poorly "
                        "(examples/train_routing_family.py trains it with a learned head)")
    p.add_argument("--full", action="store_true", help="the paper recipe (full-size model, all epochs) without CUDA")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: the recipe's, CapsNet 50, CPU demo %d)" % DEMO["epochs"])
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch: split over the torchrun processes (default: the recipe's, CapsNet 128, "
                        "Efficient-CapsNet 16, its CPU demo 64)")
    p.add_argument("--per-rank-batch-size", type=int, default=None,
                   help="batch per process instead (global batch = this x processes; default: unset)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: the recipe's, CapsNet 1e-3, Efficient-CapsNet 5e-4, its CPU "
                        "demo 2e-3)")
    p.add_argument("--schedule", choices=["exp", "budget"], default=None,
                   help="exp: lr x lr-decay every decay-steps steps (the papers'; default with CUDA or --full); "
                        "budget: lr decays exponentially to lr x lr-final over the run, measured by "
                        "epochs or --time-budget, whichever ends it first (default of the CPU demos)")
    p.add_argument("--lr-decay", type=float, default=None,
                   help="exp schedule: decay factor (default: the recipe's, CapsNet 0.96, Efficient-CapsNet 0.97) ...")
    p.add_argument("--decay-steps", type=int, default=None,
                   help="... applied every this many steps (default: the recipe's, CapsNet 2000, Efficient-CapsNet "
                        "3750: one epoch)")
    p.add_argument("--lr-final", type=float, default=None,
                   help="budget schedule: final lr / initial lr (default: the recipe's, CapsNet 0.05, "
                        "Efficient-CapsNet 0.01)")
    p.add_argument("--iterations", type=int, default=None,
                   help="routing iterations, for a routing that takes them (default: the routing's, dynamic 3, "
                        "inverted-attention 2)")
    p.add_argument("--detach", action="store_true",
                   help="dynamic routing: detach u_hat in the routing logits (all but last iteration)")
    p.add_argument("--recon-weight", type=float, default=None,
                   help="weight of the reconstruction loss (default: the recipe's, 0.0005; matrix-capsnet has no "
                        "decoder)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="Adam weight decay (default: the recipe's, 0 except matrix-capsnet's 2e-7; its CPU demo 0)")
    p.add_argument("--margin-schedule", choices=["linear", "sigmoid"], default=None,
                   help="matrix-capsnet's spread-loss margin: linear 0.2 -> 0.9 over the run (the paper) or the "
                        "authors' code's sigmoid of the step (default: linear)")
    p.add_argument("--augment", choices=["shift", "affine"], default=None,
                   help="shift: random shifts of up to --shift pixels; affine: the Efficient-CapsNet recipe's "
                        "rotation, squish, erased patch and shift (default: the recipe's, CapsNet shift, "
                        "Efficient-CapsNet affine)")
    p.add_argument("--shift", type=int, default=None, help="random translation of up to this many pixels (0: off) "
                   "with --augment shift (default: the recipe's, 2; the matrix-capsnet CPU demo 0)")
    p.add_argument("--conv-channels", type=int, default=None, help="CapsNet Conv1 channels (default: 256; demo %d)"
                   % DEMO["model"]["conv_channels"])
    p.add_argument("--primary-caps", type=int, default=None, help="CapsNet primary capsule types (default: 32; "
                   "demo %d)" % DEMO["model"]["primary_caps"])
    p.add_argument("--amp", choices=sorted(training.AMP_DTYPES), default="off",
                   help="mixed precision: autocast to bf16, or fp16 with a grad scaler (meant for CUDA)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: replay forward, losses, backward and a fused Adam step from one CUDA graph")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist",
                   help="the dataset (both 28 x 28 grey images, 10 classes)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="stop training after this many wall-clock seconds, summed over resumed sessions "
                        "(default: none; CPU demo %.0f; 0: none)" % DEMO["time_budget"])
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="also checkpoint every this many steps inside an epoch (default: at epoch ends only)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps in total; --resume continues (default: no "
                        "limit)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--train-subset", type=int, default=None,
                   help="use only the first N training images (default: all 60,000)")
    p.add_argument("--test-subset", type=int, default=None,
                   help="evaluate on the first N test images only (default: all 10,000)")
    p.add_argument("--log-every", type=int, default=50,
                   help="without a terminal: one log line every this many steps (instead of a progress bar)")
    p.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                   help="also write TensorBoard event files to DIR (needs: pip install tensorboard; default: none)")
    training.add_run_flags(p, out_dir="runs/mnist")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    training.require_positive(
        p, args, ints=("epochs", "batch_size", "per_rank_batch_size", "iterations", "eval_batch_size", "train_subset",
                       "test_subset", "decay_steps", "conv_channels", "primary_caps", "threads", "checkpoint_every",
                       "max_steps", "log_every"),
        floats=("lr", "lr_decay", "lr_final"))
    if args.batch_size is not None and args.per_rank_batch_size is not None:
        p.error("give --batch-size (global) or --per-rank-batch-size, not both")
    for name, value in (("shift", args.shift), ("time_budget", args.time_budget), ("recon_weight", args.recon_weight)):
        if value is not None and not value >= 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.model != "capsnet" and (args.conv_channels or args.primary_caps):
        p.error("--conv-channels and --primary-caps apply to --model capsnet only")
    if args.model != "matrix-capsnet" and args.margin_schedule:
        p.error("--margin-schedule applies to --model matrix-capsnet only")
    if args.weight_decay is not None and not args.weight_decay >= 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    return args


def resolve(args: argparse.Namespace, dist: training.Distributed | None = None) -> dict:
    """Turn the flags into the run's full configuration (device, mode, model, schedule, batch)."""
    device = dist.device if dist is not None else training.resolve_device(args.device)
    world = dist.world_size if dist is not None else 1
    training.check_backend(args.backend, device)
    if args.cuda_graphs:
        training.check_cuda_graphs(device, world, args.compile, args.amp)
    mode = "cpu-demo" if device.type != "cuda" and not args.full else "paper"
    base = training.MNIST_RECIPES[args.model][mode]
    pick = lambda flag, key: flag if flag is not None else base[key]  # noqa: E731
    widths = {"conv_channels": args.conv_channels, "primary_caps": args.primary_caps}  # capsnet only
    routing = training.mnist_routing(args.model, args.routing, args.iterations, args.detach)
    model = {"arch": args.model, **base["model"], **{k: v for k, v in widths.items() if v is not None}, **routing}
    if routing.get("routing", "em") != training.MODEL_ROUTING[args.model]:  # the recipe's init is its routing's
        model.pop("init_std", None)
    spread = {}
    if args.model == "matrix-capsnet":  # spread loss with its margin schedule, no decoder
        margin = base["margin"] if args.margin_schedule in (None, base["margin"]["schedule"]) else (
            {"schedule": "sigmoid"} if args.margin_schedule == "sigmoid" else {"schedule": "linear", "start": 0.2,
                                                                                "end": 0.9})
        spread = {"loss": "spread", "margin": margin}
    batch = args.per_rank_batch_size * world if args.per_rank_batch_size is not None else pick(args.batch_size,
                                                                                                "batch_size")
    if batch < world:
        raise SystemExit(f"the global batch ({batch}) must have at least one image per process ({world})")
    budget, augmentation = pick(args.time_budget, "time_budget"), pick(args.augment, "augment")
    jitter = training.MNIST_RECIPES["efficient-capsnet"][mode]["augmentation"] if augmentation == "affine" else None
    return {
        "mode": mode, "dataset": args.dataset, "device": str(device), "world_size": world, "backend": args.backend,
        "model": model, "epochs": pick(args.epochs, "epochs"), "batch_size": batch,
        "per_rank_batch_size": batch / world, "lr": pick(args.lr, "lr"), "schedule": pick(args.schedule, "schedule"),
        "lr_decay": pick(args.lr_decay, "lr_decay"), "decay_steps": pick(args.decay_steps, "decay_steps"),
        "lr_final": pick(args.lr_final, "lr_final"), "recon_weight": pick(args.recon_weight, "recon_weight"),
        "weight_decay": args.weight_decay if args.weight_decay is not None else base.get("weight_decay", 0.0),
        "shift": args.shift if args.shift is not None else base.get("shift", 2), "augment": augmentation,
        "augmentation": jitter,
        "time_budget": budget if budget else None, "amp": args.amp, "cuda_graphs": args.cuda_graphs,
        "compile": args.compile, "seed": args.seed, "threads": torch.get_num_threads(),
        "train_subset": args.train_subset, "test_subset": args.test_subset, **spread,
    }


build_model = training.build_mnist_model


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = training.init_distributed(args.device)
    try:
        return train(args, dist)
    finally:
        dist.close()


def train(args, dist: training.Distributed) -> dict:
    cfg, device, out = resolve(args, dist), dist.device, args.out_dir
    log = (lambda s: print(s, flush=True)) if dist.is_main else (lambda s: None)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUT_FILES:
            remove_stale_temporaries(out / name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes; no change to the math
    if cfg["mode"] == "cpu-demo":
        budget = f"for at most {cfg['time_budget']:.0f} s" if cfg["time_budget"] else f"for {cfg['epochs']} epochs"
        log(f"CPU demo mode (no CUDA device): a narrower {cfg['model']['arch']} ({json.dumps(cfg['model'])}) "
            f"trained {budget}. For the paper's full recipe, run on a CUDA machine or pass --full.")
    if dist.active:
        log(f"distributed: {dist.world_size} processes ({'nccl' if device.type == 'cuda' else 'gloo'}), global "
            f"batch {cfg['batch_size']} = {cfg['per_rank_batch_size']:g} per process")
    log("config: " + json.dumps(cfg))
    data = training.load_classification_data(args.data_dir, args.dataset, dist, download=not args.no_download,
                                             train_subset=args.train_subset, test_subset=args.test_subset, log=log)
    log(f"data: {args.dataset}, {data['train_x'].shape[0]} training images, {data['test_x'].shape[0]} test images")

    # the model and optimizer (the same initialization on every rank), the step, the loop
    cfg["backend"] = training.choose_backend(args.backend, dist, cfg["amp"],
                                             lambda: build_model(cfg["model"], "triton"), log)
    torch.manual_seed(args.seed)
    model = build_model(cfg["model"], cfg["backend"]).to(device)
    cfg["parameters"] = sum(p.numel() for p in model.parameters())
    routed = ", ".join(f"{k}={v}" for k, v in cfg["model"].items() if k in ("routing", "iterations", "detach"))
    log(f"model: {type(model).__name__}, {cfg['parameters']:,} parameters, {routed}, "
        f"backend={cfg['backend']}, amp={cfg['amp']}" + (", CUDA graphs" if cfg["cuda_graphs"] else ""))
    optimizer, scaler = training.make_optimizer(model, cfg, device), training.grad_scaler(device, cfg["amp"])
    net = dist.wrap(model)
    net = torch.compile(net) if args.compile else net
    spread = cfg.get("loss") == "spread"
    margin = torch.zeros((), device=device)  # the spread loss's margin, filled in place by the schedule
    criterion = spread_criterion(margin) if spread else None
    if spread:
        eager = make_spread_train_step(net, optimizer, scaler, margin, cfg["amp"], graphs=cfg["cuda_graphs"])
    else:
        eager = training.make_train_step(net, optimizer, scaler, cfg["recon_weight"], cfg["amp"],
                                         graphs=cfg["cuda_graphs"])
    step = eager
    if cfg["cuda_graphs"]:  # one process (checked): every full batch has share 1
        graphed = training.CudaGraphStep(lambda x, y: eager(x, y, 1.0))
        step = lambda x, y, share: graphed(x, y)  # noqa: E731
    batches = training.ShuffledBatches(data["train_x"], data["train_y"], cfg["batch_size"], dist,
                                       training.augmented_input(cfg["augment"], cfg["shift"], cfg["augmentation"]))
    metrics = training.MetricsFiles(out, METRIC_FIELDS, plot=True, tensorboard=args.tensorboard, enabled=dist.is_main)

    def end_of_epoch(stats: dict) -> dict:
        test_loss, test_acc = training.evaluate(model, data["test_x"], data["test_y"], args.eval_batch_size,
                                                cfg["recon_weight"], device, cfg["amp"], dist, criterion)
        return {"epoch": stats["epoch"], "mode": cfg["mode"], "train_loss": stats["train_loss"],
                "train_acc": stats["train_acc"], "test_loss": test_loss, "test_acc": test_acc,
                "test_error": 1.0 - test_acc, "seconds": stats["seconds"], "images_per_s": stats["images_per_s"],
                "lr": stats["lr"]}

    def record(row: dict, stats: dict) -> None:
        metrics.write(loop.history, row["epoch"])
        log(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | test loss "
            f"{row['test_loss']:.4f} acc {row['test_acc']:.4f} (error {100 * row['test_error']:.2f}%) | "
            f"{row['seconds']:.0f} s, {row['images_per_s']:.0f} images/s"
            + (f" | partial epoch ({stats['images']} images): time budget reached" if stats["time_up"] else ""))

    total = batches.steps_per_epoch * cfg["epochs"]
    def schedule(s: int, elapsed: float) -> float:
        if spread:
            margin.fill_(spread_margin_at(cfg, s, elapsed, total))
        return training.learning_rate(cfg, s, elapsed, total)

    loop = training.Loop(model, optimizer, step, batches, epochs=cfg["epochs"], dist=dist, seed=args.seed,
                         schedule=schedule,
                         time_budget=cfg["time_budget"], stop_at=args.max_steps, evaluate=end_of_epoch,
                         on_record=record, checkpoint=out / "checkpoint.pt", checkpoint_every=args.checkpoint_every,
                         scaler=scaler, args=cfg, progress=not args.no_progress, log_every=args.log_every)

    if args.resume:
        resumed = loop.resume(lambda old: training.checkpoint_model_mismatch(old["args"].get("model"), cfg["model"]))
        log(f"resumed from {loop.checkpoint} {resumed}")
    if dist.is_main:
        training.write_json(out / "config.json", cfg)
        # the checkpoint's history is the truth: drop rows a killed run wrote after it
        training.write_metrics_csv(out / "metrics.csv", loop.history, METRIC_FIELDS)

    finished = loop.run()
    metrics.close()
    history = loop.history
    test_loss, test_acc = (history[-1]["test_loss"], history[-1]["test_acc"]) if history else (math.nan, math.nan)
    if dist.is_main and not spread:  # (matrix capsules have no decoder)
        training.save_reconstructions(model, data["test_x"], out / "reconstructions.png", device)
    elapsed, reason = loop.elapsed(), finished["reason"]
    summary = {"mode": cfg["mode"], "epochs_run": finished["epochs_run"], "last_epoch": finished["last_epoch"],
               "steps": loop.step, "seconds": elapsed, "stopped_by": reason or "epochs", "test_accuracy": test_acc,
               "test_loss": test_loss, "world_size": dist.world_size, "history": history, "out_dir": str(out)}
    if dist.is_main:
        training.write_json(out / "summary.json", summary)
    why = {"time": " (stopped by the time budget)",
           "max_steps": f" (stopped at --max-steps {args.max_steps}; --resume continues)"}.get(reason, "")
    log(f"done ({cfg['mode']}, {cfg['parameters']:,} parameters): {elapsed:.0f} s, {loop.step} steps, "
        f"{finished['last_epoch']} epochs{why}; test accuracy: {100 * test_acc:.2f}% on the "
        f"{data['test_x'].shape[0]} test images; outputs in {out}/")
    if cfg["mode"] == "cpu-demo":
        if spread:
            log("This was the CPU demo configuration. The full paper recipe (MatrixCapsNet A=B=C=D=32, 318,964 "
                "parameters, 50 epochs) is the default on a CUDA machine, or: python examples/train_mnist.py "
                "--model matrix-capsnet --full")
        else:
            log("This was the CPU demo configuration. The full paper recipe (CapsNet with 8.2M parameters, "
                "50 epochs) is the default on a CUDA machine, or: python examples/train_mnist.py --full")
    return summary


if __name__ == "__main__":
    training.run_cli(main)
