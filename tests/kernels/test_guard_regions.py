"""Guard regions (issue 18): every kernel launcher runs on inputs that are views into larger
buffers whose margins hold NaN, and its outputs (allocated through kernels/_common.empty) are
handed out as views into larger buffers whose margins hold a sentinel.  A kernel that reads
past an input picks up NaN (its results change); one that writes past an output changes the
sentinel.  Results must be bitwise those of plain tensors, and no margin may change.
(Planting `offs < E` -> `offs <= E` in kernels/partials.py makes these tests fail.)"""
import sys

import pytest
import torch

from capstriton import kernels as K
from capstriton.kernels import _common
from capstriton.kernels.routing import em, em_conv

MARGIN = 67  # elements on each side (odd: not a multiple of any block)
SENTINEL = -12345.0
# (B, I, J, D, Din) with CAPSTRITON_SM_COUNT=8: 2 chunks of input capsules (chunk partials, arrival
# counters) / 2 batch groups of the fused weight gradient (sum_partials)
PLANS = {"chunks": (4, 8, 3, 5, 2), "groups": (17, 8, 3, 5, 2)}


class Guards:
    """Guarded buffers handed out so far: (buffer, view start, view length, margin value)."""

    def __init__(self):
        self.regions = []

    def _buffer(self, shape, dtype, fill):
        n = 1
        for s in shape:
            n *= int(s)
        buf = torch.full((n + 2 * MARGIN,), fill, dtype=dtype)
        self.regions.append((buf, n, fill))
        return buf[MARGIN:MARGIN + n].view(*shape)

    def input(self, t: torch.Tensor) -> torch.Tensor:
        view = self._buffer(t.shape, t.dtype, float("nan"))
        view.copy_(t)
        return view

    def empty(self, *shape, dtype, device):
        out = self._buffer(shape, dtype, SENTINEL)
        out.fill_(float("nan"))  # the suite's poisoning (CAPSTRITON_POISON_OUTPUTS)
        return out

    def check_margins(self):
        for buf, n, fill in self.regions:
            for margin in (buf[:MARGIN], buf[MARGIN + n:]):
                if fill != fill:
                    assert torch.isnan(margin).all(), "a kernel wrote into an input's margin"
                else:
                    assert (margin == fill).all(), "a kernel wrote past an output"


def _patch_empty(monkeypatch, guards: Guards):
    """Every kernels module allocates outputs through the `empty` it imported from _common."""
    original = _common.empty
    for name, module in list(sys.modules.items()):
        if name.startswith("capstriton.kernels") and getattr(module, "empty", None) is original:
            monkeypatch.setattr(module, "empty", guards.empty)


def _W_k(W):
    return W.permute(0, 3, 1, 2).contiguous()  # (I, J, D, Din) -> the kernel layout (I, Din, J, D)


def _routing_inputs(B, I, J, D, DIN):
    u = torch.randn(B, I, DIN)
    W = 0.5 * torch.randn(I, J, D, DIN)
    return dict(u_hat=torch.einsum("ijdk,bik->bijd", W, u), u=u, W=W, W_k=_W_k(W), grad_v=torch.randn(B, J, D),
                weight=1 + 0.1 * torch.randn(D), bias=0.1 * torch.randn(D), sa_bias=0.05 * torch.randn(I, J),
                state=torch.randn(B, J, D), grad_uhat=torch.randn(B, I, J, D), dy=torch.randn(B, I, J, D),
                # EM routing: matrix poses (B, I, 16) with W (I, J, 16); a 5x5 grid of 2 types, K=3, stride 2
                em_pose=torch.randn(B, I, 16), em_W=0.5 * torch.randn(I, J, 16), em_act=torch.rand(B, I),
                em_beta=torch.randn(J), em_grad_poses=torch.randn(B, J, 16), em_grad_acts=torch.randn(B, J),
                conv_pose=torch.randn(B, 5, 5, 2, 16), conv_W=0.5 * torch.randn(3, 3, 2, J, 16),
                conv_act=torch.rand(B, 5, 5, 2), conv_grad_poses=torch.randn(B, 2, 2, J, 16),
                conv_grad_acts=torch.randn(B, 2, 2, J))


def _squash_case(g):
    x = g("u_hat")
    dy = g("dy")
    return K.squash_fwd(x, 1e-8), K.squash_bwd(x, dy, 1e-8)


def _caps_transform(g):
    u, W = g("u"), g("W")
    grad = g("grad_uhat")
    return (K.caps_transform_fwd(u, W), *K.caps_transform_bwd(u, W, grad, groups=1),
            *K.caps_transform_bwd(u, W, grad, groups=3))


def _dynamic(fused, detach):
    def run(g):
        src, W = (g("u"), g("W_k")) if fused else (g("u_hat"), None)
        if fused:
            v, s_all, P_all = K.transform_route_fwd(src, W, 3)
            grads = K.transform_route_bwd(src, W, s_all, P_all, g("grad_v"), 3, detach)
        else:
            v, s_all, P_all = K.dynamic_routing_fwd(src, 3)
            grads = (K.dynamic_routing_bwd(src, s_all, P_all, g("grad_v"), 3, detach),)
        return v, s_all, P_all, *grads
    return run


def _self_attention(fused):
    def run(g):
        src, W = (g("u"), g("W_k")) if fused else (g("u_hat"), None)
        bias = g("sa_bias")
        v, Q, s = K.self_attention_routing_fwd(src, W, bias)
        return v, Q, s, *K.self_attention_routing_bwd(src, W, bias, Q, s, g("grad_v"))
    return run


def _inverted(fused, iterations):
    def run(g):
        src, W = (g("u"), g("W_k")) if fused else (g("u_hat"), None)
        weight, bias = g("weight"), g("bias")
        p, s_all, Q_all = K.inverted_attention_routing_fwd(src, W, iterations, weight, bias, 1e-5)
        grads = K.inverted_attention_routing_bwd(src, W, iterations, weight, bias, 1e-5, s_all, Q_all, g("grad_v"))
        return p, s_all, Q_all, *grads
    return run


def _couplings(fused):
    def run(g):
        src, W = (g("u"), g("W_k")) if fused else (g("u_hat"), None)
        return (K.routing_couplings_fwd(src, W, g("state"), g("sa_bias")), K.routing_couplings_fwd(src, W, None, None))
    return run


EM_OPTIONS = ([0.5, 1.0, 1.5], 1.0, 1e-8, 5e-4)  # inverse temperatures, cost scale, eps, min_var


def _em(g):
    pose, W, act, beta = g("em_pose"), g("em_W"), g("em_act"), g("em_beta")
    poses, acts, *stats = em.em_forward(pose, W, act, beta, beta, *EM_OPTIONS, matrix=True)
    grads = em.em_backward(pose, W, act, beta, *EM_OPTIONS, *stats, g("em_grad_poses"), g("em_grad_acts"),
                                     matrix=True)
    mu_all, var_all, logit_all = stats[:3]
    R = em.em_assignments(pose, W, mu_all[-2], var_all[-2], logit_all[-2], matrix=True)  # from iteration 2
    return poses, acts, *stats, *grads, R


def _em_conv(g):
    pose, W, act, beta = g("conv_pose"), g("conv_W"), g("conv_act"), g("em_beta")
    out = em_conv.conv_em_fwd(pose, W, act, beta, beta, 2, *EM_OPTIONS, True)
    grads = em_conv.conv_em_bwd(pose, W, act, beta, 2, *EM_OPTIONS, *out[3:], g("conv_grad_poses"),
                                g("conv_grad_acts"))
    return *out[:-1], out[-1][1:], *grads  # the normaliser of iteration 0 (uniform R) is never formed


CASES = {
    "em": _em,
    "em_conv": _em_conv,
    "squash": _squash_case,
    "caps_transform": _caps_transform,
    **{f"{name}-detach={detach}": _dynamic(fused, detach) for fused, name in ((False, "dynamic"), (True, "transform"))
       for detach in (False, True)},
    **{f"self_attention-fused={fused}": _self_attention(fused) for fused in (False, True)},
    **{f"inverted_attention-fused={fused}-r={r}": _inverted(fused, r) for fused in (False, True) for r in (1, 2)},
    **{f"couplings-fused={fused}": _couplings(fused) for fused in (False, True)},
}


SLOW = {"em_conv"}  # minutes under the interpreter: make test-slow


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_launchers_stay_inside_their_buffers(case, plan, monkeypatch):
    if plan == "chunks" and case in ("squash", "caps_transform", "em_conv"):
        pytest.skip("no routing plan")
    monkeypatch.setenv("CAPSTRITON_SM_COUNT", "8")
    data = {k: v.contiguous() for k, v in _routing_inputs(*PLANS[plan]).items()}  # launchers take contiguous
    plain = [t.clone() for t in CASES[case](lambda name: data[name].clone()) if t is not None]

    guards = Guards()
    _patch_empty(monkeypatch, guards)
    guarded = [t.clone() for t in CASES[case](lambda name: guards.input(data[name])) if t is not None]
    guards.check_margins()
    assert len(guarded) == len(plain)
    for k, (a, b) in enumerate(zip(guarded, plain)):
        assert not torch.isnan(a).any(), f"output {k}: NaN (a read past an input, or an unwritten element)"
        assert torch.equal(a, b), f"output {k} differs with guarded buffers: {(a - b).abs().max()}, {a.shape}"
