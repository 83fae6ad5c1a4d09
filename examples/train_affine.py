#!/usr/bin/env python
"""Robustness to affine transformations (Sabour et al. 2017, section 5.2): CapsNet and a CNN
of about the same size, both trained on translated MNIST and tested on affine-transformed
digits (the affNIST-style set, or the real affNIST test files with --affnist-dir).

    python examples/train_affine.py              # CUDA: full size; CPU only: a bounded demo
    python examples/train_affine.py --full       # full size on any device
    python examples/train_affine.py --affnist-dir ~/affNIST/transformed   # test on real affNIST
    python examples/train_affine.py --help

Training set: the MNIST training digits minus a held-out validation split, each placed at a
random position on a 40x40 canvas (centred, i.e. padded by 6, then shifted by up to 6 pixels in
each direction; a fresh placement at every draw).  Both models stop early on the validation
split (the same digits, placed once with a fixed seed), never on a test set.  The paper
compares the two at the same clean accuracy (99.23% and 99.22%): CapsNet trains first; the CNN
is then evaluated every --cnn-eval-every steps and keeps the evaluation whose validation
accuracy is closest to CapsNet's best (it stops 3 evaluations after reaching it, or after as
many steps as CapsNet's --patience without coming closer), and both accuracies are reported
side by side.
Tests:
  * clean: the MNIST test digits at random positions on 40x40 (fixed seed);
  * affine: the affNIST-style set of ``capstriton.data.affine`` (--per-digit transformations
    of each test digit, seed --affine-seed; 32 at full size as affNIST; its ranges approximate
    affNIST's, see that module), or with --affnist-dir the real affNIST test files
    (``capstriton.data.affnist``; never downloaded).
The CNN (``capstriton.models.ConvBaseline``) has three 5x5 convolutions, max pooling, two fully
connected layers and dropout, with its first fully connected layer sized to match CapsNet's
parameter count.

Outputs in --out-dir: capsnet/checkpoint.pt and cnn/checkpoint.pt (both readable by
examples/evaluate.py), metrics_capsnet.csv and metrics_cnn.csv (every validation evaluation),
summary.json, results.md, affine_examples.png.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import capstriton as ct  # noqa: E402
from capstriton import training  # noqa: E402
from capstriton.data import (  # noqa: E402
    AFFINE_SEED,
    AFFNIST_RANGES,
    TRANSLATED_TEST_SEED,
    DataIntegrityError,
    affine_test_set,
    as_model_input,
    center_on_canvas,
    held_out_split,
    load_affnist_test,
    random_placement,
    translated_test_set,
)
from capstriton.experiments import figures  # noqa: E402
from capstriton.experiments.comparison import ClosestToTarget  # noqa: E402
from capstriton.experiments.evaluation import class_scores  # noqa: E402
from capstriton.models import conv_baseline_matching, count_parameters  # noqa: E402
from capstriton.training.cli import HelpFormatter, run_cli  # noqa: E402

CANVAS, PAD_SHIFT = 40, 6
SPLIT_SEED, VAL_PLACEMENT_SEED = 0, 1
CNN_AFTER = 3  # CNN evaluations after reaching CapsNet's validation accuracy (a later one may come closer)
FULL, DEMO = training.AFFINE_FULL, training.AFFINE_CPU_DEMO
METRIC_FIELDS = ["step", "epoch", "seconds", "lr", "train_loss", "val_acc", "best_val_acc"]


def _both(key: str, fmt=str) -> str:
    return f"full {fmt(FULL[key])}, demo {fmt(DEMO[key])}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="full-size models and test sets even without CUDA (without it and without CUDA: the CPU demo)")
    p.add_argument("--models", default="capsnet,cnn", help="comma-separated subset of capsnet,cnn (the CNN's "
                   "target accuracy is CapsNet's, so alone it keeps its own best)")
    p.add_argument("--batch-size", type=int, default=128, help="digits per training step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate; decayed x0.96 every 2000 steps")
    p.add_argument("--max-steps", type=int, default=None, help=f"training steps per model at most (default: "
                   f"{_both('max_steps')})")
    p.add_argument("--eval-every", type=int, default=None,
                   help="CapsNet's validation every N steps (default: every epoch at full size, "
                        f"{DEMO['eval_every']} in the demo)")
    p.add_argument("--cnn-eval-every", type=int, default=None,
                   help=f"the CNN's validation every N steps (default: {_both('cnn_eval_every')}): dense, so that "
                        "one evaluation lands close to CapsNet's accuracy")
    p.add_argument("--patience", type=int, default=None,
                   help=f"CapsNet evaluations without gain before a model stops; the CNN waits as many steps "
                        f"(default: {_both('patience')})")
    p.add_argument("--time-budget", type=float, default=None,
                   help=f"seconds of training per model at most (default: full none, demo {DEMO['time_budget']:.0f})")
    p.add_argument("--val-size", type=int, default=None,
                   help=f"training digits held out for early stopping (default: {_both('val_size')})")
    p.add_argument("--per-digit", type=int, default=None,
                   help=f"affNIST-style transformations per test digit (default: {_both('per_digit')}; affNIST: 32)")
    p.add_argument("--affine-seed", type=int, default=AFFINE_SEED, help="seed of the affNIST-style test set")
    p.add_argument("--affnist-dir", type=Path, default=None,
                   help="test on the real affNIST test files in this folder (test.mat or test_batches/1.mat ... "
                        "32.mat; never downloaded) instead of the affNIST-style set (default: the affNIST-style set)")
    p.add_argument("--affnist-images", type=int, default=None,
                   help="with --affnist-dir: only the first N affNIST images (default: full all, demo "
                        "--test-subset x --per-digit)")
    p.add_argument("--recon-weight", type=float, default=0.0005, help="CapsNet's reconstruction loss weight")
    p.add_argument("--iterations", type=int, default=3, help="CapsNet's dynamic routing iterations")
    p.add_argument("--conv-channels", type=int, default=None,
                   help=f"channels of CapsNet's first convolution (default: {_both('conv_channels')})")
    p.add_argument("--primary-caps", type=int, default=None,
                   help=f"CapsNet's primary capsule types (default: {_both('primary_caps')})")
    p.add_argument("--cnn-channels", default=None,
                   help="three comma-separated conv widths of the CNN (default: full 256,256,128, demo 32,64,32)")
    p.add_argument("--train-subset", type=int, default=None,
                   help="use only the first N training digits (default: all but the validation split)")
    p.add_argument("--test-subset", type=int, default=None,
                   help="only the first N test digits (default: full all 10,000, demo 2,000)")
    training.add_run_flags(p, out_dir="runs/affine")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    models = args.models.split(",")
    if not models or any(m not in ("capsnet", "cnn") for m in models):
        p.error(f"--models must list capsnet and/or cnn, got {args.models!r}")
    if args.cnn_channels is not None:
        try:
            widths = [int(c) for c in args.cnn_channels.split(",")]
        except ValueError:
            widths = []
        if len(widths) != 3 or min(widths) < 1:
            p.error(f"--cnn-channels must be three positive integers separated by commas, got {args.cnn_channels!r}")
    if args.affnist_images is not None and args.affnist_dir is None:
        p.error("--affnist-images needs --affnist-dir")
    training.require_positive(p, args, ints=("batch_size", "max_steps", "eval_every", "cnn_eval_every", "patience",
                                             "val_size", "per_digit", "iterations", "conv_channels", "primary_caps",
                                             "threads", "eval_batch_size", "train_subset", "test_subset",
                                             "affnist_images"), floats=("time_budget",))
    return args


def resolve(args, device: torch.device) -> dict:
    demo = device.type != "cuda" and not args.full
    base = DEMO if demo else FULL
    pick = lambda value, key: value if value is not None else base[key]  # noqa: E731
    cnn = tuple(int(c) for c in args.cnn_channels.split(",")) if args.cnn_channels else base["cnn_channels"]
    test_digits, per_digit = pick(args.test_subset, "test_digits"), pick(args.per_digit, "per_digit")
    affnist_images = args.affnist_images
    if args.affnist_dir is not None and affnist_images is None and demo:
        affnist_images = (test_digits or 10_000) * per_digit
    return {"mode": "cpu-demo" if demo else "full", "device": str(device), "dataset": "mnist",
            "experiment": "affine", "models": args.models.split(","), "canvas": CANVAS, "shift": PAD_SHIFT,
            "model": {"conv_channels": pick(args.conv_channels, "conv_channels"),
                      "primary_caps": pick(args.primary_caps, "primary_caps"), "iterations": args.iterations,
                      "detach": False, "image_size": CANVAS},
            "cnn_channels": list(cnn), "batch_size": args.batch_size, "lr": args.lr,
            "max_steps": pick(args.max_steps, "max_steps"), "eval_every": pick(args.eval_every, "eval_every"),
            "cnn_eval_every": pick(args.cnn_eval_every, "cnn_eval_every"), "cnn_after": CNN_AFTER,
            "patience": pick(args.patience, "patience"), "time_budget": pick(args.time_budget, "time_budget"),
            "val_size": pick(args.val_size, "val_size"), "test_digits": test_digits, "per_digit": per_digit,
            "affine_seed": args.affine_seed, "affine_ranges": AFFNIST_RANGES,
            "affine_set": "affnist" if args.affnist_dir is not None else "affnist-style",
            "affnist_dir": str(args.affnist_dir) if args.affnist_dir is not None else None,
            "affnist_images": affnist_images, "clean_seed": TRANSLATED_TEST_SEED,
            "recon_weight": args.recon_weight, "seed": args.seed, "threads": torch.get_num_threads()}


def accuracy(model, images: torch.Tensor, labels: torch.Tensor, device, batch_size: int) -> float:
    """Fraction classified correctly: longest capsule for CapsNet, largest logit for the CNN."""
    model.eval()
    if images.shape[0] == 0:
        return 0.0
    return float((class_scores(model, images, device, batch_size).argmax(1) == labels).float().mean())


def build_model(name: str, cfg: dict, capsnet_params: int | None, backend: str) -> torch.nn.Module:
    if name == "capsnet":
        m = cfg["model"]
        return ct.CapsNet(image_size=CANVAS, conv_channels=m["conv_channels"], primary_caps=m["primary_caps"],
                          iterations=m["iterations"], init_std=0.01, backend=backend)  # the paper's init
    target = capsnet_params or count_parameters(build_model("capsnet", cfg, None, "torch"))
    return conv_baseline_matching(target, CANVAS, channels=tuple(cfg["cnn_channels"]))


def stop_reason(stopper, run: dict, cfg: dict) -> str:
    """What ended a model's training: the stopping rule's reason, else the budget or the steps."""
    if stopper.reason:
        return stopper.reason
    if run["reason"] == "time":
        return f"time budget ({cfg['time_budget']:.0f} s)"
    return f"--max-steps ({cfg['max_steps']})"


def run_model(name: str, cfg: dict, data: dict, device, args, target: float | None, capsnet_params: int | None,
              backend: str) -> dict:
    """Train one model with early stopping on the validation split; evaluate the kept weights."""
    torch.manual_seed(cfg["seed"])
    model = build_model(name, cfg, capsnet_params, backend).to(device)
    params = count_parameters(model)
    print(f"[{name}] {params:,} parameters" + (f"; keeps the evaluation closest to CapsNet's validation accuracy "
                                               f"{target:.4f}" if target is not None else ""), flush=True)
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
        kept = "kept" if target is not None else "best"
        print(f"[{name}] step {row['step']} ({row['epoch']:.2f} epochs, {row['seconds']:.0f} s): train loss "
              f"{row['train_loss']:.4f}, validation accuracy {row['val_acc']:.4f} ({kept} {row['best_val_acc']:.4f})",
              flush=True)

    capsnet_every = cfg["eval_every"] or steps_per_epoch
    if target is not None:  # the CNN's patience spans as many steps as CapsNet's
        patience = cfg["patience"] * max(1, round(capsnet_every / cfg["cnn_eval_every"]))
        stopper = ClosestToTarget(target, after=CNN_AFTER, patience=patience)
        eval_every = cfg["cnn_eval_every"]
    else:
        stopper, eval_every = training.EarlyStopping(patience=cfg["patience"]), capsnet_every
    loop = training.Loop(model, optimizer, training.make_step(loss_fn, optimizer), batches,
                         total_steps=cfg["max_steps"], seed=cfg["seed"] + (0 if name == "capsnet" else 1),
                         schedule=lambda step, elapsed: training.paper_lr(cfg["lr"], step),
                         time_budget=cfg["time_budget"], evaluate=evaluate, eval_every=eval_every,
                         early_stopping=stopper, score="val_acc", on_record=record, progress=not args.no_progress,
                         desc=name)
    run = loop.run()
    stopper.restore(model)
    result = {"parameters": params, "steps": run["steps"], "epochs": run["steps"] / steps_per_epoch,
              "train_seconds": run["seconds"], "stopped_by": stop_reason(stopper, run, cfg),
              "kept_step": stopper.best_step, "val_accuracy": stopper.best, "evaluations": len(loop.history),
              "clean_accuracy": accuracy(model, data["clean_x"], data["test_y"], device, args.eval_batch_size),
              "affine_accuracy": accuracy(model, data["affine_x"], data["affine_y"], device, args.eval_batch_size)}
    if target is not None:
        result["target_val_accuracy"], result["val_gap"] = target, stopper.best - target
    args_out = {**cfg, "kind": name}
    if name == "cnn":
        args_out["model"] = {"kind": "cnn", "channels": cfg["cnn_channels"],
                             "hidden": [model.classifier[1].out_features, model.classifier[3].out_features]}
    training.save_checkpoint(args.out_dir / name / "checkpoint.pt", model=model,
                             epoch=int(run["steps"] // steps_per_epoch), step=run["steps"], args=args_out,
                             history=loop.history, result=result)
    print(f"[{name}] stopped by {result['stopped_by']}; kept step {stopper.best_step}: validation {stopper.best:.4f}, "
          f"clean test {result['clean_accuracy']:.4f}, affine test {result['affine_accuracy']:.4f}", flush=True)
    return result


def load_test_sets(args, cfg: dict) -> tuple[dict, dict]:
    """MNIST, and the real affNIST test images when --affnist-dir is given (read and checked
    first: bad files end the run before anything is written)."""
    affnist = None
    if args.affnist_dir is not None:
        try:
            affnist = load_affnist_test(args.affnist_dir, cfg["affnist_images"])
        except (FileNotFoundError, DataIntegrityError) as e:
            raise SystemExit(f"--affnist-dir: {e}") from None
    try:
        mnist = training.load_classification_data(args.data_dir, "mnist", training.Distributed(),
                                                  download=not args.no_download)
    except SystemExit as e:  # the attempts on one line
        raise SystemExit(" ".join(str(e.code).split())) from None
    return mnist, affnist


def prepare_data(args, cfg: dict, device, mnist: dict, affnist: dict | None) -> dict:
    mnist = {k: v.cpu() for k, v in mnist.items()}
    val_idx, train_idx = held_out_split(mnist["train_x"].shape[0], cfg["val_size"], SPLIT_SEED)
    if args.train_subset:
        train_idx = train_idx[:args.train_subset]
    test_x, test_y = mnist["test_x"], mnist["test_y"]
    if cfg["test_digits"]:
        test_x, test_y = test_x[:cfg["test_digits"]], test_y[:cfg["test_digits"]]
    val_x, _ = random_placement(mnist["train_x"][val_idx], CANVAS, PAD_SHIFT,
                                torch.Generator().manual_seed(VAL_PLACEMENT_SEED))
    clean_x = translated_test_set(test_x, CANVAS, PAD_SHIFT)
    t0 = time.perf_counter()
    if affnist is not None:
        affine_x, affine_y = affnist["x"], affnist["y"]
        what = f"affNIST: the first {affine_x.shape[0]} images of {len(affnist['files'])} file(s) in {args.affnist_dir}"
    else:
        affine = affine_test_set(test_x, test_y, per_digit=cfg["per_digit"], seed=cfg["affine_seed"], canvas=CANVAS)
        affine_x, affine_y = affine["x"], affine["y"]
        what = (f"affNIST-style: {affine_x.shape[0]} images ({cfg['per_digit']} per digit, seed {cfg['affine_seed']}, "
                f"built in {time.perf_counter() - t0:.0f} s)")
    print(f"data: {len(train_idx)} training digits, {len(val_idx)} validation, {len(test_y)} clean test; affine "
          f"test set {what}", flush=True)
    shown = min(cfg["per_digit"], 3) if affnist is None else 1
    step = len(test_y) if affnist is None else 12
    figures.save_image_rows(args.out_dir / "affine_examples.png",
                            [center_on_canvas(test_x[:12], CANVAS) / 255.0, clean_x[:12] / 255.0]
                            + [affine_x[j * step:j * step + 12] / 255.0 for j in range(shown)],
                            ["centred", "clean test"] + [f"affine #{j + 1}" for j in range(shown)],
                            title="test digits: centred, randomly placed (clean test) and "
                                  + ("affNIST" if affnist is not None else "affNIST-style"))
    on = device if device.type == "cuda" else torch.device("cpu")
    return {"train_x": mnist["train_x"][train_idx].to(on), "train_y": mnist["train_y"][train_idx].to(on),
            "val_x": val_x, "val_y": mnist["train_y"][val_idx], "clean_x": clean_x, "test_y": test_y,
            "affine_x": affine_x, "affine_y": affine_y}


def affine_set_description(summary: dict) -> str:
    cfg = summary["config"]
    if cfg["affine_set"] == "affnist":
        return f"affNIST test files in {cfg['affnist_dir']} ({summary['affine_images']} images)"
    return (f"affNIST-style set, {summary['affine_images']} images ({cfg['per_digit']} per test digit, seed "
            f"{cfg['affine_seed']}; approximate affNIST ranges {cfg['affine_ranges']})")


def results_markdown(summary: dict) -> str:
    cfg = summary["config"]
    lines = [f"# Affine robustness ({cfg['mode']}, {cfg['device']})", "",
             "| model | parameters | steps (kept) | epochs | stopped by | validation | clean test (40x40) "
             "| affine test |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in summary["results"].items():
        lines.append(f"| {name} | {r['parameters']:,} | {r['steps']} ({r['kept_step']}) | {r['epochs']:.2f} | "
                     f"{r['stopped_by']} | {100 * r['val_accuracy']:.2f}% | {100 * r['clean_accuracy']:.2f}% | "
                     f"{100 * r['affine_accuracy']:.2f}% |")
    cnn = summary["results"].get("cnn", {})
    if "val_gap" in cnn:
        lines += ["", f"Validation accuracy side by side: CapsNet {100 * cnn['target_val_accuracy']:.2f}%, CNN "
                  f"{100 * cnn['val_accuracy']:.2f}% (the CNN's evaluation closest to CapsNet's, every "
                  f"{cfg['cnn_eval_every']} steps): gap {100 * cnn['val_gap']:+.2f} points."]
    lines += ["", f"Clean test: {summary['clean_images']} MNIST test digits at random positions on 40x40 (seed "
              f"{cfg['clean_seed']}). Affine test: {affine_set_description(summary)}.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = training.resolve_device(args.device)
    training.check_backend(args.backend, device)
    backend = args.backend
    cfg = resolve(args, device)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise SystemExit(f"--out-dir {args.out_dir}: exists and is not a folder")
    limits = f"at most {cfg['max_steps']} steps" + (f" or {cfg['time_budget']:.0f} s" if cfg["time_budget"] else "")
    affine = ("the real affNIST test files" if cfg["affine_set"] == "affnist"
              else f"{cfg['per_digit']} affNIST-style transformations of each")
    if cfg["mode"] == "cpu-demo":
        print(f"CPU demo mode: narrowed CapsNet (conv1 {cfg['model']['conv_channels']} channels, "
              f"{cfg['model']['primary_caps']} primary capsule types) and CNN (channels {cfg['cnn_channels']}), "
              f"each trained for {limits} (or until early stopping), {cfg['val_size']} validation digits, the "
              f"first {cfg['test_digits']} test digits and {affine}. Its numbers are not the paper's; run on a "
              "CUDA machine or pass --full for full size.", flush=True)
    else:
        print(f"full run: each model trained for {limits} (or until early stopping); affine test: {affine}",
              flush=True)
    print("config: " + json.dumps(cfg), flush=True)
    t0 = time.perf_counter()
    mnist, affnist = load_test_sets(args, cfg)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, cfg, device, mnist, affnist)
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
    run_cli(main)
