"""MultiMNIST (Sabour et al. 2017, section 6): two digits of different classes from the same
split, each shifted by up to 4 pixels in each direction on a 36x36 canvas, overlaid by a
pixel-wise sum clipped to the maximum intensity.

Training pairs are drawn on the fly on the training device (the paper's 60M fixed pairs
become a stream); the test set is a fixed draw from a CPU generator seeded with
``MULTIMNIST_TEST_SEED`` over the MNIST test split, ``MULTIMNIST_TEST_SIZE`` images by default.
Images stay uint8: clipping the sum at 255 equals clipping the [0, 1] sum at 1.
"""
from __future__ import annotations

import torch

from .canvas import random_placement

__all__ = ["MULTIMNIST_CANVAS", "MULTIMNIST_SHIFT", "MULTIMNIST_TEST_SEED", "MULTIMNIST_TEST_SIZE",
           "draw_pairs", "overlay", "multimnist_batch", "multimnist_test_set"]

MULTIMNIST_CANVAS = 36
MULTIMNIST_SHIFT = 4
MULTIMNIST_TEST_SEED = 1234
MULTIMNIST_TEST_SIZE = 10000


def draw_pairs(labels: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2) indices into ``labels``: the first uniform over all digits, the second uniform
    over the digits of a different class (redrawn until the classes differ)."""
    if labels.dim() != 1 or labels.numel() == 0 or int(labels.min()) == int(labels.max()):
        raise ValueError("labels must be a non-empty (N,) tensor holding at least two classes")
    N, dev = labels.shape[0], labels.device
    first = torch.randint(0, N, (n,), generator=generator, device=dev)
    second = torch.randint(0, N, (n,), generator=generator, device=dev)
    same = labels[first] == labels[second]
    while bool(same.any()):
        redo = same.nonzero().squeeze(1)
        second[redo] = torch.randint(0, N, (redo.numel(),), generator=generator, device=dev)
        same = labels[first] == labels[second]
    return torch.stack([first, second], 1)


def overlay(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pixel-wise sum clipped to the maximum intensity (255 for uint8, 1 for floats)."""
    if a.dtype == torch.uint8:
        return (a.int() + b.int()).clamp_(max=255).to(torch.uint8)
    return (a + b).clamp(max=1.0)


def multimnist_batch(images: torch.Tensor, labels: torch.Tensor, n: int, generator: torch.Generator | None = None,
                     canvas: int = MULTIMNIST_CANVAS, max_shift: int = MULTIMNIST_SHIFT) -> dict:
    """``n`` MultiMNIST images drawn from (N, 28, 28) uint8 digits on their device.

    Returns x (n, canvas, canvas) uint8 (the overlay), sources (n, 2, canvas, canvas) uint8
    (each shifted digit alone: the reconstruction targets), labels (n, 2), shifts (n, 2, 2) as
    (dy, dx) and the source indices (n, 2).
    """
    pairs = draw_pairs(labels, n, generator)
    placed, shifts = random_placement(images[pairs.flatten()], canvas, max_shift, generator)
    sources = placed.view(n, 2, canvas, canvas)
    return {"x": overlay(sources[:, 0], sources[:, 1]), "sources": sources, "labels": labels[pairs],
            "shifts": shifts.view(n, 2, 2), "index": pairs}


def multimnist_test_set(images: torch.Tensor, labels: torch.Tensor, n: int = MULTIMNIST_TEST_SIZE,
                        seed: int = MULTIMNIST_TEST_SEED, canvas: int = MULTIMNIST_CANVAS,
                        max_shift: int = MULTIMNIST_SHIFT) -> dict:
    """The fixed test set: ``multimnist_batch`` from a CPU generator seeded with ``seed``, so
    CPU and GPU runs see the same images."""
    gen = torch.Generator().manual_seed(seed)
    return multimnist_batch(images.cpu(), labels.cpu(), n, gen, canvas, max_shift)
