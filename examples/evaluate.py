#!/usr/bin/env python
"""Evaluation report of a checkpoint written by any training script.

    python examples/evaluate.py runs/mnist/checkpoint.pt                  # -> runs/mnist/report/
    python examples/evaluate.py runs/affine/capsnet/checkpoint.pt --affnist-dir affNIST/transformed
    python examples/evaluate.py runs/multimnist/checkpoint.pt --pairs-per-digit 1000 --device cuda
    python examples/evaluate.py CHECKPOINT --out-dir report --device cpu

What is scored depends on the script that wrote the checkpoint (its recorded configuration):
  * train_mnist.py (CapsNet or Efficient-CapsNet; MNIST or Fashion-MNIST): the test set
    (models for larger inputs see the digits centred on their canvas);
  * train_affine.py (CapsNet or the CNN): the clean test set (the test digits at random
    positions on 40x40, as in training) and the affNIST-style set of capstriton.data.affine
    (--per-digit transformations of each test digit, seed --affine-seed), or the real affNIST
    test files with --affnist-dir;
  * train_multimnist.py: the paper's MultiMNIST test protocol (each of the first --test-subset
    test digits is the first digit of --pairs-per-digit pairs, generated in seeded chunks and
    streamed): the top-2 pair error with 95% confidence intervals, the confusion of the two
    predicted classes and the paper's Figure 5.
Unset protocol flags take the values the training run used (recorded in the checkpoint), so
the report reproduces the run's test numbers.  The architecture is read off the weights, the
routing settings off the recorded configuration.  A checkpoint it cannot score, or bad input,
ends with a one-line error before anything is written.

Writes into --out-dir: summary.json and report.md; for classifiers confusion_matrix*.png and,
for capsule models, capsule_lengths.png, the reconstructions (reconstructions_correct.png,
reconstructions_misclassified.png, most_confident_errors.png) and perturbations_<k>.png (the
paper's Figure 4: each dimension of the predicted capsule moved over [-0.25, 0.25] in steps of
0.05 and decoded); for MultiMNIST pair_confusion.png, multimnist_reconstructions.png and
multimnist_errors.png.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from capstriton.data import (  # noqa: E402
    AFFINE_SEED,
    MULTIMNIST_TEST_SEED,
    TRANSLATION_SHIFT,
    DataIntegrityError,
    DataUnavailableError,
    affine_test_set,
    center_on_canvas,
    default_data_dir,
    load_affnist_test,
    mnist_tensors,
    multimnist_pairs,
    translated_test_set,
)
from capstriton.experiments.evaluation import experiment_of, model_from_checkpoint  # noqa: E402
from capstriton.experiments.multimnist import evaluate_pairs  # noqa: E402
from capstriton.experiments.report import evaluation_report, multimnist_report  # noqa: E402
from capstriton.training.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from capstriton.training.cli import (  # noqa: E402
    DATA_DIR_HELP,
    NO_DOWNLOAD_HELP,
    HelpFormatter,
    require_positive,
    resolve_device,
    run_cli,
)
from capstriton.training.recipes import MULTIMNIST_CPU_DEMO, MULTIMNIST_FULL  # noqa: E402

AFFINE_FLAGS = ("per_digit", "affine_seed", "affnist_dir", "affnist_images")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by a training script")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the report goes (default: the folder 'report' next to the checkpoint)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="capsule ops: triton kernels or plain PyTorch; auto = triton on CUDA, PyTorch otherwise")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default=None,
                   help="test set of a train_mnist.py checkpoint (default: the dataset the checkpoint records, "
                        "else mnist)")
    p.add_argument("--data-dir", type=Path, default=None, help=DATA_DIR_HELP)
    p.add_argument("--no-download", action="store_true", help=NO_DOWNLOAD_HELP)
    p.add_argument("--batch-size", type=int, default=500, help="images per evaluation batch")
    p.add_argument("--test-subset", type=int, default=None,
                   help="only the first N test digits (default: the number the training run scored, recorded in "
                        "the checkpoint; all 10,000 for train_mnist.py checkpoints)")
    p.add_argument("--per-digit", type=int, default=None,
                   help="affine checkpoints: affNIST-style transformations per test digit (default: the run's; "
                        "affNIST has 32)")
    p.add_argument("--affine-seed", type=int, default=None,
                   help=f"affine checkpoints: seed of the affNIST-style set (default: the run's, else {AFFINE_SEED})")
    p.add_argument("--affnist-dir", type=Path, default=None,
                   help="affine checkpoints: score the real affNIST test files in this folder (test.mat or "
                        "test_batches/1.mat ... 32.mat; never downloaded) instead of the affNIST-style set "
                        "(default: the affNIST-style set)")
    p.add_argument("--affnist-images", type=int, default=None,
                   help="with --affnist-dir: only the first N affNIST images (default: all in the files)")
    p.add_argument("--pairs-per-digit", type=int, default=None,
                   help="MultiMNIST checkpoints: pairs per test digit (default: the run's; the paper: "
                        f"{MULTIMNIST_FULL['pairs_per_digit']})")
    p.add_argument("--examples", type=int, default=16, help="images per figure row")
    p.add_argument("--perturbed", type=int, default=3, help="digits (of different classes) in perturbation grids")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    require_positive(p, args, ints=("batch_size", "test_subset", "examples", "perturbed", "threads", "per_digit",
                                    "affnist_images", "pairs_per_digit"))
    if args.affnist_images is not None and args.affnist_dir is None:
        p.error("--affnist-images needs --affnist-dir")
    return args


def _flags_given(args, names) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) is not None]


def check_flags(args, experiment: str) -> None:
    """SystemExit when a flag does not apply to this kind of checkpoint."""
    wrong = []
    if experiment != "classification":
        wrong += _flags_given(args, ("dataset",))
    if experiment != "affine":
        wrong += _flags_given(args, AFFINE_FLAGS)
    if experiment != "multimnist":
        wrong += _flags_given(args, ("pairs_per_digit",))
    if wrong:
        raise SystemExit(f"{wrong[0]}: does not apply to {args.checkpoint}, a {experiment} checkpoint")


def load_model(args, state: dict, device):
    try:
        model, cfg = model_from_checkpoint(state, backend=args.backend)
    except ValueError as e:
        raise SystemExit(f"{args.checkpoint}: cannot score this checkpoint: {e}") from None
    if cfg["in_channels"] != 1:
        raise SystemExit(f"{args.checkpoint}: cannot score this checkpoint: the reports cover single-channel "
                         f"(MNIST-like) models, this one takes {cfg['in_channels']} channels")
    return model.to(device), cfg


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    try:
        state = load_checkpoint(args.checkpoint, map_location="cpu")
    except (FileNotFoundError, CheckpointError) as e:
        raise SystemExit(str(e)) from None
    recorded = state.get("args") or {}
    experiment = experiment_of(recorded)
    check_flags(args, experiment)
    model, cfg = load_model(args, state, device)
    if experiment == "multimnist" and cfg["arch"] != "capsnet":
        raise SystemExit(f"{args.checkpoint}: cannot score this checkpoint: MultiMNIST needs a CapsNet, "
                         f"it holds a {cfg['arch']}")
    out = args.out_dir or args.checkpoint.resolve().parent / "report"
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out-dir {out}: exists and is not a folder")
    affnist = None
    if args.affnist_dir is not None:
        try:
            affnist = load_affnist_test(args.affnist_dir, args.affnist_images)
        except (FileNotFoundError, DataIntegrityError) as e:
            raise SystemExit(f"--affnist-dir: {e}") from None
    dataset = "mnist" if experiment != "classification" else args.dataset or recorded.get("dataset", "mnist")
    try:
        data = mnist_tensors(args.data_dir or default_data_dir(), download=not args.no_download, dataset=dataset)
    except DataUnavailableError as e:
        raise SystemExit(str(e).replace("\n", " ")) from None
    run = {"multimnist": multimnist, "affine": affine}.get(experiment, classification)
    summary = run(args, state, recorded, model, cfg, data, device, out, t0, affnist)
    print(f"report in {out}/", flush=True)
    return summary


def classification(args, state, recorded, model, cfg, data, device, out, t0, affnist) -> dict:
    dataset = args.dataset or recorded.get("dataset", "mnist")
    images, labels = data["test_x"], data["test_y"]
    if args.test_subset:
        images, labels = images[:args.test_subset], labels[:args.test_subset]
    centred = cfg["image_size"] != images.shape[-1]
    if centred:
        images = center_on_canvas(images, cfg["image_size"])
    where = f" centred on {cfg['image_size']}x{cfg['image_size']}" if centred else ""
    print(f"evaluating {args.checkpoint} ({cfg}) on {len(labels)} {dataset} test images{where} on {device}", flush=True)
    summary = evaluation_report(model, cfg, images, labels, out, device, checkpoint=str(args.checkpoint),
                                dataset=dataset, centred=centred, description=f"{dataset} test images{where}",
                                batch_size=args.batch_size, examples=args.examples, perturbed=args.perturbed,
                                training_mode=recorded.get("mode"), epoch=state.get("epoch"), started=t0)
    print(f"test error {100 * summary['test_error']:.2f}% on {len(labels)} images", flush=True)
    return summary


def affine(args, state, recorded, model, cfg, data, device, out, t0, affnist) -> dict:
    digits = args.test_subset or recorded.get("test_digits") or data["test_x"].shape[0]
    test_x, test_y = data["test_x"][:digits], data["test_y"][:digits]
    side, shift = cfg["image_size"], recorded.get("shift", TRANSLATION_SHIFT)
    clean = translated_test_set(test_x, side, shift)
    clean_desc = (f"the first {len(test_y)} MNIST test digits at random positions on {side}x{side} "
                  f"(shifts up to {shift})")
    if affnist is not None:
        extra = {"affnist": {"x": affnist["x"], "y": affnist["y"],
                             "description": f"affNIST test files ({affnist['x'].shape[0]} images from "
                                            f"{args.affnist_dir})"}}
    else:
        per_digit = args.per_digit or recorded.get("per_digit", 32)
        seed = args.affine_seed if args.affine_seed is not None else recorded.get("affine_seed", AFFINE_SEED)
        generated = affine_test_set(test_x, test_y, per_digit=per_digit, seed=seed, canvas=side)
        extra = {"affine": {"x": generated["x"], "y": generated["y"],
                            "description": f"affNIST-style set ({per_digit} transformations of each of the "
                                           f"{len(test_y)} digits, seed {seed}; approximate affNIST ranges)"}}
    name = next(iter(extra))
    print(f"evaluating {args.checkpoint} ({cfg}) on {clean_desc} and the {extra[name]['description']} on {device}",
          flush=True)
    summary = evaluation_report(model, cfg, clean, test_y, out, device, checkpoint=str(args.checkpoint),
                                dataset="mnist", centred=False, description=clean_desc, extra_sets=extra,
                                batch_size=args.batch_size, examples=args.examples, perturbed=args.perturbed,
                                training_mode=recorded.get("mode"), epoch=state.get("epoch"), started=t0)
    t = summary["test_sets"]
    print(f"clean test accuracy {100 * t['test']['accuracy']:.2f}%, {name} accuracy {100 * t[name]['accuracy']:.2f}%",
          flush=True)
    return summary


def multimnist(args, state, recorded, model, cfg, data, device, out, t0, affnist) -> dict:
    base = MULTIMNIST_FULL if device.type == "cuda" else MULTIMNIST_CPU_DEMO
    digits = args.test_subset or recorded.get("test_digits") or base["test_digits"]
    digits = min(digits, data["test_x"].shape[0])
    k = args.pairs_per_digit or recorded.get("pairs_per_digit") or base["pairs_per_digit"]
    seed = recorded.get("test_seed", MULTIMNIST_TEST_SEED)
    print(f"evaluating {args.checkpoint} ({cfg}) on the MultiMNIST test protocol: each of the first {digits} test "
          f"digits the first of {k} pairs ({digits * k} pairs, seed {seed}) on {device}", flush=True)
    chunks = multimnist_pairs(data["test_x"], data["test_y"], k, seed, digits=digits)
    result = evaluate_pairs(model, chunks, device, digits, args.batch_size, keep=args.examples)
    summary = multimnist_report(model, cfg, result, out, device, checkpoint=str(args.checkpoint),
                                protocol={"digits": digits, "pairs_per_digit": k, "seed": seed},
                                training_mode=recorded.get("mode"), started=t0)
    e = summary["pair_error"]
    print(f"pair error {100 * e['value']:.2f}% on {result['pairs']} pairs (95% interval "
          f"{100 * e['bootstrap_95'][0]:.2f}-{100 * e['bootstrap_95'][1]:.2f}%, bootstrap over base digits)",
          flush=True)
    return summary


if __name__ == "__main__":
    run_cli(main)
