"""CapsNet (Sabour et al. 2017) with its reconstruction decoder, for any image size, channel
count, number of classes and routing algorithm."""
from __future__ import annotations

import torch

from ..layers import CapsuleModule, DigitCaps, PrimaryCaps
from .heads import Decoder, check_labels, class_capsules, lengths_and_reconstruction

__all__ = ["CapsNet"]


class CapsNet(CapsuleModule):
    """Conv1 (9x9, ReLU) -> PrimaryCaps (9x9, stride 2) -> DigitCaps (routing) -> capsule
    lengths, plus a 3-FC decoder.

    The defaults are the paper's MNIST model (8,215,568 parameters).  ``forward(x, y=None)``
    takes images x (B, in_channels, image_size, image_size) and optional integer labels y (B,)
    and returns (lengths (B, num_classes), reconstructions (B, in_channels * image_size^2) or
    None, class capsules (B, num_classes, digit_dim)).  The decoder sees only the capsule
    picked by the label ``y`` (training) or, when ``y`` is None, by the longest capsule (test time).

    Arguments:
      in_channels: image channels (1 for MNIST, 3 for colour images).
      image_size: the side of the square input images (at least 17).
      conv_channels: channels of the first 9x9 convolution (256).
      primary_caps: primary capsule types (32); each gives one capsule per position of the
        PrimaryCaps grid, ((image_size - 8) - 9) // 2 + 1 squared (6 x 6 for 28 x 28 images).
      primary_dim: dimensions of a primary capsule (8).
      num_classes: class capsules, one per class (10).
      digit_dim: dimensions of a class capsule (16).
      routing: any registered routing algorithm (``capstriton.routing_names()``): "dynamic"
        (default), "self-attention", "inverted-attention" or one added with
        ``register_routing``; the class capsules' layer owns the routing's parameters.
      iterations, detach: the routing's options where it takes them (dynamic routing: 3 and
        off by default; inverted attention: 2); None leaves the routing's default.
      init_std: the class capsules' weight std; None scales it to the layer (see
        ``DigitCaps``), the paper's recipe (``capstriton.training.CAPSNET_PAPER``) passes 0.01.
      backend: "auto", "torch" or "triton" for the capsule ops; ``set_backend`` changes it later.
      decoder: build the reconstruction decoder (True) or return None reconstructions.
      **options: the routing's other options (e.g. ``eps`` for inverted attention).

    Which loss: with "dynamic" and "self-attention" routing the capsule lengths lie in [0, 1)
    and act as class probabilities: train with ``margin_loss(lengths, y)`` plus
    0.0005 x ``reconstruction_loss`` (the paper; ``capstriton.training.capsule_loss``).  With
    "inverted-attention" the capsules are LayerNorm-ed, so every length is near
    sqrt(digit_dim) and carries no probability: classify the capsules with a learned head and
    cross-entropy (``examples/train_routing_family.py``) rather than the margin loss.  A
    routing with extra inputs (activations) needs a model that supplies them; the first output
    of a routing with extra outputs is used as the class capsules.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, conv_channels: int = 256,
                 primary_caps: int = 32, primary_dim: int = 8, num_classes: int = 10, digit_dim: int = 16,
                 iterations: int | None = None, detach: bool = False, backend: str = "auto", decoder: bool = True,
                 routing: str = "dynamic", init_std: float | None = None, **options):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.conv1 = torch.nn.Conv2d(in_channels, conv_channels, kernel_size=9)
        self.primary = PrimaryCaps(conv_channels, primary_caps, primary_dim, kernel_size=9, stride=2,
                                   backend=backend)
        self.backend = backend
        if image_size < 17:
            raise ValueError(f"image_size must be at least 17 for two 9x9 convolutions, got {image_size}")
        in_caps = self.primary.output_caps(image_size - 8, image_size - 8)
        self.digit = DigitCaps(in_caps, primary_dim, num_classes, digit_dim, iterations=iterations, detach=detach,
                               backend=backend, init_std=init_std, routing=routing, **options)
        self.decoder = Decoder(num_classes * digit_dim, in_channels * image_size * image_size) if decoder else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        check_labels(y, x.shape[0])
        v = class_capsules(self.digit(self.primary(torch.relu(self.conv1(x)))))  # (B, K, D)
        lengths, recon = lengths_and_reconstruction(v, self.decoder, y)
        return lengths, recon, v
