"""Per-dtype tolerances for kernel results compared with the float64 reference.

Errors are measured as max |out - ref| / max(max |ref|, tiny) (relative to the tensor's scale).
fp32 limits are the project's contract; fp16 limits reflect 10-bit mantissas on inputs and
outputs with fp32 accumulation inside the kernels.
"""
import torch

FORWARD = {torch.float32: 1e-5, torch.float16: 5e-3}
GRADIENT = {torch.float32: 1e-4, torch.float16: 2e-2}
# bf16 (8-bit mantissa) is checked on a GPU only: the interpreter's bf16 is unreliable
BF16_FORWARD, BF16_GRADIENT = 3e-2, 1e-1


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    scale = ref.abs().max().clamp_min(1e-30)
    return float((out - ref).abs().max() / scale)


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output?)"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
