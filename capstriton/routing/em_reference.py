"""EM routing in plain PyTorch (Hinton, Sabour & Frosst 2018, Procedure 1): the reference the
kernels are checked against and the ``backend="torch"`` path (float64 included).

Equation tags (E1-E13, C1-C5, K1-K2) refer to the specification in docs/em-routing.md.  The
convolutional routing gathers each parent's K*K*A children (an unfold) and scatters each child's
normaliser back onto the child grid (a fold); there is no dense child x parent matrix.  The dense
form (`conv_em_routing_dense_ref`, a boolean connectivity mask over all child/parent pairs) is
kept for tiny test shapes: it is the specification written out.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["lambda_schedule", "cost_scale", "em_routing_ref", "matrix_transform_ref", "class_caps_votes_ref",
           "conv_caps_votes_ref", "conv_connectivity", "conv_em_routing_ref", "conv_caps_route_ref",
           "conv_em_routing_dense_ref"]

COST_NORMALIZATIONS = ("none", "ibm")


def lambda_schedule(iterations: int, inverse_temperature) -> list[float]:
    """The inverse temperature of every iteration: lambda_final * (1 - 0.95^(t+1)) (E8), or the
    given sequence, one value per iteration."""
    if isinstance(inverse_temperature, (int, float)) and not isinstance(inverse_temperature, bool):
        return [float(inverse_temperature) * (1.0 - 0.95 ** (t + 1)) for t in range(iterations)]
    values = [float(x) for x in inverse_temperature]
    if len(values) != iterations:
        raise ValueError(f"inverse_temperature must be a number or a sequence of one value per iteration "
                         f"({iterations}), got {len(values)} values")
    return values


def cost_scale(cost_normalization: str, parent_types: int, children_per_parent: int) -> float:
    """s of (E6): 1 for "none" (the paper), 100 * J / N_c for "ibm" (E13)."""
    if cost_normalization == "none":
        return 1.0
    if cost_normalization == "ibm":
        return 100.0 * parent_types / children_per_parent
    raise ValueError(f"cost_normalization must be one of {COST_NORMALIZATIONS}, got {cost_normalization!r}")


def _m_step(r: torch.Tensor, votes: torch.Tensor, squares: torch.Tensor, beta_u, beta_a, lam: float, scale: float,
            eps: float, min_var: float):
    """(E3-E7) on parent-major tensors: r (..., N) and votes, squares = votes^2 (..., N, H) hold
    each parent's N children -> mu, var (..., H), logit (...).  The sums over the children are
    matrix products (no votes-sized temporaries); sum r (V - mu)^2 is formed as
    sum r V^2 - 2 mu sum r V + mu^2 m."""
    m = r.sum(-1)
    denom = (m + eps).unsqueeze(-1)
    row = r.unsqueeze(-2)
    sum1 = (row @ votes).squeeze(-2)
    mu = sum1 / denom
    spread = (row @ squares).squeeze(-2) - 2 * mu * sum1 + mu.square() * m.unsqueeze(-1)
    var = spread.clamp(min=0) / denom + min_var
    cost = (beta_u.unsqueeze(-1) + 0.5 * torch.log(var)).sum(-1) * scale * m
    return mu, var, lam * (beta_a - cost)


def _log_q(votes: torch.Tensor, squares: torch.Tensor, mu, var, logit) -> torch.Tensor:
    """(E9-E10) on parent-major tensors: ln a + ln p (..., N), the 1/2 ln 2pi terms included;
    sum_h (V - mu)^2 / (2 var) expanded into matrix products with V^2 and V."""
    inv = 0.5 / var
    quad = (squares @ inv.unsqueeze(-1)).squeeze(-1) - (votes @ (2 * mu * inv).unsqueeze(-1)).squeeze(-1)
    const = (mu.square() * inv + 0.5 * torch.log(var)).sum(-1) + 0.5 * votes.shape[-1] * math.log(2 * math.pi)
    return F.logsigmoid(logit).unsqueeze(-1) - quad - const.unsqueeze(-1)


def _em(votes: torch.Tensor, a_in: torch.Tensor, R: torch.Tensor, normalise, beta_u, beta_a, lams: list[float],
        scale: float, eps: float, min_var: float):
    """The iterations on parent-major tensors: votes (..., P, N, H) (P parent types last before
    the children), a_in and the initial R (..., P, N) -> (mu, logit, R of the last M-step);
    ``normalise(ln q)`` is the E-step's softmax over the parents each child feeds."""
    squares = votes.square()
    for t, lam in enumerate(lams):
        mu, var, logit = _m_step(R * a_in, votes, squares, beta_u, beta_a, lam, scale, eps, min_var)
        if t < len(lams) - 1:
            R = normalise(_log_q(votes, squares, mu, var, logit))
    return mu, logit, R


def em_routing_ref(votes: torch.Tensor, activations: torch.Tensor, beta_u: torch.Tensor, beta_a: torch.Tensor,
                   iterations: int = 3, inverse_temperature=0.01, eps: float = 1e-8, min_var: float = 5e-4,
                   cost_normalization: str = "none", mask: torch.Tensor | None = None,
                   return_assignments: bool = False):
    """Fully connected EM routing: votes (B, I, J, H), activations (B, I), beta_u / beta_a (J,)
    -> (poses mu (B, J, H), activations (B, J)) of the last M-step [, R (B, I, J) it used].

    mask (I, J) bool: child i feeds parent j (None: all pairs).  A child feeding no parent gets
    R = 0; the "ibm" scale takes N_c = the mask's children per parent (all parents must have the
    same count)."""
    B, I, J, H = votes.shape
    lams = lambda_schedule(iterations, inverse_temperature)
    fed = torch.ones(I, J, dtype=torch.bool, device=votes.device) if mask is None else mask.to(votes.device)
    scale = cost_scale(cost_normalization, J, int(fed.sum(0).max()))
    counts = fed.sum(1, keepdim=True).clamp(min=1).to(votes.dtype)
    unfed = ~fed.t()  # (J, I)

    def normalise(log_q):  # (B, J, I): softmax over the parents j; a child feeding none gets 0
        return torch.softmax(log_q.masked_fill(unfed, float("-inf")), dim=-2).masked_fill(unfed, 0.0)

    R0 = (fed.to(votes.dtype) / counts).t().expand(B, J, I)
    mu, logit, R = _em(votes.transpose(1, 2).contiguous(), activations.unsqueeze(1), R0, normalise, beta_u, beta_a,
                       lams, scale, eps, min_var)
    outputs = (mu, torch.sigmoid(logit))
    return (*outputs, R.transpose(1, 2)) if return_assignments else outputs


def matrix_transform_ref(pose: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """(E1) pose (B, I, 4, 4), W (I, J, 4, 4) -> votes (B, I, J, 16), V_ij = M_i @ W_ij row-major."""
    return torch.einsum("birk,ijkc->bijrc", pose, W).flatten(-2)


def class_caps_votes_ref(pose: torch.Tensor, W: torch.Tensor, coordinate_addition: bool = True) -> torch.Tensor:
    """(K1-K2) pose (B, H, W, A, 4, 4), W (A, J, 4, 4) shared by positions -> votes (B, H*W*A, J, 16),
    children ordered (h, w, a); coordinate addition adds (h + 1/2)/H to element 3 and (w + 1/2)/W
    to element 7."""
    B, GH, GW, A = pose.shape[:4]
    votes = torch.einsum("bhwark,ajkc->bhwajrc", pose, W).flatten(-2)
    if coordinate_addition:
        rows = (torch.arange(GH, device=pose.device, dtype=votes.dtype) + 0.5) / GH
        cols = (torch.arange(GW, device=pose.device, dtype=votes.dtype) + 0.5) / GW
        offset = torch.zeros(GH, GW, 16, device=pose.device, dtype=votes.dtype)
        offset[:, :, 3] = rows[:, None]
        offset[:, :, 7] = cols[None, :]
        votes = votes + offset[None, :, :, None, None, :]
    return votes.reshape(B, GH * GW * A, W.shape[1], 16)


def _out_size(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def _windows(pose: torch.Tensor, K: int, stride: int) -> torch.Tensor:
    """(B, H, W, ...) -> (B, OH, OW, K, K, ...): each parent position's receptive field (an unfold)."""
    windows = pose.unfold(1, K, stride).unfold(2, K, stride)  # (B, OH, OW, ..., K, K)
    trailing = pose.dim() - 3
    order = [0, 1, 2, pose.dim(), pose.dim() + 1] + list(range(3, 3 + trailing))
    return windows.permute(*order)


def conv_caps_votes_ref(pose: torch.Tensor, W: torch.Tensor, stride: int) -> torch.Tensor:
    """(C1-C2) pose (B, H, W, A, 4, 4), W (K, K, A, C, 4, 4) -> votes (B, OH, OW, K, K, A, C, 16),
    votes[b, oh, ow, kh, kw, a, c] = pose[b, oh*s + kh, ow*s + kw, a] @ W[kh, kw, a, c] (VALID)."""
    K = W.shape[0]
    patches = _windows(pose, K, stride)  # (B, OH, OW, K, K, A, 4, 4)
    return torch.einsum("bxyijark,ijacks->bxyijacrs", patches, W).flatten(-2)


def conv_connectivity(H: int, W: int, K: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every parent position and kernel offset, the flat child position it reads,
    (OH, OW, K, K) int64 indices into H*W, and how many parent positions each child position
    feeds, (H, W) (P_h(h) * P_w(w) of C3; 0 for children no window covers)."""
    OH, OW = _out_size(H, K, stride), _out_size(W, K, stride)
    rows = (torch.arange(OH) * stride)[:, None] + torch.arange(K)[None, :]  # (OH, K)
    cols = (torch.arange(OW) * stride)[:, None] + torch.arange(K)[None, :]  # (OW, K)
    index = rows[:, None, :, None] * W + cols[None, :, None, :]  # (OH, OW, K, K)
    feeds = torch.zeros(H * W, dtype=torch.int64).index_add_(0, index.flatten(), torch.ones(index.numel(),
                                                                                             dtype=torch.int64))
    return index, feeds.view(H, W)


def conv_em_routing_ref(votes: torch.Tensor, activations: torch.Tensor, beta_u: torch.Tensor, beta_a: torch.Tensor,
                        stride: int, iterations: int = 3, inverse_temperature=0.01, eps: float = 1e-8,
                        min_var: float = 5e-4, cost_normalization: str = "none", return_assignments: bool = False):
    """Convolutional EM routing (C1-C5): votes (B, OH, OW, K, K, A, C, H), activations (B, Hc, Wc, A)
    on the child grid, beta_u / beta_a (C,) shared by positions -> (poses (B, OH, OW, C, H),
    activations (B, OH, OW, C)) [, R (B, OH, OW, K, K, A, C) of the last M-step].

    Each child is normalised over ALL the parents it feeds, across positions and types (C5): the
    per-child normaliser is a fold (index_add) of the parents' terms onto the child grid.
    Children that no window covers get R = 0."""
    B, OH, OW, K, _, A, C, H = votes.shape
    parent_major = votes.permute(0, 1, 2, 6, 3, 4, 5, 7).reshape(B, OH, OW, C, K * K * A, H)
    return _conv_em(parent_major, activations, beta_u, beta_a, stride, K, iterations, inverse_temperature, eps,
                    min_var, cost_normalization, return_assignments)


def conv_caps_route_ref(pose: torch.Tensor, activations: torch.Tensor, W: torch.Tensor, beta_u: torch.Tensor,
                        beta_a: torch.Tensor, stride: int, iterations: int = 3, inverse_temperature=0.01,
                        eps: float = 1e-8, min_var: float = 5e-4, cost_normalization: str = "none",
                        return_assignments: bool = False):
    """``conv_em_routing_ref(conv_caps_votes_ref(pose, W, stride), ...)`` with the votes formed
    directly in the parent-major layout the iterations use (one votes-sized tensor, no copy)."""
    K = W.shape[0]
    B, A = pose.shape[0], pose.shape[3]
    patches = _windows(pose, K, stride)  # (B, OH, OW, K, K, A, 4, 4)
    votes = torch.einsum("bxyijark,ijacks->bxycijars", patches, W)
    OH, OW, C = votes.shape[1], votes.shape[2], votes.shape[3]
    return _conv_em(votes.reshape(B, OH, OW, C, K * K * A, 16), activations, beta_u, beta_a, stride, K, iterations,
                    inverse_temperature, eps, min_var, cost_normalization, return_assignments)


def _conv_em(votes: torch.Tensor, activations: torch.Tensor, beta_u, beta_a, stride: int, K: int, iterations: int,
             inverse_temperature, eps: float, min_var: float, cost_normalization: str, return_assignments: bool):
    """Convolutional EM routing on parent-major votes (B, OH, OW, C, K*K*A, H)."""
    B, OH, OW, C, N, _ = votes.shape
    A = N // (K * K)
    Hc, Wc = activations.shape[1], activations.shape[2]
    lams = lambda_schedule(iterations, inverse_temperature)
    scale = cost_scale(cost_normalization, C, N)
    index, feeds = conv_connectivity(Hc, Wc, K, stride)
    flat_index = index.to(votes.device).flatten()  # child positions of every (parent position, offset)
    a_in = activations.reshape(B, Hc * Wc, A)[:, flat_index].reshape(B, OH, OW, 1, N)
    # t = 0: uniform over the parents fed, 1 / (P_h P_w C)
    R0 = (1.0 / (feeds.to(votes.device).flatten()[flat_index].to(votes.dtype) * C)).view(OH, OW, 1, K * K, 1)
    R0 = R0.expand(OH, OW, 1, K * K, A).reshape(1, OH, OW, 1, N).expand(B, OH, OW, C, N)

    def normalise(log_q):  # (B, OH, OW, C, N) -> softmax over every parent each child feeds (C5)
        pairs = log_q.view(B, OH, OW, C, K, K, A).permute(0, 1, 2, 4, 5, 6, 3)
        return _softmax_over_parents_fed(pairs, flat_index, Hc * Wc).permute(0, 1, 2, 6, 3, 4, 5).reshape(
            B, OH, OW, C, N)

    mu, logit, R = _em(votes, a_in, R0, normalise, beta_u, beta_a, lams, scale, eps, min_var)
    outputs = (mu, torch.sigmoid(logit))
    if not return_assignments:
        return outputs
    return (*outputs, R.reshape(B, OH, OW, C, K, K, A).permute(0, 1, 2, 4, 5, 6, 3))


def _softmax_over_parents_fed(log_q: torch.Tensor, flat_index: torch.Tensor, n_positions: int) -> torch.Tensor:
    """(C5) exp(ln q) / sum over every (position, type) parent the child feeds: a scatter-max for
    stability, then a fold (index_add) of the exponentials onto the child grid."""
    B, OH, OW, K, _, A, C = log_q.shape
    pairs = log_q.reshape(B, OH * OW * K * K, A, C)
    idx = flat_index.view(1, -1, 1).expand(B, -1, A)
    top = torch.full((B, n_positions, A), float("-inf"), dtype=log_q.dtype, device=log_q.device)
    top = top.scatter_reduce(1, idx, pairs.amax(-1), reduce="amax", include_self=True).detach()
    shifted = torch.exp(pairs - top.gather(1, idx).unsqueeze(-1))
    total = torch.zeros(B, n_positions, A, dtype=log_q.dtype, device=log_q.device).index_add(
        1, flat_index, shifted.sum(-1))
    return (shifted / total.gather(1, idx).unsqueeze(-1)).view(B, OH, OW, K, K, A, C)


def conv_em_routing_dense_ref(votes: torch.Tensor, activations: torch.Tensor, beta_u: torch.Tensor,
                              beta_a: torch.Tensor, stride: int, iterations: int = 3, inverse_temperature=0.01,
                              eps: float = 1e-8, min_var: float = 5e-4, cost_normalization: str = "none",
                              return_assignments: bool = False):
    """The specification written out (C3): children n = (h*W + w)*A + a and parents
    p = (oh*OW + ow)*C + c on a dense (B, N, P, H) vote tensor with a boolean mask, routed by
    `em_routing_ref`; beta per type repeated over positions.  Tiny shapes only."""
    B, OH, OW, K, _, A, C, Hd = votes.shape
    Hc, Wc = activations.shape[1], activations.shape[2]
    N, P = Hc * Wc * A, OH * OW * C
    dense = votes.new_zeros(B, N, P, Hd)
    mask = torch.zeros(N, P, dtype=torch.bool, device=votes.device)
    for oh in range(OH):
        for ow in range(OW):
            for kh in range(K):
                for kw in range(K):
                    h, w = oh * stride + kh, ow * stride + kw
                    n = (h * Wc + w) * A + torch.arange(A)
                    p = (oh * OW + ow) * C + torch.arange(C)
                    dense[:, n[:, None], p[None, :]] = votes[:, oh, ow, kh, kw]
                    mask[n[:, None], p[None, :]] = True
    scale_fix = {}
    if cost_normalization == "ibm":  # N_c per parent is K*K*A and J the parent types C, not P
        scale_fix = dict(inverse_temperature=[lam * cost_scale("ibm", C, K * K * A) for lam in
                                              lambda_schedule(iterations, inverse_temperature)])
        beta_a = beta_a / cost_scale("ibm", C, K * K * A)
    mu, a, R = em_routing_ref(dense, activations.reshape(B, N), beta_u.repeat(OH * OW), beta_a.repeat(OH * OW),
                              iterations, scale_fix.get("inverse_temperature", inverse_temperature), eps, min_var,
                              "none", mask, return_assignments=True)
    outputs = (mu.view(B, OH, OW, C, Hd), a.view(B, OH, OW, C))
    if not return_assignments:
        return outputs
    R_pairs = votes.new_zeros(B, OH, OW, K, K, A, C)
    for oh in range(OH):
        for ow in range(OW):
            for kh in range(K):
                for kw in range(K):
                    h, w = oh * stride + kh, ow * stride + kw
                    n = (h * Wc + w) * A + torch.arange(A)
                    p = (oh * OW + ow) * C + torch.arange(C)
                    R_pairs[:, oh, ow, kh, kw] = R[:, n[:, None], p[None, :]]
    return (*outputs, R_pairs)
