"""The capsule layers: DigitCaps owns the parameters of its routing and passes them on (both
backends agree), and torch.compile(fullgraph=True) of DigitCaps forward+backward on the triton
backend with a dynamic batch size: one compilation serves every batch (the ops' fake
implementations work with a symbolic B), and values and gradients match eager mode and the
float64 reference."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import capstriton as ct
from capstriton.reference import transform_route_ref
from tests.helpers.tolerances import FORWARD, GRADIENT, assert_close

BATCHES = (3, 5, 8)


def _forward_backward(fn, layer, u):
    u.grad, layer.weight.grad = None, None
    v = fn(u)
    v.square().sum().backward()
    return v.detach(), u.grad.clone(), layer.weight.grad.clone()


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_fullgraph_compile_with_dynamic_batch(how):
    torch._dynamo.reset()
    layer = ct.DigitCaps(in_caps=6, in_dim=4, out_caps=3, out_dim=5, iterations=3, backend="triton")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter, dynamic=True if how == "dynamic=True" else None)
    for B in BATCHES:
        u = torch.randn(B, 6, 4, requires_grad=True)
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(u, 0)
        v, grad_u, grad_W = _forward_backward(compiled, layer, u)
        v_eager, grad_u_eager, grad_W_eager = _forward_backward(layer, layer, u)
        torch.testing.assert_close(v, v_eager)
        torch.testing.assert_close(grad_u, grad_u_eager)
        torch.testing.assert_close(grad_W, grad_W_eager)
        # and the float64 reference
        u64 = u.detach().double().requires_grad_()
        W64 = layer.weight.detach().double().requires_grad_()
        v64 = transform_route_ref(u64, W64, 3)
        v64.square().sum().backward()
        assert_close(v, v64, FORWARD[torch.float32], f"B={B} forward")
        assert_close(grad_u, u64.grad, GRADIENT[torch.float32], f"B={B} grad u")
        assert_close(grad_W, W64.grad, GRADIENT[torch.float32], f"B={B} grad W")
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for batches {BATCHES}"


@pytest.mark.parametrize("routing", ["self-attention", "inverted-attention"])
def test_digitcaps_routing_owns_its_parameters(routing):
    layer = ct.DigitCaps(in_caps=7, in_dim=4, out_caps=3, out_dim=5, routing=routing, backend="triton", init_std=0.5)
    own = {"self-attention": ["coupling_bias"], "inverted-attention": ["ln_weight", "ln_bias"]}[routing]
    with torch.no_grad():
        for name in own:  # nonzero, non-default values
            getattr(layer, name).add_(0.1 * torch.randn_like(getattr(layer, name)))
    u = torch.randn(4, 7, 4)
    v = layer(u)
    v.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    layer.backend = "torch"
    v_ref = layer(u)
    v_ref.square().sum().backward()
    torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-5)
    for name in ["weight", *own]:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], getattr(layer, name).grad, rtol=1e-4, atol=1e-5)


def test_digitcaps_routing_arguments():
    assert ct.DigitCaps(6, 4, 3, 5).iterations == 3  # dynamic routing as before
    assert ct.DigitCaps(6, 4, 3, 5, routing="inverted-attention").iterations == 2
    with pytest.raises(ValueError, match=r"routing='self-attention' takes \['bias'\], got \['iterations'\]"):
        ct.DigitCaps(6, 4, 3, 5, iterations=3, routing="self-attention")
    with pytest.raises(ValueError, match="routing must be one of"):
        ct.DigitCaps(6, 4, 3, 5, routing="em")
