"""EM routing (Hinton, Sabour & Frosst 2018, "Matrix capsules with EM routing"), fully connected:
``em_routing`` on votes, ``class_caps_route`` (class capsules: W shared by positions, coordinate
addition) fused with the vote transform, and the "em" registry entry (``transform_route(...,
routing="em")``, ``DigitCaps(routing="em")``: vector votes W u, or matrix votes M @ W).

The specification is docs/em-routing.md (equation tags E1-E13, K1-K2).  The triton backend runs the
kernels of ``kernels/routing/em.py``: the votes are recomputed from the poses and W in every pass,
forward and backward (never materialized), and the assignments R are never stored;
``backend="torch"`` runs the plain-PyTorch reference (``capstriton.routing.em_reference``, float64
included).

Activations must lie in [0, 1]: a CPU tensor outside raises ValueError; on a GPU the check is a
device-side assertion, with no host synchronisation (``_validation.check_unit_interval``); under
``torch.compile`` it is skipped.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._backend import resolve_backend
from .._validation import (
    check_class_caps,
    check_iterations,
    check_matrix_transform,
    check_same_device_dtype,
    check_tensor,
    check_transform_shapes,
    check_unit_interval,
)
from ..kernels.routing import em as K
from ..reference import caps_transform_ref
from .common import absent, kernel_layout_weight
from .em_reference import (
    COST_NORMALIZATIONS,
    class_caps_votes_ref,
    cost_scale,
    em_routing_ref,
    lambda_schedule,
    matrix_transform_ref,
)
from .em_torch import class_caps_route_torch
from .registry import LayerParameter, Routed, Routing

__all__ = ["em_routing", "class_caps_route", "ROUTING"]

_STATS = 5  # mu_all, var_all, logit_all, m_all, shift0: fp32 statistics the backward reads


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
def _sizes(src: torch.Tensor, W: Optional[torch.Tensor], matrix: bool) -> tuple[int, int, int]:
    """(B, J, H) routed from votes (W None), pose (B, I, 16) with W (IW, J, 16), or u with W_k (I, Din, J, H)."""
    if W is None:
        return src.shape[0], src.shape[2], src.shape[3]
    if matrix:
        return src.shape[0], W.shape[1], 16
    return src.shape[0], W.shape[2], W.shape[3]


@torch.library.custom_op("capstriton::em_routing", mutates_args=())
def _op(src: torch.Tensor, W: Optional[torch.Tensor], activations: torch.Tensor, beta_u: torch.Tensor,
        beta_a: torch.Tensor, lams: list[float], scale: float, eps: float, min_var: float, matrix: bool,
        coordinate_addition: bool, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """src: votes (B, I, J, H) (W None), pose (B, I, 16) with W (IW, J, 16) (matrix; child i uses row
    i % IW), or u (B, I, Din) with W (I, Din, J, H) -> (poses (B, J, H), activations (B, J), and the
    statistics mu_all, var_all (T, B, J, H), logit_all, m_all (T, B, J), shift0 (B, J, H) fp32)."""
    return K.em_forward(src.contiguous(), W.contiguous() if W is not None else None, activations.contiguous(),
                        beta_u, beta_a, list(lams), scale, eps, min_var, matrix, coordinate_addition, (grid_h, grid_w))


@_op.register_fake
def _(src, W, activations, beta_u, beta_a, lams, scale, eps, min_var, matrix, coordinate_addition, grid_h, grid_w):
    B, J, H = _sizes(src, W, matrix)
    T = len(lams)
    f32 = dict(dtype=torch.float32)
    return (src.new_empty(B, J, H), src.new_empty(B, J), src.new_empty(T, B, J, H, **f32),
            src.new_empty(T, B, J, H, **f32), src.new_empty(T, B, J, **f32), src.new_empty(T, B, J, **f32),
            src.new_empty(B, J, H, **f32))


@torch.library.custom_op("capstriton::em_routing_backward", mutates_args=())
def _backward_op(src: torch.Tensor, W: Optional[torch.Tensor], activations: torch.Tensor, beta_u: torch.Tensor,
                 lams: list[float], scale: float, eps: float, min_var: float, matrix: bool, coordinate_addition: bool,
                 grid_h: int, grid_w: int, mu_all: torch.Tensor, var_all: torch.Tensor, logit_all: torch.Tensor,
                 m_all: torch.Tensor, shift0: torch.Tensor, grad_poses: torch.Tensor, grad_acts: torch.Tensor,
                 need_src: bool, need_W: bool, need_act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor, torch.Tensor]:
    """(dL/dsrc, dL/dW, dL/dactivations, dL/dbeta_u, dL/dbeta_a); a gradient not needed (or of a
    None W) is an empty tensor (no work)."""
    g_src, g_W, g_act, g_bu, g_ba = K.em_backward(
        src.contiguous(), W.contiguous() if W is not None else None, activations.contiguous(), beta_u, list(lams),
        scale, eps, min_var, mu_all.contiguous(), var_all.contiguous(), logit_all.contiguous(), m_all.contiguous(),
        shift0.contiguous(), grad_poses.contiguous(), grad_acts.contiguous(), matrix, coordinate_addition,
        (grid_h, grid_w), need_src, need_W and W is not None, need_act)
    return (g_src if need_src else absent(src), g_W if g_W is not None else absent(src),
            g_act if need_act else absent(activations), g_bu, g_ba)


@_backward_op.register_fake
def _(src, W, activations, beta_u, lams, scale, eps, min_var, matrix, coordinate_addition, grid_h, grid_w, mu_all,
      var_all, logit_all, m_all, shift0, grad_poses, grad_acts, need_src, need_W, need_act):
    return (src.new_empty(src.shape) if need_src else absent(src),
            W.new_empty(W.shape) if need_W and W is not None else absent(src),
            activations.new_empty(activations.shape) if need_act else absent(activations),
            beta_u.new_empty(beta_u.shape), beta_u.new_empty(beta_u.shape))


_ARGS = ("src", "W", "activations", "beta_u", "beta_a", "lams", "scale", "eps", "min_var", "matrix",
         "coordinate_addition", "grid_h", "grid_w")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_ARGS, inputs))
    stats = output[2:]
    ctx.mark_non_differentiable(*stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(args["src"], args["W"], args["activations"], args["beta_u"], *stats)
    ctx.options = tuple(args[k] for k in ("lams", "scale", "eps", "min_var", "matrix", "coordinate_addition",
                                          "grid_h", "grid_w"))


def _backward(ctx, grad_poses, grad_acts, *_grad_stats):
    need_src, need_W, need_act, need_bu, need_ba = ctx.needs_input_grad[:5]
    none = (None,) * (len(_ARGS) - 5)
    if (grad_poses is None and grad_acts is None) or not any(ctx.needs_input_grad[:5]):
        return (None,) * len(_ARGS)
    src, W, act, beta_u, *stats = ctx.saved_tensors
    B, J, H = stats[-1].shape
    if grad_poses is None:
        grad_poses = src.new_zeros(B, J, H)
    if grad_acts is None:
        grad_acts = src.new_zeros(B, J)
    g_src, g_W, g_act, g_bu, g_ba = _backward_op(src, W, act, beta_u, *ctx.options, *stats, grad_poses, grad_acts,
                                                 need_src, need_W, need_act)
    return ((g_src if need_src else None), (g_W if need_W else None), (g_act if need_act else None),
            (g_bu if need_bu else None), (g_ba if need_ba else None), *none)


_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("capstriton::em_assignments", mutates_args=())
def _assignments_op(src: torch.Tensor, W: Optional[torch.Tensor], mu: Optional[torch.Tensor],
                    var: Optional[torch.Tensor], logit: Optional[torch.Tensor], matrix: bool,
                    coordinate_addition: bool, grid_h: int, grid_w: int) -> torch.Tensor:
    """R (B, I, J) in src's dtype that the E-step forms from an M-step's state (mu, var, logit)
    (None: the uniform 1/J of the first iteration), the votes recomputed.  Not differentiable."""
    return K.em_assignments(src.contiguous(), W.contiguous() if W is not None else None,
                            mu.contiguous() if mu is not None else None, var, logit, matrix, coordinate_addition,
                            (grid_h, grid_w))


@_assignments_op.register_fake
def _(src, W, mu, var, logit, matrix, coordinate_addition, grid_h, grid_w):
    B, J, _ = _sizes(src, W, matrix)
    return src.new_empty(B, src.shape[1], J)


def _fused(src, W, activations, beta_u, beta_a, lams, scale, eps, min_var, matrix, coord=False, grid=(1, 1),
           return_assignments=False):
    """The op's (poses, activations) [+ R of the last M-step, not differentiable]."""
    outs = _op(src, W, activations, beta_u, beta_a, lams, float(scale), float(eps), float(min_var), matrix,
               bool(coord), int(grid[0]), int(grid[1]))
    poses, acts = outs[0], outs[1]
    if not return_assignments:
        return poses, acts
    mu_all, var_all, logit_all = outs[2], outs[3], outs[4]
    state = (mu_all[-2], var_all[-2], logit_all[-2]) if len(lams) > 1 else (None, None, None)
    R = _assignments_op(src.detach(), W.detach() if W is not None else None, *state, matrix, bool(coord),
                        int(grid[0]), int(grid[1]))
    return poses, acts, R


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _check_options(iterations, inverse_temperature, eps, min_var, cost_normalization) -> list[float]:
    """The checks shared by every public function; returns the lambda of every iteration."""
    check_iterations(iterations)
    if not isinstance(cost_normalization, str) or cost_normalization not in COST_NORMALIZATIONS:
        raise ValueError(f"cost_normalization must be one of {COST_NORMALIZATIONS}, got {cost_normalization!r}")
    for name, value in (("eps", eps), ("min_var", min_var)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(inverse_temperature, bool) or not isinstance(inverse_temperature, (int, float, list, tuple)):
        raise TypeError(f"inverse_temperature must be a number or a sequence of one number per iteration, got "
                        f"{type(inverse_temperature).__name__} {inverse_temperature!r}")
    lams = lambda_schedule(iterations, inverse_temperature)
    if not all(math.isfinite(x) for x in lams):
        raise ValueError(f"inverse_temperature must be finite, got {inverse_temperature!r}")
    return lams


def _check_activations(activations, shape: tuple, hint: str, like: torch.Tensor) -> None:
    check_tensor("activations", activations, len(shape), hint)
    if tuple(activations.shape) != tuple(shape):
        raise ValueError(f"activations must have shape {hint.strip()} = {tuple(shape)}, got {tuple(activations.shape)}")
    check_same_device_dtype(input=like, activations=activations)
    check_unit_interval("activations", activations)


def _check_betas(beta_u, beta_a, J: int, like: torch.Tensor) -> None:
    for name, t in (("beta_u", beta_u), ("beta_a", beta_a)):
        check_tensor(name, t, 1, f" (J,) = ({J},)")
        if t.shape[0] != J:
            raise ValueError(f"{name} must have shape (J,) = ({J},), one value per parent type, got {tuple(t.shape)}")
        check_same_device_dtype(input=like, **{name: t})


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def em_routing(votes: torch.Tensor, activations: torch.Tensor, beta_u: torch.Tensor, beta_a: torch.Tensor,
               iterations: int = 3, inverse_temperature=0.01, eps: float = 1e-8, min_var: float = 5e-4,
               cost_normalization: str = "none", backend: str = "auto", return_assignments: bool = False):
    """Fully connected EM routing (Procedure 1 of Hinton, Sabour & Frosst 2018; spec E2-E13).

    votes (B, I, J, H) (H = 16 for 4x4 poses; any H works), activations (B, I) in [0, 1], beta_u and
    beta_a (J,) -> (poses mu (B, J, H), activations (B, J)) of the last M-step.  R starts at 1/J; every
    iteration t runs the M-step (r = R a, m = sum r, mu, var = sum r (V - mu)^2 / (m + eps) + min_var,
    cost = s m sum_h (beta_u + ln var / 2), a = sigmoid(lambda_t (beta_a - cost))) and, except the
    last, the E-step R = softmax over j of logsigmoid(logit) + ln p.

    Args:
        iterations: >= 1.
        inverse_temperature: lambda_final of lambda_t = lambda_final (1 - 0.95^(t+1)) (E8), or a
            sequence of one lambda per iteration.
        eps: added to m in the divisions; min_var: the variance floor ([G]'s 5e-4).
        cost_normalization: "none" (the paper, s = 1) or "ibm" (s = 100 J / I, E13).
        backend: "auto", "torch" (reference, float64 included) or "triton" (kernels: R never stored).
        return_assignments: also return the assignments R (B, I, J) the last M-step used (not
            differentiable).
    """
    check_tensor("votes", votes, 4, " (B, I, J, H)")
    B, I, J, H = votes.shape
    _check_activations(activations, (B, I), " (B, I)", votes)
    _check_betas(beta_u, beta_a, J, votes)
    lams = _check_options(iterations, inverse_temperature, eps, min_var, cost_normalization)
    if resolve_backend(backend, votes, activations, beta_u, beta_a) == "torch":
        return em_routing_ref(votes, activations, beta_u, beta_a, iterations, lams, eps, min_var, cost_normalization,
                              return_assignments=return_assignments)
    scale = cost_scale(cost_normalization, J, I)
    return _fused(votes, None, activations, beta_u, beta_a, lams, scale, eps, min_var, False,
                  return_assignments=return_assignments)


def class_caps_route(pose: torch.Tensor, activations: torch.Tensor, W: torch.Tensor, beta_u: torch.Tensor,
                     beta_a: torch.Tensor, coordinate_addition: bool = True, iterations: int = 3,
                     inverse_temperature=0.01, eps: float = 1e-8, min_var: float = 5e-4,
                     cost_normalization: str = "none", backend: str = "auto", return_assignments: bool = False):
    """Class capsules: ``em_routing(class_caps_votes(pose, W, coordinate_addition), activations.reshape(B, -1),
    ...)`` fused (spec K1-K3).

    pose (B, H, W, A, 4, 4), activations (B, H, W, A) in [0, 1], W (A, J, 4, 4) shared by the positions
    of a type, beta_u and beta_a (J,) -> (poses (B, J, 16), activations (B, J)) [+ R (B, H*W*A, J)].
    Children are ordered (h, w, a); coordinate addition adds (h + 1/2)/H to vote element 3 and
    (w + 1/2)/W to element 7.  "ibm" normalisation uses N_c = H*W*A children per parent.  On the
    triton backend the votes are recomputed in every pass, never materialized; gradients reach
    pose, activations, W, beta_u and beta_a."""
    check_class_caps(pose, W)
    B, GH, GW, A = pose.shape[:4]
    J = W.shape[1]
    _check_activations(activations, (B, GH, GW, A), " (B, H, W, A)", pose)
    _check_betas(beta_u, beta_a, J, pose)
    if not isinstance(coordinate_addition, bool):
        raise TypeError(f"coordinate_addition must be a bool, got {type(coordinate_addition).__name__}")
    lams = _check_options(iterations, inverse_temperature, eps, min_var, cost_normalization)
    I = GH * GW * A
    a_flat = activations.reshape(B, I)
    if resolve_backend(backend, pose, activations, W, beta_u, beta_a) == "torch":
        if not return_assignments:  # the fast plain-PyTorch route (em_torch)
            return class_caps_route_torch(pose, activations, W, beta_u, beta_a, coordinate_addition, iterations, lams,
                                          eps, min_var, cost_normalization)
        votes = class_caps_votes_ref(pose, W, coordinate_addition)
        return em_routing_ref(votes, a_flat, beta_u, beta_a, iterations, lams, eps, min_var, cost_normalization,
                              return_assignments=return_assignments)
    scale = cost_scale(cost_normalization, J, I)
    return _fused(pose.reshape(B, I, 16), W.reshape(A, J, 16), a_flat, beta_u, beta_a, lams, scale, eps, min_var,
                  True, coordinate_addition, (GH, GW), return_assignments)


# ----------------------------------------------------------------------------------------------
# registry entry: transform_route(u, W, routing="em", ...), DigitCaps(routing="em")
# ----------------------------------------------------------------------------------------------
def _is_matrix(u, W) -> bool:
    return isinstance(u, torch.Tensor) and u.dim() == 4


def _check_route_inputs(u, W):
    """(B, I, J, matrix) for pose (B, I, 4, 4) with W (I, J, 4, 4), or u (B, I, Din) with W (I, J, Dout, Din)."""
    if _is_matrix(u, W):
        check_matrix_transform(u, W)
        return u.shape[0], u.shape[1], W.shape[1], True
    check_transform_shapes(u, W)
    return u.shape[0], u.shape[1], W.shape[1], False


def _betas(beta_u, beta_a, J: int, like: torch.Tensor):
    zeros = lambda: like.new_zeros(J)  # noqa: E731
    return (beta_u if beta_u is not None else zeros()), (beta_a if beta_a is not None else zeros())


def route(u: torch.Tensor, W: torch.Tensor, backend: str, iterations: int, inverse_temperature, eps: float,
          min_var: float, cost_normalization: str, beta_u: torch.Tensor | None, beta_a: torch.Tensor | None,
          activations: torch.Tensor) -> Routed:
    """EM routing of the votes W u (u (B, I, Din), W (I, J, Dout, Din): vector poses) or M @ W
    (pose (B, I, 4, 4), W (I, J, 4, 4): matrix poses) -> Routed(v = poses (B, J, Dout or 16),
    outputs = (activations (B, J),)).  beta_u / beta_a None: zeros."""
    B, I, J, matrix = _check_route_inputs(u, W)
    beta_u, beta_a = _betas(beta_u, beta_a, J, u)
    _check_activations(activations, (B, I), " (B, I)", u)
    _check_betas(beta_u, beta_a, J, u)
    lams = _check_options(iterations, inverse_temperature, eps, min_var, cost_normalization)
    if resolve_backend(backend, u, W, activations, beta_u, beta_a) == "torch":
        votes = matrix_transform_ref(u, W) if matrix else caps_transform_ref(u, W)
        poses, acts = em_routing_ref(votes, activations, beta_u, beta_a, iterations, lams, eps, min_var,
                                     cost_normalization)
        return Routed(poses, outputs=(acts,))
    scale = cost_scale(cost_normalization, J, I)
    if matrix:
        poses, acts = _fused(u.reshape(B, I, 16), W.reshape(I, J, 16), activations, beta_u, beta_a, lams, scale, eps,
                             min_var, True)
    else:
        poses, acts = _fused(u, kernel_layout_weight(W), activations, beta_u, beta_a, lams, scale, eps, min_var, False)
    return Routed(poses, outputs=(acts,), on_triton=True)


@torch.no_grad()
def couplings_ref(u: torch.Tensor, W: torch.Tensor, iterations: int = 3, inverse_temperature=0.01, eps: float = 1e-8,
                  min_var: float = 5e-4, cost_normalization: str = "none", beta_u: torch.Tensor | None = None,
                  beta_a: torch.Tensor | None = None, activations: torch.Tensor | None = None) -> torch.Tensor:
    """R (B, I, J): the assignments the last M-step used, by the reference."""
    matrix = _is_matrix(u, W)
    votes = matrix_transform_ref(u, W) if matrix else caps_transform_ref(u, W)
    beta_u, beta_a = _betas(beta_u, beta_a, votes.shape[2], u)
    if activations is None:
        activations = u.new_ones(u.shape[0], u.shape[1])
    return em_routing_ref(votes, activations, beta_u, beta_a, iterations, inverse_temperature, eps, min_var,
                          cost_normalization, return_assignments=True)[2]


def example_activations(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Example input activations (B, I) in (0, 1), a function of u: sigmoid of each capsule's mean."""
    return torch.sigmoid(u.detach().flatten(2).mean(-1))


ROUTING = Routing(
    "em", route, couplings_ref,
    options={"iterations": 3, "inverse_temperature": 0.01, "eps": 1e-8, "min_var": 5e-4, "cost_normalization": "none",
             "beta_u": None, "beta_a": None},
    inputs={"activations": example_activations}, outputs=("activations",),
    parameters=lambda in_caps, out_caps, out_dim: {"beta_u": LayerParameter(torch.zeros(out_caps), "beta_u"),
                                                   "beta_a": LayerParameter(torch.zeros(out_caps), "beta_a")},
    summary="EM routing (Hinton, Sabour & Frosst 2018): iterations, inverse_temperature, eps, min_var, "
            "cost_normalization; input activations; beta_u, beta_a per output capsule")
