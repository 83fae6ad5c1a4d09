"""transform_route: caps_transform followed by a routing algorithm, fused on the triton backend."""
from __future__ import annotations

import torch

from . import kernels as K
from ._backend import resolve_backend
from ._validation import check_iterations, check_transform_shapes
from .reference import transform_route_ref

__all__ = ["transform_route", "kernel_layout_weight"]


def kernel_layout_weight(W: torch.Tensor) -> torch.Tensor:
    """W (I, J, Dout, Din) -> the (I, Din, J, Dout) contiguous layout the fused kernels read
    (a view, no copy, when W is stored that way: ``DigitCaps`` does)."""
    return W.permute(0, 3, 1, 2).contiguous()


@torch.library.custom_op("capstriton::transform_route", mutates_args=())
def _fused_op(u: torch.Tensor, W_k: torch.Tensor, iterations: int,
              detach: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u (B, I, Din), W_k (I, Din, J, Dout) -> (v (B, J, Dout), s_all (r, B, J, Dout), P_all (r-1, B, J, Dout))."""
    return K.transform_route_fwd(u.contiguous(), W_k.contiguous(), iterations)


@_fused_op.register_fake
def _(u, W_k, iterations, detach):
    B, J, D = u.shape[0], W_k.shape[2], W_k.shape[3]
    return (u.new_empty(B, J, D), u.new_empty(iterations, B, J, D, dtype=torch.float32),
            u.new_empty(iterations - 1, B, J, D, dtype=torch.float32))


@torch.library.custom_op("capstriton::transform_route_backward", mutates_args=())
def _fused_backward_op(u: torch.Tensor, W_k: torch.Tensor, s_all: torch.Tensor, P_all: torch.Tensor,
                       grad_v: torch.Tensor, iterations: int, detach: bool, need_u: bool,
                       need_W: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/du, dL/dW_k); an input that needs no gradient gets an empty tensor (no work)."""
    grad_u, grad_W = K.transform_route_bwd(u.contiguous(), W_k.contiguous(), s_all.contiguous(), P_all.contiguous(),
                                           grad_v.contiguous(), iterations, detach, need_u, need_W)
    return (grad_u if need_u else u.new_empty(0)), (grad_W if need_W else W_k.new_empty(0))


@_fused_backward_op.register_fake
def _(u, W_k, s_all, P_all, grad_v, iterations, detach, need_u, need_W):
    return (u.new_empty(u.shape) if need_u else u.new_empty(0)), (W_k.new_empty(W_k.shape) if need_W else W_k.new_empty(0))


def _setup_context(ctx, inputs, output):
    u, W_k, iterations, detach = inputs
    _, s_all, P_all = output
    ctx.mark_non_differentiable(s_all, P_all)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(u, W_k, s_all, P_all)
    ctx.iterations, ctx.detach = iterations, detach


def _backward(ctx, grad_v, _grad_s, _grad_P):
    need_u, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_v is None or not (need_u or need_W):
        return None, None, None, None
    u, W_k, s_all, P_all = ctx.saved_tensors
    grad_u, grad_W = _fused_backward_op(u, W_k, s_all, P_all, grad_v, ctx.iterations, ctx.detach, need_u, need_W)
    return (grad_u if need_u else None), (grad_W if need_W else None), None, None


_fused_op.register_autograd(_backward, setup_context=_setup_context)


def transform_route(u: torch.Tensor, W: torch.Tensor, iterations: int | None = None, detach: bool = False,
                    backend: str = "auto", routing: str = "dynamic", bias: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None, eps: float | None = None, return_coupling: bool = False):
    """Routing of the predictions u_hat = W u: u (B, I, Din), W (I, J, Dout, Din) -> v (B, J, Dout).

    On the triton backend the prediction vectors u_hat = W u (B*I*J*Dout elements) are never
    materialized: every routing pass, forward and backward, recomputes them from u and W, and
    the backward produces dL/du and dL/dW directly (dL/dW reduced over the batch
    deterministically).  The kernels read W as (I, Din, J, Dout) in memory; a W stored in the
    usual contiguous layout costs one transposed copy per call (``DigitCaps`` stores its weight
    in the kernel layout).

    routing:
      * "dynamic" (default): dynamic_routing(caps_transform(u, W)); ``iterations`` (default 3)
        and ``detach``, see ``dynamic_routing``;
      * "self-attention": ``transform_self_attention_routing(u, W, bias)``, bias (I, J); no
        iterations or detach;
      * "inverted-attention": ``transform_inverted_attention_routing(u, W, iterations, weight,
        bias, eps)``, iterations default 2, LayerNorm affine weight / bias (Dout,), eps default 1e-5.
    Arguments that mean nothing for the chosen algorithm raise ValueError when set.  The
    algorithms are looked up by name in ``capstriton.routings`` (``register_routing`` adds one).
    ``return_coupling=True`` returns (v, c) with the final couplings c (B, I, J) for analysis (no
    gradient: c does not require grad).  On the triton backend one more kernel forms them from
    the last iteration's state, recomputing u_hat = W u (never materialized); the torch backend
    computes them with the reference.
    """
    from .couplings import couplings_from_state
    from .routings import get_routing, resolve_options

    algorithm = get_routing(routing)
    options = resolve_options(algorithm, dict(iterations=iterations, detach=detach, bias=bias, weight=weight,
                                              eps=eps))
    v, state, on_triton = algorithm.route(u, W, backend, **options)
    if not return_coupling:
        return v
    if on_triton:  # from the last state, u_hat recomputed: never materialized
        coupling_bias = options[algorithm.coupling_bias] if algorithm.coupling_bias else None
        return v, couplings_from_state(u, kernel_layout_weight(W), state, coupling_bias)
    return v, algorithm.couplings_ref(u, W, **options)


def transform_route_with_state(u: torch.Tensor, W: torch.Tensor, iterations: int, detach: bool, backend: str):
    """(v, P, on_triton): dynamic routing of W u and, on the triton backend, the summed outputs P
    (B, J, D) fp32 its last couplings were formed from (None with one iteration: uniform)."""
    check_transform_shapes(u, W)
    check_iterations(iterations)
    if resolve_backend(backend, u, W) == "torch":
        return transform_route_ref(u, W, iterations, detach), None, False
    v, _, P_all = _fused_op(u, kernel_layout_weight(W), iterations, detach)
    return v, (P_all[-1] if iterations > 1 else None), True
