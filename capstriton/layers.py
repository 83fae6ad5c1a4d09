"""Capsule layers: PrimaryCaps (convolutional capsules) and DigitCaps (transform + routing)."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ._backend import BACKENDS
from ._validation import check_iterations
from .routing import get_routing, transform_route
from .routing.registry import resolve_options
from .squash import squash


class PrimaryCaps(nn.Module):
    """Conv2d producing num_caps capsule types of caps_dim each per position, squashed.

    (B, in_channels, H, W) -> (B, num_caps * H' * W', caps_dim); capsules are ordered
    (type, row, column), e.g. 32 x 6 x 6 = 1152 for MNIST.
    """

    def __init__(self, in_channels: int = 256, num_caps: int = 32, caps_dim: int = 8, kernel_size: int = 9,
                 stride: int = 2, backend: str = "auto"):
        super().__init__()
        self.num_caps, self.caps_dim, self.backend = num_caps, caps_dim, backend
        self.conv = nn.Conv2d(in_channels, num_caps * caps_dim, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        u = rearrange(out, "b (n d) h w -> b (n h w) d", n=self.num_caps, d=self.caps_dim)
        return squash(u, dim=-1, backend=self.backend)


class DigitCaps(nn.Module):
    """Fully connected capsule layer with routing.

    Each input capsule i has its own learned matrix W[i, j] per output capsule j
    (``weight`` has shape (in_caps, out_caps, out_dim, in_dim)).  ``routing`` names a registered
    algorithm, looked up when the layer is built (``capstriton.routing.routing_names()``):
      * "dynamic" (default): routing-by-agreement (Sabour et al. 2017), ``iterations`` times;
      * "self-attention" (Efficient-CapsNet): no iterations; owns ``coupling_bias`` (in_caps, out_caps);
      * "inverted-attention" (Tsai et al. 2020): ``iterations`` (default 2) of attention with a
        LayerNorm whose affine ``ln_weight``, ``ln_bias`` (out_dim,) the layer owns;
      * any algorithm added with ``capstriton.register_routing``: the layer owns the parameters
        its entry declares, and ``**options`` sets its other keywords.
    On the triton backend u_hat = W u is never materialized.

    forward(u (B, in_caps, in_dim), **inputs) -> v (B, out_caps, out_dim), or (v, *extra outputs)
    for an algorithm with extra inputs / outputs (passed and returned as ``transform_route`` does).
    """

    def __init__(self, in_caps: int = 1152, in_dim: int = 8, out_caps: int = 10, out_dim: int = 16,
                 iterations: int | None = None, detach: bool = False, backend: str = "auto", init_std: float = 0.01,
                 routing: str = "dynamic", **options):
        super().__init__()
        algorithm = get_routing(routing)
        self.routing_options = resolve_options(algorithm, {**options, "iterations": iterations, "detach": detach})
        if "iterations" in self.routing_options:
            check_iterations(self.routing_options["iterations"])
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for name, value in (("in_caps", in_caps), ("in_dim", in_dim), ("out_caps", out_caps), ("out_dim", out_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.backend, self.routing = backend, routing
        # shape (in_caps, out_caps, out_dim, in_dim), stored as (in_caps, in_dim, out_caps, out_dim): the
        # fused kernels read that layout, so no transposed copy is made per call
        stored = init_std * torch.randn(in_caps, in_dim, out_caps, out_dim)
        self.weight = nn.Parameter(stored.permute(0, 2, 3, 1))
        self._routing_parameters = {}  # layer attribute -> the routing option it is passed as
        for attr, parameter in algorithm.parameters(in_caps, out_caps, out_dim).items():
            setattr(self, attr, nn.Parameter(parameter.init))
            self._routing_parameters[attr] = parameter.option
            self.routing_options.pop(parameter.option, None)

    @property
    def iterations(self) -> int:
        """Routing iterations (1 for an algorithm that takes none)."""
        return self.routing_options.get("iterations", 1)

    @property
    def detach(self) -> bool:
        return bool(self.routing_options.get("detach", False))

    def forward(self, u: torch.Tensor, **inputs):
        # under autocast u may arrive in half precision: compute in u's dtype (fp32 inside the kernels)
        cast = lambda p: p if p.dtype == u.dtype or not u.is_floating_point() else p.to(u.dtype)  # noqa: E731
        options = {option: cast(getattr(self, attr)) for attr, option in self._routing_parameters.items()}
        return transform_route(u, cast(self.weight), backend=self.backend, routing=self.routing,
                               **self.routing_options, **options, **inputs)

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.routing_options.items() if not isinstance(v, torch.Tensor))
        return (f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
                f"out_dim={self.out_dim}, routing={self.routing!r}{options}, backend={self.backend!r}")
