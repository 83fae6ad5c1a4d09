"""Per-parent algebra shared by the fused EM routing kernels (fully connected and convolutional):
the end of an M-step from the children's sums, and the backward of the M-step and of the E-step
as coefficients a pass over the children applies.  Plain torch on (..., J, H) statistics: the
children are never touched here.

Notation (per sample, parent j, h < H): r_ij = R_ij a_i, m_j = sum_i r_ij, mu = sum r V / (m + eps),
var = sum r (V - mu)^2 / (m + eps) + min_var, cost = s m sum_h (beta_u + ln var / 2),
logit = lam (beta_a - cost);  E-step: ln q_ij = logsigmoid(logit_j) - sum_h [(V - mu)^2 / (2 var)
+ ln var / 2] (+ a constant), R = softmax over the parents child i feeds.

Backward through one iteration, given g_mu, g_var, g_logit of its state (`m_step_backward`):
    dL/dr_ij = alpha_j + sum_h [beta_jh Vc_ijh + gamma_jh Vc_ijh^2],   Vc = V - mu
    direct dL/dV_ij = r_ij (beta_j + 2 gamma_j Vc_ij)
and from the E-step's sums D0 = sum_i g_ij, D1 = sum_i g_ij (V - mu'), D2 = sum_i g_ij (V - mu')^2,
g_ij = dL/d ln q_ij = R_ij (dR_ij - sum_k R_ik dR_ik), the gradients of the previous state
(`e_step_backward`); the children also get dL/dV_ij -= g_ij (V - mu') / var'.
"""
from __future__ import annotations

import torch

__all__ = ["finish_m_step", "m_step_backward", "e_step_backward"]


def finish_m_step(m: torch.Tensor, sum1: torch.Tensor, sum2: torch.Tensor, shift: torch.Tensor | None,
                  beta_u: torch.Tensor, beta_a: torch.Tensor, lam: float, scale: float, eps: float,
                  min_var: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """m (..., J), sum1 = sum_i r (V - shift), sum2 = sum_i r (V - shift)^2 (..., J, H), shift
    (..., J, H) or None (zero) -> (mu, var (..., J, H), logit (..., J)).  Summing about a shift
    close to the mean (the previous iteration's) avoids the cancellation of sum r V^2 - m mu^2."""
    denom = (m + eps).unsqueeze(-1)
    if shift is None:
        mu = delta = sum1 / denom
    else:  # mu = sum r V / (m + eps) exactly, eps included
        mu = (sum1 + shift * m.unsqueeze(-1)) / denom
        delta = mu - shift
    # sum r (V - mu)^2 = sum2 - 2 delta sum1 + delta^2 m
    spread = sum2 - 2 * delta * sum1 + delta.square() * m.unsqueeze(-1)
    var = spread.clamp(min=0) / denom + min_var
    cost = (beta_u.unsqueeze(-1) + 0.5 * torch.log(var)).sum(-1) * scale * m
    return mu, var, lam * (beta_a - cost)


def m_step_backward(mu: torch.Tensor, var: torch.Tensor, m: torch.Tensor, g_mu: torch.Tensor, g_var: torch.Tensor,
                    g_logit: torch.Tensor, beta_u: torch.Tensor, lam: float, scale: float, eps: float,
                    min_var: float):
    """The backward of one M-step as per-parent coefficients (module docstring).

    mu, var, g_mu, g_var (..., J, H); m, g_logit (..., J); beta_u (J,).  Returns
    (alpha (..., J), beta (..., J, H), gamma (..., J, H), g_beta_u (..., J), g_beta_a (..., J)):
    the beta gradients per parent, to be summed over the batch (and positions) by the caller."""
    H = mu.shape[-1]
    denom = m + eps
    log_var = torch.log(var)
    g_cost = -lam * g_logit
    g_beta_a = lam * g_logit
    g_beta_u = g_cost * scale * m * H
    g_var = g_var + (g_cost * scale * m).unsqueeze(-1) * 0.5 / var
    spread = (var - min_var) * denom.unsqueeze(-1)  # Q = sum r (V - mu)^2
    g_spread = g_var / denom.unsqueeze(-1)  # gamma = dL/dQ
    # Q = S2 - 2 mu S1 + mu^2 m with S1 = mu (m + eps):  dQ/dmu = -2 eps mu
    g_mu_total = g_mu - 2 * eps * mu * g_spread
    beta = g_mu_total / denom.unsqueeze(-1)  # = dL/dS1 + 2 mu dL/dS2
    # dL/dr = dL/dm + sum_h (dL/dS1 V + dL/dS2 V^2); written about Vc = V - mu the mu terms cancel
    # exactly, leaving alpha = the cost's and the variance's dependence on m alone
    alpha = g_cost * scale * (beta_u.unsqueeze(-1) + 0.5 * log_var).sum(-1) - (g_var * spread).sum(-1) / denom.square()
    return alpha, beta, g_spread, g_beta_u, g_beta_a


def e_step_backward(D0: torch.Tensor, D1: torch.Tensor, D2: torch.Tensor, var_prev: torch.Tensor,
                    logit_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The E-step's sums over the children (module docstring) -> the gradients of the previous
    state it read: (g_mu (..., J, H), g_var (..., J, H), g_logit (..., J))."""
    g_mu = D1 / var_prev
    g_var = D2 / (2 * var_prev.square()) - D0.unsqueeze(-1) / (2 * var_prev)
    g_logit = D0 * torch.sigmoid(-logit_prev)  # d logsigmoid(x)/dx = 1 - sigmoid(x)
    return g_mu, g_var, g_logit
