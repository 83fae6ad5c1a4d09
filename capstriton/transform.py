"""caps_transform: u_hat[b, i, j] = W[i, j] @ u[b, i]."""
from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._validation import check_transform_shapes
from .reference import caps_transform_ref

__all__ = ["caps_transform"]


def caps_transform(u: torch.Tensor, W: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Per-capsule weight transform: u (B, I, Din), W (I, J, Dout, Din) -> u_hat (B, I, J, Dout)."""
    check_transform_shapes(u, W)
    if resolve_backend(backend, u, W) == "torch":
        return caps_transform_ref(u, W)
    raise NotImplementedError("caps_transform triton backend: in progress")
