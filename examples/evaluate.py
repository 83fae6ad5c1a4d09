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
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from capstriton import figures  # noqa: E402
from capstriton._io import atomic_write  # noqa: E402
from capstriton.checkpoint import load_checkpoint  # noqa: E402
from capstriton.data import DataUnavailableError, center_on_canvas, default_data_dir, mnist_tensors  # noqa: E402
from capstriton.decoding import decode_perturbations, perturbation_deltas  # noqa: E402
from capstriton.evaluation import as_model_input, capsnet_from_checkpoint, confusion_matrix, predict  # noqa: E402
from capstriton.training import require_positive, resolve_device  # noqa: E402


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


@torch.no_grad()
def reconstruct(model, images_u8: torch.Tensor, device) -> torch.Tensor:
    """Reconstructions from the longest capsule, (n, H, W) on the CPU."""
    if images_u8.shape[0] == 0:
        return images_u8.float()
    _, recon, _ = model(as_model_input(images_u8.to(device)))
    return recon.float().cpu().view(images_u8.shape)


def input_recon_rows(model, images, idx, device):
    chosen = images[idx]
    return [chosen.float() / 255.0, reconstruct(model, chosen, device)]


def write_figures(model, out: Path, images, labels, lengths, capsules, pred, device, args) -> dict:
    """Every PNG of the report; returns the facts the summary needs about them."""
    K = lengths.shape[1]
    n = args.examples
    correct = (pred == labels).nonzero().squeeze(1)
    wrong = (pred != labels).nonzero().squeeze(1)
    conf = lengths.max(1).values
    files, facts = [], {}

    figures.save_confusion_matrix(out / "confusion_matrix.png", confusion_matrix(pred, labels, K))
    files.append("confusion_matrix.png")
    for name, idx in (("correct", correct[:n]), ("misclassified", wrong[:n])):
        if idx.numel():
            tags = [f"{int(labels[i])}->{int(pred[i])}" for i in idx]
            figures.save_image_rows(out / f"reconstructions_{name}.png", input_recon_rows(model, images, idx, device),
                                    ["input", "reconstruction"], tags,
                                    f"{name} test digits (true->predicted) and their reconstructions")
            files.append(f"reconstructions_{name}.png")
    worst = wrong[conf[wrong].argsort(descending=True)][:n]
    facts["most_confident_errors"] = [{"index": int(i), "true": int(labels[i]), "predicted": int(pred[i]),
                                       "length": round(float(conf[i]), 4)} for i in worst]
    if worst.numel():
        tags = [f"{int(labels[i])}->{int(pred[i])}\n{float(conf[i]):.2f}" for i in worst]
        figures.save_image_rows(out / "most_confident_errors.png", input_recon_rows(model, images, worst, device),
                                ["input", "reconstruction"], tags,
                                "most confidently misclassified (true->predicted, capsule length)")
        files.append("most_confident_errors.png")

    rows = torch.arange(len(labels))
    others = torch.ones_like(lengths, dtype=torch.bool)
    others[rows, labels] = False
    figures.save_histogram(out / "capsule_lengths.png",
                           {"true class": lengths[rows, labels], "other classes": lengths[others]},
                           "capsule length", "digit capsule lengths on the test set")
    files.append("capsule_lengths.png")

    deltas = perturbation_deltas(0.25, 0.05)
    picked, seen = [], set()
    for i in correct.tolist():
        if int(labels[i]) not in seen:
            seen.add(int(labels[i]))
            picked.append(i)
        if len(picked) == args.perturbed:
            break
    side = images.shape[-1]
    for i in picked:
        grid = decode_perturbations(model, capsules[i].to(device), int(pred[i]), deltas).float().cpu()
        name = f"perturbations_{i}.png"
        figures.save_image_rows(out / name, list(grid.view(grid.shape[0], len(deltas), side, side)),
                                [f"dim {d}" for d in range(grid.shape[0])], [f"{round(float(t), 2) + 0.0:+.2f}" for t in deltas],
                                f"test digit {i} (class {int(labels[i])}): one capsule dimension moved per row", cell=0.5)
        files.append(name)
    facts["perturbed_digits"] = picked
    facts["files"] = files
    return facts


def markdown(summary: dict) -> str:
    side = summary["model"]["image_size"]
    centred = f" (centred on {side}x{side})" if summary["centred"] else ""
    lines = [f"# Evaluation of `{summary['checkpoint']}`", "",
             f"CapsNet {summary['model']} ({summary['parameters']:,} parameters), {summary['dataset']}, "
             f"{summary['test_images']} test images{centred}, device {summary['device']}.", "",
             f"**Test error: {100 * summary['test_error']:.2f}%** ({summary['misclassified']} misclassified; "
             f"accuracy {100 * summary['accuracy']:.2f}%).", "",
             "| class | " + " | ".join(str(k) for k in range(len(summary["per_class_accuracy"]))) + " |",
             "|---|" + "---|" * len(summary["per_class_accuracy"]),
             "| accuracy (%) | " + " | ".join(f"{100 * a:.2f}" for a in summary["per_class_accuracy"]) + " |", "",
             "## Most confidently misclassified", "", "| test index | true | predicted | capsule length |",
             "|---|---|---|---|"]
    lines += [f"| {e['index']} | {e['true']} | {e['predicted']} | {e['length']:.3f} |"
              for e in summary["most_confident_errors"]]
    lines += ["", "## Figures", ""]
    lines += [f"![{f}]({f})" for f in summary["files"]]
    lines += ["", "Perturbation grids: each row moves one of the predicted capsule's dimensions by "
              f"{summary['perturbation']['deltas']} and decodes it (the paper's Figure 4)."]
    return "\n".join(lines) + "\n"


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

    lengths, capsules = predict(model, images, device, args.batch_size)
    pred = lengths.argmax(1)
    K = lengths.shape[1]
    per_class = [float((pred[labels == k] == k).float().mean()) if bool((labels == k).any()) else float("nan")
                 for k in range(K)]
    accuracy = float((pred == labels).float().mean())
    cm = confusion_matrix(pred, labels, K)
    summary = {"checkpoint": str(args.checkpoint), "model": cfg,
               "parameters": sum(p.numel() for p in model.parameters()), "dataset": dataset,
               "test_images": len(labels), "centred": centred, "device": str(device), "accuracy": accuracy,
               "test_error": 1.0 - accuracy, "misclassified": int((pred != labels).sum()),
               "per_class_accuracy": per_class, "confusion_matrix": cm.tolist(),
               "capsule_length_mean": {"true_class": float(lengths[torch.arange(len(labels)), labels].mean()),
                                       "all": float(lengths.mean())},
               "perturbation": {"deltas": [round(float(d), 2) for d in perturbation_deltas(0.25, 0.05)],
                                "dimensions": capsules.shape[-1]},
               "training_mode": recorded.get("mode"), "epoch": state.get("epoch")}
    if cfg["decoder"]:
        summary.update(write_figures(model, out, images, labels, lengths, capsules, pred, device, args))
    else:
        summary.update({"files": [], "most_confident_errors": [], "perturbed_digits": []})
        print("this model has no decoder: no reconstruction or perturbation figures", flush=True)
    summary["seconds"] = time.perf_counter() - t0
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "summary.json", lambda f: f.write(text.encode()))
    md = markdown(summary)
    atomic_write(out / "report.md", lambda f: f.write(md.encode()))
    print(f"test error {100 * summary['test_error']:.2f}% on {len(labels)} images; report in {out}/", flush=True)
    return summary


if __name__ == "__main__":
    main()
