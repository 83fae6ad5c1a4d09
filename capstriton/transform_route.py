"""transform_route: caps_transform followed by dynamic_routing, fused on the triton backend."""
from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._validation import check_iterations, check_transform_shapes
from .reference import transform_route_ref

__all__ = ["transform_route"]


def transform_route(u: torch.Tensor, W: torch.Tensor, iterations: int = 3, detach: bool = False,
                    backend: str = "auto") -> torch.Tensor:
    """dynamic_routing(caps_transform(u, W)): u (B, I, Din), W (I, J, Dout, Din) -> v (B, J, Dout)."""
    check_transform_shapes(u, W)
    check_iterations(iterations)
    if resolve_backend(backend, u, W) == "torch":
        return transform_route_ref(u, W, iterations, bool(detach))
    raise NotImplementedError("transform_route triton backend: in progress")
