"""Digits placed on a larger black canvas: centred, or at a random offset (the translated
MNIST of the paper's affine experiment, and the shifted digits of MultiMNIST)."""
from __future__ import annotations

import torch

__all__ = ["paste", "center_on_canvas", "random_placement"]


def _check_images(images: torch.Tensor, canvas: int) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 3:
        raise ValueError(f"images must be a (B, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if canvas < max(images.shape[1:]):
        raise ValueError(f"canvas must be at least the image size {tuple(images.shape[1:])}, got {canvas}")


def paste(images: torch.Tensor, canvas: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """(B, h, w) images -> (B, canvas, canvas) zeros with image b at rows top[b]:top[b]+h,
    columns left[b]:left[b]+w (offsets must keep it inside the canvas)."""
    _check_images(images, canvas)
    B, h, w = images.shape
    if B and (int(top.min()) < 0 or int(left.min()) < 0 or int(top.max()) > canvas - h
              or int(left.max()) > canvas - w):
        raise ValueError(f"offsets must keep a {h}x{w} image inside a {canvas}x{canvas} canvas")
    out = images.new_zeros(B, canvas, canvas)
    rows = (top.view(B, 1) + torch.arange(h, device=images.device))[:, :, None]   # (B, h, 1)
    cols = (left.view(B, 1) + torch.arange(w, device=images.device))[:, None, :]  # (B, 1, w)
    out[torch.arange(B, device=images.device)[:, None, None], rows, cols] = images
    return out


def center_on_canvas(images: torch.Tensor, canvas: int) -> torch.Tensor:
    """Zero padding around each image so that it sits in the middle of a canvas x canvas image."""
    _check_images(images, canvas)
    B, h, w = images.shape
    top = torch.full((B,), (canvas - h) // 2, dtype=torch.long, device=images.device)
    left = torch.full((B,), (canvas - w) // 2, dtype=torch.long, device=images.device)
    return paste(images, canvas, top, left)


def random_placement(images: torch.Tensor, canvas: int, max_shift: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image centred on the canvas, then moved by its own integer (dy, dx), each drawn
    uniformly from [-max_shift, max_shift] (the paper's code: pad, then shift).  Returns the
    canvases and the shifts (B, 2) as (dy, dx).  ``generator`` must live on the images' device."""
    _check_images(images, canvas)
    B, h, w = images.shape
    pad = min(canvas - h, canvas - w) // 2
    if not 0 <= max_shift <= pad:
        raise ValueError(f"max_shift must lie in [0, {pad}] for {h}x{w} images on a {canvas}x{canvas} canvas, "
                         f"got {max_shift}")
    shift = torch.randint(-max_shift, max_shift + 1, (B, 2), generator=generator, device=images.device)
    top = (canvas - h) // 2 + shift[:, 0]
    left = (canvas - w) // 2 + shift[:, 1]
    return paste(images, canvas, top, left), shift
