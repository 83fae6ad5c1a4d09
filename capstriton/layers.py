"""Capsule layers: PrimaryCaps (convolutional capsules) and DigitCaps (transform + routing)."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ._backend import BACKENDS
from ._validation import check_iterations
from .inverted_attention_routing import transform_inverted_attention_routing
from .self_attention_routing import transform_self_attention_routing
from .squash import squash
from .transform_route import transform_route

ROUTINGS = ("dynamic", "self-attention", "inverted-attention")


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
    (``weight`` has shape (in_caps, out_caps, out_dim, in_dim)).  ``routing``:
      * "dynamic" (default): routing-by-agreement (Sabour et al. 2017), ``iterations`` times;
      * "self-attention" (Efficient-CapsNet): no iterations; owns ``coupling_bias`` (in_caps, out_caps);
      * "inverted-attention" (Tsai et al. 2020): ``iterations`` (default 2) of attention with a
        LayerNorm whose affine ``ln_weight``, ``ln_bias`` (out_dim,) the layer owns.
    On the triton backend u_hat = W u is never materialized.

    forward(u (B, in_caps, in_dim)) -> v (B, out_caps, out_dim)
    """

    def __init__(self, in_caps: int = 1152, in_dim: int = 8, out_caps: int = 10, out_dim: int = 16,
                 iterations: int | None = None, detach: bool = False, backend: str = "auto", init_std: float = 0.01,
                 routing: str = "dynamic"):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if routing == "self-attention" and (iterations is not None or detach):
            raise ValueError("routing='self-attention' has no iterations and no detach, got "
                             f"iterations={iterations!r}, detach={detach!r}")
        if routing == "inverted-attention" and detach:
            raise ValueError("routing='inverted-attention' has no detach, got detach=True")
        if iterations is None:
            iterations = {"dynamic": 3, "self-attention": 1, "inverted-attention": 2}[routing]
        check_iterations(iterations)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for name, value in (("in_caps", in_caps), ("in_dim", in_dim), ("out_caps", out_caps), ("out_dim", out_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.iterations, self.detach, self.backend = iterations, detach, backend
        # shape (in_caps, out_caps, out_dim, in_dim), stored as (in_caps, in_dim, out_caps, out_dim): the
        # fused kernels read that layout, so no transposed copy is made per call
        stored = init_std * torch.randn(in_caps, in_dim, out_caps, out_dim)
        self.weight = nn.Parameter(stored.permute(0, 2, 3, 1))
        self.routing = routing
        if routing == "self-attention":
            self.coupling_bias = nn.Parameter(torch.zeros(in_caps, out_caps))
        elif routing == "inverted-attention":
            self.ln_weight = nn.Parameter(torch.ones(out_dim))
            self.ln_bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        # under autocast u may arrive in half precision: compute in u's dtype (fp32 inside the kernels)
        cast = lambda p: p if p.dtype == u.dtype or not u.is_floating_point() else p.to(u.dtype)  # noqa: E731
        weight = cast(self.weight)
        if self.routing == "self-attention":
            return transform_self_attention_routing(u, weight, cast(self.coupling_bias), backend=self.backend)
        if self.routing == "inverted-attention":
            return transform_inverted_attention_routing(u, weight, self.iterations, cast(self.ln_weight),
                                                        cast(self.ln_bias), backend=self.backend)
        return transform_route(u, weight, iterations=self.iterations, detach=self.detach, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
                f"out_dim={self.out_dim}, iterations={self.iterations}, detach={self.detach}, "
                f"backend={self.backend!r}, routing={self.routing!r}")
