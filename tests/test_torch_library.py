"""torch.library registration: opcheck on every op, and torch.compile(fullgraph=True) of
DigitCaps forward+backward without graph breaks."""
import pytest
import torch

import capstriton as ct


def _routing_cases():
    u = torch.randn(3, 5, 4, requires_grad=True)
    W = torch.randn(5, 3, 6, 4, requires_grad=True)
    u_hat = torch.randn(3, 5, 3, 6, requires_grad=True)
    return {
        "transform_route": (torch.ops.capstriton.transform_route.default, (u, W, 2, False)),
        "transform_route-detach": (torch.ops.capstriton.transform_route.default, (u, W, 3, True)),
        "dynamic_routing": (torch.ops.capstriton.dynamic_routing.default, (u_hat, 2, False)),
        "squash": (torch.ops.capstriton.squash.default, (torch.randn(4, 7, requires_grad=True), 1e-8)),
    }


@pytest.mark.parametrize("name", list(_routing_cases()))
def test_opcheck(name):
    op, args = _routing_cases()[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_digitcaps_fullgraph_matches_eager(compile_backend):
    torch._dynamo.reset()
    layer = ct.DigitCaps(in_caps=6, in_dim=4, out_caps=3, out_dim=5, iterations=3, backend="triton")
    u = torch.randn(4, 6, 4, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend=compile_backend)
    v = compiled(u)
    v.square().sum().backward()
    grad_u, grad_W = u.grad.clone(), layer.weight.grad.clone()
    u.grad = None
    layer.weight.grad = None
    v_eager = layer(u)
    v_eager.square().sum().backward()
    torch.testing.assert_close(v, v_eager)
    torch.testing.assert_close(grad_u, u.grad)
    torch.testing.assert_close(grad_W, layer.weight.grad)
