#!/usr/bin/env python
"""Robustness to affine transformations (Sabour et al. 2017, section 5.2): CapsNet and a CNN
of about the same size, both trained on translated MNIST and tested on affNIST-style digits.

    python examples/train_affine.py              # CUDA: full size; CPU only: a bounded demo
    python examples/train_affine.py --full       # full size on any device
    python examples/train_affine.py --help

Training set: the MNIST training digits minus a held-out validation split, each placed at a
random position on a 40x40 canvas (centred, i.e. padded by 6, then shifted by up to 6 pixels in
each direction; a fresh placement at every draw).  Both models stop early on the validation
split (the same digits, placed once with a fixed seed), never on a test set; the CNN stops at
the first evaluation that reaches CapsNet's best validation accuracy (the paper compares
models of about the same clean accuracy) or else keeps its own best.  Tests:
  * clean: the 10,000 MNIST test digits at random positions on 40x40 (fixed seed);
  * affine: the affNIST-style set of ``capstriton.data.affine`` (--per-digit transformations
    of each test digit, seed --affine-seed; 32 at full size as affNIST).
The CNN (``capstriton.models.ConvBaseline``) has three 5x5 convolutions, max pooling, two fully
connected layers and dropout, with its first fully connected layer sized to match CapsNet's
parameter count.

Outputs in --out-dir: capsnet/checkpoint.pt (readable by examples/evaluate.py),
cnn/checkpoint.pt, metrics_capsnet.csv and metrics_cnn.csv (every validation evaluation),
summary.json, results.md, affine_examples.png.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import capstriton as ct  # noqa: E402
from capstriton import training  # noqa: E402
from capstriton.data import (  # noqa: E402
    AFFINE_SEED,
    AFFNIST_RANGES,
    affine_test_set,
    as_model_input,  # noqa: E402
    center_on_canvas,
    random_placement,
)
from capstriton.experiments import figures  # noqa: E402
from capstriton.models import conv_baseline_matching, count_parameters  # noqa: E402

CANVAS, PAD_SHIFT = 40, 6
SPLIT_SEED, PLACEMENT_SEED = 0, 1
FULL, DEMO = training.AFFINE_FULL, training.AFFINE_CPU_DEMO
METRIC_FIELDS = ["step", "epoch", "seconds", "lr", "train_loss", "val_acc", "best_val_acc"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="full-size models and test set even without CUDA")
    p.add_argument("--models", default="capsnet,cnn", help="comma-separated subset of capsnet,cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam; decayed x0.96 every 2000 steps")
    p.add_argument("--max-steps", type=int, default=None, help="per model (default: full 200000, demo 100000)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="validation every N steps (default: every epoch at full size, 50 in the demo)")
    p.add_argument("--patience", type=int, default=None, help="evaluations without gain before stopping")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training per model (demo: 300)")
    p.add_argument("--val-size", type=int, default=None,
                   help="training digits held out for early stopping (full: 5000, demo: 1000)")
    p.add_argument("--per-digit", type=int, default=None, help="affine transformations per test digit (full: 32)")
    p.add_argument("--affine-seed", type=int, default=AFFINE_SEED)
    p.add_argument("--recon-weight", type=float, default=0.0005)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--conv-channels", type=int, default=None)
    p.add_argument("--primary-caps", type=int, default=None)
    p.add_argument("--cnn-channels", default=None, help="three comma-separated conv widths (full: 256,256,128)")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training digits")
    p.add_argument("--test-subset", type=int, default=None,
                   help="only the first N test digits (full: all 10000, demo: 2000)")
    training.add_run_flags(p, out_dir="runs/affine")
    args = p.parse_args(argv)
    models = args.models.split(",")
    if not models or any(m not in ("capsnet", "cnn") for m in models):
        p.error(f"--models must list capsnet and/or cnn, got {args.models!r}")
    training.require_positive(p, args, ints=("batch_size", "max_steps", "eval_every", "patience", "val_size",
                                             "per_digit", "iterations", "conv_channels", "primary_caps", "threads",
                                             "eval_batch_size", "train_subset", "test_subset"), floats=("time_budget",))
    return args


def resolve(args, device: torch.device) -> dict:
    demo = device.type != "cuda" and not args.full
    base = DEMO if demo else FULL
    pick = lambda value, key: value if value is not None else base[key]  # noqa: E731
    cnn = tuple(int(c) for c in args.cnn_channels.split(",")) if args.cnn_channels else base["cnn_channels"]
    return {"mode": "cpu-demo" if demo else "full", "device": str(device), "dataset": "mnist",
            "models": args.models.split(","), "canvas": CANVAS, "shift": PAD_SHIFT,
            "model": {"conv_channels": pick(args.conv_channels, "conv_channels"),
                      "primary_caps": pick(args.primary_caps, "primary_caps"), "iterations": args.iterations,
                      "detach": False, "image_size": CANVAS},
            "cnn_channels": list(cnn), "batch_size": args.batch_size, "lr": args.lr,
            "max_steps": pick(args.max_steps, "max_steps"), "eval_every": pick(args.eval_every, "eval_every"),
            "patience": pick(args.patience, "patience"), "time_budget": pick(args.time_budget, "time_budget"),
            "val_size": pick(args.val_size, "val_size"), "test_digits": pick(args.test_subset, "test_digits"),
            "per_digit": pick(args.per_digit, "per_digit"),
            "affine_seed": args.affine_seed, "affine_ranges": AFFNIST_RANGES, "recon_weight": args.recon_weight,
            "seed": args.seed, "threads": torch.get_num_threads()}


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, device, batch_size: int) -> float:
    """Fraction classified correctly: longest capsule for CapsNet, largest logit for the CNN."""
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        out = model(as_model_input(images[start:start + batch_size].to(device)))
        scores = out[0] if isinstance(out, tuple) else out
        correct += int((scores.argmax(1).cpu() == labels[start:start + batch_size]).sum())
    return correct / max(images.shape[0], 1)


def build_model(name: str, cfg: dict, capsnet_params: int | None, backend: str) -> torch.nn.Module:
    if name == "capsnet":
        m = cfg["model"]
        return ct.CapsNet(image_size=CANVAS, conv_channels=m["conv_channels"], primary_caps=m["primary_caps"],
                          iterations=m["iterations"], backend=backend)
    target = capsnet_params or count_parameters(build_model("capsnet", cfg, None, "torch"))
    return conv_baseline_matching(target, CANVAS, channels=tuple(cfg["cnn_channels"]))


def run_model(name: str, cfg: dict, data: dict, device, args, target: float | None, capsnet_params: int | None,
              backend: str) -> dict:
    """Train one model with early stopping on the validation split; evaluate the kept weights."""
    torch.manual_seed(cfg["seed"])
    model = build_model(name, cfg, capsnet_params, backend).to(device)
    params = count_parameters(model)
    print(f"[{name}] {params:,} parameters" + (f"; stops at validation accuracy {target:.4f} (CapsNet's best)"
                                               if target is not None else ""), flush=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    # digits in a fresh random order every epoch, each placed at a fresh random position
    batches = training.ShuffledBatches(data["train_x"], data["train_y"], cfg["batch_size"], drop_last=True,
                                       prepare=lambda x, gen: as_model_input(random_placement(x, CANVAS, PAD_SHIFT,
                                                                                              gen)[0]))
    steps_per_epoch = max(1, batches.steps_per_epoch)

    def loss_fn(x, y):
        if name == "cnn":
            return F.cross_entropy(model(x), y), None
        lengths, recon, _ = model(x, y)
        return ct.margin_loss(lengths, y) + cfg["recon_weight"] * ct.reconstruction_loss(recon, x), None

    def evaluate(stats: dict) -> dict:
        return {"step": stats["step"], "epoch": stats["step"] / steps_per_epoch, "seconds": stats["elapsed"],
                "lr": stats["lr"], "train_loss": stats["train_loss"],
                "val_acc": accuracy(model, data["val_x"], data["val_y"], device, args.eval_batch_size)}

    def record(row: dict, stats: dict) -> None:
        training.write_metrics_csv(args.out_dir / f"metrics_{name}.csv", loop.history, METRIC_FIELDS)
        print(f"[{name}] step {row['step']} ({row['epoch']:.2f} epochs, {row['seconds']:.0f} s): train loss "
              f"{row['train_loss']:.4f}, validation accuracy {row['val_acc']:.4f} (best {row['best_val_acc']:.4f})",
              flush=True)

    stopper = training.EarlyStopping(patience=cfg["patience"], target=target)
    loop = training.Loop(model, optimizer, training.make_step(loss_fn, optimizer), batches,
                         total_steps=cfg["max_steps"], seed=cfg["seed"] + (0 if name == "capsnet" else 1),
                         schedule=lambda step, elapsed: training.paper_lr(cfg["lr"], step),
                         time_budget=cfg["time_budget"], evaluate=evaluate,
                         eval_every=cfg["eval_every"] or steps_per_epoch, early_stopping=stopper, score="val_acc",
                         on_record=record, progress=not args.no_progress, desc=name)
    run = loop.run()
    stopper.restore(model)
    result = {"parameters": params, "steps": run["steps"], "train_seconds": run["seconds"],
              "stopped_by": stopper.reason or ("time budget" if run["reason"] == "time" else "steps"),
              "kept_step": stopper.best_step, "val_accuracy": stopper.best,
              "clean_accuracy": accuracy(model, data["clean_x"], data["test_y"], device, args.eval_batch_size),
              "affine_accuracy": accuracy(model, data["affine_x"], data["affine_y"], device, args.eval_batch_size)}
    args_out = {**cfg, "kind": name}
    if name == "cnn":
        args_out["model"] = {"kind": "cnn", "channels": cfg["cnn_channels"],
                             "hidden": [model.classifier[1].out_features, model.classifier[3].out_features]}
    training.save_checkpoint(args.out_dir / name / "checkpoint.pt", model=model,
                             epoch=int(run["steps"] // steps_per_epoch), step=run["steps"], args=args_out,
                             history=loop.history, result=result)
    print(f"[{name}] kept step {stopper.best_step} ({result['stopped_by']}): validation {stopper.best:.4f}, "
          f"clean test {result['clean_accuracy']:.4f}, affine test {result['affine_accuracy']:.4f}", flush=True)
    return result


def prepare_data(args, cfg: dict, device) -> dict:
    mnist = training.load_classification_data(args.data_dir, "mnist", training.Distributed(),
                                              download=not args.no_download)
    split = torch.randperm(mnist["train_x"].shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED),
                           device="cpu")
    val_idx, train_idx = split[:cfg["val_size"]], split[cfg["val_size"]:]
    if args.train_subset:
        train_idx = train_idx[:args.train_subset]
    test_x, test_y = mnist["test_x"], mnist["test_y"]
    if cfg["test_digits"]:
        test_x, test_y = test_x[:cfg["test_digits"]], test_y[:cfg["test_digits"]]
    placement = torch.Generator().manual_seed(PLACEMENT_SEED)
    val_x, _ = random_placement(mnist["train_x"][val_idx], CANVAS, PAD_SHIFT, placement)
    clean_x, _ = random_placement(test_x, CANVAS, PAD_SHIFT, placement)
    t0 = time.perf_counter()
    affine = affine_test_set(test_x, test_y, per_digit=cfg["per_digit"], seed=cfg["affine_seed"], canvas=CANVAS)
    print(f"data: {len(train_idx)} training digits, {len(val_idx)} validation, {len(test_y)} clean test, "
          f"{affine['x'].shape[0]} affine test images ({cfg['per_digit']} per digit, seed {cfg['affine_seed']}, "
          f"built in {time.perf_counter() - t0:.0f} s)", flush=True)
    figures.save_image_rows(args.out_dir / "affine_examples.png",
                            [center_on_canvas(test_x[:12], CANVAS) / 255.0, clean_x[:12] / 255.0]
                            + [affine["x"][j * len(test_y):j * len(test_y) + 12] / 255.0
                               for j in range(min(cfg["per_digit"], 3))],
                            ["centred", "clean test"] + [f"affine #{j + 1}" for j in range(min(cfg["per_digit"], 3))],
                            title="test digits: centred, randomly placed (clean test) and affNIST-style")
    on = device if device.type == "cuda" else torch.device("cpu")
    return {"train_x": mnist["train_x"][train_idx].to(on), "train_y": mnist["train_y"][train_idx].to(on),
            "val_x": val_x, "val_y": mnist["train_y"][val_idx], "clean_x": clean_x, "test_y": test_y,
            "affine_x": affine["x"], "affine_y": affine["y"]}


def results_markdown(summary: dict) -> str:
    cfg = summary["config"]
    lines = [f"# Affine robustness ({cfg['mode']}, {cfg['device']})", "",
             "| model | parameters | steps | stopped | validation | clean test (40x40) | affine test |",
             "|---|---|---|---|---|---|---|"]
    for name, r in summary["results"].items():
        lines.append(f"| {name} | {r['parameters']:,} | {r['steps']} (kept {r['kept_step']}) | {r['stopped_by']} | "
                     f"{100 * r['val_accuracy']:.2f}% | {100 * r['clean_accuracy']:.2f}% | "
                     f"{100 * r['affine_accuracy']:.2f}% |")
    lines += ["", f"Affine test: {summary['affine_images']} images ({cfg['per_digit']} per test digit, "
              f"seed {cfg['affine_seed']}, ranges {cfg['affine_ranges']}).", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = training.resolve_device(args.device)
    backend = args.backend
    cfg = resolve(args, device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if cfg["mode"] == "cpu-demo":
        print(f"CPU demo mode: narrowed CapsNet (conv1 {cfg['model']['conv_channels']} channels, "
              f"{cfg['model']['primary_caps']} primary capsule types) and CNN (channels {cfg['cnn_channels']}), "
              f"{cfg['time_budget']:.0f} s of training each, {cfg['val_size']} validation digits, the first "
              f"{cfg['test_digits']} test digits with {cfg['per_digit']} affine transformations each. Its numbers "
              "are not the paper's; run on a CUDA machine or pass --full for full size.",
              flush=True)
    print("config: " + json.dumps(cfg), flush=True)
    t0 = time.perf_counter()
    data = prepare_data(args, cfg, device)
    results, target, capsnet_params = {}, None, None
    for name in ("capsnet", "cnn"):
        if name not in cfg["models"]:
            continue
        results[name] = run_model(name, cfg, data, device, args, target, capsnet_params, backend)
        if name == "capsnet":
            target, capsnet_params = results[name]["val_accuracy"], results[name]["parameters"]
    summary = {"config": cfg, "results": results, "affine_images": int(data["affine_x"].shape[0]),
               "clean_images": int(data["clean_x"].shape[0]), "seconds": time.perf_counter() - t0}
    training.write_json(args.out_dir / "summary.json", summary)
    md = results_markdown(summary)
    training.write_text(args.out_dir / "results.md", md)
    print(md, flush=True)
    print(f"done ({cfg['mode']}) in {summary['seconds']:.0f} s; outputs in {args.out_dir}/", flush=True)
    return summary


if __name__ == "__main__":
    main()
