"""CapsNet on MultiMNIST (paper section 6): both labels present in the margin loss, each
digit reconstructed from its own capsule, prediction = the two longest capsules."""
from __future__ import annotations

import torch

from ..loss import margin_loss, reconstruction_loss
from .decoding import decode_capsule

__all__ = ["multi_hot", "multimnist_loss", "top2", "pair_errors"]


def multi_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, n) integer labels -> (B, num_classes) floats with a 1 at every listed class."""
    out = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels, 1.0)


def multimnist_loss(model, x: torch.Tensor, sources: torch.Tensor, labels: torch.Tensor, recon_weight: float):
    """Margin loss with both classes present plus ``recon_weight`` x the summed reconstruction
    losses of the two shifted source digits, each decoded from its own class's capsule.

    x (B, 1, H, W) and sources (B, 2, H, W) in [0, 1], labels (B, 2).  Returns (loss, lengths).
    """
    lengths, recon_first, v = model(x, labels[:, 0])
    loss = margin_loss(lengths, multi_hot(labels, lengths.shape[1], lengths.dtype))
    if recon_first is not None and recon_weight:
        recon_second = decode_capsule(model, v, labels[:, 1])
        loss = loss + recon_weight * (reconstruction_loss(recon_first, sources[:, 0])
                                      + reconstruction_loss(recon_second, sources[:, 1]))
    return loss, lengths


def top2(lengths: torch.Tensor) -> torch.Tensor:
    """(B, K) capsule lengths -> (B, 2) classes of the two longest capsules, longest first."""
    return lengths.topk(2, dim=1).indices


def pair_errors(predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(B,) bool: True where the predicted pair of classes differs from the true pair (order
    ignored)."""
    if predicted.shape != true.shape or predicted.dim() != 2 or predicted.shape[1] != 2:
        raise ValueError(f"expected two (B, 2) tensors, got {tuple(predicted.shape)} and {tuple(true.shape)}")
    return (predicted.sort(1).values != true.sort(1).values).any(1)
