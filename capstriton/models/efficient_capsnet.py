"""Efficient-CapsNet for MNIST (Mazzia et al. 2021, "Efficient-CapsNet: capsule network with
self-attention routing") with its reconstruction decoder.  Its training recipe:
``capstriton.training.recipes``; its augmentation: ``capstriton.data.augment``."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import CapsuleModule, DigitCaps
from ..reference import exp_squash_ref
from .heads import Decoder, check_labels, class_capsules, lengths_and_reconstruction

__all__ = ["EfficientCapsNet"]


class EfficientCapsNet(CapsuleModule):
    """Efficient-CapsNet (MNIST): four convolutions with ReLU and batch norm, depthwise primary
    capsules, self-attention routed class capsules, and the 3-FC reconstruction decoder.

    conv 5x5 (32) -> conv 3x3 (64) -> conv 3x3 (64) -> conv 3x3 stride 2 (128), each ReLU then
    BatchNorm; a 9x9 depthwise convolution turns the 9x9x128 map into 16 primary capsules of 8
    dims (squashed with (1 - exp(-|s|)) s / |s|); a fully connected capsule layer
    (``self.digit``, a ``DigitCaps``) with self-attention routing (W (16, 10, 16, 8) and the
    coupling bias (16, 10)) gives 10 class capsules of 16 dims.  161,824 trainable parameters
    without the decoder (the paper's "161k"), 1,573,168 with it.

    ``forward(x, y=None)`` returns (lengths (B, 10), reconstructions (B, 784) or None, class
    capsules (B, 10, 16)) like ``capstriton.CapsNet``: the decoder sees the capsule of the label
    ``y`` (training) or of the longest capsule (test time).

    Arguments: ``decoder``, ``backend`` (``set_backend`` changes it later), ``num_classes``,
    ``primary_caps``, ``primary_dim``, ``class_dim``; ``routing``: any registered routing
    (default "self-attention", the paper's) with its options in ``**options``; ``init_std``: the
    class capsules' weight std, None for the authors' he_normal sqrt(2 / (num_classes x
    primary_caps x primary_dim)) under self-attention and ``DigitCaps``'s scaled default under
    another routing.  Loss: as for ``CapsNet`` (margin loss on the lengths, except under
    "inverted-attention", whose lengths carry no probability).  Checkpoints saved before the
    class capsules moved into ``self.digit`` (keys ``weight``, ``coupling_bias``) still load.
    """

    def __init__(self, decoder: bool = True, backend: str = "auto", num_classes: int = 10,
                 primary_caps: int = 16, primary_dim: int = 8, class_dim: int = 16, routing: str = "self-attention",
                 init_std: float | None = None, **options):
        super().__init__()
        self.num_classes, self.backend = num_classes, backend
        self.primary_caps, self.primary_dim = primary_caps, primary_dim
        layers, channels = [], 1
        for out, k, stride in ((32, 5, 1), (64, 3, 1), (64, 3, 1), (128, 3, 2)):
            conv = nn.Conv2d(channels, out, k, stride=stride)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True), nn.BatchNorm2d(out)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.primary = nn.Conv2d(channels, primary_caps * primary_dim, 9, groups=channels)  # depthwise
        authors = init_std is None and routing == "self-attention"
        if authors:
            init_std = math.sqrt(2.0 / (num_classes * primary_caps * primary_dim))  # the authors' he_normal
        rng = torch.random.get_rng_state()
        self.digit = DigitCaps(primary_caps, primary_dim, num_classes, class_dim, backend=backend, routing=routing,
                               init_std=init_std, **options)
        if authors:  # W drawn as before it moved into DigitCaps, in (I, J, D, Din) order: the same weights
            torch.random.set_rng_state(rng)
            with torch.no_grad():
                self.digit.weight.copy_(init_std * torch.randn(primary_caps, num_classes, class_dim, primary_dim))
        self.decoder = Decoder(num_classes * class_dim, 28 * 28) if decoder else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("weight", "coupling_bias"):  # checkpoints from before self.digit
            if prefix + name in state_dict and prefix + "digit." + name not in state_dict:
                state_dict[prefix + "digit." + name] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"x must have shape (B, 1, 28, 28), got {tuple(x.shape)}")
        check_labels(y, x.shape[0])
        u = self.primary(self.features(x)).reshape(x.shape[0], self.primary_caps, self.primary_dim)
        v = class_capsules(self.digit(exp_squash_ref(u)))  # (B, 10, 16)
        lengths, recon = lengths_and_reconstruction(v, self.decoder, y)
        return lengths, recon, v
