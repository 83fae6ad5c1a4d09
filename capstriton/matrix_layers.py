"""Matrix capsule layers with EM routing (Hinton, Sabour & Frosst 2018): ``PrimaryMatrixCaps``
(a 1x1 convolution to 4x4 poses and sigmoid activations), ``ConvCaps`` (convolutional capsules,
K x K VALID windows, EM routing where every child is normalised over all the parents it feeds)
and ``ClassCaps`` (class capsules, transformation matrices shared over positions, coordinate
addition).  Capsule types are last: poses (B, H, W, types, 4, 4), activations (B, H, W, types).

The layers route with ``capstriton.conv_caps_route`` / ``capstriton.class_caps_route``: on the
triton backend the fused kernels (never materializing the votes), on the torch backend (CPU,
float64) their plain-PyTorch implementation (``capstriton.routing.em_torch``).

Per-layer inverse temperatures (lambda_final of the spec's E8, paper form): the spec follows the
authors' code, whose class layer uses a quarter of the conv layers' value (beta_final 0.01 and
0.01 / 4 in its reparametrised form, i.e. lambda_final 0.02 for ``ConvCaps`` and 0.005 for
``ClassCaps`` under ``cost_normalization="none"``).  With ``cost_normalization="ibm"`` use 0.01
in every layer (the IBM code's setting).  ``inverse_temperature=None`` picks these defaults.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .layers import CapsuleModule, _check_backend
from .matrix_caps import check_class_caps
from .routing.em import class_caps_route
from .routing.em_conv import conv_caps_route

__all__ = ["PrimaryMatrixCaps", "ConvCaps", "ClassCaps", "CONV_INVERSE_TEMPERATURE", "CLASS_INVERSE_TEMPERATURE"]

# lambda_final per layer kind (paper form): [G]'s beta_final 0.01 (conv) and 0.01 / 4 (class) x 2
CONV_INVERSE_TEMPERATURE = {"none": 0.02, "ibm": 0.01}
CLASS_INVERSE_TEMPERATURE = {"none": 0.005, "ibm": 0.01}
COST_NORMALIZATIONS = ("none", "ibm")


def _check_options(iterations, cost_normalization):
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if cost_normalization not in COST_NORMALIZATIONS:
        raise ValueError(f"cost_normalization must be one of {COST_NORMALIZATIONS}, got {cost_normalization!r}")


# --------------------------------------------------------------------------------------------
# layers

def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_inverse_temperature(value, iterations: int):
    if value is None:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 < value < math.inf:
            raise ValueError(f"inverse_temperature must be > 0, got {value!r}")
        return
    if isinstance(value, Sequence) and len(value) == iterations and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in value):
        return
    raise ValueError(f"inverse_temperature must be None (the layer's default), a number > 0 or {iterations} "
                     f"numbers > 0 (one per iteration), got {value!r}")


def _check_capsules(pose, activations, types: int, layer: str) -> None:
    if not isinstance(pose, torch.Tensor) or not isinstance(activations, torch.Tensor):
        raise TypeError(f"{layer} takes pose (B, H, W, {types}, 4, 4) and activations (B, H, W, {types}) tensors, "
                        f"got {type(pose).__name__} and {type(activations).__name__}")
    if pose.dim() != 6 or tuple(pose.shape[3:]) != (types, 4, 4):
        raise ValueError(f"{layer} expects pose (B, H, W, {types}, 4, 4), got shape {tuple(pose.shape)}")
    if tuple(activations.shape) != tuple(pose.shape[:4]):
        raise ValueError(f"{layer} expects activations of shape {tuple(pose.shape[:4])} (the pose's B, H, W, "
                         f"types), got {tuple(activations.shape)}")


class PrimaryMatrixCaps(CapsuleModule):
    """Primary matrix capsules: a ``kernel_size`` convolution (1x1 in the paper) from
    ``in_channels`` feature maps to ``types`` capsule types per position, each a 4x4 pose
    (16 channels, linear) and an activation (1 channel, sigmoid), both with biases.

    forward(x (B, in_channels, H, W)) -> (pose (B, H', W', types, 4, 4), activations
    (B, H', W', types)).  Parameters: (in_channels k^2 + 1) x 17 types.  Pose weights
    default-initialised like ``nn.Conv2d`` (kaiming uniform); activation bias 0, so activations
    start near 0.5."""

    def __init__(self, in_channels: int, types: int, kernel_size: int = 1, backend: str = "auto"):
        super().__init__()
        _check_backend(backend)
        self.in_channels, self.types = _positive_int("in_channels", in_channels), _positive_int("types", types)
        self.kernel_size, self.backend = _positive_int("kernel_size", kernel_size), backend
        self.pose = nn.Conv2d(in_channels, types * 16, kernel_size)
        self.activation = nn.Conv2d(in_channels, types, kernel_size)
        nn.init.zeros_(self.activation.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            given = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"PrimaryMatrixCaps expects x (B, {self.in_channels}, H, W), got {given}")
        p = self.pose(x)                                            # (B, types*16, H, W)
        B, _, H, W = p.shape
        pose = p.view(B, self.types, 4, 4, H, W).permute(0, 4, 5, 1, 2, 3)
        acts = torch.sigmoid(self.activation(x)).permute(0, 2, 3, 1)
        return pose, acts

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, types={self.types}, kernel_size={self.kernel_size}"


class _EMCaps(CapsuleModule):
    """What ConvCaps and ClassCaps share: the routing options and beta_u, beta_a (out_types,)."""
    default_temperature: dict = CONV_INVERSE_TEMPERATURE

    def _setup(self, in_types, out_types, iterations, inverse_temperature, eps, min_var, cost_normalization,
               backend, beta_u, beta_a):
        _check_backend(backend)
        self.in_types, self.out_types = _positive_int("in_types", in_types), _positive_int("out_types", out_types)
        _check_options(iterations, cost_normalization)
        _check_inverse_temperature(inverse_temperature, iterations)
        if not (isinstance(eps, (int, float)) and eps >= 0 and isinstance(min_var, (int, float)) and min_var >= 0):
            raise ValueError(f"eps and min_var must be numbers >= 0, got {eps!r} and {min_var!r}")
        if inverse_temperature is None:
            inverse_temperature = self.default_temperature[cost_normalization]
        self.iterations, self.cost_normalization, self.backend = iterations, cost_normalization, backend
        self.inverse_temperature = (inverse_temperature if isinstance(inverse_temperature, (int, float))
                                    else tuple(float(v) for v in inverse_temperature))
        self.eps, self.min_var = float(eps), float(min_var)
        self.beta_u = nn.Parameter(torch.full((out_types,), float(beta_u)))
        self.beta_a = nn.Parameter(torch.full((out_types,), float(beta_a)))

    def route_options(self) -> dict:
        return {"iterations": self.iterations, "inverse_temperature": self.inverse_temperature, "eps": self.eps,
                "min_var": self.min_var, "cost_normalization": self.cost_normalization}

    def _cast(self, pose):
        """The parameters in the input's dtype under autocast (the routing computes in it)."""
        params = (self.weight, self.beta_u, self.beta_a)
        if pose.dtype != self.weight.dtype and torch.is_autocast_enabled():
            return tuple(p.to(pose.dtype) for p in params)
        return params

    def extra_repr(self) -> str:
        return (f"in_types={self.in_types}, out_types={self.out_types}, iterations={self.iterations}, "
                f"inverse_temperature={self.inverse_temperature}, cost_normalization={self.cost_normalization!r}, "
                f"backend={self.backend!r}")


class ConvCaps(_EMCaps):
    """Convolutional matrix capsules with EM routing (spec section 4): every parent (oh, ow, c)
    routes the K x K x in_types children of its VALID window, and every child is normalised over
    all the parents it feeds (positions and types, C5).

    Owns ``weight`` (K, K, in_types, out_types, 4, 4), one 4x4 transformation per (kernel
    offset, child type, parent type), and ``beta_u``, ``beta_a`` (out_types,), shared by all
    positions: K^2 in out 16 + 2 out parameters.

    forward(pose (B, H, W, in_types, 4, 4), activations (B, H, W, in_types)) -> (pose
    (B, OH, OW, out_types, 4, 4), activations (B, OH, OW, out_types)), OH = (H - K) // stride + 1.

    Arguments: ``iterations`` (3), ``inverse_temperature`` (lambda_final of E8, or one value per
    iteration; None: 0.02 under ``cost_normalization="none"``, the authors' conv-layer value in
    paper form, 0.01 under "ibm"), ``eps``, ``min_var``, ``cost_normalization`` ("none" or
    "ibm"), ``backend`` ("auto", "torch", "triton"; ``set_backend`` changes it).
    ``init_std``: the weight is drawn from a normal truncated at 2 std (default 0.5: a vote then
    has the pose's scale, 4 x 0.5^2 = 1; the authors' code uses 0.3).  ``beta_u``, ``beta_a``:
    initial values (default 0: with lambda_final 0.02 the initial activations lie near 0.5)."""

    def __init__(self, in_types: int, out_types: int, kernel_size: int = 3, stride: int = 1, iterations: int = 3,
                 inverse_temperature: float | Sequence[float] | None = None, eps: float = 1e-8, min_var: float = 5e-4,
                 cost_normalization: str = "none", backend: str = "auto", init_std: float = 0.5,
                 beta_u: float = 0.0, beta_a: float = 0.0):
        super().__init__()
        self._setup(in_types, out_types, iterations, inverse_temperature, eps, min_var, cost_normalization, backend,
                    beta_u, beta_a)
        self.kernel_size, self.stride = _positive_int("kernel_size", kernel_size), _positive_int("stride", stride)
        self.init_std = float(init_std)
        weight = torch.empty(kernel_size, kernel_size, in_types, out_types, 4, 4)
        nn.init.trunc_normal_(weight, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std)
        self.weight = nn.Parameter(weight)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        K, s = self.kernel_size, self.stride
        if K > height or K > width:
            raise ValueError(f"ConvCaps(kernel_size={K}) needs a capsule grid of at least {K} x {K}, "
                             f"got {height} x {width}")
        return (height - K) // s + 1, (width - K) // s + 1

    def forward(self, pose: torch.Tensor, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_capsules(pose, activations, self.in_types, "ConvCaps")
        self.output_size(pose.shape[1], pose.shape[2])
        W, beta_u, beta_a = self._cast(pose)
        mu, a = conv_caps_route(pose, activations, W, beta_u, beta_a, self.stride, backend=self.backend,
                                **self.route_options())
        return mu.unflatten(-1, (4, 4)), a

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, " + super().extra_repr()


class ClassCaps(_EMCaps):
    """Class capsules with EM routing (spec section 6): one 4x4 transformation per (child type,
    class), shared by all positions; children flattened (h, w, type); with
    ``coordinate_addition`` the scaled centre of each child's position, (h + 1/2)/H and
    (w + 1/2)/W, is added to vote elements 3 and 7 (V[0, 3], V[1, 3]).

    Owns ``weight`` (in_types, classes, 4, 4), ``beta_u``, ``beta_a`` (classes,):
    16 in classes + 2 classes parameters.

    forward(pose (B, H, W, in_types, 4, 4), activations (B, H, W, in_types)) -> (pose
    (B, classes, 4, 4), activations (B, classes)).

    ``inverse_temperature`` None: 0.005 under ``cost_normalization="none"`` (the authors' class
    layer uses a quarter of the conv layers' value), 0.01 under "ibm".  ``init_std`` (default
    0.5, truncated normal) and the other arguments as for ``ConvCaps``."""
    default_temperature = CLASS_INVERSE_TEMPERATURE

    def __init__(self, in_types: int, classes: int, coordinate_addition: bool = True, iterations: int = 3,
                 inverse_temperature: float | Sequence[float] | None = None, eps: float = 1e-8, min_var: float = 5e-4,
                 cost_normalization: str = "none", backend: str = "auto", init_std: float = 0.5,
                 beta_u: float = 0.0, beta_a: float = 0.0):
        super().__init__()
        self._setup(in_types, classes, iterations, inverse_temperature, eps, min_var, cost_normalization, backend,
                    beta_u, beta_a)
        if not isinstance(coordinate_addition, bool):
            raise TypeError(f"coordinate_addition must be a bool, got {coordinate_addition!r}")
        self.classes, self.coordinate_addition, self.init_std = classes, coordinate_addition, float(init_std)
        weight = torch.empty(in_types, classes, 4, 4)
        nn.init.trunc_normal_(weight, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std)
        self.weight = nn.Parameter(weight)

    def forward(self, pose: torch.Tensor, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_capsules(pose, activations, self.in_types, "ClassCaps")
        W, beta_u, beta_a = self._cast(pose)
        check_class_caps(pose, W)
        mu, a = class_caps_route(pose, activations, W, beta_u, beta_a, self.coordinate_addition, backend=self.backend,
                                 **self.route_options())
        return mu.unflatten(-1, (4, 4)), a

    def extra_repr(self) -> str:
        return f"coordinate_addition={self.coordinate_addition}, " + super().extra_repr()
