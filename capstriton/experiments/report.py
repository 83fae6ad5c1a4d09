"""The evaluation reports of trained models, written as summary.json, report.md and PNG figures.

* ``evaluation_report``: a classifier (CapsNet, Efficient-CapsNet or the CNN) on a test set:
  test error, per-class accuracy, confusion matrix and, for capsule models, the most confident
  errors, capsule lengths, reconstructions and the paper's Figure 4 (perturbed capsule
  dimensions); further test sets (the affine experiment's) scored alongside.
* ``multimnist_report``: a CapsNet on the MultiMNIST test protocol: top-2 pair error with 95%
  confidence intervals, the confusion of the predicted classes and the paper's Figure 5
  (each digit reconstructed from its own capsule).

Every number is computed before anything is written; each file is written atomically."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from ..data import as_model_input
from ..files import atomic_write
from . import figures
from .decoding import decode_capsule, decode_perturbations, perturbation_deltas
from .evaluation import class_scores, classification_scores, predict
from .multimnist import bootstrap_interval, wilson_interval

__all__ = ["evaluation_report", "write_figures", "markdown", "reconstruct", "multimnist_report",
           "write_pair_figures", "multimnist_markdown"]


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
                  perturbed: int = 3, decoder: bool = True) -> dict:
    """The capsule figures of the report (``examples`` images per row, ``perturbed`` digits of
    different classes in perturbation grids; reconstructions only with a ``decoder``); returns
    the facts the summary needs about them."""
    n = examples
    wrong = (pred != labels).nonzero().squeeze(1)
    correct = (pred == labels).nonzero().squeeze(1)
    conf = lengths.max(1).values
    files, facts = [], {}
    worst = wrong[conf[wrong].argsort(descending=True)][:n]
    facts["most_confident_errors"] = [{"index": int(i), "true": int(labels[i]), "predicted": int(pred[i]),
                                       "length": round(float(conf[i]), 4)} for i in worst]
    rows = torch.arange(len(labels))
    others = torch.ones_like(lengths, dtype=torch.bool)
    others[rows, labels] = False
    figures.save_histogram(out / "capsule_lengths.png",
                           {"true class": lengths[rows, labels], "other classes": lengths[others]},
                           "capsule length", "digit capsule lengths on the test set")
    files.append("capsule_lengths.png")
    facts["perturbed_digits"] = []
    if not decoder:
        facts["files"] = files
        return facts
    for name, idx in (("correct", correct[:n]), ("misclassified", wrong[:n])):
        if idx.numel():
            tags = [f"{int(labels[i])}->{int(pred[i])}" for i in idx]
            figures.save_image_rows(out / f"reconstructions_{name}.png", _input_recon_rows(model, images, idx, device),
                                    ["input", "reconstruction"], tags,
                                    f"{name} test digits (true->predicted) and their reconstructions")
            files.append(f"reconstructions_{name}.png")
    if worst.numel():
        tags = [f"{int(labels[i])}->{int(pred[i])}\n{float(conf[i]):.2f}" for i in worst]
        figures.save_image_rows(out / "most_confident_errors.png", _input_recon_rows(model, images, worst, device),
                                ["input", "reconstruction"], tags,
                                "most confidently misclassified (true->predicted, capsule length)")
        files.append("most_confident_errors.png")
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


def _class_table(scores: dict) -> list[str]:
    k = len(scores["per_class_accuracy"])
    return ["| class | " + " | ".join(str(c) for c in range(k)) + " |", "|---|" + "---|" * k,
            "| accuracy (%) | " + " | ".join(f"{100 * a:.2f}" for a in scores["per_class_accuracy"]) + " |"]


def markdown(summary: dict) -> str:
    """report.md from the summary."""
    model = summary["model"]
    lines = [f"# Evaluation of `{summary['checkpoint']}`", "",
             f"{model.get('arch', 'capsnet')} {model} ({summary['parameters']:,} parameters), device "
             f"{summary['device']}.", "",
             f"**Test error: {100 * summary['test_error']:.2f}%** ({summary['misclassified']} misclassified; accuracy "
             f"{100 * summary['accuracy']:.2f}%) on {summary['test_sets']['test']['description']}.", "",
             "| test set | images | test error | accuracy |", "|---|---|---|---|"]
    for name, t in summary["test_sets"].items():
        lines.append(f"| {name}: {t['description']} | {t['images']:,} | **{100 * t['test_error']:.2f}%** | "
                     f"{100 * t['accuracy']:.2f}% |")
    for name, t in summary["test_sets"].items():
        lines += ["", f"## Per-class accuracy: {name}", ""] + _class_table(t)
    if summary["most_confident_errors"]:
        lines += ["", "## Most confidently misclassified", "", "| test index | true | predicted | capsule length |",
                  "|---|---|---|---|"]
        lines += [f"| {e['index']} | {e['true']} | {e['predicted']} | {e['length']:.3f} |"
                  for e in summary["most_confident_errors"]]
    lines += ["", "## Figures", ""]
    lines += [f"![{f}]({f})" for f in summary["files"]]
    if summary["perturbed_digits"]:
        lines += ["", "Perturbation grids: each row moves one of the predicted capsule's dimensions by "
                  f"{summary['perturbation']['deltas']} and decodes it (the paper's Figure 4)."]
    return "\n".join(lines) + "\n"


def _write_summary(out: Path, summary: dict, md: str) -> None:
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "summary.json", lambda f: f.write(text.encode()))
    atomic_write(out / "report.md", lambda f: f.write(md.encode()))


def evaluation_report(model, cfg: dict, images: torch.Tensor, labels: torch.Tensor, out: Path, device, *,
                      checkpoint: str, dataset: str, centred: bool, description: str | None = None,
                      extra_sets: dict | None = None, batch_size: int = 500, examples: int = 16,
                      perturbed: int = 3, training_mode: str | None = None, epoch: int | None = None,
                      started: float | None = None, log: Callable[[str], None] = _say) -> dict:
    """Evaluate ``model`` (built from a checkpoint, config ``cfg``; a capsule model unless
    ``cfg["arch"]`` is "cnn") on uint8 test ``images`` and their ``labels`` (the "test" set, of
    the figures) and on ``extra_sets`` ({name: {"x", "y", "description"}}, scored alike); then
    write summary.json, report.md and the figures into ``out``.  ``started``: the perf_counter
    time the summary's seconds count from."""
    started = time.perf_counter() if started is None else started
    capsule = cfg.get("arch", "capsnet") != "cnn"
    if capsule:
        lengths, capsules = predict(model, images, device, batch_size)
    else:
        lengths, capsules = class_scores(model, images, device, batch_size), None
    K = lengths.shape[1]
    pred = lengths.argmax(1)
    sets = {"test": {"description": description or dataset, **classification_scores(pred, labels, K)}}
    for name, extra in (extra_sets or {}).items():
        extra_pred = class_scores(model, extra["x"], device, batch_size).argmax(1)
        sets[name] = {"description": extra["description"], **classification_scores(extra_pred, extra["y"], K)}
    main = sets["test"]
    summary = {"checkpoint": str(checkpoint), "model": cfg,
               "parameters": sum(p.numel() for p in model.parameters()), "dataset": dataset,
               "test_images": len(labels), "centred": centred, "device": str(device),
               **{k: main[k] for k in ("accuracy", "test_error", "misclassified", "per_class_accuracy",
                                       "confusion_matrix")},
               "test_sets": sets, "training_mode": training_mode, "epoch": epoch}
    if capsule:
        summary["capsule_length_mean"] = {"true_class": float(lengths[torch.arange(len(labels)), labels].mean()),
                                          "all": float(lengths.mean())}
        summary["perturbation"] = {"deltas": [round(float(d), 2) for d in perturbation_deltas(0.25, 0.05)],
                                   "dimensions": capsules.shape[-1]}
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, t in sets.items():
        fname = "confusion_matrix.png" if name == "test" else f"confusion_matrix_{name}.png"
        figures.save_confusion_matrix(out / fname, torch.tensor(t["confusion_matrix"]),
                                      f"confusion matrix: {t['description']}")
        files.append(fname)
    facts = {"files": [], "most_confident_errors": [], "perturbed_digits": []}
    if capsule:
        facts = write_figures(model, out, images, labels, lengths, capsules, pred, device, examples, perturbed,
                              decoder=bool(cfg["decoder"]))
        if not cfg["decoder"]:
            log("this model has no decoder: no reconstruction or perturbation figures")
    summary.update({**facts, "files": files + facts["files"]})
    summary["seconds"] = time.perf_counter() - started
    _write_summary(out, summary, markdown(summary))
    return summary


# ----------------------------------------------------------------------------- MultiMNIST

@torch.no_grad()
def _decode_pairs(model, part: dict, device, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    side = part["x"].shape[-1]
    v = part["capsules"].to(device)
    decode = lambda k: decode_capsule(model, v, classes[:, k].to(device)).float().cpu().view(-1, side, side)  # noqa: E731
    return decode(0), decode(1)


def model_has_decoder(model) -> bool:
    return getattr(model, "decoder", None) is not None


def write_pair_figures(model, out: Path, result: dict, device) -> list[str]:
    """The paper's Figure 5 for the first images and the first misclassified ones (each digit
    reconstructed from its own capsule: the longest, the second longest, both overlaid, and for
    errors the overlay from the true classes), and the pair confusion; the file names."""
    files = []
    figures.save_confusion_matrix(out / "pair_confusion.png", result["confusion"],
                                  "MultiMNIST: true class vs the predicted class that took its place")
    files.append("pair_confusion.png")
    for name, part, title in (("multimnist_reconstructions.png", result["examples"],
                               "MultiMNIST test inputs and the reconstructions of the two longest capsules"),
                              ("multimnist_errors.png", result["errors"],
                               "misclassified pairs (L: true, R: the two longest capsules)")):
        if part is None or not model_has_decoder(model):
            continue
        first, second = _decode_pairs(model, part, device, part["pred"])
        truth = _decode_pairs(model, part, device, part["labels"]) if name == "multimnist_errors.png" else (None, None)
        tags = ["L {},{}\nR {},{}".format(*part["labels"][i].tolist(), *part["pred"][i].tolist())
                for i in range(len(part["labels"]))]
        figures.save_pair_reconstructions(out / name, part["x"] / 255.0, first, second, tags, title, *truth)
        files.append(name)
    return files


def multimnist_markdown(summary: dict) -> str:
    """report.md of a MultiMNIST evaluation."""
    p, e = summary["protocol"], summary["pair_error"]
    lines = [f"# MultiMNIST evaluation of `{summary['checkpoint']}`", "",
             f"CapsNet {summary['model']} ({summary['parameters']:,} parameters), device {summary['device']}.", "",
             f"Test protocol: each of the first {p['digits']:,} MNIST test digits is the first digit of "
             f"{p['pairs_per_digit']:,} pairs ({p['pairs']:,} pairs, seed {p['seed']}; the paper: 10,000 x 1,000).", "",
             f"**Pair error: {100 * e['value']:.2f}%** ({summary['pairs_wrong']:,} of {p['pairs']:,} pairs), 95% "
             f"interval {100 * e['bootstrap_95'][0]:.2f}-{100 * e['bootstrap_95'][1]:.2f}% (bootstrap over base "
             f"digits), {100 * e['wilson_95'][0]:.2f}-{100 * e['wilson_95'][1]:.2f}% (binomial, Wilson).", "",
             "Pair confusion (`pair_confusion.png`): two entries per image, rows the true classes, columns the "
             "predicted classes; a true class the prediction missed counts against the class that took its place.",
             "", "## Figures", ""]
    lines += [f"![{f}]({f})" for f in summary["files"]]
    return "\n".join(lines) + "\n"


def multimnist_report(model, cfg: dict, result: dict, out: Path, device, *, checkpoint: str, protocol: dict,
                      training_mode: str | None = None, started: float | None = None) -> dict:
    """Write a MultiMNIST evaluation (``result`` of ``experiments.multimnist.evaluate_pairs``) as
    summary.json, report.md and figures into ``out``; ``protocol``: digits, pairs_per_digit,
    seed."""
    started = time.perf_counter() if started is None else started
    summary = {"checkpoint": str(checkpoint), "model": cfg, "dataset": "multimnist",
               "parameters": sum(p.numel() for p in model.parameters()), "device": str(device),
               "protocol": {**protocol, "pairs": result["pairs"]}, "pairs_wrong": result["wrong"],
               "test_pair_error": result["error"],
               "pair_error": {"value": result["error"], "wilson_95": wilson_interval(result["wrong"], result["pairs"]),
                              "bootstrap_95": bootstrap_interval(result["wrong_per_digit"], result["count_per_digit"])},
               "pair_confusion": result["confusion"].tolist(), "training_mode": training_mode}
    out.mkdir(parents=True, exist_ok=True)
    summary["files"] = write_pair_figures(model, out, result, device)
    summary["seconds"] = time.perf_counter() - started
    _write_summary(out, summary, multimnist_markdown(summary))
    return summary
