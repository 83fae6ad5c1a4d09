"""Margin loss of Sabour et al. (2017), eq. 4."""
from __future__ import annotations

import torch

from ._validation import check_tensor


def margin_loss(lengths: torch.Tensor, targets: torch.Tensor, m_pos: float = 0.9, m_neg: float = 0.1,
                lam: float = 0.5) -> torch.Tensor:
    """L = sum_k T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2, summed over
    classes k and averaged over the batch.

    lengths: (B, K) capsule lengths.  targets: (B,) integer class labels, or (B, K) one-hot /
    multi-hot floats (for several digits per image).
    """
    check_tensor("lengths", lengths, 2, " (B, K)")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    B, K = lengths.shape
    if targets.dim() == 1 and not targets.is_floating_point():
        if targets.shape[0] != B:
            raise ValueError(f"targets must have shape ({B},) to match lengths {tuple(lengths.shape)}, "
                             f"got {tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= K):
            raise ValueError(f"class labels must lie in [0, {K}), got values in "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        T = torch.nn.functional.one_hot(targets, K).to(lengths.dtype)
    elif targets.dim() == 2 and targets.is_floating_point():
        if targets.shape != lengths.shape:
            raise ValueError(f"one-hot targets must have the shape of lengths {tuple(lengths.shape)}, "
                             f"got {tuple(targets.shape)}")
        T = targets.to(lengths.dtype)
    else:
        raise ValueError("targets must be integer labels of shape (B,) or float one-hot of shape (B, K), "
                         f"got {targets.dtype} of shape {tuple(targets.shape)}")
    present = T * torch.clamp(m_pos - lengths, min=0.0) ** 2
    absent = lam * (1.0 - T) * torch.clamp(lengths - m_neg, min=0.0) ** 2
    return (present + absent).sum(dim=1).mean()


def reconstruction_loss(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per image, averaged over the batch (scale it by 0.0005)."""
    diff = reconstructions.flatten(1) - images.flatten(1)
    return (diff * diff).sum(dim=1).mean()
