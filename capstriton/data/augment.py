"""Data augmentation of the Efficient-CapsNet recipe: random affine jitter and an erased patch,
drawn per image on the batch's device."""
from __future__ import annotations

import math

import torch

__all__ = ["augment"]


def augment(x: torch.Tensor, generator: torch.Generator, rotate_deg: float = 30.0, shift_px: float = 2.0,
            squish_px: float = 0.0, erase_px: int = 0, **_) -> torch.Tensor:
    """Random affine jitter of a batch (B, C, H, W), one draw per image: rotation by
    rotate_deg x N(0, 0.33) (clipped to +-1) on half of the images, a horizontal squish of up to
    squish_px pixels, a translation of up to shift_px pixels, then an erased erase_px square."""
    B, _, H, W = x.shape
    dev = x.device
    draw = lambda *shape: torch.rand(*shape, generator=generator, device=dev)  # noqa: E731
    angle = (torch.randn(B, generator=generator, device=dev) * 0.33).clamp(-0.9999, 0.9999)
    angle = angle * math.radians(rotate_deg) * (draw(B) < 0.5)
    squish = 1.0 + squish_px * draw(B) / W
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = cos * squish, -sin * squish
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    theta[:, :, 2] = (draw(B, 2) * 2 - 1) * shift_px * 2 / torch.tensor([W, H], device=dev)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    if erase_px > 0:
        rows = torch.arange(H, device=dev)[None, :, None]
        cols = torch.arange(W, device=dev)[None, None, :]
        top = (draw(B) * (H - erase_px)).long()[:, None, None]
        left = (draw(B) * (W - erase_px)).long()[:, None, None]
        hole = (rows >= top) & (rows < top + erase_px) & (cols >= left) & (cols < left + erase_px)
        out = out * (~hole).unsqueeze(1)
    return out
