"""An affNIST-style test set built from the MNIST test digits, and the translated 40x40 test
set of the affine experiment.  (Real affNIST files: ``capstriton.data.affnist``.)

affNIST (Tieleman, 2013) puts each MNIST digit on a 40x40 canvas under random affine
transformations, 32 per digit.  **The ranges used here are approximations**, not checked
against the affNIST page: the copy of that page the project could read shows only its opening
(40x40 images, 32 random transformations of each MNIST digit, the test set made from the 10,000
MNIST test digits, MATLAB files), not its list of ranges.  ``AFFNIST_RANGES`` follows the
description this module was first written from: rotation within +-20 degrees, shear within
+-0.2 (along x), horizontal and vertical scales drawn independently in [0.8, 1.2], and any
translation that keeps the whole digit inside the 40x40 canvas.  Another public description of
affNIST uses a single log-uniform scale in [0.8, 1.25] and translations within +-5 pixels.
Numbers measured on this set are "affNIST-style", not affNIST numbers; for those, read the real
files with ``capstriton.data.affnist``.

Every parameter is drawn uniformly from its range with a CPU ``torch.Generator`` seeded with
``seed`` (default ``AFFINE_SEED``), so every machine builds the same images.  Draws are made
transformation by transformation (all digits' first transformation, then all digits' second,
...): the set with ``per_digit=k`` is the first ``k * N`` images of the set with any larger
``per_digit`` and the same seed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .canvas import random_placement

__all__ = ["AFFNIST_RANGES", "AFFNIST_PER_DIGIT", "AFFINE_SEED", "AFFNIST_CANVAS", "TRANSLATION_SHIFT",
           "TRANSLATED_TEST_SEED", "sample_affine_params", "linear_part", "ink_boxes", "affine_transform",
           "affine_test_set", "translated_test_set"]

AFFNIST_RANGES = {"rotation_deg": (-20.0, 20.0), "shear": (-0.2, 0.2), "scale_x": (0.8, 1.2), "scale_y": (0.8, 1.2)}
AFFNIST_PER_DIGIT = 32
AFFINE_SEED = 2017
AFFNIST_CANVAS = 40
TRANSLATION_SHIFT = 6       # the paper's training digits: padded to 40x40, then shifted by up to 6 pixels
TRANSLATED_TEST_SEED = 1    # the placements of the clean (translated) 40x40 test set


def sample_affine_params(n: int, generator: torch.Generator, ranges: dict = AFFNIST_RANGES) -> dict:
    """n independent draws of rotation/shear/scales, uniform in ``ranges``, plus ``u_x, u_y``
    in [0, 1) that place the digit within its allowed translation range (float64, CPU)."""
    u = torch.rand(n, len(ranges) + 2, generator=generator, dtype=torch.float64, device=generator.device)
    params = {name: lo + (hi - lo) * u[:, i] for i, (name, (lo, hi)) in enumerate(ranges.items())}
    params["u_x"], params["u_y"] = u[:, -2], u[:, -1]
    return params


def linear_part(params: dict) -> torch.Tensor:
    """(n, 2, 2) matrices A = rotation @ shear @ scale acting on (x, y) pixel coordinates."""
    theta = params["rotation_deg"] * (math.pi / 180.0)
    cos, sin, zero, one = theta.cos(), theta.sin(), torch.zeros_like(theta), torch.ones_like(theta)
    rotation = torch.stack([cos, -sin, sin, cos], -1).view(-1, 2, 2)
    shear = torch.stack([one, params["shear"], zero, one], -1).view(-1, 2, 2)
    scale = torch.stack([params["scale_x"], zero, zero, params["scale_y"]], -1).view(-1, 2, 2)
    return rotation @ shear @ scale


def ink_boxes(images: torch.Tensor) -> torch.Tensor:
    """(n, 4) float64 (x0, x1, y0, y1): first and last column and row holding ink (a blank
    image gets the whole frame)."""
    n, h, w = images.shape
    ink = images > 0

    def span(mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(size, device=mask.device).expand_as(mask)
        lo = torch.where(mask, idx, size).min(1).values
        hi = torch.where(mask, idx, -1).max(1).values
        blank = hi < 0
        return torch.where(blank, 0, lo), torch.where(blank, size - 1, hi)

    x0, x1 = span(ink.any(1), w)
    y0, y1 = span(ink.any(2), h)
    return torch.stack([x0, x1, y0, y1], 1).double()


def affine_transform(images: torch.Tensor, params: dict,
                     canvas: int = AFFNIST_CANVAS) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp (n, h, w) uint8 digits onto (n, canvas, canvas) uint8 images (bilinear).

    Each digit's ink box is transformed about its centre by ``linear_part(params)``; the box's
    transformed extent fixes the range of output centres that keep it inside the canvas, and
    ``u_x, u_y`` pick the centre within that range (the canvas centre when it cannot fit).
    Returns the images and the output centres (n, 2) in (x, y) pixel coordinates.
    """
    n, h, w = images.shape
    A = linear_part(params)
    box = ink_boxes(images)
    src_centre = torch.stack([(box[:, 0] + box[:, 1]) / 2, (box[:, 2] + box[:, 3]) / 2], 1)
    half = torch.stack([(box[:, 1] - box[:, 0]) / 2 + 0.5, (box[:, 3] - box[:, 2]) / 2 + 0.5], 1)
    extent = (A.abs() @ half.unsqueeze(-1)).squeeze(-1)          # half-size of the transformed box
    lo, hi = extent - 0.5, canvas - 0.5 - extent
    fits = lo <= hi
    u = torch.stack([params["u_x"], params["u_y"]], 1)
    centre = torch.where(fits, lo + u * (hi - lo), torch.full_like(lo, (canvas - 1) / 2))
    # output pixel q -> source point A^-1 (q - centre) + src_centre, in grid_sample's [-1, 1]
    coords = torch.arange(canvas, dtype=torch.float64, device=images.device)
    q = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), -1).view(1, -1, 2)  # (1, P, 2) as (x, y)
    src = (q - centre[:, None]) @ torch.linalg.inv(A).transpose(1, 2) + src_centre[:, None]
    size = torch.tensor([w - 1, h - 1], dtype=torch.float64, device=images.device)
    grid = (src * (2.0 / size) - 1.0).view(n, canvas, canvas, 2).float()
    warped = F.grid_sample(images.unsqueeze(1).float(), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=True)
    return warped.squeeze(1).round().clamp(0, 255).to(torch.uint8), centre


def affine_test_set(images: torch.Tensor, labels: torch.Tensor, per_digit: int = AFFNIST_PER_DIGIT,
                    seed: int = AFFINE_SEED, canvas: int = AFFNIST_CANVAS, chunk: int = 10000) -> dict:
    """The affNIST-style set: ``per_digit`` transformations of every (N, 28, 28) uint8 digit.

    Returns x (per_digit * N, canvas, canvas) uint8, y, ``source`` (the digit each image came
    from) and the parameters (rotation_deg, shear, scale_x, scale_y, centre (x, y)); image
    ``j * N + i`` is digit i under its j-th transformation.  Built on the CPU.
    """
    if per_digit < 1:
        raise ValueError(f"per_digit must be >= 1, got {per_digit}")
    if images.dim() != 3 or images.dtype != torch.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected (N, H, W) uint8 images and (N,) labels, got {images.dtype} "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    images, labels = images.cpu(), labels.cpu()
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    xs, params = [], []
    for _ in range(per_digit):
        p = sample_affine_params(n, gen)
        for start in range(0, n, chunk):
            part = {k: v[start:start + chunk] for k, v in p.items()}
            x, centre = affine_transform(images[start:start + chunk], part, canvas)
            xs.append(x)
            params.append({**{k: v for k, v in part.items() if not k.startswith("u_")}, "centre": centre})
    merged = {k: torch.cat([p[k] for p in params]) for k in params[0]}
    return {"x": torch.cat(xs), "y": labels.repeat(per_digit),
            "source": torch.arange(n, device="cpu").repeat(per_digit), **merged}


def translated_test_set(images: torch.Tensor, canvas: int = AFFNIST_CANVAS, max_shift: int = TRANSLATION_SHIFT,
                        seed: int = TRANSLATED_TEST_SEED) -> torch.Tensor:
    """The clean test set of the affine experiment: each (N, 28, 28) digit centred on the
    canvas and shifted by its own integer (dy, dx) in [-max_shift, max_shift] (CPU generator
    seeded with ``seed``, drawn for these images alone: the same set in every script)."""
    return random_placement(images.cpu(), canvas, max_shift, torch.Generator().manual_seed(seed))[0]
