import pytest
import torch

import capstriton as ct
from capstriton.reference import squash_ref
from tests.helpers.tolerances import FORWARD, GRADIENT, assert_close

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


# --- overflow: |x|^2 overflows fp32 above ~1.8e19 (fp16 from 256); squash stays finite and exact

def _rows_with_max(magnitudes, D, dtype):
    """Random rows (never zero) whose largest |entry| is each given magnitude."""
    x = torch.rand(len(magnitudes), D, dtype=torch.float64) * 2 - 1
    x = x / x.abs().amax(dim=1, keepdim=True) * torch.tensor(magnitudes, dtype=torch.float64)[:, None]
    return x.to(dtype)


def _check_values_and_grads(x, backend, dtype):
    """Values relative to their scale.  Gradients relative to the Jacobian's scale: its
    tangential part is f I with f = |v| / |x|, so an error of order eps_dtype * f |g| is what any
    floating-point evaluation commits (the radial part f + 2 f' n, the whole gradient for D = 1,
    is far smaller for long vectors); on a GPU plus an absolute allowance of dtype's smallest
    normal number (subnormal results may be flushed to zero there)."""
    x = x.clone().requires_grad_()
    gy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    y = ct.squash(x, backend=backend)
    (gx,) = torch.autograd.grad(y, x, gy)
    x64 = x.detach().double().requires_grad_()
    y64 = squash_ref(x64)
    (gx64,) = torch.autograd.grad(y64, x64, gy.double())
    assert_close(y, y64, FORWARD[dtype], f"squash forward ({backend})")
    assert torch.isfinite(gx).all(), f"squash grad ({backend}): non-finite values"
    atol = torch.finfo(dtype).tiny if gx.is_cuda else 0.0
    err = float((gx.double() - gx64).abs().max())
    f = y64.detach().norm(dim=-1) / x64.detach().norm(dim=-1)
    scale = max(float(gx64.abs().max()), float((f[..., None] * gy.double().abs()).max()))
    allowed = GRADIENT[dtype] * scale + atol
    assert err <= allowed, f"squash grad ({backend}): max error {err:.3e} > {allowed:.3e}"
    lengths = y.double().norm(dim=-1)
    assert torch.all(lengths < 1.0 + 10 * FORWARD[dtype]), lengths


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("magnitude", [1e19, 1e30, 3e38], ids=["1e19", "1e30", "3e38"])
def test_squash_huge_fp32_inputs(magnitude, backend):
    for D in (1, 5, 16, 33):
        x = _rows_with_max([magnitude, magnitude / 3, magnitude * 0.9], D, torch.float32)
        _check_values_and_grads(x, backend, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_squash_fp16_inputs_whose_square_overflows(backend):
    x = _rows_with_max([256.0, 300.0, 1000.0, 3.0e4, 6.0e4], 16, torch.float16)
    _check_values_and_grads(x, backend, torch.float16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_squash_rows_of_every_scale_together(backend):
    # around the rescaling switch (max |x| = 1), tiny, ordinary, huge, and one huge entry among
    # small ones, in one tensor (rows are independent)
    x = _rows_with_max([0.999, 1.0, 1.001, 1e-20, 0.5, 7.0, 1e10, 2.0**64, 3.3e38], 7, torch.float32)
    x[-1, 1:] = torch.tensor([1e-3, -2.0, 5e30, 0.0, 1.0, -1e-40])
    _check_values_and_grads(x, backend, torch.float32)
