"""Self-attention routing (Mazzia et al. 2021, Efficient-CapsNet): on prediction vectors u_hat,
or fused with the transform u_hat = W u (never materialized on the triton backend), and the
registry entry.  Kernels: ``kernels/routing/self_attention.py``."""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import resolve_backend
from .._validation import check_tensor, check_transform_shapes
from ..kernels.routing import self_attention as K
from ..reference import caps_transform_ref, self_attention_couplings_ref, self_attention_routing_ref
from .common import absent, check_coupling_bias, kernel_layout_weight, output_shape
from .registry import LayerParameter, Routed, Routing

__all__ = ["self_attention_routing", "transform_self_attention_routing", "ROUTING"]


@torch.library.custom_op("capstriton::self_attention_routing", mutates_args=())
def _op(src: torch.Tensor, W: Optional[torch.Tensor],
        bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return K.self_attention_routing_fwd(src, W, bias)


@_op.register_fake
def _(src, W, bias):
    shape = output_shape(src, W)
    return src.new_empty(shape), src.new_empty(shape, dtype=torch.float32), src.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("capstriton::self_attention_routing_backward", mutates_args=())
def _backward_op(src: torch.Tensor, W: Optional[torch.Tensor], bias: Optional[torch.Tensor], Q: torch.Tensor,
                 s: torch.Tensor, grad_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_src, grad_W, grad_bias = K.self_attention_routing_bwd(src, W, bias, Q, s, grad_v)
    return (grad_src, grad_W if grad_W is not None else absent(src),
            grad_bias if grad_bias is not None else absent(src))


@_backward_op.register_fake
def _(src, W, bias, Q, s, grad_v):
    return (torch.empty_like(src), torch.empty_like(W) if W is not None else absent(src),
            torch.empty_like(bias) if bias is not None else absent(src))


def _setup_context(ctx, inputs, output):
    src, W, bias = inputs
    _, Q, s = output
    ctx.mark_non_differentiable(Q, s)
    ctx.save_for_backward(src, W, bias, Q, s)


def _backward(ctx, grad_v, _grad_Q, _grad_s):
    src, W, bias, Q, s = ctx.saved_tensors
    if grad_v is None:
        grad_v = src.new_zeros(output_shape(src, W))
    grad_src, grad_W, grad_bias = _backward_op(src, W, bias, Q, s, grad_v)
    return grad_src, grad_W if W is not None else None, grad_bias if bias is not None else None


_op.register_autograd(_backward, setup_context=_setup_context)


def self_attention_routing(u_hat: torch.Tensor, bias: torch.Tensor | None = None,
                           backend: str = "auto") -> torch.Tensor:
    """Self-attention routing (Efficient-CapsNet): u_hat (B, I, J, D) -> v (B, J, D).

    logits_ij = u_hat_ij . S_j / sqrt(D) with S_j = sum_k u_hat_kj; c_ij = softmax over the
    OUTPUT capsules j of the logits, plus ``bias_ij`` (added after the softmax, as in the authors'
    code); s_j = sum_i c_ij u_hat_ij; v_j = (1 - exp(-|s_j|)) s_j / |s_j| (v = s at s = 0).
    No iterations: two passes over the input capsules (one for S, one for s).

    Range: the logits are formed in fp32 (fp64 for fp64 inputs), so results are finite and right
    while |u_hat_ij . S_j| / sqrt(D) stays below the dtype's maximum (fp32: entries up to about
    1e18 / sqrt(I * D)); the squash itself is overflow-safe for every finite s.  Beyond that range
    the logits overflow and the result is NaN (never a finite wrong value), as in the authors' code.

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
    return route(u, W, backend, bias).v


def route(u: torch.Tensor, W: torch.Tensor, backend: str, bias: torch.Tensor | None) -> Routed:
    """transform_self_attention_routing; on the triton backend the state is the query Q (B, J, D)
    fp32 its couplings were formed from."""
    check_transform_shapes(u, W)
    check_coupling_bias(bias, W.shape[0], W.shape[1], u)
    tensors = (u, W) if bias is None else (u, W, bias)
    if resolve_backend(backend, *tensors) == "torch":
        return Routed(self_attention_routing_ref(caps_transform_ref(u, W), bias))
    v, Q, _ = _op(u.contiguous(), kernel_layout_weight(W), bias.contiguous() if bias is not None else None)
    return Routed(v, state=Q, on_triton=True)


@torch.no_grad()
def couplings_ref(u: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return self_attention_couplings_ref(caps_transform_ref(u, W), bias)


ROUTING = Routing(
    "self-attention", route, couplings_ref, state_couplings=True, options={"bias": None}, coupling_bias="bias",
    parameters=lambda in_caps, out_caps, out_dim: {
        "coupling_bias": LayerParameter(torch.zeros(in_caps, out_caps), "bias")},
    summary="self-attention routing (Mazzia et al. 2021, Efficient-CapsNet): a learned coupling bias",
    init_gain=0.25)  # its lengths 1 - exp(-|s|) grow as |s|, not |s|^2, and its couplings sharpen at once
