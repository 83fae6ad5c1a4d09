"""Inverted dot-product attention routing kernels (unfused on u_hat and fused with the
transform) against the float64 reference: values and every gradient (u_hat or u and W, and
the LayerNorm weight and bias), iterations 1..4."""
import pytest
import torch

import capstriton as ct
from capstriton.reference import caps_transform_ref, inverted_attention_routing_ref
from capstriton.routing import kernel_layout_weight
from tests.helpers.attention_cases import DTYPES, SHAPES, assert_matches_ref64, count_launches, ref64, transform_inputs
from tests.helpers.tolerances import FORWARD, GRADIENT, assert_close


def _affine(D, dtype):
    weight = (1.0 + 0.3 * torch.randn(D)).to(dtype).requires_grad_()
    return weight, (0.3 * torch.randn(D)).to(dtype).requires_grad_()


def _check(fused, shape, dtype, iterations, affine=True, eps=1e-5):
    u, W, u_hat, grad_v = transform_inputs(shape, dtype)
    extra = _affine(shape[3], dtype) if affine else ()
    names = ("grad_weight", "grad_bias") if affine else ()
    if fused:
        p = ct.transform_inverted_attention_routing(u, W, iterations, *extra, eps=eps, backend="triton")
        inputs, names = (u, W, *extra), ("grad_u", "grad_W", *names)
        ref = lambda u_, W_, *a: inverted_attention_routing_ref(caps_transform_ref(u_, W_), iterations, *a, eps=eps)  # noqa: E731
    else:
        p = ct.inverted_attention_routing(u_hat, iterations, *extra, eps=eps, backend="triton")
        inputs, names = (u_hat, *extra), ("grad_u_hat", *names)
        ref = lambda x, *a: inverted_attention_routing_ref(x, iterations, *a, eps=eps)  # noqa: E731
    assert_matches_ref64(p, ref, inputs, grad_v, names, dtype, "p")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference(shape, fused, dtype):
    _check(fused, shape, dtype, iterations=2)


@pytest.mark.parametrize("iterations", [1, 3, 4])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_iterations_and_affine(iterations, affine):
    _check(True, (6, 11, 4, 6, 5), torch.float32, iterations, affine, eps=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("programs", [1, 40], ids=["one-chunk", "many-chunks"])
def test_grid_splits_and_batch_groups(programs, monkeypatch):
    """One chunk, and many chunks (partials reduced 8 at a time with a remainder) with several
    weight-gradient batch groups (B = 40): the reference's results, bitwise repeatable."""
    from capstriton.kernels.routing import inverted_attention as kmod
    from capstriton.kernels.routing import streaming as _streaming
    monkeypatch.setattr(kmod, "target_programs", lambda device: programs)
    shape = (40, 17, 4, 5, 3)
    p = _streaming.plan(*shape, programs)
    assert (p.n_chunks > 1, p.n_groups > 1) == ((True, True) if programs > 1 else (False, False))
    _check(True, shape, torch.float32, 3)
    _check(False, shape, torch.float32, 3)
    u, W, _, grad_v = transform_inputs(shape, torch.float32)
    weight, bias = _affine(5, torch.float32)
    run = lambda: torch.autograd.grad(ct.transform_inverted_attention_routing(u, W, 3, weight, bias),  # noqa: E731
                                      (W, weight, bias), grad_v)
    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


def test_one_affine_parameter_alone():
    u, W, u_hat, grad_v = transform_inputs((4, 6, 3, 5, 2), torch.float32)
    weight, bias = _affine(5, torch.float32)
    for kw in ({"weight": weight}, {"bias": bias}):
        p = ct.inverted_attention_routing(u_hat, 2, backend="triton", **kw)
        g = torch.autograd.grad(p, list(kw.values()), grad_v)[0]
        ref = lambda x, a, _kw=kw: inverted_attention_routing_ref(x, 2, **{next(iter(_kw)): a})  # noqa: E731
        p64, _, g64 = ref64(ref, (u_hat, next(iter(kw.values()))), grad_v)
        assert_close(p, p64, FORWARD[torch.float32], "p")
        assert_close(g, g64, GRADIENT[torch.float32], f"grad of {next(iter(kw))}")


def test_triton_path_launches_kernels(monkeypatch):
    from capstriton.kernels.routing import inverted_attention as kmod
    from capstriton.kernels.routing import streaming as _streaming
    calls = count_launches(monkeypatch, {kmod: ["inverted_attention_pass_kernel", "inverted_attention_bwd_init_kernel"],
                                         _streaming: ["stream_grad_fused_kernel"]})
    u, W, _, grad_v = transform_inputs((3, 4, 2, 3, 2), torch.float32)
    weight, bias = _affine(3, torch.float32)
    p = ct.transform_inverted_attention_routing(u, W, 3, weight, bias, backend="auto")  # triton (interpreter)
    torch.autograd.grad(p, (u, W, weight, bias), grad_v)
    # forward: 3 passes (each finishing itself); backward: 2 reduction passes (the first forms
    # gs^{r-1} from dL/dp) and the final pass
    assert calls == {"inverted_attention_pass_kernel": 5, "stream_grad_fused_kernel": 1}
    calls.clear()
    p = ct.transform_inverted_attention_routing(u, W, 1, weight, bias, backend="auto")
    torch.autograd.grad(p, (u, W, weight, bias), grad_v)
    # one iteration: no reduction pass, so gs^0 gets its own small kernel
    assert calls == {"inverted_attention_pass_kernel": 1, "inverted_attention_bwd_init_kernel": 1,
                     "stream_grad_fused_kernel": 1}


def test_opcheck():
    u, W, u_hat, _ = transform_inputs((3, 5, 3, 6, 4), torch.float32)
    weight, bias = _affine(6, torch.float32)
    op = torch.ops.capstriton.inverted_attention_routing.default
    W_k = kernel_layout_weight(W)
    for args in ((u, W_k, 2, weight, bias, 1e-5), (u, W_k, 1, None, None, 1e-5), (u_hat, None, 3, weight, bias, 1e-3)):
        torch.library.opcheck(op, args)


def test_compiled_fullgraph_matches_eager():
    torch._dynamo.reset()
    u, W, _, _ = transform_inputs((4, 6, 3, 5, 4), torch.float32)
    weight, bias = _affine(5, torch.float32)
    fn = lambda *a: ct.transform_inverted_attention_routing(*a, backend="triton").square().sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = (u, W, 2, weight, bias)
    grads = torch.autograd.grad(compiled(*args), (u, W, weight, bias))
    eager = torch.autograd.grad(fn(*args), (u, W, weight, bias))
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b)


def test_bad_input_is_rejected():
    u_hat = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"\(D,\) = \(5,\), got \(4,\)"):
        ct.inverted_attention_routing(u_hat, 2, weight=torch.ones(4))
    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        ct.inverted_attention_routing(u_hat, 0)
    with pytest.raises(TypeError, match="iterations must be an int"):
        ct.inverted_attention_routing(u_hat, 2.0)
    with pytest.raises(ValueError, match="eps must be a positive float, got 0"):
        ct.inverted_attention_routing(u_hat, eps=0)
    with pytest.raises(TypeError, match="same dtype"):
        ct.inverted_attention_routing(u_hat, bias=torch.zeros(5, dtype=torch.float16))
    with pytest.raises(ValueError, match="disagree"):
        ct.transform_inverted_attention_routing(torch.randn(2, 3, 4), torch.randn(3, 2, 5, 7))
