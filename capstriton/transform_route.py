"""transform_route: caps_transform followed by dynamic_routing, fused on the triton backend."""
from __future__ import annotations

import torch

from . import kernels as K
from ._backend import resolve_backend
from ._validation import check_iterations, check_transform_shapes
from .reference import transform_route_ref

__all__ = ["transform_route"]


@torch.library.custom_op("capstriton::transform_route", mutates_args=())
def _fused_op(u: torch.Tensor, W: torch.Tensor, iterations: int,
              detach: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return K.transform_route_fwd(u, W, iterations)


@_fused_op.register_fake
def _(u, W, iterations, detach):
    B, J, D = u.shape[0], W.shape[1], W.shape[2]
    stats = u.new_empty(iterations, B, J, D, dtype=torch.float32)
    return u.new_empty(B, J, D), stats, torch.empty_like(stats)


@torch.library.custom_op("capstriton::transform_route_backward", mutates_args=())
def _fused_backward_op(u: torch.Tensor, W: torch.Tensor, s_all: torch.Tensor, V_all: torch.Tensor,
                       grad_v: torch.Tensor, iterations: int, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return K.transform_route_bwd(u, W, s_all, V_all, grad_v, iterations, detach)


@_fused_backward_op.register_fake
def _(u, W, s_all, V_all, grad_v, iterations, detach):
    return torch.empty_like(u), torch.empty_like(W)


def _setup_context(ctx, inputs, output):
    u, W, iterations, detach = inputs
    _, s_all, V_all = output
    ctx.mark_non_differentiable(s_all, V_all)
    ctx.save_for_backward(u, W, s_all, V_all)
    ctx.iterations, ctx.detach = iterations, detach


def _backward(ctx, grad_v, _grad_s, _grad_V):
    u, W, s_all, V_all = ctx.saved_tensors
    if grad_v is None:
        grad_v = torch.zeros(u.shape[0], W.shape[1], W.shape[2], dtype=u.dtype, device=u.device)
    grad_u, grad_W = _fused_backward_op(u, W, s_all, V_all, grad_v, ctx.iterations, ctx.detach)
    return grad_u, grad_W, None, None


_fused_op.register_autograd(_backward, setup_context=_setup_context)


def transform_route(u: torch.Tensor, W: torch.Tensor, iterations: int = 3, detach: bool = False,
                    backend: str = "auto") -> torch.Tensor:
    """dynamic_routing(caps_transform(u, W)): u (B, I, Din), W (I, J, Dout, Din) -> v (B, J, Dout).

    On the triton backend the prediction vectors u_hat = W u (B*I*J*Dout elements) are never
    materialized: every routing pass, forward and backward, recomputes them from u and W, and
    the backward produces dL/du and dL/dW directly (dL/dW reduced over the batch
    deterministically).  See ``dynamic_routing`` for ``iterations`` and ``detach``.
    """
    check_transform_shapes(u, W)
    check_iterations(iterations)
    if resolve_backend(backend, u, W) == "torch":
        return transform_route_ref(u, W, iterations, bool(detach))
    return _fused_op(u.contiguous(), W.contiguous(), iterations, bool(detach))[0]
