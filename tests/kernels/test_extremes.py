"""Every public op over dtype x layout x magnitude x backend against the float64 reference
(issue 18: bf16 under the interpreter, overflow-safe squash and LayerNorm inside the routing
kernels, self-attention's documented range).  Tiny shapes: the whole sweep takes seconds.

Forward and the gradients of every floating-point input are checked.  Inputs that the dtype
cannot hold (1e30 in fp16) are skipped; 1e-30 in fp16 underflows to 0, which is a valid input.
Self-attention forms fp32 logits u . S: at 1e30 they overflow, and the op must then return NaN,
never a finite wrong value (its docstring documents the range)."""
import pytest
import torch

import capstriton as ct
from capstriton import reference as ref
from tests.helpers.tolerances import BF16_FORWARD, BF16_GRADIENT, FORWARD, GRADIENT, rel_err

B, I, J, D, DIN = 2, 3, 2, 3, 2
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
MAGNITUDES = {"1e-30": 1e-30, "1": 1.0, "1e30": 1e30}
LAYOUTS = ("contiguous", "transposed", "offset")


def _tols(dtype):
    if dtype == torch.bfloat16:
        return BF16_FORWARD, BF16_GRADIENT
    if dtype == torch.float64:
        return FORWARD[torch.float32], GRADIENT[torch.float32]
    return FORWARD[dtype], GRADIENT[dtype]


def _lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as t, stored contiguously, transposed (last two dims; 1-D: strided) or at an offset."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "transposed":  # a 1-D tensor: every other element of a buffer
        return torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]
    if layout == "offset":
        buf = torch.full((t.numel() + 5,), float("nan"), dtype=t.dtype)
        view = buf[5:].view(t.shape)
        view.copy_(t)
        return view
    return t


def _uhat(m):
    return {"u_hat": m * torch.randn(B, I, J, D, dtype=torch.float64)}


def _uW(m):
    return {"u": m * torch.randn(B, I, DIN, dtype=torch.float64),
            "W": 0.5 * torch.randn(I, J, D, DIN, dtype=torch.float64)}


def _ln(m):
    return {"weight": 1 + 0.1 * torch.randn(D, dtype=torch.float64), "bias": 0.1 * torch.randn(D, dtype=torch.float64)}


def _sa_bias(m):
    return {"bias": 0.05 * torch.randn(I, J, dtype=torch.float64)}


# name -> (inputs(magnitude) -> dict of float64 masters, op(backend, **inputs), reference(**inputs))
OPS = {
    "squash": (lambda m: {"x": m * torch.randn(B, J, D, dtype=torch.float64)},
               lambda be, x: ct.squash(x, backend=be), lambda x: ref.squash_ref(x)),
    "caps_transform": (_uW, lambda be, u, W: ct.caps_transform(u, W, backend=be), ref.caps_transform_ref),
    "dynamic_routing": (_uhat, lambda be, u_hat: ct.dynamic_routing(u_hat, iterations=3, backend=be),
                        lambda u_hat: ref.dynamic_routing_ref(u_hat, 3)),
    "transform_route": (_uW, lambda be, u, W: ct.transform_route(u, W, iterations=2, backend=be),
                        lambda u, W: ref.transform_route_ref(u, W, 2)),
    "self_attention_routing": (lambda m: {**_uhat(m), **_sa_bias(m)},
                               lambda be, u_hat, bias: ct.self_attention_routing(u_hat, bias, backend=be),
                               ref.self_attention_routing_ref),
    "transform_self_attention_routing": (
        lambda m: {**_uW(m), **_sa_bias(m)},
        lambda be, u, W, bias: ct.transform_self_attention_routing(u, W, bias, backend=be),
        lambda u, W, bias: ref.self_attention_routing_ref(ref.caps_transform_ref(u, W), bias)),
    "inverted_attention_routing": (
        lambda m: {**_uhat(m), **_ln(m)},
        lambda be, u_hat, weight, bias: ct.inverted_attention_routing(u_hat, 2, weight, bias, backend=be),
        lambda u_hat, weight, bias: ref.inverted_attention_routing_ref(u_hat, 2, weight, bias)),
    "transform_inverted_attention_routing": (
        lambda m: {**_uW(m), **_ln(m)},
        lambda be, u, W, weight, bias: ct.transform_inverted_attention_routing(u, W, 2, weight, bias, backend=be),
        lambda u, W, weight, bias: ref.inverted_attention_routing_ref(ref.caps_transform_ref(u, W), 2, weight, bias)),
}
SELF_ATTENTION = ("self_attention_routing", "transform_self_attention_routing")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("magnitude", list(MAGNITUDES), ids=list(MAGNITUDES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("op", list(OPS))
def test_op_matches_float64(op, dtype, layout, magnitude, backend):
    make, fn, reference = OPS[op]
    mag = MAGNITUDES[magnitude]
    if mag > torch.finfo(dtype).max:
        pytest.skip(f"{magnitude} is not representable in {dtype}")
    masters = make(mag)
    inputs = {k: _lay_out(v.to(dtype), layout).requires_grad_() for k, v in masters.items()}
    if backend == "triton" and dtype == torch.float64:
        with pytest.raises(TypeError, match="float64"):
            fn(backend, **inputs)
        return
    out = fn(backend, **inputs)
    assert out.dtype == dtype
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out.to(dtype))

    leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    out64 = reference(**leaves)
    grads64 = torch.autograd.grad(out64, list(leaves.values()), grad_out)

    if op in SELF_ATTENTION and mag > 1e18 and dtype != torch.float64:  # beyond the documented range
        assert torch.isnan(out).all(), "overflowing logits must give NaN, not a finite value"
        return
    fwd_tol, grad_tol = _tols(dtype)
    assert torch.isfinite(out).all(), f"{op}: non-finite output"
    assert rel_err(out, out64) <= fwd_tol, f"{op}: forward error {rel_err(out, out64):.2e}"
    for name, g, g64 in zip(inputs, grads, grads64):
        assert torch.isfinite(g).all(), f"{op}: non-finite grad {name}"
        assert rel_err(g, g64) <= grad_tol, f"{op}: grad {name} error {rel_err(g, g64):.2e}"
