"""The votes of matrix capsules (Hinton, Sabour & Frosst 2018, "Matrix capsules with EM routing"):
V = M @ W, a 4x4 pose times a 4x4 transformation matrix, flattened row-major to 16 (element
h = 4 r + c holds V[r, c]).  See docs/em-routing or the spec's sections 1, 4 (C1-C2) and 6 (K1-K2).

    matrix_transform(pose (B, I, 4, 4), W (I, J, 4, 4))            -> votes (B, I, J, 16)
    conv_caps_votes(pose (B, H, W, A, 4, 4), W (K, K, A, C, 4, 4), stride)
                                                                     -> votes (B, OH, OW, K, K, A, C, 16)
    class_caps_votes(pose (B, H, W, A, 4, 4), W (A, J, 4, 4), coordinate_addition=True)
                                                                     -> votes (B, H*W*A, J, 16)

These are validated public wrappers of the plain-PyTorch references
(``capstriton.routing.em_reference``) and compute in plain PyTorch on every device: they
**materialize the votes by definition** (e.g. 5.3M floats per sample in the first ConvCaps layer
of the smallNORB network).  For training use the fused routes (``class_caps_route``,
``conv_caps_route``, or the layers ``ConvCaps`` / ``ClassCaps``), which on the triton backend never
materialize the votes.  Bad input raises ValueError / TypeError naming what was expected and
what was given.
"""
from __future__ import annotations

import torch

from ._validation import check_class_caps, check_matrix_transform, check_pose, check_same_device_dtype
from .routing.em_reference import class_caps_votes_ref, conv_caps_votes_ref, matrix_transform_ref

__all__ = ["matrix_transform", "conv_caps_votes", "class_caps_votes"]


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_conv_caps(pose, W, stride) -> None:
    """The checks of ``conv_caps_votes`` (and of the convolutional capsule layers)."""
    check_pose("pose", pose, 6, " (B, H, W, A, 4, 4)")
    check_pose("W", W, 6, " (K, K, A, C, 4, 4)")
    check_same_device_dtype(pose=pose, W=W)
    _check_int("stride", stride)
    K = W.shape[0]
    if W.shape[1] != K:
        raise ValueError(f"W must have a square kernel (K, K, A, C, 4, 4), got shape {tuple(W.shape)}")
    if pose.shape[3] != W.shape[2]:
        raise ValueError(f"pose (B, H, W, A, 4, 4) and W (K, K, A, C, 4, 4) disagree on the child types A: got "
                         f"pose {tuple(pose.shape)} (A={pose.shape[3]}) and W {tuple(W.shape)} (A={W.shape[2]})")
    H, Wd = pose.shape[1], pose.shape[2]
    if K > H or K > Wd:
        raise ValueError(f"the kernel ({K} x {K}) is larger than the capsule grid ({H} x {Wd}): VALID windows need "
                         f"K <= H and K <= W")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def matrix_transform(pose: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Votes V_ij = M_i @ W_ij of fully connected matrix capsules, flattened row-major:
    pose (B, I, 4, 4), W (I, J, 4, 4) -> (B, I, J, 16).  Plain PyTorch (materializes the votes)."""
    check_matrix_transform(pose, W)
    return matrix_transform_ref(pose, W)


def conv_caps_votes(pose: torch.Tensor, W: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Votes of convolutional capsules over VALID K x K windows (spec C1-C2):
    votes[b, oh, ow, kh, kw, a, c] = pose[b, oh*stride + kh, ow*stride + kw, a] @ W[kh, kw, a, c],
    flattened row-major; pose (B, H, W, A, 4, 4), W (K, K, A, C, 4, 4) -> (B, OH, OW, K, K, A, C, 16)
    with OH = (H - K) // stride + 1 (OW likewise).  Plain PyTorch (materializes the votes)."""
    check_conv_caps(pose, W, stride)
    return conv_caps_votes_ref(pose, W, stride)


def class_caps_votes(pose: torch.Tensor, W: torch.Tensor, coordinate_addition: bool = True) -> torch.Tensor:
    """Votes of the class capsules (spec K1-K2): W (A, J, 4, 4) shared by every position of a
    type, V[b, (h, w, a), j] = pose[b, h, w, a] @ W[a, j] flattened row-major; with
    ``coordinate_addition`` element 3 (V[0, 3]) gains (h + 1/2) / H and element 7 (V[1, 3])
    (w + 1/2) / W.  pose (B, H, W, A, 4, 4) -> (B, H*W*A, J, 16), children ordered (h, w, a).
    Plain PyTorch (materializes the votes)."""
    check_class_caps(pose, W)
    _check_flag("coordinate_addition", coordinate_addition)
    return class_caps_votes_ref(pose, W, coordinate_addition=coordinate_addition)
