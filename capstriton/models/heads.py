"""What the capsule models share after their class capsules: the capsule lengths (the class
scores), the pick of one capsule per sample (the label's in training, the longest at test time)
and the 3-FC reconstruction decoder fed the picked capsule alone."""
from __future__ import annotations

import torch
from torch import nn

from ..loss import check_labels_async, class_mask

__all__ = ["Decoder", "capsule_lengths", "check_labels", "class_capsules", "masked_capsules",
           "lengths_and_reconstruction"]


class Decoder(nn.Sequential):
    """The reconstruction network of Sabour et al. (2017): FC 512 - ReLU - FC 1024 - ReLU - FC
    ``out_features`` - sigmoid.  Its parameters are ``0.*``, ``2.*`` and ``4.*`` (under a model:
    ``decoder.0.weight`` ...)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(
            nn.Linear(in_features, 512), nn.ReLU(inplace=True),
            nn.Linear(512, 1024), nn.ReLU(inplace=True),
            nn.Linear(1024, out_features), nn.Sigmoid(),
        )


def capsule_lengths(v: torch.Tensor) -> torch.Tensor:
    """(B, K, D) capsules -> (B, K) lengths, summed in fp32 and returned in v's dtype."""
    return torch.sqrt((v.float() ** 2).sum(dim=-1) + 1e-12).to(v.dtype)


def check_labels(y: torch.Tensor | None, batch: int) -> None:
    """ValueError unless ``y`` is None or integer class labels of shape (batch,)."""
    if y is not None and (not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dim() != 1
                          or y.shape[0] != batch):
        given = f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be integer class labels of shape ({batch},), got {given}")


def class_capsules(routed) -> torch.Tensor:
    """The class capsules v (B, K, D) of what a capsule layer returned: v itself, or the first
    of (v, *extra outputs) for a routing that declares outputs."""
    return routed if isinstance(routed, torch.Tensor) else routed[0]


def masked_capsules(v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K, D) capsules, (B,) classes -> (B, K*D): every capsule but the labelled one zeroed
    (a comparison mask: no host sync, unlike one_hot)."""
    return (v * class_mask(labels, v.shape[1]).to(v.dtype).unsqueeze(-1)).flatten(1)


def lengths_and_reconstruction(v: torch.Tensor, decoder: nn.Module | None,
                               y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class capsules (B, K, D) -> (lengths (B, K), reconstructions or None without a decoder).
    The decoder sees the capsule of the label ``y`` (checked on the device: no host sync) or,
    when ``y`` is None, of the longest capsule."""
    lengths = capsule_lengths(v)
    if decoder is None:
        return lengths, None
    if y is not None:
        check_labels_async(y, v.shape[1])
        picked = y
    else:
        picked = lengths.argmax(dim=1)
    return lengths, decoder(masked_capsules(v, picked))
