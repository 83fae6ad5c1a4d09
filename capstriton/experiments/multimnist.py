"""CapsNet on MultiMNIST (paper section 6): both labels present in the margin loss, each
digit reconstructed from its own capsule, prediction = the two longest capsules; the streamed
evaluation of the test protocol with its confidence intervals and pair confusion."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..loss import margin_loss, reconstruction_loss
from .decoding import decode_capsule
from .evaluation import predict

__all__ = ["multi_hot", "multimnist_loss", "top2", "pair_errors", "pair_confusion", "wilson_interval",
           "bootstrap_interval", "evaluate_pairs"]


def multi_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, n) integer labels -> (B, num_classes) floats with a 1 at every listed class."""
    out = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels, 1.0)


def multimnist_loss(model, x: torch.Tensor, sources: torch.Tensor, labels: torch.Tensor, recon_weight: float):
    """Margin loss with both classes present plus ``recon_weight`` x the summed reconstruction
    losses of the two shifted source digits, each decoded from its own class's capsule.

    x (B, 1, H, W) and sources (B, 2, H, W) in [0, 1], labels (B, 2).  Returns (loss, lengths).
    """
    lengths, recon_first, v = model(x, labels[:, 0])
    loss = margin_loss(lengths, multi_hot(labels, lengths.shape[1], lengths.dtype))
    if recon_first is not None and recon_weight:
        recon_second = decode_capsule(model, v, labels[:, 1])
        loss = loss + recon_weight * (reconstruction_loss(recon_first, sources[:, 0])
                                      + reconstruction_loss(recon_second, sources[:, 1]))
    return loss, lengths


def top2(lengths: torch.Tensor) -> torch.Tensor:
    """(B, K) capsule lengths -> (B, 2) classes of the two longest capsules, longest first."""
    return lengths.topk(2, dim=1).indices


def pair_errors(predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(B,) bool: True where the predicted pair of classes differs from the true pair (order
    ignored)."""
    if predicted.shape != true.shape or predicted.dim() != 2 or predicted.shape[1] != 2:
        raise ValueError(f"expected two (B, 2) tensors, got {tuple(predicted.shape)} and {tuple(true.shape)}")
    return (predicted.sort(1).values != true.sort(1).values).any(1)


def pair_confusion(predicted: torch.Tensor, true: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class, two entries per image:
    a class in both pairs counts on the diagonal; the true class the prediction missed counts
    against the predicted class that took its place (when both are missed, the smaller missed
    true class against the smaller wrong prediction).  (B, 2) inputs, order ignored."""
    if predicted.shape != true.shape or predicted.dim() != 2 or predicted.shape[1] != 2:
        raise ValueError(f"expected two (B, 2) tensors, got {tuple(predicted.shape)} and {tuple(true.shape)}")
    t, p = true.sort(1).values, predicted.sort(1).values
    hit = (t.unsqueeze(2) == p.unsqueeze(1)).any(2)    # (B, 2): true class among the predictions
    used = (p.unsqueeze(2) == t.unsqueeze(1)).any(2)   # (B, 2): predicted class among the true ones
    rows = t.gather(1, torch.argsort(hit.long(), dim=1, stable=True))     # missed true classes first
    wrong = p.gather(1, torch.argsort(used.long(), dim=1, stable=True))   # wrong predictions first
    missed = (~hit).sum(1, keepdim=True)
    cols = torch.where(torch.arange(2, device=t.device) < missed, wrong, rows)
    return torch.bincount((rows * num_classes + cols).flatten(),
                          minlength=num_classes ** 2).view(num_classes, num_classes)


def wilson_interval(errors: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of the error rate ``errors / n``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(wrong: torch.Tensor, count: torch.Tensor, draws: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the pair error over base digits: ``wrong[i]`` of the
    ``count[i]`` pairs with digit i first were wrong; the digits are resampled with replacement
    (the pairs of one digit share it, so they are not independent)."""
    if wrong.shape != count.shape or wrong.dim() != 1 or wrong.numel() == 0:
        raise ValueError("wrong and count must be (M,) tensors of the same shape, M >= 1")
    gen = torch.Generator().manual_seed(seed)
    M, rates = wrong.shape[0], []
    wrong, count = wrong.double().cpu(), count.double().cpu()
    per_block = max(1, 2_000_000 // M)
    for start in range(0, draws, per_block):
        idx = torch.randint(0, M, (min(per_block, draws - start), M), generator=gen)
        rates.append(wrong[idx].sum(1) / count[idx].sum(1).clamp(min=1))
    rates = torch.cat(rates)
    lo, hi = torch.quantile(rates, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return lo, hi


@torch.no_grad()
def evaluate_pairs(model, chunks: Iterable[dict], device, num_digits: int, batch_size: int = 500,
                   keep: int = 10) -> dict:
    """Stream MultiMNIST chunks (``capstriton.data.multimnist_pairs``) through ``model``: the
    top-2 pair error overall and per base digit (``pair % num_digits``), the pair confusion, and
    the first ``keep`` images and first ``keep`` misclassified ones (inputs, labels, predicted
    pairs, capsules) for figures."""
    wrong_per = torch.zeros(num_digits, dtype=torch.long)
    count_per = torch.zeros(num_digits, dtype=torch.long)
    confusion, first, errors = None, [], []
    for part in chunks:
        lengths, capsules = predict(model, part["x"], device, batch_size)
        pred = top2(lengths)
        wrong = pair_errors(pred, part["labels"])
        base = part["pair"] % num_digits
        wrong_per += torch.bincount(base, weights=wrong.double(), minlength=num_digits).long()
        count_per += torch.bincount(base, minlength=num_digits)
        cm = pair_confusion(pred, part["labels"], lengths.shape[1])
        confusion = cm if confusion is None else confusion + cm
        for bucket, mask in ((first, torch.ones_like(wrong)), (errors, wrong)):
            room = keep - sum(len(b["labels"]) for b in bucket)
            idx = mask.nonzero().squeeze(1)[:max(room, 0)]
            if idx.numel():
                bucket.append({"x": part["x"][idx], "labels": part["labels"][idx], "pred": pred[idx],
                               "capsules": capsules[idx], "pair": part["pair"][idx]})
    n, w = int(count_per.sum()), int(wrong_per.sum())
    if n == 0:
        raise ValueError("no MultiMNIST pairs to evaluate")
    merge = lambda bucket: {k: torch.cat([b[k] for b in bucket]) for k in bucket[0]} if bucket else None  # noqa: E731
    return {"pairs": n, "wrong": w, "error": w / n, "wrong_per_digit": wrong_per, "count_per_digit": count_per,
            "confusion": confusion, "examples": merge(first), "errors": merge(errors)}
