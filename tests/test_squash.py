import pytest
import torch

import capstriton as ct
from capstriton.reference import squash_ref
from tolerances import FORWARD, GRADIENT, assert_close

SHAPES = {"R1-D1": (1, 1), "R5-D8": (5, 8), "R33-D16": (33, 16), "B3-R7-D5": (3, 7, 5), "R300-D33": (300, 33)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_squash_matches_float64_reference(shape, dtype):
    x = (torch.randn(shape) * 2).to(dtype).requires_grad_()
    gy = torch.randn(shape).to(dtype)
    y = ct.squash(x, backend="triton")
    (gx,) = torch.autograd.grad(y, x, gy)
    x64 = x.detach().double().requires_grad_()
    y64 = squash_ref(x64)
    (gx64,) = torch.autograd.grad(y64, x64, gy.double())
    assert y.dtype == dtype and gx.dtype == dtype
    assert_close(y, y64, FORWARD[dtype], "squash forward")
    assert_close(gx, gx64, GRADIENT[dtype], "squash grad")


def test_squash_other_dim():
    x = torch.randn(4, 6, 3, requires_grad=True)
    y = ct.squash(x, dim=1, backend="triton")
    assert_close(y, squash_ref(x.double(), dim=1), FORWARD[torch.float32], "squash dim=1")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_squash_zero_and_huge_vectors_stay_finite(backend):
    x = torch.zeros(4, 16)
    x[1] = 1e18
    x[2, 0] = -3e-20
    x[3] = 1e4
    x.requires_grad_()
    y = ct.squash(x, backend=backend)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    lengths = y.norm(dim=-1)
    assert torch.all(lengths < 1.0 + 1e-6)
    assert lengths[0] == 0 and lengths[1] > 0.999 and lengths[3] > 0.999  # long vectors -> ~1


def test_squash_gradcheck_reference():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: squash_ref(t), (x,))
