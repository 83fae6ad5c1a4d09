"""dynamic_routing: routing-by-agreement over precomputed prediction vectors u_hat."""
from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._validation import check_iterations, check_tensor
from .reference import dynamic_routing_ref

__all__ = ["dynamic_routing"]


def dynamic_routing(u_hat: torch.Tensor, iterations: int = 3, detach: bool = False,
                    backend: str = "auto") -> torch.Tensor:
    """Routing-by-agreement (Procedure 1): u_hat (B, I, J, D) -> v (B, J, D)."""
    check_tensor("u_hat", u_hat, 4, " (B, I, J, D)")
    check_iterations(iterations)
    if resolve_backend(backend, u_hat) == "torch":
        return dynamic_routing_ref(u_hat, iterations, bool(detach))
    raise NotImplementedError("dynamic_routing triton backend: in progress")
