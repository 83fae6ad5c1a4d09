"""Efficient-CapsNet for MNIST (Mazzia et al. 2021, "Efficient-CapsNet: capsule network with
self-attention routing"), with its reconstruction decoder and its training recipe."""
from __future__ import annotations

import math

import torch
from torch import nn

from .reference import exp_squash_ref
from .self_attention_routing import transform_self_attention_routing

__all__ = ["EfficientCapsNet", "EFFICIENT_CAPSNET_RECIPE", "EFFICIENT_CAPSNET_CPU_DEMO", "augment"]

# The authors' MNIST recipe (their config.json and training code).  The reconstruction loss is
# their 0.392 x mean squared error over the 784 pixels = 0.0005 x sum of squares, the form
# capstriton.reconstruction_loss uses.
EFFICIENT_CAPSNET_RECIPE = {
    "optimizer": "adam", "lr": 5e-4,
    "schedule": "exp-epoch", "lr_decay_per_epoch": 0.97,  # lr x 0.97 ** epoch
    "batch_size": 16, "epochs": 150,
    "margin": {"m_pos": 0.9, "m_neg": 0.1, "lam": 0.5},
    "recon_weight": 0.0005,
    # per image (`augment`): rotation by 30 deg x N(0, 0.33) clipped to +-1 on half of the images,
    # a horizontal squish of up to 7 px, a 4 x 4 erased patch, and a shift (the authors shift
    # within the digit's margins; here up to 2 px)
    "augmentation": {"rotate_deg": 30.0, "shift_px": 2, "squish_px": 7, "erase_px": 4},
}
# Bounded CPU demonstration (minutes on 2 cores): larger batches, a learning rate annealed over
# the wall-clock budget, lighter augmentation (rotation and shifts only).
EFFICIENT_CAPSNET_CPU_DEMO = {
    **EFFICIENT_CAPSNET_RECIPE, "lr": 2e-3, "schedule": "budget", "lr_final": 0.01, "batch_size": 64,
    "epochs": 30, "time_budget": 780.0,
    "augmentation": {"rotate_deg": 15.0, "shift_px": 2, "squish_px": 0, "erase_px": 0},
}


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


class EfficientCapsNet(nn.Module):
    """Efficient-CapsNet (MNIST): four convolutions with ReLU and batch norm, depthwise primary
    capsules, self-attention routed class capsules, and the 3-FC reconstruction decoder.

    conv 5x5 (32) -> conv 3x3 (64) -> conv 3x3 (64) -> conv 3x3 stride 2 (128), each ReLU then
    BatchNorm; a 9x9 depthwise convolution turns the 9x9x128 map into 16 primary capsules of 8
    dims (squashed with (1 - exp(-|s|)) s / |s|); a fully connected capsule layer with
    self-attention routing (``capstriton.transform_self_attention_routing``, W (16, 10, 16, 8)
    and the coupling bias (16, 10)) gives 10 class capsules of 16 dims.  161,824 trainable
    parameters without the decoder (the paper's "161k"), 1,573,168 with it.

    ``forward(x, y=None)`` returns (lengths (B, 10), reconstructions (B, 784) or None, class
    capsules (B, 10, 16)) like ``capstriton.CapsNet``: the decoder sees the capsule of the label
    ``y`` (training) or of the longest capsule (test time).
    """

    def __init__(self, decoder: bool = True, backend: str = "auto", num_classes: int = 10,
                 primary_caps: int = 16, primary_dim: int = 8, class_dim: int = 16):
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
        fan_in = num_classes * primary_caps * primary_dim  # the authors' he_normal on W (J, I, Din, D)
        self.weight = nn.Parameter(math.sqrt(2.0 / fan_in)
                                   * torch.randn(primary_caps, num_classes, class_dim, primary_dim))
        self.coupling_bias = nn.Parameter(torch.zeros(primary_caps, num_classes))
        self.decoder = nn.Sequential(
            nn.Linear(num_classes * class_dim, 512), nn.ReLU(inplace=True),
            nn.Linear(512, 1024), nn.ReLU(inplace=True),
            nn.Linear(1024, 28 * 28), nn.Sigmoid(),
        ) if decoder else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"x must have shape (B, 1, 28, 28), got {tuple(x.shape)}")
        u = self.primary(self.features(x)).reshape(x.shape[0], self.primary_caps, self.primary_dim)
        u = exp_squash_ref(u)
        weight, bias = self.weight, self.coupling_bias
        if weight.dtype != u.dtype:  # autocast: route in u's dtype (fp32 inside the kernels)
            weight, bias = weight.to(u.dtype), bias.to(u.dtype)
        v = transform_self_attention_routing(u, weight, bias, backend=self.backend)  # (B, 10, 16)
        lengths = torch.sqrt((v.float() ** 2).sum(dim=-1) + 1e-12).to(v.dtype)
        recon = None
        if self.decoder is not None:
            picked = y if y is not None else lengths.argmax(dim=1)
            mask = torch.nn.functional.one_hot(picked, self.num_classes).to(v.dtype)
            recon = self.decoder((v * mask.unsqueeze(-1)).flatten(1))
        return lengths, recon, v
