"""torch.library registration: opcheck on every op, and torch.compile(fullgraph=True) of
DigitCaps forward+backward without graph breaks."""
import pytest
import torch

import capstriton as ct


def _routing_cases():
    u = torch.randn(3, 5, 4, requires_grad=True)
    W_k = torch.randn(5, 4, 3, 6, requires_grad=True)  # the kernel layout (I, Din, J, D)
    u_hat = torch.randn(3, 5, 3, 6, requires_grad=True)
    # non-contiguous inputs: the ops make them contiguous inside; fakes match the real strides
    u_t = torch.randn(5, 3, 4).transpose(0, 1).requires_grad_()
    W_t = torch.randn(5, 3, 6, 4).permute(0, 3, 1, 2).requires_grad_()
    u_hat_t = torch.randn(3, 5, 6, 3).transpose(2, 3).requires_grad_()
    return {
        "transform_route": (torch.ops.capstriton.transform_route.default, (u, W_k, 2, False)),
        "transform_route-detach": (torch.ops.capstriton.transform_route.default, (u, W_k, 3, True)),
        "transform_route-1-iteration": (torch.ops.capstriton.transform_route.default, (u, W_k, 1, False)),
        "transform_route-strided": (torch.ops.capstriton.transform_route.default, (u_t, W_t, 2, False)),
        "dynamic_routing": (torch.ops.capstriton.dynamic_routing.default, (u_hat, 2, False)),
        "dynamic_routing-strided": (torch.ops.capstriton.dynamic_routing.default, (u_hat_t, 2, False)),
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


def test_strided_inputs_give_the_contiguous_result():
    """A direct op call with transposed inputs computes the same values as with contiguous ones."""
    u = torch.randn(5, 3, 4).transpose(0, 1)
    W_k = torch.randn(5, 3, 6, 4).permute(0, 3, 1, 2)
    v_strided = torch.ops.capstriton.transform_route(u, W_k, 3, False)[0]
    v = torch.ops.capstriton.transform_route(u.contiguous(), W_k.contiguous(), 3, False)[0]
    torch.testing.assert_close(v_strided, v, rtol=0, atol=0)
    u_hat = torch.randn(3, 5, 6, 3).transpose(2, 3)
    torch.testing.assert_close(torch.ops.capstriton.dynamic_routing(u_hat, 2, False)[0],
                               torch.ops.capstriton.dynamic_routing(u_hat.contiguous(), 2, False)[0], rtol=0, atol=0)
