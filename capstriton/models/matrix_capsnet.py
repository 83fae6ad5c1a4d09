"""Matrix capsules with EM routing (Hinton, Sabour & Frosst, ICLR 2018), the network of the
paper's Fig. 1: ReLU conv1 -> primary capsules -> two convolutional capsule layers -> class
capsules with coordinate addition."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..layers import CapsuleModule, _check_backend
from ..matrix_layers import ClassCaps, ConvCaps, PrimaryMatrixCaps

__all__ = ["MatrixCapsNet"]


class MatrixCapsNet(CapsuleModule):
    """ReLU conv1 5x5 stride 2 (A channels) -> ``PrimaryMatrixCaps`` (1x1, B types) -> ``ConvCaps``
    3x3 stride 2 (C types) -> ``ConvCaps`` 3x3 stride 1 (D types) -> ``ClassCaps`` (``classes``,
    coordinate addition), EM routing in every capsule layer.

    Padding: VALID everywhere (the authors' code).  32x32 smallNORB crops give 14 -> 14 -> 6 -> 4
    positions (the class layer routes 4 x 4 x D children); 28x28 MNIST digits give
    12 -> 12 -> 5 -> 3 (3 x 3 x D children).  Parameters with one input channel: 316,394 for
    A=B=C=D=32 and 5 classes (smallNORB), 318,964 with 10 classes (MNIST), 67,154 for the small
    network A=64, B=8, C=D=16 and 5 classes (68,444 with 10 classes).

    ``forward(x (B, in_channels, H, W), return_poses=False)`` -> class activations (B, classes)
    in [0, 1] (train with ``capstriton.spread_loss``), or (activations, class poses
    (B, classes, 4, 4)) with ``return_poses``.

    Arguments: ``iterations``, ``cost_normalization``, ``eps``, ``min_var`` for every capsule
    layer; ``inverse_temperature`` (None: each layer's default, 0.02 for the conv capsules and
    0.005 for the class capsules under "none", 0.01 under "ibm") and ``class_inverse_temperature``
    (None: the same rule); ``coordinate_addition``; ``init_std`` of the capsule layers'
    transformation matrices; ``backend`` ("auto", "torch", "triton"; ``set_backend`` changes it).
    """

    def __init__(self, A: int = 32, B: int = 32, C: int = 32, D: int = 32, classes: int = 5, in_channels: int = 1,
                 iterations: int = 3, inverse_temperature: float | Sequence[float] | None = None,
                 class_inverse_temperature: float | Sequence[float] | None = None, cost_normalization: str = "none",
                 coordinate_addition: bool = True, eps: float = 1e-8, min_var: float = 5e-4, init_std: float = 0.5,
                 backend: str = "auto"):
        super().__init__()
        _check_backend(backend)
        for name, value in (("A", A), ("B", B), ("C", C), ("D", D), ("classes", classes), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.A, self.B, self.C, self.D, self.classes, self.in_channels = A, B, C, D, classes, in_channels
        self.backend = backend
        routing = {"iterations": iterations, "cost_normalization": cost_normalization, "eps": eps,
                   "min_var": min_var, "init_std": init_std, "backend": backend}
        self.conv1 = nn.Conv2d(in_channels, A, 5, stride=2)
        self.primary = PrimaryMatrixCaps(A, B, backend=backend)
        self.conv_caps1 = ConvCaps(B, C, 3, stride=2, inverse_temperature=inverse_temperature, **routing)
        self.conv_caps2 = ConvCaps(C, D, 3, stride=1, inverse_temperature=inverse_temperature, **routing)
        self.class_caps = ClassCaps(D, classes, coordinate_addition=coordinate_addition,
                                    inverse_temperature=class_inverse_temperature, **routing)

    def grid_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The capsule grids (primary, conv caps 1, conv caps 2) for (height, width) inputs."""
        h, w = (height - 5) // 2 + 1, (width - 5) // 2 + 1
        sizes = [(h, w)]
        for layer in (self.conv_caps1, self.conv_caps2):
            h, w = layer.output_size(h, w)
            sizes.append((h, w))
        return sizes

    def forward(self, x: torch.Tensor, return_poses: bool = False):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            given = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MatrixCapsNet expects x (B, {self.in_channels}, H, W), got {given}")
        if min(x.shape[2:]) < 5:
            raise ValueError(f"MatrixCapsNet needs inputs of at least 5 x 5 pixels, got shape {tuple(x.shape)}")
        self.grid_sizes(x.shape[2], x.shape[3])  # too small an input: a ValueError naming the layer
        pose, a = self.primary(torch.relu(self.conv1(x)))
        pose, a = self.conv_caps1(pose, a)
        pose, a = self.conv_caps2(pose, a)
        pose, a = self.class_caps(pose, a)
        return (a, pose) if return_poses else a

    def extra_repr(self) -> str:
        return f"A={self.A}, B={self.B}, C={self.C}, D={self.D}, classes={self.classes}, backend={self.backend!r}"
