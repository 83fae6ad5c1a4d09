"""Inverted dot-product attention routing (Tsai et al. 2020): on prediction vectors u_hat, or
fused with the transform u_hat = W u (never materialized on the triton backend), and the
registry entry.  Kernels: ``kernels/routing/inverted_attention.py``."""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import resolve_backend
from .._validation import check_iterations, check_same_device_dtype, check_tensor, check_transform_shapes
from ..kernels.routing import inverted_attention as K
from ..reference import caps_transform_ref, inverted_attention_routing_ref
from .common import absent, kernel_layout_weight, output_shape
from .registry import LayerParameter, Routed, Routing

__all__ = ["inverted_attention_routing", "transform_inverted_attention_routing", "ROUTING"]


@torch.library.custom_op("capstriton::inverted_attention_routing", mutates_args=())
def _op(src: torch.Tensor, W: Optional[torch.Tensor], iterations: int, weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return K.inverted_attention_routing_fwd(src, W, iterations, weight, bias, eps)


@_op.register_fake
def _(src, W, iterations, weight, bias, eps):
    shape = output_shape(src, W)
    return (src.new_empty(shape), src.new_empty((iterations, *shape), dtype=torch.float32),
            src.new_empty((iterations - 1, *shape), dtype=torch.float32))


@torch.library.custom_op("capstriton::inverted_attention_routing_backward", mutates_args=())
def _backward_op(src: torch.Tensor, W: Optional[torch.Tensor], iterations: int, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], eps: float, s_all: torch.Tensor, Q_all: torch.Tensor,
                 grad_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = K.inverted_attention_routing_bwd(src, W, iterations, weight, bias, eps, s_all, Q_all, grad_p)
    return tuple(g if g is not None else absent(src) for g in grads)


@_backward_op.register_fake
def _(src, W, iterations, weight, bias, eps, s_all, Q_all, grad_p):
    return tuple(torch.empty_like(t) if t is not None else absent(src) for t in (src, W, weight, bias))


def _setup_context(ctx, inputs, output):
    src, W, iterations, weight, bias, eps = inputs
    _, s_all, Q_all = output
    ctx.mark_non_differentiable(s_all, Q_all)
    ctx.save_for_backward(src, W, weight, bias, s_all, Q_all)
    ctx.iterations, ctx.eps = iterations, eps


def _backward(ctx, grad_p, _grad_s, _grad_Q):
    src, W, weight, bias, s_all, Q_all = ctx.saved_tensors
    if grad_p is None:
        grad_p = src.new_zeros(output_shape(src, W))
    grads = _backward_op(src, W, ctx.iterations, weight, bias, ctx.eps, s_all, Q_all, grad_p)
    grad_src, grad_W, grad_weight, grad_bias = (g if t is not None else None
                                                for g, t in zip(grads, (src, W, weight, bias)))
    return grad_src, grad_W, None, grad_weight, grad_bias, None


_op.register_autograd(_backward, setup_context=_setup_context)


def check_layer_norm_args(weight, bias, eps, D: int, like: torch.Tensor) -> None:
    """weight and bias: None or (D,) tensors on ``like``'s device with its dtype; eps > 0."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(name, t, 1, f" (D,) = ({D},)")
        if t.shape[0] != D:
            raise ValueError(f"{name} must have shape (D,) = ({D},), got {tuple(t.shape)}")
        check_same_device_dtype(input=like, **{name: t})
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")


def _kernel_affine(weight, bias, D: int, like: torch.Tensor):
    """The kernels take both affine parameters or neither: fill in the missing one."""
    if weight is None and bias is None:
        return None, None
    weight = weight.contiguous() if weight is not None else like.new_ones(D)
    bias = bias.contiguous() if bias is not None else like.new_zeros(D)
    return weight, bias


def _route(src, W, u_hat_fn, iterations, weight, bias, eps, backend, tensors):
    check_iterations(iterations)
    D = W.shape[2] if W is not None else src.shape[3]
    check_layer_norm_args(weight, bias, eps, D, src)
    tensors = tensors + tuple(t for t in (weight, bias) if t is not None)
    if resolve_backend(backend, *tensors) == "torch":
        return Routed(inverted_attention_routing_ref(u_hat_fn(), iterations, weight, bias, float(eps)))
    w, b = _kernel_affine(weight, bias, D, src)
    p, _, Q_all = _op(src.contiguous(), kernel_layout_weight(W) if W is not None else None, iterations, w, b,
                      float(eps))
    return Routed(p, state=Q_all[-1] if iterations > 1 else None, on_triton=True)


def inverted_attention_routing(u_hat: torch.Tensor, iterations: int = 2, weight: torch.Tensor | None = None,
                               bias: torch.Tensor | None = None, eps: float = 1e-5,
                               backend: str = "auto") -> torch.Tensor:
    """Inverted dot-product attention routing (Tsai et al. 2020): u_hat (B, I, J, D) -> p (B, J, D).

    p^0 = 0; for t = 1..iterations: r_ij = softmax over the OUTPUT capsules j of
    u_hat_ij . p^{t-1}_j / sqrt(D) (the scale of the authors' code); p^t_j = LayerNorm over D of
    sum_i r_ij u_hat_ij, with the optional affine ``weight``, ``bias`` (D,).  Returns p^r (the
    first iteration's coupling is uniform).  The outputs are normalised, so their lengths carry
    no class probability: classify them with a learned head (e.g. a linear map per capsule).

    Args:
        u_hat: prediction vectors, floating point, (batch, input capsules, output capsules, dim).
        iterations: routing iterations, >= 1.
        weight, bias: optional LayerNorm affine (D,), same dtype and device as u_hat.
        eps: LayerNorm epsilon (> 0).
        backend: "auto", "torch" (reference) or "triton" (kernels; couplings never stored).
    """
    check_tensor("u_hat", u_hat, 4, " (B, I, J, D)")
    return _route(u_hat, None, lambda: u_hat, iterations, weight, bias, eps, backend, (u_hat,)).v


def transform_inverted_attention_routing(u: torch.Tensor, W: torch.Tensor, iterations: int = 2,
                                         weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                                         eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """inverted_attention_routing(caps_transform(u, W), ...): u (B, I, Din), W (I, J, D, Din) -> (B, J, D).

    On the triton backend u_hat = W u is never materialized: every pass, forward and backward,
    recomputes it; the backward produces dL/du, dL/dW and the LayerNorm parameter gradients
    directly (reduced over the batch deterministically).  The kernels read W as (I, Din, J, D); a W
    stored in the usual layout costs one transposed copy per call (``DigitCaps`` stores its weight
    in the kernel layout)."""
    return route(u, W, backend, iterations, bias, weight, eps).v


def route(u: torch.Tensor, W: torch.Tensor, backend: str, iterations: int, bias: torch.Tensor | None,
          weight: torch.Tensor | None, eps: float) -> Routed:
    """transform_inverted_attention_routing; on the triton backend the state is the query Q^{r-1}
    (B, J, D) fp32 of the last iteration's couplings (None with one iteration: uniform)."""
    check_transform_shapes(u, W)
    return _route(u, W, lambda: caps_transform_ref(u, W), iterations, weight, bias, eps, backend, (u, W))


@torch.no_grad()
def couplings_ref(u: torch.Tensor, W: torch.Tensor, iterations: int = 2, bias: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """r of the last iteration."""
    return inverted_attention_routing_ref(caps_transform_ref(u, W), iterations, weight, bias, eps,
                                          return_coupling=True)[1]


ROUTING = Routing(
    "inverted-attention", route, couplings_ref, state_couplings=True,
    options={"iterations": 2, "bias": None, "weight": None, "eps": 1e-5},
    parameters=lambda in_caps, out_caps, out_dim: {"ln_weight": LayerParameter(torch.ones(out_dim), "weight"),
                                                   "ln_bias": LayerParameter(torch.zeros(out_dim), "bias")},
    summary="inverted dot-product attention routing (Tsai et al. 2020): iterations, a LayerNorm affine")
