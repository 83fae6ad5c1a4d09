"""Squash kernels: v = x * n / ((1 + n) * sqrt(n + eps)), n = |x|^2, over the last dim.

Forward and backward; one program per block of rows, statistics in fp32.

Backward: with f(n) = n / ((1 + n) sqrt(n + eps)), v = f(n) x and
    dv/dx = f I + 2 f'(n) x x^T,   f'(n) = ((n + eps) - n (1 + n) / 2) / ((1 + n)^2 (n + eps)^(3/2)),
so grad_x = f grad_v + 2 f'(n) (x . grad_v) x.  Both f and f' are finite at n = 0 for eps > 0.

Overflow: n = |x|^2 overflows fp32 for |x| above ~1.8e19 (and the norm itself for entries near
3.4e38).  The kernels therefore rescale each row first: s = 2^floor(log2 max_k |x_k|) when that
maximum is >= 1, else s = 1 (division by a power of two is exact), z = x / s, q = |z|^2 in
[1, 4D) for long rows.  With n = s^2 q, in terms of z and q only,
    t = s^2 / (1 + n) = 1 / (1/s^2 + q),    n / (1 + n) = q t,    sqrt(n + eps) = s sqrt(q + eps/s^2),
    v = F z,                 F = q t / sqrt(q + eps/s^2)                          (= s f),
    grad_x = (F g + C (z . g) z) / s,
                             C = t / sqrt(q + eps/s^2) * (2 t/s^2 - q / (q + eps/s^2))   (= 2 s^3 f'),
where 1/s^2 may underflow to 0 (the exact limit).  No intermediate exceeds O(D) for any finite x.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import empty, on_device


@triton.jit
def _pow2_scale(max_abs):
    """Per-row scale s of the module docstring: 2^floor(log2 max_abs) (the exponent bits of the
    fp32 max_abs) when max_abs >= 1, else 1.  x / s is then exact and |x / s|^2 cannot overflow."""
    pow2 = (max_abs.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(max_abs >= 1.0, pow2, 1.0)


@triton.jit
def _squash_scale_rescaled(q, s, eps):
    """Overflow-safe (F, C) of the module docstring, fp32, for z = x / s with s = _pow2_scale(max |x|)
    and q = |z|^2: squash(x) = F z and grad_x = (F g + C (z . g) z) / s.  Finite for every finite x."""
    inv_s = 1.0 / s
    inv_s2 = inv_s * inv_s  # underflows to 0 for huge s: the exact limit, and s * s never overflows
    t = 1.0 / (inv_s2 + q)
    q_eps = q + eps * inv_s2
    inv_root = 1.0 / tl.sqrt(q_eps)
    F = q * t * inv_root
    C = t * inv_root * (2.0 * inv_s2 * t - q / q_eps)
    return F, C


@triton.jit
def _rescaled_rows(x, eps):
    """x (rows, BLOCK) fp32 -> (z, s, F, C) over axis 1, see _squash_scale_rescaled."""
    s = _pow2_scale(tl.max(tl.abs(x), axis=1))
    z = x / s[:, None]
    F, C = _squash_scale_rescaled(tl.sum(z * z, axis=1), s, eps)
    return z, s, F, C


@triton.jit
def squash_fwd_kernel(
    x_ptr,            # (R, D) input rows, contiguous
    y_ptr,            # (R, D) output rows, same dtype as x
    R,                # number of rows
    D,                # row length (capsule dimension)
    eps,              # fp32 epsilon inside the square root
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z, _, F, _ = _rescaled_rows(x, eps)
    tl.store(y_ptr + offs, (z * F[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def squash_bwd_kernel(
    x_ptr,            # (R, D) forward input
    dy_ptr,           # (R, D) gradient of the output
    dx_ptr,           # (R, D) gradient of the input (written)
    R,                # number of rows
    D,                # row length
    eps,              # fp32 epsilon
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z, s, F, C = _rescaled_rows(x, eps)
    z_dot_dy = tl.sum(z * dy, axis=1)
    dx = (F[:, None] * dy + (C * z_dot_dy)[:, None] * z) / s[:, None]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_params(D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): about 4K elements per program."""
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(256, 4096 // block_d))
    return block_r, block_d, 4


def squash_fwd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) contiguous -> squash over the last dim, same dtype."""
    D = x.shape[-1]
    R = x.numel() // D
    y = empty(*x.shape, dtype=x.dtype, device=x.device)
    block_r, block_d, warps = _launch_params(D)
    with on_device(x):
        squash_fwd_kernel[(triton.cdiv(R, block_r),)](x_ptr=x, y_ptr=y, R=R, D=D, eps=eps, BLOCK_R=block_r,
                                                      BLOCK_D=block_d, num_warps=warps)
    return y


def squash_bwd(x: torch.Tensor, dy: torch.Tensor, eps: float) -> torch.Tensor:
    """Gradient of squash_fwd with respect to x, given dy (same shape as x, contiguous)."""
    D = x.shape[-1]
    R = x.numel() // D
    dx = empty(*x.shape, dtype=x.dtype, device=x.device)
    block_r, block_d, warps = _launch_params(D)
    with on_device(x):
        squash_bwd_kernel[(triton.cdiv(R, block_r),)](x_ptr=x, dy_ptr=dy, dx_ptr=dx, R=R, D=D, eps=eps,
                                                      BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return dx


def _compile_cases() -> list[dict]:
    """Launch configurations checked by ``python -m capstriton.kernels.compile_check``: forward
    and backward in fp32 and fp16, at CapsNet's capsule sizes (primary D=8, digit D=16)."""
    cases = []
    for D in (8, 16):
        block_r, block_d, warps = _launch_params(D)
        for dt in ("fp32", "fp16"):
            sizes = {"R": "i32", "D": "i32", "eps": "fp32"}
            blocks = {"BLOCK_R": block_r, "BLOCK_D": block_d}
            cases.append(dict(name=f"squash_fwd_{dt}_d{D}", fn=squash_fwd_kernel,
                              signature={"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", **sizes},
                              constexprs=blocks, num_warps=warps, num_stages=3, default=True))
            cases.append(dict(name=f"squash_bwd_{dt}_d{D}", fn=squash_bwd_kernel,
                              signature={"x_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "dx_ptr": f"*{dt}", **sizes},
                              constexprs=blocks, num_warps=warps, num_stages=3, default=True))
    return cases


COMPILE_CASES = _compile_cases()
