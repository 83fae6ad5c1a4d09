"""Backend dispatch: "torch" (plain-PyTorch reference), "triton" (kernels) or "auto"."""
from __future__ import annotations

import torch

from .kernels._common import interpreter_enabled

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend, *tensors: torch.Tensor) -> str:
    """Return "torch" or "triton" for the given request and tensors, or raise a clear error."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        if tensors and any(t.dtype == torch.float64 for t in tensors):
            return "torch"  # the kernels compute in fp32; float64 stays on the reference
        if on_cuda or interpreter_enabled():
            return "triton"
        return "torch"
    if backend == "triton":
        if not (on_cuda or interpreter_enabled()):
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                f"imported, to run the kernels on the CPU), got tensors on {devices}"
            )
        if any(t.dtype == torch.float64 for t in tensors):
            raise TypeError("backend='triton' supports float32, float16 and bfloat16 inputs, got float64")
    return backend
