"""The plain-PyTorch backend of the fused EM routes (``class_caps_route``, ``conv_caps_route`` with
``backend="torch"``): the same math as ``em_reference`` (equal to 1e-11 in float64, values and
gradients), about 5x faster on the CPU, where users train on it.

The votes are gathered once (an unfold for convolutional capsules) into a (..., parent types,
children, 16) layout; [V, V^2] feed one batched product for both moments of the M-step and one
for the E-step's quadratic form, whose gradients are summed in place over their uses (no
votes-sized temporaries per iteration); the per-child normaliser of C5 is an index_add over the
child grid; there is no dense child x parent matrix.  Inputs are checked by the public functions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .em_reference import class_caps_votes_ref, lambda_schedule

__all__ = ["class_caps_route_torch", "conv_caps_route_torch"]

_HALF_LN_2PI = 0.5 * math.log(2.0 * math.pi)


class _GradBuffer:
    """The gradient of VV, summed in place over its uses: the first rank-1 term allocates it."""

    def __init__(self):
        self.grad = None

    def add(self, left: torch.Tensor, right: torch.Tensor) -> None:
        if self.grad is None:
            self.grad = torch.bmm(left, right)
        else:
            self.grad.baddbmm_(left, right)


class _Votes(torch.autograd.Function):
    """V (X, N, 16) -> VV = [V, V^2] (X, N, 32), the votes and their squares side by side.  Its
    backward reads the gradient of VV from ``grad_buffer``, into which every ``_Moments`` /
    ``_Quadratic`` use adds its rank-1 term in place (``baddbmm_``): one V-sized gradient instead
    of one new tensor per use and their sums (on the CPU allocating and first-touching those
    large tensors costs more than the arithmetic)."""

    @staticmethod
    def forward(ctx, V, grad_buffer):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(V)
        ctx.grad_buffer = grad_buffer
        VV = V.new_empty(*V.shape[:-1], 32)
        VV[..., :16] = V
        torch.mul(V, V, out=VV[..., 16:])
        return VV

    @staticmethod
    def backward(ctx, grad):
        (V,) = ctx.saved_tensors
        g = ctx.grad_buffer.grad
        ctx.grad_buffer.grad = None
        if g is None and grad is None:
            return None, None
        if g is None:
            g = grad
        elif grad is not None:
            g = g + grad
        return torch.addcmul(g[..., :16], V, g[..., 16:], value=2.0), None


class _Moments(torch.autograd.Function):
    """rn (X, 1, N) @ VV (X, N, 32) -> (X, 1, 32); the gradient of VV goes to the buffer."""

    @staticmethod
    def forward(ctx, rn, VV, grad_buffer):
        ctx.save_for_backward(rn, VV)
        ctx.grad_buffer = grad_buffer
        return rn @ VV

    @staticmethod
    def backward(ctx, grad):
        rn, VV = ctx.saved_tensors
        ctx.grad_buffer.add(rn.transpose(-1, -2), grad)
        return grad @ VV.transpose(-1, -2), None, None


class _Quadratic(torch.autograd.Function):
    """VV (X, N, 32) @ coef (X, 32, 1) -> (X, N, 1); the gradient of VV goes to the buffer."""

    @staticmethod
    def forward(ctx, VV, coef, grad_buffer):
        ctx.save_for_backward(VV, coef)
        ctx.grad_buffer = grad_buffer
        return VV @ coef

    @staticmethod
    def backward(ctx, grad):
        VV, coef = ctx.saved_tensors
        ctx.grad_buffer.add(grad, coef.transpose(-1, -2))
        return None, VV.transpose(-1, -2) @ grad, None


class _VoteProducts:
    """The two products the routing takes with the votes, (X, N, 32) flattened: through the
    in-place gradient buffer when the votes need a gradient, plain ``@`` otherwise."""

    def __init__(self, V: torch.Tensor):
        shape = V.shape
        self.lead = shape[:-2]
        flat = V.reshape(-1, shape[-2], 16)
        if torch.is_grad_enabled() and V.requires_grad:
            self.buffer = _GradBuffer()
            self.VV = _Votes.apply(flat, self.buffer)
        else:
            self.buffer, self.VV = None, torch.cat([flat, flat * flat], dim=-1)

    def moments(self, rn: torch.Tensor) -> torch.Tensor:
        """rn (..., N) -> sum_n rn V and sum_n rn V^2 side by side (..., 32)."""
        x = rn.reshape(-1, 1, rn.shape[-1])
        out = _Moments.apply(x, self.VV, self.buffer) if self.buffer is not None else x @ self.VV
        return out.view(*self.lead, 32)

    def quadratic(self, coef: torch.Tensor) -> torch.Tensor:
        """coef (..., 32) -> sum_h VV[..., n, h] coef[..., h] (..., N)."""
        x = coef.reshape(-1, 32, 1)
        out = _Quadratic.apply(self.VV, x, self.buffer) if self.buffer is not None else self.VV @ x
        return out.view(*self.lead, -1)


def _m_step(R, a, votes, beta_u, beta_a, lam, scale, eps, min_var):
    """One M-step (E3-E7) over the children N of ``votes`` (a ``_VoteProducts`` of (..., J, N, 16)),
    R (..., J, N), a (..., 1, N) (broadcast over J): mu, var, log var, logit.  One batched
    product gives the first and second moments."""
    r = R * a
    m = r.sum(-1)                                                   # (..., J)
    rn = r / (m + eps).unsqueeze(-1)
    mu, ex2 = votes.moments(rn).chunk(2, dim=-1)                    # (..., J, 16) each
    # sum rn (V - mu)^2 = ex2 - 2 mu^2 + mu^2 m / (m + eps)
    var = (ex2 - mu * mu * (2.0 - m / (m + eps)).unsqueeze(-1)).clamp_min(0.0) + min_var
    log_var = var.log()
    cost = (beta_u.unsqueeze(-1) + 0.5 * log_var).sum(-1) * (scale * m)
    logit = lam * (beta_a - cost)
    return mu, var, log_var, logit


def _log_q(votes, mu, var, log_var, logit):
    """ln q (..., J, N) of the E-step (E9-E10): the quadratic form sum_h (V - mu)^2 / (2 var)
    expanded into one batched product with [V, V^2]."""
    w = 0.5 / var                                                   # (..., J, 16)
    quad = votes.quadratic(torch.cat([-2.0 * mu * w, w], dim=-1)) + (mu * mu * w).sum(-1, keepdim=True)
    ln_p = -quad - 0.5 * log_var.sum(-1, keepdim=True) - 16 * _HALF_LN_2PI
    return F.logsigmoid(logit).unsqueeze(-1) + ln_p


def class_caps_route_torch(pose, activations, W, beta_u, beta_a, coordinate_addition=True, iterations=3,
                    inverse_temperature=0.01, eps=1e-8, min_var=5e-4, cost_normalization="none"):
    """Plain-PyTorch class capsules + EM routing: (poses (B, J, 16), activations (B, J))."""
    votes = class_caps_votes_ref(pose, W, coordinate_addition)          # (B, I, J, 16)
    B, I, J, _ = votes.shape
    VV = _VoteProducts(votes.transpose(1, 2))                       # (B, J, I, 16)
    a = activations.reshape(B, 1, I).to(votes.dtype)
    scale = 100.0 * J / I if cost_normalization == "ibm" else 1.0
    R = votes.new_full((B, J, I), 1.0 / J)
    lams = lambda_schedule(iterations, inverse_temperature)
    for t, lam in enumerate(lams):
        mu, var, log_var, logit = _m_step(R, a, VV, beta_u, beta_a, lam, scale, eps, min_var)
        if t < iterations - 1:
            R = torch.softmax(_log_q(VV, mu, var, log_var, logit), dim=1)
    return mu, torch.sigmoid(logit)


_CONV_INDEX_CACHE: dict = {}


def _conv_geometry(H, W, K, stride, device):
    """child index (OH*OW*K*K,) of every (parent position, kernel offset) and the number of
    parent positions each child position feeds (H*W,)."""
    key = (H, W, K, stride, str(device))
    if key not in _CONV_INDEX_CACHE:
        OH, OW = (H - K) // stride + 1, (W - K) // stride + 1
        oh = torch.arange(OH, device=device).view(OH, 1, 1, 1)
        ow = torch.arange(OW, device=device).view(1, OW, 1, 1)
        kh = torch.arange(K, device=device).view(1, 1, K, 1)
        kw = torch.arange(K, device=device).view(1, 1, 1, K)
        child = ((oh * stride + kh) * W + (ow * stride + kw)).reshape(-1)
        count = torch.zeros(H * W, device=device).index_add_(0, child, torch.ones(child.shape[0], device=device))
        _CONV_INDEX_CACHE[key] = (child, count)
    return _CONV_INDEX_CACHE[key]


def conv_caps_route_torch(pose, activations, W, beta_u, beta_a, stride=1, iterations=3, inverse_temperature=0.01,
                   eps=1e-8, min_var=5e-4, cost_normalization="none"):
    """Plain-PyTorch convolutional capsules + EM routing: (poses (B, OH, OW, C, 16), activations
    (B, OH, OW, C)).  Votes in the layout (B, P, C, N, 16), P = OH*OW parent positions, N = K*K*A
    children per parent; the E-step normalises each child over every parent it feeds (C5) by
    index_add over the child grid."""
    B, H, Wd, A = pose.shape[:4]
    K, C = W.shape[0], W.shape[3]
    OH, OW = (H - K) // stride + 1, (Wd - K) // stride + 1
    P, N = OH * OW, K * K * A
    win = pose.unfold(1, K, stride).unfold(2, K, stride)            # (B, OH, OW, A, 4, 4, K, K)
    win = win.permute(0, 1, 2, 6, 7, 3, 4, 5).reshape(B, P, N, 4, 4)
    Wn = W.reshape(N, C, 4, 4)
    VV = _VoteProducts(torch.einsum("bpnrk,nckq->bpcnrq", win, Wn).reshape(B, P, C, N, 16))
    a_win = activations.unfold(1, K, stride).unfold(2, K, stride)   # (B, OH, OW, A, K, K)
    a = a_win.permute(0, 1, 2, 4, 5, 3).reshape(B, P, 1, N).to(pose.dtype)
    child, count = _conv_geometry(H, Wd, K, stride, pose.device)
    R0 = (1.0 / (count[child].to(pose.dtype) * C)).view(1, P, 1, K * K, 1).expand(B, P, C, K * K, A)
    R = R0.reshape(B, P, C, N)
    scale = 100.0 * C / N if cost_normalization == "ibm" else 1.0
    lams = lambda_schedule(iterations, inverse_temperature)
    for t, lam in enumerate(lams):
        mu, var, log_var, logit = _m_step(R, a, VV, beta_u, beta_a, lam, scale, eps, min_var)
        if t < iterations - 1:
            lnq = _log_q(VV, mu, var, log_var, logit).view(B, P, C, K * K, A)
            with torch.no_grad():  # a per-child shift (any constant works): the max over its parents
                top = lnq.amax(2).reshape(B, P * K * K, A)
                kappa = top.new_full((B, H * Wd, A), -math.inf).scatter_reduce(
                    1, child.view(1, -1, 1).expand_as(top), top, "amax", include_self=True)
                kappa = kappa[:, child].view(B, P, 1, K * K, A)
            e = torch.exp(lnq - kappa)
            den = e.new_zeros(B, H * Wd, A).index_add(1, child, e.sum(2).reshape(B, P * K * K, A))
            R = (e / den[:, child].view(B, P, 1, K * K, A)).reshape(B, P, C, N)
    return mu.view(B, OH, OW, C, 16), torch.sigmoid(logit).view(B, OH, OW, C)
