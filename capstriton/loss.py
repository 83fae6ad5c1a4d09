"""Margin loss of Sabour et al. (2017), eq. 4; reconstruction loss; spread loss of Hinton et al.
(2018), eq. 3, with its margin schedules."""
from __future__ import annotations

import math

import torch

from ._validation import check_tensor


def class_mask(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, num_classes) bool mask, True at each row's label: one_hot by comparison (no host sync)."""
    return labels[:, None] == torch.arange(num_classes, device=labels.device)


def check_labels_async(labels: torch.Tensor, num_classes: int) -> None:
    """Device-side check that every label lies in [0, num_classes): RuntimeError at once on the
    CPU, at the next synchronization on CUDA.  Unlike a ValueError check it never stalls the
    host, so a training step stays free of syncs (the training scripts check a dataset's labels
    once at load with a ValueError)."""
    in_range = ((labels >= 0) & (labels < num_classes)).all()
    torch._assert_async(in_range, f"class labels must lie in [0, {num_classes}), got a label outside it")


def margin_loss(lengths: torch.Tensor, targets: torch.Tensor, m_pos: float = 0.9, m_neg: float = 0.1,
                lam: float = 0.5) -> torch.Tensor:
    """L = sum_k T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2, summed over
    classes k and averaged over the batch.

    lengths: (B, K) capsule lengths.  targets: (B,) integer class labels, or (B, K) one-hot /
    multi-hot floats (for several digits per image).  Integer labels outside [0, K) raise a
    RuntimeError through a device-side assert (see ``check_labels_async``): no host sync.
    """
    check_tensor("lengths", lengths, 2, " (B, K)")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    B, K = lengths.shape
    if targets.dtype == torch.bool:
        raise TypeError("targets must be integer class labels (B,) or float one-hot (B, K), got torch.bool "
                        "(bool labels would be read as the classes 0 and 1): convert them explicitly")
    if targets.dim() == 1 and not targets.is_floating_point():
        if targets.shape[0] != B:
            raise ValueError(f"targets must have shape ({B},) to match lengths {tuple(lengths.shape)}, "
                             f"got {tuple(targets.shape)}")
        check_labels_async(targets, K)
        T = class_mask(targets, K).to(lengths.dtype)
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
    """Sum of squared pixel errors per image, averaged over the batch (scale it by 0.0005).

    reconstructions (B, ...) and images (B, ...): floating-point, the same batch size B >= 1
    and the same number of pixels per image (the layouts may differ: (B, 784) and
    (B, 1, 28, 28)).  TypeError / ValueError otherwise (never a silent broadcast)."""
    if not (isinstance(reconstructions, torch.Tensor) and isinstance(images, torch.Tensor)
            and reconstructions.dim() >= 2 and images.dim() >= 2 and reconstructions.shape[0] == images.shape[0]
            and reconstructions.numel() > 0 and reconstructions.numel() == images.numel()
            and reconstructions.is_floating_point() and images.is_floating_point()):
        _explain_reconstruction_inputs(reconstructions, images)
    diff = reconstructions.flatten(1) - images.flatten(1)
    return (diff * diff).sum(dim=1).mean()


def _explain_reconstruction_inputs(reconstructions, images) -> None:
    """The TypeError / ValueError for inputs that ``reconstruction_loss`` refuses."""
    for name, t in (("reconstructions", reconstructions), ("images", images)):
        check_tensor(name, t, None, " (B, ...)")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (B, ...) with a batch dimension and pixel dimensions, "
                             f"got shape {tuple(t.shape)}")
    if reconstructions.shape[0] != images.shape[0]:
        raise ValueError(f"reconstructions and images must have the same batch size, got "
                         f"{tuple(reconstructions.shape)} and {tuple(images.shape)}")
    raise ValueError(f"reconstructions and images must have the same number of pixels per image, got "
                     f"{tuple(reconstructions.shape)} and {tuple(images.shape)}")


def spread_loss(activations: torch.Tensor, targets: torch.Tensor, margin: float | torch.Tensor = 0.2) -> torch.Tensor:
    """Spread loss (Hinton, Sabour & Frosst 2018, eq. 3; spec L1): the mean over the batch of
    sum_{i != t} max(0, m - (a_t - a_i))^2, with a the class activations and t the target class.

    activations: (B, E) floating point, in [0, 1] (checked on the device: a RuntimeError through
    a device-side assert, no host sync; E >= 2).  targets: (B,) integer class labels in [0, E)
    (checked likewise).  margin: m, a number in [0, 1] or a 0-dim tensor (e.g. filled in place
    by a schedule under CUDA graphs); ``spread_margin`` / ``spread_margin_sigmoid`` give the
    paper's and the authors' schedules.  Per example, [P]; the batch mean is [I]'s reduction (the
    authors' code also divides by E).
    """
    check_tensor("activations", activations, 2, " (B, E)")
    if activations.shape[1] < 2:
        raise ValueError(f"activations must have at least 2 classes (B, E >= 2), got shape {tuple(activations.shape)}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of integer class labels (B,), got {type(targets).__name__}")
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"targets must be integer class labels (B,), got {targets.dtype}")
    B, E = activations.shape
    if targets.dim() != 1 or targets.shape[0] != B:
        raise ValueError(f"targets must have shape ({B},) to match activations {tuple(activations.shape)}, "
                         f"got {tuple(targets.shape)}")
    if targets.device != activations.device:
        raise ValueError(f"targets and activations must be on the same device, got {targets.device} and "
                         f"{activations.device}")
    if isinstance(margin, torch.Tensor):
        if margin.dim() != 0:
            raise ValueError(f"margin must be a number or a 0-dim tensor, got shape {tuple(margin.shape)}")
    elif isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 1:
        raise ValueError(f"margin must be a number in [0, 1] (the paper grows it from 0.2 to 0.9), got {margin!r}")
    check_labels_async(targets, E)
    in_range = ((activations >= 0) & (activations <= 1)).all()
    torch._assert_async(in_range, "spread_loss: activations must lie in [0, 1], got a value outside it")
    mask = class_mask(targets, E)
    a = activations.float() if activations.dtype in (torch.float16, torch.bfloat16) else activations
    a_t = (a * mask).sum(dim=1, keepdim=True)
    gap = torch.clamp(margin - (a_t - a), min=0.0) ** 2
    return gap.masked_fill(mask, 0.0).sum(dim=1).mean()


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {type(value).__name__} {value!r}")
    return float(value)


def spread_margin(progress: float, start: float = 0.2, end: float = 0.9) -> float:
    """The paper's margin schedule (spec L2a): start + (end - start) x progress, "starting with a
    small margin of 0.2 and linearly increasing it during training to 0.9"; progress (the
    fraction of the run done) is clamped to [0, 1]."""
    progress = min(max(_check_number("progress", progress), 0.0), 1.0)
    return _check_number("start", start) + (_check_number("end", end) - start) * progress


def spread_margin_sigmoid(step: int | float) -> float:
    """The authors' code's margin schedule (spec L2b): 0.2 + 0.79 x sigmoid(min(10, step / 50000
    - 4)): 0.214 at step 0, 0.595 at step 200k, saturating near 0.99."""
    x = min(10.0, _check_number("step", step) / 50000.0 - 4.0)
    return 0.2 + 0.79 / (1.0 + math.exp(-x))
