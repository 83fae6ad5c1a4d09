"""Convolutional EM routing (spec section 4): the gather/scatter reference against the dense-mask
specification, and the fused triton kernels (votes recomputed, never stored) against the float64
reference, forward and every gradient, on odd shapes (K = 1, 2, 3; stride 1, 2, 3; uncovered
children; C = 1, 5; A = 1, 3; B = 1, 2), fp32 and fp16, iterations 1..3.  Tiny shapes: the
interpreter runs every (child, parent position) pair of every pass in Python."""
import pytest
import torch
import triton

import capstriton as ct
from capstriton.routing import em_conv as em_conv_module
from capstriton.routing.em_reference import conv_caps_votes_ref, conv_em_routing_dense_ref, conv_em_routing_ref
from tests.helpers.tolerances import FORWARD, GRADIENT, assert_close


def _inputs(B, H, A, C, K, dtype=torch.float64, Wd=None, zero_act=False):
    Wd = H if Wd is None else Wd
    pose = torch.randn(B, H, Wd, A, 4, 4)
    act = torch.zeros(B, H, Wd, A) if zero_act else torch.rand(B, H, Wd, A)
    W = 0.5 * torch.randn(K, K, A, C, 4, 4)
    beta_u, beta_a = 0.5 * torch.randn(C), torch.randn(C)
    return [x.to(dtype) for x in (pose, act, W)] + [beta_u.to(dtype), beta_a.to(dtype)]


# ---------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("B,H,Wd,A,C,K,stride,iterations,norm", [
    (2, 5, 4, 2, 3, 3, 1, 3, "none"),
    (1, 6, 6, 3, 2, 3, 2, 3, "ibm"),     # uncovered row/column
    (2, 5, 7, 1, 5, 2, 3, 2, "none"),    # stride > K: gaps
    (1, 3, 3, 2, 1, 1, 1, 3, "ibm"),
])
def test_gather_reference_equals_dense_mask(B, H, Wd, A, C, K, stride, iterations, norm):
    pose, act, W, bu, ba = _inputs(B, H, A, C, K, Wd=Wd)
    votes = conv_caps_votes_ref(pose, W, stride)
    kw = dict(iterations=iterations, inverse_temperature=0.5, cost_normalization=norm, return_assignments=True)
    got = conv_em_routing_ref(votes, act, bu, ba, stride, **kw)
    want = conv_em_routing_dense_ref(votes, act, bu, ba, stride, **kw)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- triton vs reference
CASES = {  # (B, H, A, C, K, stride, iterations, dtype[, W]): square grids unless W is given
    "K3-s2-uncovered-A3-C5": (1, 6, 3, 5, 3, 2, 2, torch.float32),
    "K1-s1-A1-C1-B2-T3": (2, 2, 1, 1, 1, 1, 3, torch.float32),
    "K2-s3-uncovered-A1-C5-T3-fp16": (1, 6, 1, 5, 2, 3, 3, torch.float16),
    "K3-s1-A3-C1-T1-4x5": (1, 4, 3, 1, 3, 1, 1, torch.float32, 5),
    "K2-s1-A3-C5-B2-fp16": (2, 3, 3, 5, 2, 1, 2, torch.float16),
}


def _grads_of(fn, leaves, grads):
    out = fn(*leaves)
    return list(out) + list(torch.autograd.grad(out, leaves, grads))


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_fused_conv_caps_route_matches_reference(case):
    B, H, A, C, K, stride, iterations, dtype, *Wd = case
    Wd = Wd[0] if Wd else H
    inputs = _inputs(B, H, A, C, K, dtype=torch.float32, Wd=Wd)
    pose, act, W = (x.to(dtype) for x in inputs[:3])
    bu, ba = inputs[3:]
    OH, OW = (H - K) // stride + 1, (Wd - K) // stride + 1
    grads = (torch.randn(B, OH, OW, C, 16).to(dtype), torch.randn(B, OH, OW, C).to(dtype))
    opts = dict(iterations=iterations, inverse_temperature=0.5)

    def run(backend):
        return lambda p, a, w, u, v: ct.conv_caps_route(p, a, w, u, v, stride, backend=backend, **opts)
    got = _grads_of(run("triton"), [x.clone().requires_grad_() for x in (pose, act, W, bu, ba)], grads)
    want = _grads_of(run("torch"), [x.detach().double().requires_grad_() for x in (pose, act, W, bu, ba)],
                     [g.double() for g in grads])
    names = ("poses", "activations", "grad_pose", "grad_activations", "grad_W", "grad_beta_u", "grad_beta_a")
    for name, x, y in zip(names, got, want):
        tol = (FORWARD if name in ("poses", "activations") else GRADIENT)[dtype]
        assert x.dtype == (bu.dtype if "beta" in name else dtype), name
        assert_close(x, y, tol, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on a GPU (the interpreter's bf16 is wrong)")
def test_bf16_on_cuda_matches_reference():
    from tests.helpers.tolerances import BF16_FORWARD, BF16_GRADIENT
    pose, act, W, bu, ba = _inputs(2, 14, 8, 16, 3, dtype=torch.float32)  # the small net's ConvCaps1
    grads = (torch.randn(2, 6, 6, 16, 16), torch.randn(2, 6, 6, 16))
    got = _grads_of(lambda *x: ct.conv_caps_route(*x, 2, backend="triton"),
                    [x.to(torch.bfloat16).requires_grad_() for x in (pose, act, W)] + [bu.requires_grad_(),
                                                                                      ba.requires_grad_()],
                    [g.to(torch.bfloat16) for g in grads])
    want = _grads_of(lambda *x: ct.conv_caps_route(*x, 2, backend="torch"),
                     [x.to(torch.bfloat16).double().requires_grad_() for x in (pose, act, W, bu, ba)],
                     [g.to(torch.bfloat16).double() for g in grads])
    for i, (x, y) in enumerate(zip(got, want)):
        assert_close(x, y, BF16_FORWARD if i < 2 else BF16_GRADIENT, f"output {i}")


def test_ibm_cost_normalization_and_schedule_sequence():
    pose, act, W, bu, ba = _inputs(1, 4, 2, 3, 2, dtype=torch.float32)
    opts = dict(iterations=2, inverse_temperature=[0.01, 0.03], cost_normalization="ibm")
    got = ct.conv_caps_route(pose, act, W, bu, ba, 2, backend="triton", **opts)
    want = ct.conv_caps_route(*(x.double() for x in (pose, act, W, bu, ba)), 2, backend="torch", **opts)
    for x, y in zip(got, want):
        assert_close(x, y, FORWARD[torch.float32], "ibm")


def test_return_assignments_sum_to_one_over_parents_fed():
    B, H, A, C, K, stride = 1, 6, 2, 3, 3, 2  # row/column 5 uncovered
    pose, act, W, bu, ba = _inputs(B, H, A, C, K, dtype=torch.float32)
    mu, a_out, R = ct.conv_caps_route(pose, act, W, bu, ba, stride, iterations=2, backend="triton",
                                      return_assignments=True)
    mu64, a64, R64 = ct.conv_caps_route(*(x.double() for x in (pose, act, W, bu, ba)), stride, iterations=2,
                                        backend="torch", return_assignments=True)
    assert R.shape == (B, 2, 2, K, K, A, C)
    assert_close(R, R64, FORWARD[torch.float32], "R")
    assert_close(mu, mu64, FORWARD[torch.float32], "poses")
    # fold R onto the child grid: every covered child sums to 1 over all parents it feeds, uncovered ones 0
    total = torch.zeros(B, H, H, A, dtype=torch.float64)
    for oh in range(2):
        for ow in range(2):
            for kh in range(K):
                for kw in range(K):
                    total[:, oh * stride + kh, ow * stride + kw] += R[:, oh, ow, kh, kw].double().sum(-1)
    assert torch.allclose(total[:, :5, :5], torch.ones(B, 5, 5, A, dtype=torch.float64), atol=1e-5)
    assert (total[:, 5] == 0).all() and (total[:, :, 5] == 0).all()
    votes = conv_caps_votes_ref(pose, W, stride)  # the VOTES mode writes the same assignments
    R_votes = ct.conv_em_routing(votes, act, bu, ba, stride, iterations=2, backend="triton",
                                 return_assignments=True)[2]
    assert_close(R_votes, R64, FORWARD[torch.float32], "R (votes)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_conv_em_routing_on_given_votes_matches_reference(dtype):
    """The triton backend of conv_em_routing: the same kernels reading the votes (VOTES mode)."""
    B, H, A, C, K, stride = 1, 5, 2, 3, 2, 2  # row/column 4 uncovered
    pose, act, W, bu, ba = _inputs(B, H, A, C, K, dtype=torch.float32)
    votes = conv_caps_votes_ref(pose, W, stride).to(dtype)
    act = act.to(dtype)
    grads = (torch.randn(B, 2, 2, C, 16).to(dtype), torch.randn(B, 2, 2, C).to(dtype))

    def run(backend):
        return lambda v, a, u, b: ct.conv_em_routing(v, a, u, b, stride, iterations=3, inverse_temperature=0.5,
                                                     backend=backend)
    got = _grads_of(run("triton"), [x.clone().requires_grad_() for x in (votes, act, bu, ba)], grads)
    want = _grads_of(run("torch"), [x.detach().double().requires_grad_() for x in (votes, act, bu, ba)],
                     [g.double() for g in grads])
    names = ("poses", "activations", "grad_votes", "grad_activations", "grad_beta_u", "grad_beta_a")
    for name, x, y in zip(names, got, want):
        assert_close(x, y, (FORWARD if name in ("poses", "activations") else GRADIENT)[dtype], name)
    assert (got[2] != 0).any()


def test_all_zero_activations_stay_finite():
    pose, act, W, bu, ba = _inputs(1, 3, 2, 2, 2, dtype=torch.float32, zero_act=True)
    leaves = [x.requires_grad_() for x in (pose, act, W, bu, ba)]
    out = ct.conv_caps_route(*leaves[:3], leaves[3], leaves[4], 2, iterations=2, backend="triton")
    grads = torch.autograd.grad(out, leaves, (torch.randn_like(out[0]), torch.randn_like(out[1])))
    for t in (*out, *grads):
        assert torch.isfinite(t).all()


def test_grad_W_is_deterministic_with_several_batch_groups():
    pose, act, W, bu, ba = _inputs(3, 2, 1, 2, 1, dtype=torch.float32)  # 3 batch groups
    W.requires_grad_()
    gW = []
    for _ in range(2):
        out = ct.conv_caps_route(pose, act, W, bu, ba, 2, iterations=2, backend="triton")
        gW.append(torch.autograd.grad(out[1].sum(), W)[0])
    assert torch.equal(gW[0], gW[1])


# ---------------------------------------------------------------------------------------------- torch.library
def test_opcheck():
    pose, act, W, bu, ba = _inputs(1, 2, 1, 2, 2, dtype=torch.float32)
    args = (pose.reshape(1, 2, 2, 1, 16).requires_grad_(), W.reshape(2, 2, 1, 2, 16).requires_grad_(),
            act.requires_grad_(), bu.requires_grad_(), ba.requires_grad_(), 1, [0.01, 0.02], 1.0, 1e-8, 5e-4, False)
    torch.library.opcheck(em_conv_module._route_op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    outs = em_conv_module._route_op(*[x.detach() if isinstance(x, torch.Tensor) else x for x in args])
    bwd = (*[x.detach() for x in args[:4]], 1, [0.01, 0.02], 1.0, 1e-8, 5e-4, *outs[3:],
           torch.randn(1, 1, 1, 2, 16), torch.randn(1, 1, 1, 2), True)
    torch.library.opcheck(em_conv_module._route_backward_op, bwd, test_utils=("test_schema", "test_faketensor"))
    votes = conv_caps_votes_ref(pose, W, 1)
    vargs = (votes.requires_grad_(), act, bu, ba, 1, [0.01, 0.02], 1.0, 1e-8, 5e-4, True)
    torch.library.opcheck(em_conv_module._votes_op, vargs,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    outs = em_conv_module._votes_op(*[x.detach() if isinstance(x, torch.Tensor) else x for x in vargs])
    vbwd = (votes.detach(), act.detach(), bu.detach(), 1, [0.01, 0.02], 1.0, 1e-8, 5e-4, *outs[3:],
            torch.randn(1, 1, 1, 2, 16), torch.randn(1, 1, 1, 2))
    torch.library.opcheck(em_conv_module._votes_backward_op, vbwd, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    pose, act, W, bu, ba = _inputs(1, 2, 1, 2, 2, dtype=torch.float32)

    def f(pose, act, W, bu, ba):
        return ct.conv_caps_route(pose, act, W, bu, ba, 1, iterations=2, backend="triton")
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for x, y in zip(compiled(pose, act, W, bu, ba), f(pose, act, W, bu, ba)):
        torch.testing.assert_close(x, y)


# ---------------------------------------------------------------------------------------------- backends, checks
def test_torch_backend_launches_no_kernel(monkeypatch):
    def forbid(cls):
        def run(self, *args, **kwargs):
            raise AssertionError("a triton kernel was launched on the torch backend")
        monkeypatch.setattr(cls, "run", run)
    for cls in (triton.runtime.interpreter.InterpretedFunction, triton.runtime.jit.JITFunction):
        forbid(cls)
    pose, act, W, bu, ba = _inputs(1, 4, 2, 2, 2, dtype=torch.float32)
    leaves = [x.requires_grad_() for x in (pose, act, W, bu, ba)]
    out = ct.conv_caps_route(*leaves[:3], leaves[3], leaves[4], 2, backend="torch")
    torch.autograd.grad(out, leaves, (torch.ones_like(out[0]), torch.ones_like(out[1])))
    ct.conv_em_routing(conv_caps_votes_ref(pose, W, 2), act, bu, ba, 2, backend="torch")


def test_auto_backend_keeps_float64_on_torch():
    pose, act, W, bu, ba = _inputs(1, 3, 1, 2, 2)
    got = ct.conv_caps_route(pose, act, W, bu, ba, 1)
    want = conv_em_routing_ref(conv_caps_votes_ref(pose, W, 1), act, bu, ba, 1)
    for x, y in zip(got, want):  # the torch backend's route (em_torch) is the reference's math
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("change,error,match", [
    (dict(pose=torch.randn(1, 4, 4, 2, 3, 3)), ValueError, "4x4"),
    (dict(W=torch.randn(2, 2, 3, 3, 4, 4)), ValueError, "child types"),
    (dict(W=torch.randn(5, 5, 2, 3, 4, 4)), ValueError, "kernel size"),
    (dict(stride=0), ValueError, "stride"),
    (dict(stride=1.5), TypeError, "stride"),
    (dict(act=torch.rand(1, 4, 4, 3)), ValueError, "activations"),
    (dict(act=torch.rand(1, 4, 4, 2) + 0.5), ValueError, r"activations must lie in \[0, 1\]"),
    (dict(act=-torch.rand(1, 4, 4, 2)), ValueError, r"activations must lie in \[0, 1\]"),
    (dict(beta_u=torch.randn(4)), ValueError, "beta_u"),
    (dict(iterations=0), ValueError, "iterations"),
    (dict(cost_normalization="paper"), ValueError, "cost_normalization"),
    (dict(inverse_temperature=[0.1]), ValueError, "inverse_temperature"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_input_is_rejected(change, error, match):
    args = dict(pose=torch.randn(1, 4, 4, 2, 4, 4), act=torch.rand(1, 4, 4, 2), W=torch.randn(2, 2, 2, 3, 4, 4),
                beta_u=torch.randn(3), beta_a=torch.randn(3), stride=1, iterations=2, cost_normalization="none",
                inverse_temperature=0.01, backend="torch")
    args.update(change)
    with pytest.raises(error, match=match):
        ct.conv_caps_route(args.pop("pose"), args.pop("act"), args.pop("W"), args.pop("beta_u"), args.pop("beta_a"),
                           args.pop("stride"), **args)


def test_conv_em_routing_rejects_bad_votes():
    votes, act = torch.randn(1, 2, 2, 2, 2, 3, 4, 16), torch.rand(1, 3, 3, 3)
    bu = ba = torch.randn(4)
    with pytest.raises(ValueError, match="16"):
        ct.conv_em_routing(votes[..., :15], act, bu, ba, 1)
    with pytest.raises(ValueError, match="A = 3"):
        ct.conv_em_routing(votes, act[..., :2], bu, ba, 1)
    with pytest.raises(ValueError, match="parent grid"):
        ct.conv_em_routing(votes, act, bu, ba, 2)
    ct.conv_em_routing(votes, act, bu, ba, 1, backend="torch")
