"""The convolutional baseline of the paper's affine-robustness experiment (section 5.2).

The paper compares CapsNet with "a traditional convolutional model with a similar number of
parameters" using max pooling and dropout.  ``ConvBaseline`` follows the paper's CNN layout
(three 5x5 convolutions of 256, 256 and 128 channels, fully connected layers of 328 and 192
units, dropout before the class layer) with 2x2 max pooling after the first two convolutions;
``conv_baseline_matching`` widens the first fully connected layer until the parameter count
matches a given model's.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvBaseline", "conv_baseline_matching", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ConvBaseline(nn.Module):
    """conv5x5-relu-maxpool2, conv5x5-relu-maxpool2, conv5x5-relu, FC-relu, FC-relu, dropout,
    FC -> class logits (train with cross entropy)."""

    def __init__(self, image_size: int = 40, in_channels: int = 1, channels: tuple = (256, 256, 128),
                 hidden: tuple = (328, 192), num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        if len(channels) != 3 or len(hidden) != 2 or min(*channels, *hidden) < 1:
            raise ValueError(f"channels must be 3 and hidden 2 positive sizes, got {channels} and {hidden}")
        if image_size < 4:
            raise ValueError(f"image_size must be at least 4 for two 2x2 poolings, got {image_size}")
        self.in_channels, self.image_size = in_channels, image_size
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 5, padding=2), nn.ReLU(inplace=True),
        )
        flat = c3 * (image_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden[0]), nn.ReLU(inplace=True), nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden[1], num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        return self.classifier(self.features(x))


def conv_baseline_matching(target_parameters: int, image_size: int = 40, channels: tuple = (256, 256, 128),
                           second_hidden: int = 192, **kwargs) -> ConvBaseline:
    """A ``ConvBaseline`` whose first fully connected layer is sized so that its parameter
    count is as close as possible to ``target_parameters`` (at least 1 unit)."""
    probe = ConvBaseline(image_size, channels=channels, hidden=(1, second_hidden), **kwargs)
    per_unit = probe.classifier[1].in_features + 1 + second_hidden  # weights in, bias, weights out
    width = max(1, round((target_parameters - count_parameters(probe)) / per_unit) + 1)
    return ConvBaseline(image_size, channels=channels, hidden=(width, second_hidden), **kwargs)
