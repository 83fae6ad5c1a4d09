"""Where a run's batches come from: epochs of shuffled global batches that every rank draws
alike and then shards (``ShuffledBatches``), or batches drawn afresh at every step
(``DrawnBatches``); the random shifts of the paper's augmentation; a dataset loaded once per
rank with its labels checked."""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F

from ..data import DataUnavailableError, as_model_input, augment, default_data_dir, mnist_tensors
from .distributed import Distributed

__all__ = ["ShuffledBatches", "DrawnBatches", "shift_offsets", "shift_images", "random_shift", "augmented_input",
           "check_labels", "load_classification_data"]


def shift_offsets(n: int, max_shift: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (dy, dx) in [0, 2 * max_shift]."""
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator, device=device)
    return dy, dx


def shift_images(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate image b by (dy[b] - max_shift, dx[b] - max_shift), zero fill (pad + crop)."""
    B, C, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    rows = (dy + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift], zero fill
    (pad + random crop, vectorized over the batch)."""
    if max_shift == 0:
        return x
    return shift_images(x, *shift_offsets(x.shape[0], max_shift, generator, x.device), max_shift)


def augmented_input(kind: str, shift: int = 2, jitter: dict | None = None) -> Callable:
    """prepare(images, generator): uint8 images -> model input in [0, 1], augmented: "shift":
    ``random_shift`` by up to ``shift`` pixels; "affine": ``capstriton.data.augment`` with the
    ``jitter`` settings (the Efficient-CapsNet recipe's rotation, squish, erased patch, shift)."""
    if kind == "shift":
        return lambda x, gen: random_shift(as_model_input(x), shift, gen)
    if kind == "affine":
        return lambda x, gen: augment(as_model_input(x), gen, **(jitter or {}))
    raise ValueError(f"augmentation must be 'shift' or 'affine', got {kind!r}")


class ShuffledBatches:
    """Epochs of a dataset held on the device, in a fresh random order each: global batches of
    ``batch_size`` images, of which each rank takes its contiguous shard.  Every rank draws the
    same order and the same augmentation for the whole global batch, so the batches do not
    depend on the number of processes.

    ``prepare(images, generator)``: the global batch of stored images -> model input (default:
    uint8 -> float in [0, 1]).  ``drop_last``: skip a last partial batch (a last batch smaller
    than the number of ranks is always skipped)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, dist: Distributed | None = None,
                 prepare: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 drop_last: bool = False):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.dist = dist or Distributed(device=images.device)
        self.prepare = prepare or (lambda x, gen: as_model_input(x))
        n = images.shape[0]
        self.steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        if not drop_last and n % batch_size and n % batch_size < self.dist.world_size:
            self.steps_per_epoch -= 1

    def order(self, generator: torch.Generator) -> torch.Tensor:
        """An epoch's order (saved in mid-epoch checkpoints)."""
        return torch.randperm(self.images.shape[0], generator=generator, device=self.images.device)

    def batch(self, order: torch.Tensor, i: int, generator: torch.Generator) -> tuple[tuple, int, int]:
        """Batch ``i`` of the epoch: (this rank's (x, y), its images, the global batch's images)."""
        idx = order[i * self.batch_size:(i + 1) * self.batch_size]
        x = self.prepare(self.images[idx], generator)
        if not self.dist.active:
            return (x, self.labels[idx]), idx.shape[0], idx.shape[0]
        mine = self.dist.shard(torch.arange(idx.shape[0], device=idx.device))
        return (x[mine], self.labels[idx[mine]]), mine.shape[0], idx.shape[0]


class DrawnBatches:
    """A batch drawn afresh at every step by ``draw(generator)`` -> a tuple of tensors whose
    first has the batch's images along dim 0 (one process)."""

    def __init__(self, draw: Callable[[torch.Generator], tuple], steps_per_epoch: int):
        self.draw, self.steps_per_epoch = draw, steps_per_epoch

    def order(self, generator: torch.Generator) -> None:
        return None

    def batch(self, order: None, i: int, generator: torch.Generator) -> tuple[tuple, int, int]:
        inputs = self.draw(generator)
        return inputs, inputs[0].shape[0], inputs[0].shape[0]


def check_labels(labels: torch.Tensor, num_classes: int, what: str = "labels") -> None:
    """ValueError unless every label lies in [0, num_classes) (checked once, at load)."""
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{what} must be integer class labels, got dtype {labels.dtype}")
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = int(((labels < 0) | (labels >= num_classes)).sum())
        raise ValueError(f"{what} must lie in [0, {num_classes}), got values in [{lo}, {hi}] "
                         f"({bad} of {labels.numel()} out of range)")


def load_classification_data(root: str | os.PathLike | None, dataset: str, dist: Distributed, *, download: bool = True,
                             num_classes: int = 10, train_subset: int | None = None, test_subset: int | None = None,
                             log: Callable[[str], None] = print) -> dict:
    """MNIST or Fashion-MNIST on this rank's device: train_x, train_y, test_x, test_y (the first
    ``*_subset`` images), labels of the whole sets checked (ValueError).  Rank 0 provisions the
    files first, the other ranks then only read them; SystemExit when they are unavailable."""
    root = root or default_data_dir()
    tensors = None
    for turn in ("main", "others"):
        if (turn == "main") == dist.is_main:
            try:
                tensors = mnist_tensors(root, download=download and dist.is_main, dataset=dataset, log=log)
            except DataUnavailableError as e:
                raise SystemExit(str(e)) from None
        dist.barrier()
    out = {}
    for name, subset in (("train", train_subset), ("test", test_subset)):
        x, y = tensors[f"{name}_x"], tensors[f"{name}_y"]
        check_labels(y, num_classes, f"{dataset} {name} labels")  # the whole set, once
        x, y = (x[:subset], y[:subset]) if subset else (x, y)
        out[f"{name}_x"], out[f"{name}_y"] = x.to(dist.device), y.to(dist.device)
    return out
