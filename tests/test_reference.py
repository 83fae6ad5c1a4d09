"""The plain-PyTorch reference against an independent float64 computation: explicit loops
over samples and capsules with the routing logits stored, as in Procedure 1 of the paper;
gradients through torch.autograd.gradcheck."""
import math

import pytest
import torch

from capstriton.reference import caps_transform_ref, dynamic_routing_ref, squash_ref, transform_route_ref


def _squash_loop(s):
    n = float(sum(x * x for x in s))
    scale = n / (1 + n) / math.sqrt(n + 1e-8)
    return [x * scale for x in s]


def _routing_loop(u_hat, iterations):
    B, I, J, D = u_hat.shape
    out = torch.empty(B, J, D, dtype=torch.float64)
    for b in range(B):
        logits = [[0.0] * J for _ in range(I)]
        for it in range(iterations):
            coupling = []
            for i in range(I):
                m = max(logits[i])
                e = [math.exp(x - m) for x in logits[i]]
                coupling.append([x / sum(e) for x in e])  # softmax over output capsules j
            v = []
            for j in range(J):
                s = [sum(coupling[i][j] * float(u_hat[b, i, j, d]) for i in range(I)) for d in range(D)]
                v.append(_squash_loop(s))
            if it < iterations - 1:
                for i in range(I):
                    for j in range(J):
                        logits[i][j] += sum(float(u_hat[b, i, j, d]) * v[j][d] for d in range(D))
        out[b] = torch.tensor(v, dtype=torch.float64)
    return out


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_routing_reference_matches_loops(iterations):
    u_hat = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(dynamic_routing_ref(u_hat, iterations), _routing_loop(u_hat, iterations),
                               rtol=1e-12, atol=1e-12)


def test_coupling_is_softmax_over_output_capsules():
    # one input capsule: whatever the logits, its coupling sums to 1 over j, so with I = 1
    # and identical predictions for every j all outputs are equal
    u_hat = torch.randn(1, 1, 1, 4, dtype=torch.float64).expand(1, 1, 3, 4).contiguous()
    v = dynamic_routing_ref(u_hat, 3)
    torch.testing.assert_close(v[0, 0], v[0, 1])
    torch.testing.assert_close(v[0, 0], torch.tensor(_squash_loop((u_hat[0, 0, 0] / 3).tolist()), dtype=torch.float64))


def test_transform_reference_matches_loops():
    u = torch.randn(3, 4, 5, dtype=torch.float64)
    W = torch.randn(4, 2, 6, 5, dtype=torch.float64)
    out = caps_transform_ref(u, W)
    for b in range(3):
        for i in range(4):
            for j in range(2):
                torch.testing.assert_close(out[b, i, j], W[i, j] @ u[b, i])


def test_squash_reference_matches_formula():
    x = torch.randn(4, 7, dtype=torch.float64)
    expected = torch.stack([torch.tensor(_squash_loop(r.tolist()), dtype=torch.float64) for r in x])
    torch.testing.assert_close(squash_ref(x), expected)


def test_squash_reference_rescaling_is_exact_over_every_scale():
    # rows from 1e-30 to 1e100 (float64: the loop's |x|^2 does not overflow), across the switch
    # at max |x| = 1 where the reference starts dividing by a power of two
    scales = torch.tensor([1e-30, 1e-3, 0.999, 1.0, 1.001, 3.0, 1e10, 1e19, 1e100], dtype=torch.float64)
    x = (torch.rand(len(scales), 6, dtype=torch.float64) + 0.1) * scales[:, None]
    expected = torch.stack([torch.tensor(_squash_loop(r.tolist()), dtype=torch.float64) for r in x])
    torch.testing.assert_close(squash_ref(x), expected, rtol=1e-13, atol=0)
    # gradients through the rescaled path (max |x| > 1) and the plain one (max |x| < 1)
    for scale in (0.3, 40.0):
        x = (scale * torch.randn(3, 5, dtype=torch.float64)).requires_grad_()
        assert torch.autograd.gradcheck(squash_ref, (x,))


def test_squash_reference_fp32_huge_inputs_match_float64():
    x = torch.tensor([[3e38, -1e38, 2.0], [1e19, 1e19, -1e19]], dtype=torch.float32, requires_grad=True)
    y = squash_ref(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(squash_ref(x64).sum(), x64)
    torch.testing.assert_close(y.double(), squash_ref(x64), rtol=1e-6, atol=1e-7)
    # gradients ~ 1 / |x|: compared on that scale
    torch.testing.assert_close(g.double() * x.detach().double().norm(dim=1, keepdim=True),
                               g64 * x64.detach().norm(dim=1, keepdim=True), rtol=0, atol=1e-5)


@pytest.mark.parametrize("iterations", [1, 3])
def test_reference_gradcheck(iterations):
    # detach=True is by design not the true gradient (checked in closed form below)
    u = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 3, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: transform_route_ref(a, b, iterations), (u, W))
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(squash_ref, (x,))


def test_detach_reference_gradient_is_last_iteration_only():
    u_hat = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    grad_v = torch.randn(2, 3, 4, dtype=torch.float64)
    (g,) = torch.autograd.grad(dynamic_routing_ref(u_hat, 3, detach=True), u_hat, grad_v)
    # closed form: dL/du_hat = c^r gs^r with c^r from the (detached) routing
    with torch.no_grad():
        b = torch.zeros(2, 5, 3, dtype=torch.float64)
        for _ in range(2):
            c = torch.softmax(b, dim=2)
            v = squash_ref((c.unsqueeze(-1) * u_hat).sum(1))
            b = b + (u_hat * v.unsqueeze(1)).sum(-1)
        c = torch.softmax(b, dim=2)
    s = (c.unsqueeze(-1) * u_hat.detach()).sum(1).requires_grad_()
    (gs,) = torch.autograd.grad(squash_ref(s), s, grad_v)
    torch.testing.assert_close(g, c.unsqueeze(-1) * gs.unsqueeze(1))
