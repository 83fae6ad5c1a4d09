"""squash: public function, torch.library op (kernels + autograd), reference dispatch.
Kernels: ``kernels/squash.py``."""
from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._validation import check_tensor
from .kernels import squash as K
from .reference import squash_ref

__all__ = ["squash"]


@torch.library.custom_op("capstriton::squash", mutates_args=())
def _squash_op(x: torch.Tensor, eps: float) -> torch.Tensor:
    return K.squash_fwd(x, eps)


@_squash_op.register_fake
def _(x, eps):
    return torch.empty_like(x)


@torch.library.custom_op("capstriton::squash_backward", mutates_args=())
def _squash_backward_op(x: torch.Tensor, grad: torch.Tensor, eps: float) -> torch.Tensor:
    return K.squash_bwd(x, grad.contiguous(), eps)


@_squash_backward_op.register_fake
def _(x, grad, eps):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, eps = inputs
    ctx.save_for_backward(x)
    ctx.eps = eps


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _squash_backward_op(x, grad, ctx.eps), None


_squash_op.register_autograd(_backward, setup_context=_setup_context)


def squash(x: torch.Tensor, dim: int = -1, eps: float = 1e-8, backend: str = "auto") -> torch.Tensor:
    """Capsule non-linearity: v = x |x|^2 / ((1 + |x|^2) sqrt(|x|^2 + eps)) along ``dim``.

    Keeps the direction of x and maps its length into [0, 1).  Finite, with finite
    gradients, for zero vectors (eps > 0).

    Args:
        x: floating-point tensor of any shape.
        dim: the capsule dimension.
        eps: added under the square root; must be > 0.
        backend: "auto" (triton for CUDA tensors or under TRITON_INTERPRET=1, else torch),
            "torch" (plain PyTorch reference) or "triton" (kernels).
    """
    check_tensor("x", x)
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}), got {dim!r} for shape {tuple(x.shape)}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if resolve_backend(backend, x) == "torch":
        return squash_ref(x, dim=dim, eps=eps)
    moved = x.movedim(dim, -1).contiguous()
    return _squash_op(moved, float(eps)).movedim(-1, dim)
