"""caps_transform: u_hat[b, i, j] = W[i, j] @ u[b, i].  Public function, torch.library ops
(kernels + autograd), reference dispatch.  Kernels: ``kernels/caps_transform.py``."""
from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._validation import check_transform_shapes
from .kernels import caps_transform as K
from .reference import caps_transform_ref

__all__ = ["caps_transform"]


@torch.library.custom_op("capstriton::caps_transform", mutates_args=())
def _caps_transform_op(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return K.caps_transform_fwd(u, W)


@_caps_transform_op.register_fake
def _(u, W):
    return u.new_empty(u.shape[0], u.shape[1], W.shape[1], W.shape[2])


@torch.library.custom_op("capstriton::caps_transform_backward", mutates_args=())
def _caps_transform_backward_op(u: torch.Tensor, W: torch.Tensor,
                                grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return K.caps_transform_bwd(u, W, grad.contiguous())


@_caps_transform_backward_op.register_fake
def _(u, W, grad):
    return torch.empty_like(u), torch.empty_like(W)


def _setup_context(ctx, inputs, output):
    u, W = inputs
    ctx.save_for_backward(u, W)


def _backward(ctx, grad):
    u, W = ctx.saved_tensors
    return _caps_transform_backward_op(u, W, grad)


_caps_transform_op.register_autograd(_backward, setup_context=_setup_context)


def caps_transform(u: torch.Tensor, W: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Per-capsule weight transform (the prediction vectors of Sabour et al. 2017).

    u_hat[b, i, j, :] = W[i, j] @ u[b, i, :]

    Args:
        u: input capsules (B, I, Din).
        W: weights (I, J, Dout, Din), same dtype and device as u.
        backend: "auto" (triton for CUDA tensors or under TRITON_INTERPRET=1, else torch),
            "torch" (plain PyTorch reference) or "triton" (kernels: float32, float16 or
            bfloat16, fp32 accumulation, result in the input dtype).

    Returns:
        u_hat (B, I, J, Dout), differentiable with respect to u and W.
    """
    check_transform_shapes(u, W)
    if resolve_backend(backend, u, W) == "torch":
        return caps_transform_ref(u, W)
    return _caps_transform_op(u.contiguous(), W.contiguous())
