"""Self-attention routing (Mazzia et al. 2021, Efficient-CapsNet): on prediction vectors u_hat,
or fused with the transform u_hat = W u (never materialized on the triton backend)."""
from __future__ import annotations

from typing import Optional

import torch

from . import kernels as K
from ._backend import resolve_backend
from ._validation import check_same_device_dtype, check_tensor, check_transform_shapes
from .reference import caps_transform_ref, self_attention_routing_ref
from .transform_route import kernel_layout_weight

__all__ = ["self_attention_routing", "transform_self_attention_routing"]

_NONE = (0,)  # shape of the placeholder a backward op returns for an absent (None) input


@torch.library.custom_op("capstriton::self_attention_routing", mutates_args=())
def _op(src: torch.Tensor, W: Optional[torch.Tensor],
        bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return K.self_attention_routing_fwd(src, W, bias)


def _output_shape(src, W):
    """(B, J, D) for u_hat (B, I, J, D), or u with W in the kernel layout (I, Din, J, D)."""
    return (src.shape[0], W.shape[2], W.shape[3]) if W is not None else (src.shape[0], src.shape[2], src.shape[3])


@_op.register_fake
def _(src, W, bias):
    shape = _output_shape(src, W)
    return src.new_empty(shape), src.new_empty(shape, dtype=torch.float32), src.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("capstriton::self_attention_routing_backward", mutates_args=())
def _backward_op(src: torch.Tensor, W: Optional[torch.Tensor], bias: Optional[torch.Tensor], Q: torch.Tensor,
                 s: torch.Tensor, grad_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_src, grad_W, grad_bias = K.self_attention_routing_bwd(src, W, bias, Q, s, grad_v)
    return (grad_src, grad_W if grad_W is not None else src.new_empty(_NONE),
            grad_bias if grad_bias is not None else src.new_empty(_NONE))


@_backward_op.register_fake
def _(src, W, bias, Q, s, grad_v):
    return (torch.empty_like(src), torch.empty_like(W) if W is not None else src.new_empty(_NONE),
            torch.empty_like(bias) if bias is not None else src.new_empty(_NONE))


def _setup_context(ctx, inputs, output):
    src, W, bias = inputs
    _, Q, s = output
    ctx.mark_non_differentiable(Q, s)
    ctx.save_for_backward(src, W, bias, Q, s)


def _backward(ctx, grad_v, _grad_Q, _grad_s):
    src, W, bias, Q, s = ctx.saved_tensors
    if grad_v is None:
        grad_v = src.new_zeros(_output_shape(src, W))
    grad_src, grad_W, grad_bias = _backward_op(src, W, bias, Q, s, grad_v)
    return grad_src, grad_W if W is not None else None, grad_bias if bias is not None else None


_op.register_autograd(_backward, setup_context=_setup_context)


def check_coupling_bias(bias, I: int, J: int, like: torch.Tensor) -> None:
    """bias must be None or a (I, J) tensor on ``like``'s device with its dtype."""
    if bias is None:
        return
    check_tensor("bias", bias, 2, f" (I, J) = ({I}, {J})")
    if tuple(bias.shape) != (I, J):
        raise ValueError(f"bias must have shape (I, J) = ({I}, {J}), got {tuple(bias.shape)}")
    check_same_device_dtype(input=like, bias=bias)


def self_attention_routing(u_hat: torch.Tensor, bias: torch.Tensor | None = None,
                           backend: str = "auto") -> torch.Tensor:
    """Self-attention routing (Efficient-CapsNet): u_hat (B, I, J, D) -> v (B, J, D).

    logits_ij = u_hat_ij . S_j / sqrt(D) with S_j = sum_k u_hat_kj; c_ij = softmax over the
    OUTPUT capsules j of the logits, plus ``bias_ij`` (added after the softmax, as in the authors'
    code); s_j = sum_i c_ij u_hat_ij; v_j = (1 - exp(-|s_j|)) s_j / |s_j| (v = s at s = 0).
    No iterations: two passes over the input capsules (one for S, one for s).

    Args:
        u_hat: prediction vectors, floating point, (batch, input capsules, output capsules, dim).
        bias: optional learned coupling bias (I, J), same dtype and device as u_hat.
        backend: "auto", "torch" (reference) or "triton" (kernels; the couplings are never stored).
    """
    check_tensor("u_hat", u_hat, 4, " (B, I, J, D)")
    check_coupling_bias(bias, u_hat.shape[1], u_hat.shape[2], u_hat)
    tensors = (u_hat,) if bias is None else (u_hat, bias)
    if resolve_backend(backend, *tensors) == "torch":
        return self_attention_routing_ref(u_hat, bias)
    return _op(u_hat.contiguous(), None, bias.contiguous() if bias is not None else None)[0]


def transform_self_attention_routing(u: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None = None,
                                     backend: str = "auto") -> torch.Tensor:
    """self_attention_routing(caps_transform(u, W), bias): u (B, I, Din), W (I, J, D, Din) -> (B, J, D).

    On the triton backend u_hat = W u is never materialized: both forward passes and the backward
    recompute it, and the backward produces dL/du, dL/dW and dL/dbias directly (weight and bias
    gradients reduced over the batch deterministically).  The kernels read W as (I, Din, J, D);
    a W stored in the usual layout costs one transposed copy per call (``DigitCaps`` stores its
    weight in the kernel layout)."""
    return transform_with_state(u, W, bias, backend)[0]


def transform_with_state(u, W, bias, backend: str):
    """(v, Q, on_triton): v of transform_self_attention_routing and, on the triton backend, the
    query Q (B, J, D) fp32 its couplings were formed from (None on the torch backend)."""
    check_transform_shapes(u, W)
    check_coupling_bias(bias, W.shape[0], W.shape[1], u)
    tensors = (u, W) if bias is None else (u, W, bias)
    if resolve_backend(backend, *tensors) == "torch":
        return self_attention_routing_ref(caps_transform_ref(u, W), bias), None, False
    v, Q, _ = _op(u.contiguous(), kernel_layout_weight(W), bias.contiguous() if bias is not None else None)
    return v, Q, True
