"""Helpers every routing module shares: the kernels' weight layout, argument checks, the shapes
of the ops' outputs.  A leaf: imports nothing else of ``capstriton.routing``."""
from __future__ import annotations

import torch

from .._validation import check_same_device_dtype, check_tensor

__all__ = ["kernel_layout_weight", "check_coupling_bias", "output_shape", "absent"]


def kernel_layout_weight(W: torch.Tensor) -> torch.Tensor:
    """W (I, J, Dout, Din) -> the (I, Din, J, Dout) contiguous layout the fused kernels read
    (a view, no copy, when W is stored that way: ``DigitCaps`` does)."""
    return W.permute(0, 3, 1, 2).contiguous()


def check_coupling_bias(bias, I: int, J: int, like: torch.Tensor) -> None:
    """bias must be None or a (I, J) tensor on ``like``'s device with its dtype."""
    if bias is None:
        return
    check_tensor("bias", bias, 2, f" (I, J) = ({I}, {J})")
    if tuple(bias.shape) != (I, J):
        raise ValueError(f"bias must have shape (I, J) = ({I}, {J}), got {tuple(bias.shape)}")
    check_same_device_dtype(input=like, bias=bias)


def output_shape(src: torch.Tensor, W_k: torch.Tensor | None) -> tuple[int, int, int]:
    """(B, J, D) routed from u_hat (B, I, J, D), or from u with W_k in the kernel layout (I, Din, J, D)."""
    if W_k is not None:
        return src.shape[0], W_k.shape[2], W_k.shape[3]
    return src.shape[0], src.shape[2], src.shape[3]


def absent(like: torch.Tensor) -> torch.Tensor:
    """The empty placeholder a backward op returns for an input that is None (ops return tensors)."""
    return like.new_empty((0,))
