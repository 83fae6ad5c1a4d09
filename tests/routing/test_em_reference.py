"""The plain-PyTorch EM routing reference (capstriton/routing/em_reference.py) against the
specification's equations written out by hand, and the per-parent backward algebra the kernels
use (kernels/routing/em_statistics.py) against autograd of the reference, in float64."""
import math

import pytest
import torch

from capstriton.kernels.routing.em_statistics import e_step_backward, finish_m_step, m_step_backward
from capstriton.routing.em_reference import (
    class_caps_votes_ref,
    conv_caps_route_ref,
    conv_caps_votes_ref,
    conv_em_routing_dense_ref,
    conv_em_routing_ref,
    cost_scale,
    em_routing_ref,
    lambda_schedule,
    matrix_transform_ref,
)

D64 = dict(dtype=torch.float64)


def _case(B=3, I=7, J=5, H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    votes = torch.randn(B, I, J, H, generator=g, **D64)
    acts = torch.rand(B, I, generator=g, **D64) * 0.9 + 0.05
    beta_u = torch.randn(J, generator=g, **D64)
    beta_a = torch.randn(J, generator=g, **D64)
    return votes, acts, beta_u, beta_a


def _procedure_1(votes, acts, beta_u, beta_a, iterations, lam_final, eps, min_var):
    """Procedure 1 of the paper in loops, a_j p_j / sum_k a_k p_k form (E11 as written)."""
    B, I, J, H = votes.shape
    R = torch.full((B, I, J), 1.0 / J, **D64)
    for t in range(iterations):
        lam = lam_final * (1 - 0.95 ** (t + 1))
        r = R * acts[:, :, None]
        m = r.sum(1)
        mu = torch.einsum("bij,bijh->bjh", r, votes) / (m[..., None] + eps)
        var = torch.einsum("bij,bijh->bjh", r, (votes - mu[:, None]) ** 2) / (m[..., None] + eps) + min_var
        sigma = var.sqrt()
        cost = ((beta_u[:, None] + torch.log(sigma)) * m[..., None]).sum(-1)
        a = torch.sigmoid(lam * (beta_a - cost))
        if t < iterations - 1:
            p = torch.exp(-((votes - mu[:, None]) ** 2 / (2 * var[:, None])).sum(-1)) / \
                torch.prod(torch.sqrt(2 * math.pi * var), -1)[:, None]
            R = a[:, None] * p / (a[:, None] * p).sum(-1, keepdim=True)
    return mu, a, R


def test_lambda_schedule_and_cost_scale():
    assert lambda_schedule(3, 0.01) == pytest.approx([0.0005, 0.000975, 0.00142625])
    assert lambda_schedule(2, [0.1, 0.2]) == [0.1, 0.2]
    with pytest.raises(ValueError, match="one value per iteration"):
        lambda_schedule(3, [0.1, 0.2])
    assert cost_scale("ibm", 5, 512) == pytest.approx(100 * 5 / 512)
    with pytest.raises(ValueError, match="cost_normalization"):
        cost_scale("paper", 5, 512)


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_reference_is_procedure_1(iterations):
    votes, acts, bu, ba = _case()
    votes = votes * 0.3  # p_ij stays representable in the product form
    mu, a, R = em_routing_ref(votes, acts, bu, ba, iterations, 0.01, 1e-8, 5e-4, return_assignments=True)
    mu2, a2, R2 = _procedure_1(votes, acts, bu, ba, iterations, 0.01, 1e-8, 5e-4)
    torch.testing.assert_close(mu, mu2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a, a2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(R, R2, rtol=1e-10, atol=1e-12)


def test_ibm_is_none_with_scaled_temperature_and_beta_a():
    votes, acts, bu, ba = _case()
    s = cost_scale("ibm", 5, 7)
    mu, a = em_routing_ref(votes, acts, bu, ba, 3, 0.01, cost_normalization="ibm")
    lams = [lam * s for lam in lambda_schedule(3, 0.01)]
    mu2, a2 = em_routing_ref(votes, acts, bu, ba / s, 3, lams)
    torch.testing.assert_close((mu, a), (mu2, a2), rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    votes, acts, bu, ba = _case(B=2, I=3, J=2, H=4)
    args = [x.requires_grad_() for x in (votes, acts, bu, ba)]
    assert torch.autograd.gradcheck(lambda *a: em_routing_ref(*a, iterations=3, inverse_temperature=1.0), args)


def test_single_child_and_silent_children_stay_finite():
    votes, acts, bu, ba = _case(I=1)
    for a_in in (acts, torch.zeros_like(acts)):
        mu, a = em_routing_ref(votes, a_in, bu, ba, 3)
        assert torch.isfinite(mu).all() and torch.isfinite(a).all()


def test_votes():
    g = torch.Generator().manual_seed(1)
    pose, W = torch.randn(2, 3, 4, 4, generator=g, **D64), torch.randn(3, 5, 4, 4, generator=g, **D64)
    votes = matrix_transform_ref(pose, W)
    torch.testing.assert_close(votes[1, 2, 4], (pose[1, 2] @ W[2, 4]).flatten())
    grid, Wc = torch.randn(2, 3, 4, 2, 4, 4, generator=g, **D64), torch.randn(2, 5, 4, 4, generator=g, **D64)
    votes = class_caps_votes_ref(grid, Wc)
    h, w, a, j = 2, 1, 1, 3
    expect = (grid[0, h, w, a] @ Wc[a, j]).flatten()
    expect[3] += (h + 0.5) / 3
    expect[7] += (w + 0.5) / 4
    torch.testing.assert_close(votes[0, (h * 4 + w) * 2 + a, j], expect)
    Wk = torch.randn(3, 3, 2, 5, 4, 4, generator=g, **D64)
    conv = conv_caps_votes_ref(torch.randn(2, 7, 8, 2, 4, 4, generator=g, **D64), Wk, 2)
    assert conv.shape == (2, 3, 3, 3, 3, 2, 5, 16)


@pytest.mark.parametrize("K,stride,H,W", [(3, 2, 7, 8), (2, 3, 7, 6), (1, 1, 3, 2), (3, 1, 5, 5)])
@pytest.mark.parametrize("normalization", ["none", "ibm"])
def test_conv_gather_reference_is_the_dense_one(K, stride, H, W, normalization):
    g = torch.Generator().manual_seed(2)
    A, C = 2, 3
    pose = torch.randn(2, H, W, A, 4, 4, generator=g, **D64) * 0.5
    Wk = torch.randn(K, K, A, C, 4, 4, generator=g, **D64) * 0.5
    acts = torch.rand(2, H, W, A, generator=g, **D64)
    bu, ba = torch.randn(C, generator=g, **D64), torch.randn(C, generator=g, **D64)
    votes = conv_caps_votes_ref(pose, Wk, stride)
    kw = dict(iterations=3, inverse_temperature=0.5, cost_normalization=normalization, return_assignments=True)
    got = conv_em_routing_ref(votes, acts, bu, ba, stride, **kw)
    want = conv_em_routing_dense_ref(votes, acts, bu, ba, stride, **kw)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    fused = conv_caps_route_ref(pose, acts, Wk, bu, ba, stride, **kw)
    for x, y in zip(fused, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    # every covered child's assignments sum to 1 over the parents it feeds
    R = got[2]
    OH, OW = R.shape[1], R.shape[2]
    total = torch.zeros(2, H, W, A, **D64)
    for oh in range(OH):
        for ow in range(OW):
            total[:, oh * stride:oh * stride + K, ow * stride:ow * stride + K] += R[:, oh, ow].sum(-1)
    rows = torch.zeros(H, dtype=torch.bool)
    cols = torch.zeros(W, dtype=torch.bool)
    for o in range(OH):
        rows[o * stride:o * stride + K] = True
    for o in range(OW):
        cols[o * stride:o * stride + K] = True
    covered = rows[:, None] & cols[None, :]
    torch.testing.assert_close(total[:, covered], torch.ones_like(total[:, covered]))
    assert (total[:, ~covered] == 0).all()


def _routing_by_passes(votes, acts, bu, ba, iterations, lams, scale, eps, min_var, g_mu_out, g_a_out):
    """Forward and backward of FC EM routing written as the kernels' passes (sums over the
    children, the per-parent algebra of em_statistics), votes materialized: returns
    (mu, a, dL/dvotes, dL/dacts, dL/dbeta_u, dL/dbeta_a) for L = <g_mu_out, mu> + <g_a_out, a>."""
    B, I, J, H = votes.shape
    states, Rs = [], []
    shift = None
    R = torch.full((B, I, J), 1.0 / J, **D64)
    for t in range(iterations):
        if t > 0:
            mu_p, var_p, logit_p, _ = states[-1]
            log_q = torch.nn.functional.logsigmoid(logit_p)[:, None] - (
                (votes - mu_p[:, None]) ** 2 / (2 * var_p[:, None]) + 0.5 * torch.log(var_p[:, None])).sum(-1)
            R = torch.softmax(log_q, -1)
            shift = mu_p
        Rs.append(R)
        r = R * acts[..., None]
        centred = votes - (0 if shift is None else shift[:, None])
        m = r.sum(1)
        mu, var, logit = finish_m_step(m, (r[..., None] * centred).sum(1), (r[..., None] * centred ** 2).sum(1),
                                       shift, bu, ba, lams[t], scale, eps, min_var)
        states.append((mu, var, logit, m))
    a = torch.sigmoid(states[-1][2])
    g_mu, g_var, g_logit = g_mu_out, torch.zeros_like(g_mu_out), g_a_out * a * (1 - a)
    g_votes, g_acts = torch.zeros_like(votes), torch.zeros_like(acts)
    g_bu, g_ba = torch.zeros_like(bu), torch.zeros_like(ba)
    for t in reversed(range(iterations)):
        mu, var, logit, m = states[t]
        alpha, beta, gamma, gbu, gba = m_step_backward(mu, var, m, g_mu, g_var, g_logit, bu, lams[t], scale, eps,
                                                       min_var)
        g_bu, g_ba = g_bu + gbu.sum(0), g_ba + gba.sum(0)
        R = Rs[t]
        r = R * acts[..., None]
        Vc = votes - mu[:, None]
        dr = alpha[:, None] + (beta[:, None] * Vc + gamma[:, None] * Vc ** 2).sum(-1)
        g_votes += r[..., None] * (beta[:, None] + 2 * gamma[:, None] * Vc)
        g_acts += (dr * R).sum(-1)
        if t == 0:
            break
        dR = dr * acts[..., None]
        g_lnq = R * (dR - (R * dR).sum(-1, keepdim=True))
        mu_p, var_p, logit_p, _ = states[t - 1]
        Vp = votes - mu_p[:, None]
        g_votes -= g_lnq[..., None] * Vp / var_p[:, None]
        g_mu, g_var, g_logit = e_step_backward(g_lnq.sum(1), (g_lnq[..., None] * Vp).sum(1),
                                               (g_lnq[..., None] * Vp ** 2).sum(1), var_p, logit_p)
    return states[-1][0], a, g_votes, g_acts, g_bu, g_ba


@pytest.mark.parametrize("iterations,normalization", [(1, "none"), (2, "ibm"), (3, "none"), (4, "none")])
def test_pass_algebra_matches_autograd(iterations, normalization):
    votes, acts, bu, ba = _case(B=2, I=6, J=3)
    lams = [2.0 * (t + 1) for t in range(iterations)]  # large enough that every term matters
    scale = cost_scale(normalization, 3, 6)
    leaves = [x.clone().requires_grad_() for x in (votes, acts, bu, ba)]
    mu, a = em_routing_ref(*leaves, iterations, lams, 1e-3, 5e-4, normalization)
    g = torch.Generator().manual_seed(5)
    g_mu, g_a = torch.randn(mu.shape, generator=g, **D64), torch.randn(a.shape, generator=g, **D64)
    want = torch.autograd.grad((mu * g_mu).sum() + (a * g_a).sum(), leaves)
    mu2, a2, *got = _routing_by_passes(votes, acts, bu, ba, iterations, lams, scale, 1e-3, 5e-4, g_mu, g_a)
    torch.testing.assert_close((mu2, a2), (mu.detach(), a.detach()), rtol=1e-10, atol=1e-12)
    for x, y, name in zip(got, want, ("votes", "activations", "beta_u", "beta_a")):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10, msg=name)
