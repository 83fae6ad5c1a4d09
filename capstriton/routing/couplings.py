"""Coupling coefficients of the routing algorithms, for analysis.  NOT differentiable.

Every algorithm forms its couplings from the prediction vectors u_hat (B, I, J, D) and a
per-sample fp32 state Q (B, J, D):

    c_ij = softmax_j(u_hat_ij . Q_j) (+ bias_ij)      (uniform 1/J when there is no state)

with Q = v^1 + ... + v^{r-1} for dynamic routing (None when r = 1), the query S / sqrt(D) plus
the coupling bias for self-attention, and the last query p / sqrt(D) for inverted attention
(None when r = 1).

* ``couplings_from_state(src, W_k, state, bias)``: c from a state, on the triton backend by the
  ``capstriton::routing_couplings`` op (kernels/routing/couplings.py: u_hat = W u is recomputed, never
  materialized, when src = u is given with W_k in the kernel layout);
* ``routing_couplings(u, W, routing, iterations, ...)``: the plain-PyTorch reference of any
  registered algorithm (its ``couplings_ref``), which reruns the routing on a materialized u_hat.

The couplings are returned for inspection: neither path has a gradient (the op registers a
backward that marks its output non-differentiable, so inputs that require grad are accepted and
c never requires grad).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import resolve_backend
from .._validation import check_same_device_dtype, check_tensor
from ..kernels.routing import couplings as K
from ..reference import caps_transform_ref, state_couplings_ref
from .common import check_coupling_bias
from .registry import get_routing, resolve_inputs

__all__ = ["routing_couplings", "couplings_from_state"]


# ----------------------------------------------------------------------------------------------
# torch.library op (triton kernels; no gradient)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("capstriton::routing_couplings", mutates_args=())
def _couplings_op(src: torch.Tensor, W_k: Optional[torch.Tensor], state: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """c (B, I, J) in src's dtype from src = u (B, I, Din) with W_k (I, Din, J, D), or u_hat
    (B, I, J, D) with W_k None; state (B, J, D) fp32 or None (uniform); bias (I, J) or None.
    Not differentiable."""
    def contig(t):
        return t.contiguous() if t is not None else None
    state = state.float() if state is not None else None  # the kernel reads an fp32 state
    return K.routing_couplings_fwd(src.contiguous(), contig(W_k), contig(state), contig(bias))


def _couplings_shape(src, W_k):
    return src.shape[0], src.shape[1], (W_k.shape[2] if W_k is not None else src.shape[2])


@_couplings_op.register_fake
def _(src, W_k, state, bias):
    return src.new_empty(_couplings_shape(src, W_k))


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output)  # analysis only: c never requires grad


def _backward(ctx, grad_c):  # never reached: the output is non-differentiable
    return None, None, None, None


_couplings_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def _check_state_inputs(src, W_k, state, bias) -> tuple[int, int, int, int]:
    """Validate couplings_from_state's arguments; returns (B, I, J, D)."""
    if W_k is not None:
        check_tensor("src", src, 3, " (B, I, Din) when W_k is given")
        check_tensor("W_k", W_k, 4, " (I, Din, J, D), the kernel layout")
        check_same_device_dtype(src=src, W_k=W_k)
        if src.shape[1] != W_k.shape[0] or src.shape[2] != W_k.shape[1]:
            raise ValueError("src (B, I, Din) and W_k (I, Din, J, D) disagree: expected src.shape[1] == "
                             f"W_k.shape[0] and src.shape[2] == W_k.shape[1], got src {tuple(src.shape)} and "
                             f"W_k {tuple(W_k.shape)}")
        (B, I, _), J, D = src.shape, W_k.shape[2], W_k.shape[3]
    else:
        check_tensor("src", src, 4, " (B, I, J, D) (u_hat) when W_k is None")
        B, I, J, D = src.shape
    if state is not None:
        check_tensor("state", state, 3, f" (B, J, D) = ({B}, {J}, {D})")
        if tuple(state.shape) != (B, J, D):
            raise ValueError(f"state must have shape (B, J, D) = ({B}, {J}, {D}), got {tuple(state.shape)}")
        if state.device != src.device:
            raise ValueError(f"src and state must be on the same device, got {src.device} and {state.device}")
    check_coupling_bias(bias, I, J, src)
    return B, I, J, D


def couplings_from_state(src: torch.Tensor, W_k: torch.Tensor | None, state: torch.Tensor | None,
                         bias: torch.Tensor | None = None, backend: str = "triton") -> torch.Tensor:
    """c (B, I, J) = softmax_j(u_hat_ij . state_j) (+ bias_ij), or 1/J (+ bias_ij) when state is None.

    src: u (B, I, Din) with W_k (I, Din, J, D) (the kernel layout, see
    ``kernel_layout_weight``; u_hat = W u is recomputed, never stored), or
    u_hat (B, I, J, D) with W_k None.  state: (B, J, D), fp32 (the routing state; the triton path
    reads another float dtype as fp32) or None; bias: (I, J) in src's dtype or None.  Returns c in
    src's dtype (fp32 math).

    For analysis only: NOT differentiable (c never requires grad, whatever the inputs).
    backend: "triton" (default: the ``capstriton::routing_couplings`` op; CUDA tensors, or the
    interpreter), "torch" (the same formula in PyTorch, u_hat materialized) or "auto"."""
    _check_state_inputs(src, W_k, state, bias)
    tensors = tuple(t for t in (src, W_k, bias) if t is not None)
    if resolve_backend(backend, *tensors) == "torch":
        with torch.no_grad():
            math = torch.promote_types(src.dtype, torch.float32)
            u_hat = src.to(math) if W_k is None else caps_transform_ref(src.to(math), W_k.permute(0, 2, 3, 1).to(math))
            cast = lambda t: t.to(math) if t is not None else None  # noqa: E731
            return state_couplings_ref(u_hat, cast(state), cast(bias)).to(src.dtype)
    return _couplings_op(src, W_k, state, bias)


def routing_couplings(u: torch.Tensor, W: torch.Tensor, routing: str, iterations: int | None = None, bias=None,
                      weight=None, eps: float | None = None, **options) -> torch.Tensor:
    """c (B, I, J): the couplings of the last routing iteration for u (B, I, Din), W (I, J, D, Din),
    by the registered algorithm's plain-PyTorch reference (u_hat materialized).  NOT
    differentiable.  Options the algorithm does not take are ignored; those left None take its
    defaults."""
    algorithm = get_routing(routing)
    given = dict(iterations=iterations, bias=bias, weight=weight, eps=eps, **options)
    kwargs = {k: (given[k] if given.get(k) is not None else default) for k, default in algorithm.options.items()}
    kwargs.update(resolve_inputs(algorithm, given))
    with torch.no_grad():
        return algorithm.couplings_ref(u, W, **kwargs)
