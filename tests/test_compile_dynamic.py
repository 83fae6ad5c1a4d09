"""torch.compile(fullgraph=True) of DigitCaps forward+backward on the triton backend with a
dynamic batch size: one compilation serves every batch (the ops' fake implementations work
with a symbolic B), and values and gradients match eager mode and the float64 reference."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import capstriton as ct
from capstriton.reference import transform_route_ref
from tolerances import FORWARD, GRADIENT, assert_close

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
