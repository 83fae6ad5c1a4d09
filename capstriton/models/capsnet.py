"""CapsNet for MNIST (Sabour et al. 2017) with its reconstruction decoder."""
from __future__ import annotations

import torch
from torch import nn

from ..layers import DigitCaps, PrimaryCaps
from .heads import Decoder, check_labels, lengths_and_reconstruction

__all__ = ["CapsNet"]


class CapsNet(nn.Module):
    """Conv1 -> PrimaryCaps -> DigitCaps (routing) -> capsule lengths, plus a 3-FC decoder.

    Default settings are the paper's MNIST model (8,215,568 parameters).  ``forward(x, y)``
    returns (lengths (B, K), reconstructions (B, H*W*C) or None, digit capsules (B, K, D)).
    The decoder sees only the capsule picked by the label ``y`` (training) or, when ``y`` is
    None, by the longest capsule (test time).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, conv_channels: int = 256,
                 primary_caps: int = 32, primary_dim: int = 8, num_classes: int = 10, digit_dim: int = 16,
                 iterations: int = 3, detach: bool = False, backend: str = "auto", decoder: bool = True):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.conv1 = nn.Conv2d(in_channels, conv_channels, kernel_size=9)
        self.primary = PrimaryCaps(conv_channels, primary_caps, primary_dim, kernel_size=9, stride=2,
                                   backend=backend)
        grid = ((image_size - 8) - 9) // 2 + 1
        if grid < 1:
            raise ValueError(f"image_size must be at least 17 for two 9x9 convolutions, got {image_size}")
        self.digit = DigitCaps(primary_caps * grid * grid, primary_dim, num_classes, digit_dim,
                               iterations=iterations, detach=detach, backend=backend)
        self.decoder = Decoder(num_classes * digit_dim, in_channels * image_size * image_size) if decoder else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        check_labels(y, x.shape[0])
        v = self.digit(self.primary(torch.relu(self.conv1(x))))  # (B, K, D)
        lengths, recon = lengths_and_reconstruction(v, self.decoder, y)
        return lengths, recon, v
