"""Self-attention routing kernels (unfused on u_hat and fused with the transform) against the
float64 reference: values and every gradient (u_hat or u and W, and the coupling bias)."""
import pytest
import torch

import capstriton as ct
from capstriton.reference import caps_transform_ref, exp_squash_ref, self_attention_routing_ref
from capstriton.routing import kernel_layout_weight
from tests.helpers.attention_cases import DTYPES, SHAPES, assert_matches_ref64, count_launches, ref64, transform_inputs
from tests.helpers.tolerances import GRADIENT, assert_close


def _bias(shape, dtype):
    _, I, J, _, _ = shape
    return (0.1 * torch.randn(I, J)).to(dtype).requires_grad_()


def _check(fused, shape, dtype, with_bias, backend="triton"):
    u, W, u_hat, grad_v = transform_inputs(shape, dtype)
    bias = _bias(shape, dtype) if with_bias else None
    extra = (bias,) if with_bias else ()
    if fused:
        v = ct.transform_self_attention_routing(u, W, bias, backend=backend)
        inputs, names = (u, W, *extra), ("grad_u", "grad_W", "grad_bias")
        ref = lambda u_, W_, *b: self_attention_routing_ref(caps_transform_ref(u_, W_), *b)  # noqa: E731
    else:
        v = ct.self_attention_routing(u_hat, bias, backend=backend)
        inputs, names = (u_hat, *extra), ("grad_u_hat", "grad_bias")
        ref = self_attention_routing_ref
    assert_matches_ref64(v, ref, inputs, grad_v, names, dtype, "v")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference(shape, fused, with_bias, dtype):
    _check(fused, shape, dtype, with_bias)


@pytest.mark.slow
@pytest.mark.parametrize("programs", [1, 40], ids=["one-chunk", "many-chunks"])
def test_grid_splits_and_batch_groups(programs, monkeypatch):
    """One chunk, and many chunks (partials reduced 8 at a time with a remainder) with several
    weight-gradient batch groups (B = 40): the reference's results, bitwise repeatable."""
    from capstriton.kernels.routing import self_attention as kmod
    from capstriton.kernels.routing import streaming as _streaming
    monkeypatch.setattr(kmod, "target_programs", lambda device: programs)
    shape = (40, 17, 4, 5, 3)
    p = _streaming.plan(*shape[:3], shape[3], shape[4], programs)
    assert (p.n_chunks > 1, p.n_groups > 1) == ((True, True) if programs > 1 else (False, False))
    _check(True, shape, torch.float32, True)
    _check(False, shape, torch.float32, True)
    u, W, _, grad_v = transform_inputs(shape, torch.float32)
    bias = _bias(shape, torch.float32)
    g1 = torch.autograd.grad(ct.transform_self_attention_routing(u, W, bias), (W, bias), grad_v)
    g2 = torch.autograd.grad(ct.transform_self_attention_routing(u, W, bias), (W, bias), grad_v)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_squash_is_finite_at_zero():
    """s = 0 (all-zero predictions): v = 0 and dL/ds = dL/dv (identity Jacobian), both backends."""
    s = torch.zeros(2, 3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, dtype=torch.float64)
    (grad_s,) = torch.autograd.grad(exp_squash_ref(s), s, g)
    assert torch.equal(grad_s, g)
    u_hat = torch.zeros(2, 5, 3, 4, requires_grad=True)
    v = ct.self_attention_routing(u_hat, backend="triton")
    (grad,) = torch.autograd.grad(v, u_hat, g.float())
    assert torch.equal(v, torch.zeros_like(v))
    v64, grad64 = ref64(self_attention_routing_ref, (u_hat,), g)
    assert torch.isfinite(grad).all() and torch.isfinite(grad64).all()
    assert_close(grad, grad64, GRADIENT[torch.float32], "grad_u_hat at s = 0")


def test_triton_path_launches_kernels(monkeypatch):
    from capstriton.kernels.routing import self_attention as kmod
    from capstriton.kernels.routing import streaming as _streaming
    calls = count_launches(monkeypatch, {kmod: ["self_attention_pass_kernel"],
                                         _streaming: ["stream_grad_fused_kernel"]})
    u, W, _, grad_v = transform_inputs((3, 4, 2, 3, 2), torch.float32)
    bias = torch.randn(4, 2, requires_grad=True)
    v = ct.transform_self_attention_routing(u, W, bias, backend="auto")  # auto -> triton (interpreter)
    torch.autograd.grad(v, (u, W, bias), grad_v)
    # forward: the S and s passes (each finishing itself); backward: the reduction for R (forming
    # dL/ds itself) and the final pass
    assert calls == {"self_attention_pass_kernel": 3, "stream_grad_fused_kernel": 1}


def test_opcheck():
    u, W, u_hat, _ = transform_inputs((3, 5, 3, 6, 4), torch.float32)
    bias = torch.randn(5, 3, requires_grad=True)
    op = torch.ops.capstriton.self_attention_routing.default
    W_k = kernel_layout_weight(W)
    for args in ((u, W_k, bias), (u, W_k, None), (u_hat, None, bias), (u_hat, None, None)):
        torch.library.opcheck(op, args)


def test_compiled_fullgraph_matches_eager():
    torch._dynamo.reset()
    u, W, _, _ = transform_inputs((4, 6, 3, 5, 4), torch.float32)
    bias = torch.randn(6, 3, requires_grad=True)
    fn = lambda *a: ct.transform_self_attention_routing(*a, backend="triton").square().sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(u, W, bias), (u, W, bias))
    eager = torch.autograd.grad(fn(u, W, bias), (u, W, bias))
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b)


def test_bad_input_is_rejected():
    u_hat = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"\(I, J\) = \(3, 4\), got \(4, 3\)"):
        ct.self_attention_routing(u_hat, torch.randn(4, 3))
    with pytest.raises(TypeError, match="same dtype"):
        ct.self_attention_routing(u_hat, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="4 dimensions"):
        ct.self_attention_routing(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        ct.self_attention_routing(torch.ones(2, 3, 4, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="disagree"):
        ct.transform_self_attention_routing(torch.randn(2, 3, 4), torch.randn(3, 2, 5, 7))
    with pytest.raises(ValueError, match="backend"):
        ct.self_attention_routing(u_hat, backend="cuda")
