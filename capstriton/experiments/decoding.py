"""The CapsNet decoder fed one chosen capsule: the masked input of the paper's reconstruction
network, for reconstructions of a given class and for perturbed capsules."""
from __future__ import annotations

import torch

from ..models.heads import masked_capsules

__all__ = ["decode_capsule", "perturbation_deltas", "decode_perturbations"]


def decode_capsule(model, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``model.decoder`` applied to the capsule of class ``labels`` alone: (B, pixels)."""
    if getattr(model, "decoder", None) is None:
        raise ValueError("this model has no decoder")
    return model.decoder(masked_capsules(v, labels))


def perturbation_deltas(limit: float = 0.25, step: float = 0.05) -> torch.Tensor:
    """-limit, -limit + step, ..., +limit (the paper's Figure 4: 11 values)."""
    n = int(round(2 * limit / step))
    return torch.linspace(-limit, limit, n + 1)


@torch.no_grad()
def decode_perturbations(model, v: torch.Tensor, label: int, deltas: torch.Tensor) -> torch.Tensor:
    """One sample's capsules v (K, D): each dimension d of capsule ``label`` moved by every delta
    and decoded.  Returns (D, len(deltas), pixels)."""
    K, D = v.shape
    moved = v.unsqueeze(0).unsqueeze(0).repeat(D, len(deltas), 1, 1)  # (D, n, K, D)
    dims = torch.arange(D, device=v.device)
    moved[dims, :, label, dims] += deltas.to(v.device, v.dtype).unsqueeze(0)
    labels = torch.full((D * len(deltas),), label, dtype=torch.long, device=v.device)
    return decode_capsule(model, moved.view(-1, K, D), labels).view(D, len(deltas), -1)
