"""The evaluation report of a trained CapsNet: test error, per-class accuracy, confusion matrix,
reconstructions, the most confident errors, capsule lengths and the paper's Figure 4
(perturbed capsule dimensions), written as summary.json, report.md and PNG figures."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from ..data import as_model_input
from ..files import atomic_write
from . import figures
from .decoding import decode_perturbations, perturbation_deltas
from .evaluation import confusion_matrix, predict

__all__ = ["evaluation_report", "write_figures", "markdown", "reconstruct"]


def _say(line: str) -> None:
    print(line, flush=True)


@torch.no_grad()
def reconstruct(model, images_u8: torch.Tensor, device) -> torch.Tensor:
    """Reconstructions from the longest capsule, (n, H, W) on the CPU."""
    if images_u8.shape[0] == 0:
        return images_u8.float()
    _, recon, _ = model(as_model_input(images_u8.to(device)))
    return recon.float().cpu().view(images_u8.shape)


def _input_recon_rows(model, images, idx, device):
    chosen = images[idx]
    return [chosen.float() / 255.0, reconstruct(model, chosen, device)]


def write_figures(model, out: Path, images, labels, lengths, capsules, pred, device, examples: int = 16,
                  perturbed: int = 3) -> dict:
    """Every PNG of the report (``examples`` images per row, ``perturbed`` digits of different
    classes in perturbation grids); returns the facts the summary needs about them."""
    K = lengths.shape[1]
    n = examples
    correct = (pred == labels).nonzero().squeeze(1)
    wrong = (pred != labels).nonzero().squeeze(1)
    conf = lengths.max(1).values
    files, facts = [], {}

    figures.save_confusion_matrix(out / "confusion_matrix.png", confusion_matrix(pred, labels, K))
    files.append("confusion_matrix.png")
    for name, idx in (("correct", correct[:n]), ("misclassified", wrong[:n])):
        if idx.numel():
            tags = [f"{int(labels[i])}->{int(pred[i])}" for i in idx]
            figures.save_image_rows(out / f"reconstructions_{name}.png", _input_recon_rows(model, images, idx, device),
                                    ["input", "reconstruction"], tags,
                                    f"{name} test digits (true->predicted) and their reconstructions")
            files.append(f"reconstructions_{name}.png")
    worst = wrong[conf[wrong].argsort(descending=True)][:n]
    facts["most_confident_errors"] = [{"index": int(i), "true": int(labels[i]), "predicted": int(pred[i]),
                                       "length": round(float(conf[i]), 4)} for i in worst]
    if worst.numel():
        tags = [f"{int(labels[i])}->{int(pred[i])}\n{float(conf[i]):.2f}" for i in worst]
        figures.save_image_rows(out / "most_confident_errors.png", _input_recon_rows(model, images, worst, device),
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
        if len(picked) == perturbed:
            break
    side = images.shape[-1]
    for i in picked:
        grid = decode_perturbations(model, capsules[i].to(device), int(pred[i]), deltas).float().cpu()
        name = f"perturbations_{i}.png"
        figures.save_image_rows(out / name, list(grid.view(grid.shape[0], len(deltas), side, side)),
                                [f"dim {d}" for d in range(grid.shape[0])],
                                [f"{round(float(t), 2) + 0.0:+.2f}" for t in deltas],
                                f"test digit {i} (class {int(labels[i])}): one capsule dimension moved per row",
                                cell=0.5)
        files.append(name)
    facts["perturbed_digits"] = picked
    facts["files"] = files
    return facts


def markdown(summary: dict) -> str:
    """report.md from the summary."""
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


def evaluation_report(model, cfg: dict, images: torch.Tensor, labels: torch.Tensor, out: Path, device, *,
                      checkpoint: str, dataset: str, centred: bool, batch_size: int = 500, examples: int = 16,
                      perturbed: int = 3, training_mode: str | None = None, epoch: int | None = None,
                      started: float | None = None, log: Callable[[str], None] = _say) -> dict:
    """Evaluate ``model`` (built from a checkpoint, config ``cfg``) on uint8 test ``images`` and
    their ``labels``; write summary.json, report.md and the figures (those need a decoder) into
    ``out``.  ``started``: the perf_counter time the summary's seconds count from."""
    started = time.perf_counter() if started is None else started
    lengths, capsules = predict(model, images, device, batch_size)
    pred = lengths.argmax(1)
    K = lengths.shape[1]
    per_class = [float((pred[labels == k] == k).float().mean()) if bool((labels == k).any()) else float("nan")
                 for k in range(K)]
    accuracy = float((pred == labels).float().mean())
    cm = confusion_matrix(pred, labels, K)
    summary = {"checkpoint": str(checkpoint), "model": cfg,
               "parameters": sum(p.numel() for p in model.parameters()), "dataset": dataset,
               "test_images": len(labels), "centred": centred, "device": str(device), "accuracy": accuracy,
               "test_error": 1.0 - accuracy, "misclassified": int((pred != labels).sum()),
               "per_class_accuracy": per_class, "confusion_matrix": cm.tolist(),
               "capsule_length_mean": {"true_class": float(lengths[torch.arange(len(labels)), labels].mean()),
                                       "all": float(lengths.mean())},
               "perturbation": {"deltas": [round(float(d), 2) for d in perturbation_deltas(0.25, 0.05)],
                                "dimensions": capsules.shape[-1]},
               "training_mode": training_mode, "epoch": epoch}
    out.mkdir(parents=True, exist_ok=True)
    if cfg["decoder"]:
        summary.update(write_figures(model, out, images, labels, lengths, capsules, pred, device, examples,
                                     perturbed))
    else:
        summary.update({"files": [], "most_confident_errors": [], "perturbed_digits": []})
        log("this model has no decoder: no reconstruction or perturbation figures")
    summary["seconds"] = time.perf_counter() - started
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "summary.json", lambda f: f.write(text.encode()))
    md = markdown(summary)
    atomic_write(out / "report.md", lambda f: f.write(md.encode()))
    return summary
