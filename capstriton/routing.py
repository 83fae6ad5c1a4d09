"""dynamic_routing: routing-by-agreement over precomputed prediction vectors u_hat."""
from __future__ import annotations

import torch

from . import kernels as K
from ._backend import resolve_backend
from ._validation import check_iterations, check_tensor
from .reference import dynamic_routing_ref

__all__ = ["dynamic_routing"]


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
