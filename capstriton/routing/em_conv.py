"""Convolutional EM routing (Hinton, Sabour & Frosst 2018; spec section 4, C1-C5): ``conv_em_routing``
on given votes and ``conv_caps_route``, the conv-capsule transform fused with the routing (on the
triton backend the votes (B, OH, OW, K, K, A, C, 16) and the assignments never exist).  Every child
is normalised over ALL the parents it feeds, across positions and types; children no window covers
take no part.  Kernels: ``kernels/routing/em_conv.py``; references: ``em_reference``."""
from __future__ import annotations

import torch

from .._backend import resolve_backend
from .._validation import check_iterations, check_same_device_dtype, check_tensor, check_unit_interval
from ..kernels.routing import em_conv as K
from .em_reference import (
    COST_NORMALIZATIONS,
    conv_caps_route_ref,
    conv_em_routing_ref,
    cost_scale,
    lambda_schedule,
)
from .em_torch import conv_caps_route_torch

__all__ = ["conv_em_routing", "conv_caps_route"]


# ---------------------------------------------------------------------------------------------- ops
@torch.library.custom_op("capstriton::em_conv_route", mutates_args=())
def _route_op(pose: torch.Tensor, W: torch.Tensor, activations: torch.Tensor, beta_u: torch.Tensor,
              beta_a: torch.Tensor, stride: int, lambdas: list[float], scale: float, eps: float, min_var: float,
              return_R: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor, torch.Tensor]:
    """pose (B, H, W, A, 16), W (K, K, A, C, 16), activations (B, H, W, A) -> (poses (B, OH, OW, C, 16),
    acts (B, OH, OW, C), R (B, OH, OW, K, K, A, C) fp32 or empty, then the saved statistics (T, ...)
    fp32: mu, var (T, B, OH, OW, C, 16), logit, m (T, B, OH, OW, C), logZ (T, B, H, W, A))."""
    return K.conv_em_fwd(pose.contiguous(), W.contiguous(), activations.contiguous(), beta_u, beta_a, stride,
                         list(lambdas), scale, eps, min_var, return_R)


def _out_shape(pose, W, stride):
    B, H, Wd, A = pose.shape[:4]
    k, C = W.shape[0], W.shape[3]
    return B, (H - k) // stride + 1, (Wd - k) // stride + 1, k, A, C


@_route_op.register_fake
def _(pose, W, activations, beta_u, beta_a, stride, lambdas, scale, eps, min_var, return_R):
    B, OH, OW, k, A, C = _out_shape(pose, W, stride)
    T = len(lambdas)
    f32 = dict(dtype=torch.float32)
    R = pose.new_empty(B, OH, OW, k, k, A, C, **f32) if return_R else pose.new_empty(0, **f32)
    return (pose.new_empty(B, OH, OW, C, 16), pose.new_empty(B, OH, OW, C), R,
            pose.new_empty(T, B, OH, OW, C, 16, **f32), pose.new_empty(T, B, OH, OW, C, 16, **f32),
            pose.new_empty(T, B, OH, OW, C, **f32), pose.new_empty(T, B, OH, OW, C, **f32),
            pose.new_empty(T, *pose.shape[:4], **f32))


@torch.library.custom_op("capstriton::em_conv_route_backward", mutates_args=())
def _route_backward_op(pose: torch.Tensor, W: torch.Tensor, activations: torch.Tensor, beta_u: torch.Tensor,
                       stride: int, lambdas: list[float], scale: float, eps: float, min_var: float,
                       mu_all: torch.Tensor, var_all: torch.Tensor, logit_all: torch.Tensor, m_all: torch.Tensor,
                       logz_all: torch.Tensor, grad_poses: torch.Tensor, grad_acts: torch.Tensor,
                       need_W: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dpose, dL/dactivations, dL/dW (empty unless need_W), dL/dbeta_u, dL/dbeta_a)."""
    gp, ga, gW, gbu, gba = K.conv_em_bwd(pose.contiguous(), W.contiguous(), activations.contiguous(), beta_u, stride,
                                         list(lambdas), scale, eps, min_var, mu_all, var_all, logit_all, m_all,
                                         logz_all, grad_poses.contiguous(), grad_acts.contiguous(), need_W)
    return gp, ga, (gW if need_W else W.new_empty(0)), gbu.to(beta_u.dtype), gba.to(beta_u.dtype)


@_route_backward_op.register_fake
def _(pose, W, activations, beta_u, stride, lambdas, scale, eps, min_var, mu_all, var_all, logit_all, m_all,
      logz_all, grad_poses, grad_acts, need_W):
    C = W.shape[3]
    return (pose.new_empty(pose.shape), activations.new_empty(activations.shape),
            W.new_empty(W.shape) if need_W else W.new_empty(0), beta_u.new_empty(C), beta_u.new_empty(C))


def _setup_context(ctx, inputs, output):
    pose, W, activations, beta_u, beta_a, stride, lambdas, scale, eps, min_var, return_R = inputs
    _, _, R, mu_all, var_all, logit_all, m_all, logz_all = output
    ctx.mark_non_differentiable(R, mu_all, var_all, logit_all, m_all, logz_all)
    ctx.save_for_backward(pose, W, activations, beta_u, mu_all, var_all, logit_all, m_all, logz_all)
    ctx.options = (stride, list(lambdas), scale, eps, min_var)
    ctx.beta_a_dtype = beta_a.dtype


def _backward(ctx, grad_poses, grad_acts, *_stats):
    if not any(ctx.needs_input_grad[:5]):
        return (None,) * 11
    pose, W, activations, beta_u, mu_all, var_all, logit_all, m_all, logz_all = ctx.saved_tensors
    stride, lambdas, scale, eps, min_var = ctx.options
    gp, ga, gW, gbu, gba = _route_backward_op(pose, W, activations, beta_u, stride, lambdas, scale, eps, min_var,
                                              mu_all, var_all, logit_all, m_all, logz_all, grad_poses, grad_acts,
                                              ctx.needs_input_grad[1])
    need = ctx.needs_input_grad
    return ((gp if need[0] else None), (gW if need[1] else None), (ga if need[2] else None),
            (gbu if need[3] else None), (gba.to(ctx.beta_a_dtype) if need[4] else None)) + (None,) * 6


_route_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- ops on given votes
@torch.library.custom_op("capstriton::em_conv_routing", mutates_args=())
def _votes_op(votes: torch.Tensor, activations: torch.Tensor, beta_u: torch.Tensor, beta_a: torch.Tensor,
              stride: int, lambdas: list[float], scale: float, eps: float, min_var: float,
              return_R: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor, torch.Tensor]:
    """votes (B, OH, OW, K, K, A, C, 16), activations (B, H, W, A) -> the outputs of ``_route_op``."""
    return K.conv_em_fwd(votes.contiguous(), None, activations.contiguous(), beta_u, beta_a, stride, list(lambdas),
                         scale, eps, min_var, return_R)


@_votes_op.register_fake
def _(votes, activations, beta_u, beta_a, stride, lambdas, scale, eps, min_var, return_R):
    B, OH, OW, k, _, A, C, _ = votes.shape
    T = len(lambdas)
    f32 = dict(dtype=torch.float32)
    R = votes.new_empty(B, OH, OW, k, k, A, C, **f32) if return_R else votes.new_empty(0, **f32)
    return (votes.new_empty(B, OH, OW, C, 16), votes.new_empty(B, OH, OW, C), R,
            votes.new_empty(T, B, OH, OW, C, 16, **f32), votes.new_empty(T, B, OH, OW, C, 16, **f32),
            votes.new_empty(T, B, OH, OW, C, **f32), votes.new_empty(T, B, OH, OW, C, **f32),
            votes.new_empty(T, *activations.shape, **f32))


@torch.library.custom_op("capstriton::em_conv_routing_backward", mutates_args=())
def _votes_backward_op(votes: torch.Tensor, activations: torch.Tensor, beta_u: torch.Tensor, stride: int,
                       lambdas: list[float], scale: float, eps: float, min_var: float, mu_all: torch.Tensor,
                       var_all: torch.Tensor, logit_all: torch.Tensor, m_all: torch.Tensor, logz_all: torch.Tensor,
                       grad_poses: torch.Tensor, grad_acts: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dvotes, dL/dactivations, dL/dbeta_u, dL/dbeta_a)."""
    gv, ga, _, gbu, gba = K.conv_em_bwd(votes.contiguous(), None, activations.contiguous(), beta_u, stride,
                                        list(lambdas), scale, eps, min_var, mu_all, var_all, logit_all, m_all,
                                        logz_all, grad_poses.contiguous(), grad_acts.contiguous(), False)
    return gv, ga, gbu.to(beta_u.dtype), gba.to(beta_u.dtype)


@_votes_backward_op.register_fake
def _(votes, activations, beta_u, stride, lambdas, scale, eps, min_var, mu_all, var_all, logit_all, m_all,
      logz_all, grad_poses, grad_acts):
    C = votes.shape[6]
    return (votes.new_empty(votes.shape), activations.new_empty(activations.shape), beta_u.new_empty(C),
            beta_u.new_empty(C))


def _votes_setup_context(ctx, inputs, output):
    votes, activations, beta_u, beta_a, stride, lambdas, scale, eps, min_var, return_R = inputs
    _, _, R, mu_all, var_all, logit_all, m_all, logz_all = output
    ctx.mark_non_differentiable(R, mu_all, var_all, logit_all, m_all, logz_all)
    ctx.save_for_backward(votes, activations, beta_u, mu_all, var_all, logit_all, m_all, logz_all)
    ctx.options = (stride, list(lambdas), scale, eps, min_var)
    ctx.beta_a_dtype = beta_a.dtype


def _votes_backward(ctx, grad_poses, grad_acts, *_stats):
    need = ctx.needs_input_grad
    if not any(need[:4]):
        return (None,) * 10
    votes, activations, beta_u, mu_all, var_all, logit_all, m_all, logz_all = ctx.saved_tensors
    gv, ga, gbu, gba = _votes_backward_op(votes, activations, beta_u, *ctx.options, mu_all, var_all, logit_all,
                                          m_all, logz_all, grad_poses, grad_acts)
    return ((gv if need[0] else None), (ga if need[1] else None), (gbu if need[2] else None),
            (gba.to(ctx.beta_a_dtype) if need[3] else None)) + (None,) * 6


_votes_op.register_autograd(_votes_backward, setup_context=_votes_setup_context)


# ---------------------------------------------------------------------------------------------- checks
def _check_options(iterations, inverse_temperature, eps, min_var, cost_normalization, stride) -> list[float]:
    check_iterations(iterations)
    if isinstance(stride, bool) or not isinstance(stride, int):
        raise TypeError(f"stride must be an int >= 1, got {type(stride).__name__} {stride!r}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if cost_normalization not in COST_NORMALIZATIONS:
        raise ValueError(f"cost_normalization must be one of {COST_NORMALIZATIONS}, got {cost_normalization!r}")
    for name, value in (("eps", eps), ("min_var", min_var)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return lambda_schedule(iterations, inverse_temperature)


def _check_betas(beta_u, beta_a, C: int, like: torch.Tensor) -> None:
    for name, beta in (("beta_u", beta_u), ("beta_a", beta_a)):
        check_tensor(name, beta, 1, f" (C,) = ({C},)")
        if beta.shape[0] != C:
            raise ValueError(f"{name} must have shape (C,) = ({C},) (one value per parent type), "
                             f"got {tuple(beta.shape)}")
        if beta.device != like.device:
            raise ValueError(f"{name} must be on {like.device}, got {beta.device}")


def _check_grid(H: int, Wd: int, k: int, what: str) -> None:
    if k > H or k > Wd:
        raise ValueError(f"kernel size K must not exceed the child grid {what}: expected K <= min(H, W) = "
                         f"{min(H, Wd)}, got K = {k}")


def _check_activations(activations, B: int, H: int, Wd: int, A: int, like: torch.Tensor) -> None:
    check_tensor("activations", activations, 4, f" (B, H, W, A) = ({B}, {H}, {Wd}, {A})")
    if tuple(activations.shape) != (B, H, Wd, A):
        raise ValueError(f"activations must have shape (B, H, W, A) = ({B}, {H}, {Wd}, {A}), "
                         f"got {tuple(activations.shape)}")
    check_same_device_dtype(pose=like, activations=activations)
    check_unit_interval("activations", activations)


# ---------------------------------------------------------------------------------------------- public
def conv_em_routing(votes: torch.Tensor, activations: torch.Tensor, beta_u: torch.Tensor, beta_a: torch.Tensor,
                    stride: int, iterations: int = 3, inverse_temperature=0.01, eps: float = 1e-8,
                    min_var: float = 5e-4, cost_normalization: str = "none", backend: str = "auto",
                    return_assignments: bool = False):
    """Convolutional EM routing of given votes (spec C1-C5, E2-E13).

    Args:
        votes: (B, OH, OW, K, K, A, C, 16), votes[b, oh, ow, kh, kw, a, c] = pose @ W of child
            (oh*stride + kh, ow*stride + kw, a) for parent (oh, ow, c), flattened row-major.
        activations: (B, H, W, A) child activations on the child grid, OH = (H - K) // stride + 1.
        beta_u, beta_a: (C,) per parent type, shared by all positions.
        stride: the convolution stride (>= 1).
        iterations, inverse_temperature, eps, min_var, cost_normalization: as in ``em_routing``
            ("ibm": cost scale 100 * C / (K*K*A)).
        backend: "auto", "torch" (the gather/scatter reference ``em_reference.conv_em_routing_ref``)
            or "triton": the kernels of ``conv_caps_route`` in their VOTES mode, reading the given
            votes instead of recomputing them (the assignments are never stored; the backward writes
            dL/dvotes, votes-sized, as the input's gradient must be).
        return_assignments: also return R (B, OH, OW, K, K, A, C) of the last M-step.

    Returns (poses (B, OH, OW, C, 16), activations (B, OH, OW, C)) [, R].
    """
    check_tensor("votes", votes, 8, " (B, OH, OW, K, K, A, C, 16)")
    B, OH, OW, k, k2, A, C, Hd = votes.shape
    if k != k2 or Hd != 16:
        raise ValueError(f"votes must have shape (B, OH, OW, K, K, A, C, 16) (square kernel, 4x4 poses "
                         f"flattened to 16), got {tuple(votes.shape)}")
    lams = _check_options(iterations, inverse_temperature, eps, min_var, cost_normalization, stride)
    check_tensor("activations", activations, 4, " (B, H, W, A)")
    _, H, Wd, A_act = activations.shape
    if activations.shape[0] != B or A_act != A:
        raise ValueError(f"activations must have shape (B, H, W, A) with B = {B} and A = {A} (from votes), "
                         f"got {tuple(activations.shape)}")
    _check_grid(H, Wd, k, f"{H}x{Wd}")
    grid = ((H - k) // stride + 1, (Wd - k) // stride + 1)
    if grid != (OH, OW):
        raise ValueError(f"votes' parent grid must be ((H - K) // stride + 1, (W - K) // stride + 1) = {grid} for "
                         f"activations {tuple(activations.shape)}, K = {k} and stride {stride}, got ({OH}, {OW})")
    check_same_device_dtype(votes=votes, activations=activations)
    _check_betas(beta_u, beta_a, C, votes)
    if resolve_backend(backend, votes, activations) == "torch":
        return conv_em_routing_ref(votes, activations, beta_u, beta_a, stride, iterations, lams, eps, min_var,
                                   cost_normalization, bool(return_assignments))
    scale = cost_scale(cost_normalization, C, k * k * A)
    poses, acts, R, *_ = _votes_op(votes, activations, beta_u, beta_a, stride, lams, scale, float(eps),
                                   float(min_var), bool(return_assignments))
    return (poses, acts, R.to(votes.dtype)) if return_assignments else (poses, acts)


def conv_caps_route(pose: torch.Tensor, activations: torch.Tensor, W: torch.Tensor, beta_u: torch.Tensor,
                    beta_a: torch.Tensor, stride: int, iterations: int = 3, inverse_temperature=0.01,
                    eps: float = 1e-8, min_var: float = 5e-4, cost_normalization: str = "none",
                    backend: str = "auto", return_assignments: bool = False):
    """Convolutional capsules with EM routing, fused: equal to
    ``conv_em_routing(conv_caps_votes(pose, W, stride), activations, ...)`` forward and backward.

    Args:
        pose: (B, H, W, A, 4, 4) child poses; activations (B, H, W, A).
        W: (K, K, A, C, 4, 4), one matrix per (kernel offset, child type, parent type); VALID windows,
            OH = (H - K) // stride + 1.
        beta_u, beta_a: (C,).  Other options as in ``conv_em_routing``.
        backend: "torch" runs the gather/scatter reference on materialized votes; "triton" the fused
            kernels (``kernels/routing/em_conv.py``): votes and assignments are recomputed from pose and W
            in every pass, only per-parent and per-child statistics are stored; "auto" picks triton on
            CUDA (or under the interpreter) and for non-float64 inputs.
        return_assignments: also return R (B, OH, OW, K, K, A, C) of the last M-step (materialized on
            request; not differentiable on the triton backend).

    Returns (poses (B, OH, OW, C, 16), activations (B, OH, OW, C)) [, R].
    """
    check_tensor("pose", pose, 6, " (B, H, W, A, 4, 4)")
    if tuple(pose.shape[-2:]) != (4, 4):
        raise ValueError(f"pose must hold 4x4 matrices (B, H, W, A, 4, 4), got shape {tuple(pose.shape)}")
    check_tensor("W", W, 6, " (K, K, A, C, 4, 4)")
    if tuple(W.shape[-2:]) != (4, 4) or W.shape[0] != W.shape[1]:
        raise ValueError(f"W must have shape (K, K, A, C, 4, 4) (square kernel, 4x4 matrices), got {tuple(W.shape)}")
    B, H, Wd, A = pose.shape[:4]
    k, C = W.shape[0], W.shape[3]
    if W.shape[2] != A:
        raise ValueError(f"W's child types must match pose's: expected W.shape[2] == A = {A}, got W {tuple(W.shape)}")
    check_same_device_dtype(pose=pose, W=W)
    lams = _check_options(iterations, inverse_temperature, eps, min_var, cost_normalization, stride)
    _check_grid(H, Wd, k, f"{H}x{Wd}")
    _check_activations(activations, B, H, Wd, A, pose)
    _check_betas(beta_u, beta_a, C, pose)
    if resolve_backend(backend, pose, W, activations) == "torch":
        if not return_assignments:  # the fast plain-PyTorch route (em_torch)
            return conv_caps_route_torch(pose, activations, W, beta_u, beta_a, stride, iterations, lams, eps,
                                         min_var, cost_normalization)
        return conv_caps_route_ref(pose, activations, W, beta_u, beta_a, stride, iterations, lams, eps, min_var,
                                   cost_normalization, True)
    scale = cost_scale(cost_normalization, C, k * k * A)
    poses, acts, R, *_ = _route_op(pose.reshape(B, H, Wd, A, 16), W.reshape(k, k, A, C, 16), activations, beta_u,
                                   beta_a, stride, lams, scale, float(eps), float(min_var), bool(return_assignments))
    return (poses, acts, R.to(pose.dtype)) if return_assignments else (poses, acts)
