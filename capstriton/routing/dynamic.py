"""Dynamic routing (routing-by-agreement, Sabour et al. 2017): ``dynamic_routing`` on
prediction vectors u_hat, the op fused with the transform u_hat = W u (never materialized on
the triton backend), and the registry entry.  Kernels: ``kernels/routing/dynamic.py``."""
from __future__ import annotations

import torch

from .._backend import resolve_backend
from .._validation import check_iterations, check_tensor, check_transform_shapes
from ..kernels.routing import dynamic as K
from ..reference import caps_transform_ref, dynamic_routing_ref, state_couplings_ref, transform_route_ref
from .common import absent, kernel_layout_weight
from .registry import Routed, Routing

__all__ = ["dynamic_routing", "ROUTING"]


@torch.library.custom_op("capstriton::dynamic_routing", mutates_args=())
def _routing_op(u_hat: torch.Tensor, iterations: int, detach: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u_hat (B, I, J, D) -> (v (B, J, D), s_all (r, B, J, D), P_all (r-1, B, J, D))."""
    return K.dynamic_routing_fwd(u_hat.contiguous(), iterations)


@_routing_op.register_fake
def _(u_hat, iterations, detach):
    B, _, J, D = u_hat.shape
    return (u_hat.new_empty(B, J, D), u_hat.new_empty(iterations, B, J, D, dtype=torch.float32),
            u_hat.new_empty(iterations - 1, B, J, D, dtype=torch.float32))


@torch.library.custom_op("capstriton::dynamic_routing_backward", mutates_args=())
def _routing_backward_op(u_hat: torch.Tensor, s_all: torch.Tensor, V_all: torch.Tensor, grad_v: torch.Tensor,
                         iterations: int, detach: bool) -> torch.Tensor:
    return K.dynamic_routing_bwd(u_hat.contiguous(), s_all.contiguous(), V_all.contiguous(), grad_v.contiguous(),
                                 iterations, detach)


@_routing_backward_op.register_fake
def _(u_hat, s_all, V_all, grad_v, iterations, detach):
    return u_hat.new_empty(u_hat.shape)


def _setup_context(ctx, inputs, output):
    u_hat, iterations, detach = inputs
    _, s_all, V_all = output
    ctx.mark_non_differentiable(s_all, V_all)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(u_hat, s_all, V_all)
    ctx.iterations, ctx.detach = iterations, detach


def _backward(ctx, grad_v, _grad_s, _grad_V):
    if grad_v is None or not ctx.needs_input_grad[0]:
        return None, None, None
    u_hat, s_all, V_all = ctx.saved_tensors
    return _routing_backward_op(u_hat, s_all, V_all, grad_v, ctx.iterations, ctx.detach), None, None


_routing_op.register_autograd(_backward, setup_context=_setup_context)


def dynamic_routing(u_hat: torch.Tensor, iterations: int = 3, detach: bool = False,
                    backend: str = "auto") -> torch.Tensor:
    """Routing-by-agreement (Procedure 1 of Sabour et al. 2017): u_hat (B, I, J, D) -> v (B, J, D).

    b = 0; repeat ``iterations`` times: c = softmax over the OUTPUT capsules j of b;
    s_j = sum_i c_ij u_hat_ij; v_j = squash(s_j); b_ij += u_hat_ij . v_j.

    Args:
        u_hat: prediction vectors, floating point, (batch, input capsules, output capsules, dim).
        iterations: routing iterations, >= 1.
        detach: compute the routing logits from u_hat.detach(): gradients reach u_hat only
            through the last iteration's weighted sum, with the coupling coefficients constant.
        backend: "auto", "torch" (reference) or "triton" (kernels; logits are never stored and
            backward recomputes them).
    """
    check_tensor("u_hat", u_hat, 4, " (B, I, J, D)")
    check_iterations(iterations)
    if resolve_backend(backend, u_hat) == "torch":
        return dynamic_routing_ref(u_hat, iterations, bool(detach))
    return _routing_op(u_hat, iterations, bool(detach))[0]


# ---------------------------------------------------------------------------------------------- fused
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
    return (grad_u if need_u else absent(u)), (grad_W if need_W else absent(W_k))


@_fused_backward_op.register_fake
def _(u, W_k, s_all, P_all, grad_v, iterations, detach, need_u, need_W):
    return (u.new_empty(u.shape) if need_u else absent(u)), (W_k.new_empty(W_k.shape) if need_W else absent(W_k))


def _fused_setup_context(ctx, inputs, output):
    u, W_k, iterations, detach = inputs
    _, s_all, P_all = output
    ctx.mark_non_differentiable(s_all, P_all)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(u, W_k, s_all, P_all)
    ctx.iterations, ctx.detach = iterations, detach


def _fused_backward(ctx, grad_v, _grad_s, _grad_P):
    need_u, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_v is None or not (need_u or need_W):
        return None, None, None, None
    u, W_k, s_all, P_all = ctx.saved_tensors
    grad_u, grad_W = _fused_backward_op(u, W_k, s_all, P_all, grad_v, ctx.iterations, ctx.detach, need_u, need_W)
    return (grad_u if need_u else None), (grad_W if need_W else None), None, None


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)



def route(u: torch.Tensor, W: torch.Tensor, backend: str, iterations: int, detach: bool) -> Routed:
    """Dynamic routing of W u; on the triton backend the state is the summed outputs P (B, J, D)
    fp32 the last couplings were formed from (None with one iteration: uniform)."""
    check_transform_shapes(u, W)
    check_iterations(iterations)
    if resolve_backend(backend, u, W) == "torch":
        return Routed(transform_route_ref(u, W, iterations, bool(detach)))
    v, _, P_all = _fused_op(u, kernel_layout_weight(W), iterations, bool(detach))
    return Routed(v, state=P_all[-1] if iterations > 1 else None, on_triton=True)


@torch.no_grad()
def couplings_ref(u: torch.Tensor, W: torch.Tensor, iterations: int = 3, detach: bool = False) -> torch.Tensor:
    """softmax_j(u_hat_ij . (v^1 + ... + v^{r-1})_j): the logits are sums of agreements."""
    u_hat = caps_transform_ref(u, W)
    V = torch.zeros_like(u_hat[:, 0])
    for t in range(1, iterations):
        V += dynamic_routing_ref(u_hat, t)
    return state_couplings_ref(u_hat, V)


ROUTING = Routing(
    "dynamic", route, couplings_ref, state_couplings=True, options={"iterations": 3, "detach": False},
    summary="routing-by-agreement (Sabour et al. 2017): iterations, detach")
