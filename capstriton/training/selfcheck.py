"""The start-up check of the Triton kernels: before the default run (backend auto) trains on a
GPU whose driver and toolchain the kernels have not met before, compare them with the PyTorch
reference at the training shapes, and fall back (loudly) to the reference when they differ."""
from __future__ import annotations

from typing import Callable

import torch

from ..layers import DigitCaps
from ..routing import transform_route
from ..squash import squash
from .distributed import Distributed
from .precision import AMP_DTYPES

__all__ = ["triton_self_check", "capsule_shapes", "choose_backend"]


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def triton_self_check(device: torch.device, in_caps: int = 64, in_dim: int = 8, out_caps: int = 10,
                      out_dim: int = 16, iterations: int = 3, batch: int = 8,
                      dtype: torch.dtype = torch.float32) -> str | None:
    """None when the Triton kernels match the PyTorch reference on ``device`` (values and
    gradients) for squash on (batch, in_caps, in_dim) capsules and the fused DigitCaps op at
    the given shape (the training shapes); otherwise what went wrong."""
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        u = (0.5 * torch.randn(batch, in_caps, in_dim, device=device, generator=gen)).to(dtype)
        W = (0.1 * torch.randn(in_caps, out_caps, out_dim, in_dim, device=device, generator=gen)).to(dtype)
        s = (3.0 * torch.randn(batch, in_caps, in_dim, device=device, generator=gen)).to(dtype)
        results = []
        for backend in ("triton", "torch"):
            uu, WW, ss = (t.clone().requires_grad_() for t in (u, W, s))
            v = transform_route(uu, WW, iterations, backend=backend)
            q = squash(ss, dim=-1, backend=backend)
            grads = torch.autograd.grad(v.float().square().sum() + (q.float() * s.float()).sum(), (uu, WW, ss))
            results.append((v, q, *grads))
        for name, got, ref in zip(("v", "squash", "grad_u", "grad_W", "grad_squash"), *results):
            err = _relative_error(got, ref)
            if not err <= tol:
                return f"{name} differs from the reference by {err:.2e} ({dtype}, B={batch}, I={in_caps})"
    except Exception as e:  # noqa: BLE001 - any failure means: do not train on these kernels
        return f"{type(e).__name__}: {e}"
    return None


def capsule_shapes(model: torch.nn.Module) -> list[dict]:
    """The (in_caps, in_dim, out_caps, out_dim, iterations) of the model's DigitCaps layers."""
    shapes = []
    for m in model.modules():
        if isinstance(m, DigitCaps):
            shape = {k: getattr(m, k) for k in ("in_caps", "in_dim", "out_caps", "out_dim", "iterations")}
            if shape not in shapes:
                shapes.append(shape)
    return shapes or [{}]  # no DigitCaps: check the kernels at the default shape


def choose_backend(backend: str, dist: Distributed, amp: str, make_model: Callable[[], torch.nn.Module],
                   log: Callable[[str], None] = print) -> str:
    """``backend`` itself, except "auto" on CUDA: "auto" when the kernels pass
    ``triton_self_check`` at the shapes of ``make_model()`` (built with backend "triton") on
    every rank, in float32 and in the ``amp`` dtype; otherwise, with a warning, "torch"."""
    device = dist.device
    if backend != "auto" or device.type != "cuda":
        return backend
    dtypes = [torch.float32] + ([AMP_DTYPES[amp]] if amp != "off" else [])
    shapes = capsule_shapes(make_model())
    problem = next((p for shape in shapes for dt in dtypes
                    if (p := triton_self_check(device, **shape, dtype=dt)) is not None), None)
    failed = dist.sum(torch.tensor([float(problem is not None)], device=device))
    if float(failed) > 0:
        log(f"WARNING: the Triton kernels failed their start-up check on this GPU "
            f"({problem or 'on another rank'}); training on the plain-PyTorch backend instead. Please report this.")
        return "torch"
    return "auto"
