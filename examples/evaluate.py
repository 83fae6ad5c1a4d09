#!/usr/bin/env python
"""Evaluation report of a trained CapsNet checkpoint.

    python examples/evaluate.py runs/mnist/checkpoint.pt                 # -> runs/mnist/report/
    python examples/evaluate.py CHECKPOINT --out-dir report --device cpu

Works for the checkpoints of the training scripts (full-size or the CPU demo's narrow model;
28x28 models see the test digits as they are, larger models see them centred on their canvas).
The architecture is read off the weights, the routing settings off the recorded configuration.

Writes into --out-dir: summary.json and report.md (test error, per-class accuracy, most
confidently misclassified digits), confusion_matrix.png, reconstructions_correct.png and
reconstructions_misclassified.png (inputs above their reconstructions from the longest
capsule), most_confident_errors.png, capsule_lengths.png (histogram) and
perturbations_<k>.png (the paper's Figure 4: each of the 16 dimensions of the predicted
capsule moved over [-0.25, 0.25] in steps of 0.05 and decoded).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from capstriton.data import DataUnavailableError, center_on_canvas, default_data_dir, mnist_tensors  # noqa: E402
from capstriton.experiments.evaluation import capsnet_from_checkpoint  # noqa: E402
from capstriton.experiments.report import evaluation_report  # noqa: E402
from capstriton.training.checkpoint import load_checkpoint  # noqa: E402
from capstriton.training.cli import require_positive, resolve_device  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by a training script")
    p.add_argument("--out-dir", type=Path, default=None, help="default: <checkpoint folder>/report")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default=None,
                   help="default: the dataset recorded in the checkpoint (else mnist)")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--test-subset", type=int, default=None, help="only the first N test images")
    p.add_argument("--examples", type=int, default=16, help="images per figure row")
    p.add_argument("--perturbed", type=int, default=3, help="digits (of different classes) in perturbation grids")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    require_positive(p, args, ints=("batch_size", "test_subset", "examples", "perturbed", "threads"))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint, map_location="cpu")
    try:
        model, cfg = capsnet_from_checkpoint(state, backend=args.backend)
    except ValueError as e:
        raise SystemExit(f"{args.checkpoint}: {e}") from None
    model.to(device)
    if cfg["in_channels"] != 1:
        raise SystemExit(f"{args.checkpoint}: the report covers single-channel (MNIST-like) models, "
                         f"this one takes {cfg['in_channels']} channels")
    recorded = state.get("args", {}) or {}
    dataset = args.dataset or recorded.get("dataset", "mnist")
    out = args.out_dir or args.checkpoint.resolve().parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    try:
        data = mnist_tensors(args.data_dir or default_data_dir(), download=not args.no_download, dataset=dataset)
    except DataUnavailableError as e:
        raise SystemExit(str(e)) from None
    images, labels = data["test_x"], data["test_y"]
    if args.test_subset:
        images, labels = images[:args.test_subset], labels[:args.test_subset]
    centred = cfg["image_size"] != images.shape[-1]
    if centred:
        images = center_on_canvas(images, cfg["image_size"])
    print(f"evaluating {args.checkpoint} ({cfg}) on {len(labels)} {dataset} test images on {device}", flush=True)
    summary = evaluation_report(model, cfg, images, labels, out, device, checkpoint=str(args.checkpoint),
                                dataset=dataset, centred=centred, batch_size=args.batch_size,
                                examples=args.examples, perturbed=args.perturbed,
                                training_mode=recorded.get("mode"), epoch=state.get("epoch"), started=t0)
    print(f"test error {100 * summary['test_error']:.2f}% on {len(labels)} images; report in {out}/", flush=True)
    return summary


if __name__ == "__main__":
    main()
