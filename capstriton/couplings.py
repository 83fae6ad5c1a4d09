"""Final coupling coefficients of each routing algorithm, for analysis (computed by the
plain-PyTorch reference, without gradients: u_hat is materialized)."""
from __future__ import annotations

import torch

from .reference import (caps_transform_ref, dynamic_routing_ref, inverted_attention_routing_ref,
                        self_attention_couplings_ref)

__all__ = ["routing_couplings"]


@torch.no_grad()
def routing_couplings(u: torch.Tensor, W: torch.Tensor, routing: str, iterations: int, bias=None, weight=None,
                      eps: float = 1e-5) -> torch.Tensor:
    """c (B, I, J): the couplings of the last routing iteration for u (B, I, Din), W (I, J, D, Din).

    dynamic: softmax_j(u_hat_ij . (v^1 + ... + v^{r-1})_j) (the logits are sums of agreements);
    self-attention: softmax + bias; inverted-attention: r of the last iteration."""
    u_hat = caps_transform_ref(u, W)
    if routing == "self-attention":
        return self_attention_couplings_ref(u_hat, bias)
    if routing == "inverted-attention":
        return inverted_attention_routing_ref(u_hat, iterations, weight, bias, eps, return_coupling=True)[1]
    V = torch.zeros_like(u_hat[:, 0])
    for t in range(1, iterations):
        V += dynamic_routing_ref(u_hat, t)
    return torch.softmax((u_hat * V.unsqueeze(1)).sum(dim=-1), dim=2)
