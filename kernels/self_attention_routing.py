"""Self-attention routing kernels (Mazzia et al. 2021, Efficient-CapsNet), unfused (u_hat read
from memory) and fused with the transform (u_hat = W u recomputed, never stored).

Forward, per sample (u = u_hat (I, J, D), bias (I, J) optional), two streaming passes:
    S_j = sum_k u_kj                                      pass 1 (MODE_SUM), finish: Q = S / sqrt(D)
    q_ij = softmax_j(u_ij . Q_j),  c_ij = q_ij + bias_ij,  s_j = sum_i c_ij u_ij      pass 2
    v_j = f(n_j) s_j,  n = |s_j|,  f(n) = (1 - exp(-n)) / n   (f(0) = 1)              finish
The I x I attention matrix u_ij . u_kj is never formed: only its row sums u_ij . S_j enter.
Saved for the backward: Q and s, (B, J, D) each.

Backward.  With g = dL/dv and s_hat = s / n (0 at n = 0), since v = (1 - exp(-n)) s_hat:
    gs = f g + (exp(-n) - f) (s_hat . g) s_hat                       (finite at s = 0: gs = g)
    gc_ij = u_ij . gs_j,  dL/dbias_ij = sum_b gc_ij
    ga_ij = q_ij (gc_ij - sum_k q_ik gc_ik)                           (softmax over j)
    R_j = sum_k ga_kj u_kj / sqrt(D)                                  (through S_j = sum_k u_kj)
    dL/du_ij = c_ij gs_j + ga_ij Q_j + R_j
One reduction pass (MODE_BACKWARD) gives R; the final pass (`attention_grad_kernel` with one
iteration, Q_all = Q, gs_all = gs) writes dL/du_hat, or fused dL/du and dL/dW partials, and the
dL/dbias partials.  f and exp(-n) - f are evaluated by a series below n = 0.1, where 1 - exp(-n)
would cancel (fp32).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._attention import (MODE_BACKWARD, MODE_FORWARD, MODE_SUM, Plan, finish_compile_case, pass_compile_cases,
                         scaled_sum_finish_kernel)
from ._common import empty, on_device
from .partials import sum_partials
from ._tiles3d import _sample_tile, _sum_partials

@triton.jit
def _exp_squash_scale(n):
    """f(n) = (1 - exp(-n)) / n and exp(-n) for norms n >= 0, accurate in fp32 down to n = 0."""
    e = tl.exp(-n)
    series = 1.0 + n * (-0.5 + n * (1.0 / 6.0 + n * (-1.0 / 24.0 + n * (1.0 / 120.0 - n / 720.0))))
    small = n < 0.1
    f = tl.where(small, series, (1.0 - e) / tl.where(small, 1.0, n))
    return f, e


@triton.jit
def exp_squash_fwd_finish_kernel(
    part_ptr,         # (n_chunks, B, J, D) fp32 partial sums of s
    n_chunks,
    s_ptr,            # (B, J, D) fp32 out: s (saved for the backward)
    v_ptr,            # (B, J, D) out, input dtype: v = f(|s|) s
    B, J, D,
    BJ: tl.constexpr,
    BD: tl.constexpr,
):
    offs, mask = _sample_tile(J, D, BJ, BD)
    s = _sum_partials(part_ptr, n_chunks, B * J * D, offs, mask, BJ, BD)
    tl.store(s_ptr + offs, s, mask=mask)
    f, _ = _exp_squash_scale(tl.sqrt(tl.sum(s * s, axis=1)))
    tl.store(v_ptr + offs, (s * f[:, None]).to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def exp_squash_bwd_kernel(
    s_ptr,            # (B, J, D) fp32: s
    grad_v_ptr,       # (B, J, D) dL/dv, any float dtype
    gs_ptr,           # (B, J, D) fp32 out: dL/ds
    B, J, D,
    BJ: tl.constexpr,
    BD: tl.constexpr,
):
    offs, mask = _sample_tile(J, D, BJ, BD)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    g = tl.load(grad_v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.sqrt(tl.sum(s * s, axis=1))
    f, e = _exp_squash_scale(n)
    s_hat = s / tl.where(n > 0, n, 1.0)[:, None]
    gs = f[:, None] * g + ((e - f) * tl.sum(s_hat * g, axis=1))[:, None] * s_hat
    tl.store(gs_ptr + offs, gs, mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _forward(src, W, bias):
    plan = Plan(src, W)
    scale = 1.0 / math.sqrt(plan.D)
    part = plan.stats(plan.n_chunks)
    Q, s = plan.stats(), plan.stats()
    plan.pass_(MODE_SUM, src, W, None, None, None, part)
    plan.reduce(part, Q, scale)
    plan.pass_(MODE_FORWARD, src, W, Q, None, bias, part)
    v = empty(plan.B, plan.J, plan.D, dtype=src.dtype, device=plan.device)
    exp_squash_fwd_finish_kernel[(plan.B,)](part, plan.n_chunks, s, v, plan.B, plan.J, plan.D, **plan.dims)
    return v, Q, s


def _backward(src, W, bias, Q, s, grad_v):
    plan = Plan(src, W)
    gs, R = plan.stats(), plan.stats()
    exp_squash_bwd_kernel[(plan.B,)](s, grad_v.contiguous(), gs, plan.B, plan.J, plan.D, **plan.dims)
    part = plan.stats(plan.n_chunks)
    plan.pass_(MODE_BACKWARD, src, W, Q, gs, None, part)
    plan.reduce(part, R, 1.0 / math.sqrt(plan.D))
    grad_src, grad_W_part, grad_bias_part = plan.grad(src, W, Q[None], gs[None], R, bias, src.dtype)
    grad_W = sum_partials(grad_W_part, W.dtype) if W is not None else None
    grad_bias = sum_partials(grad_bias_part, bias.dtype) if bias is not None else None
    return grad_src, grad_W, grad_bias


def self_attention_routing_fwd(src: torch.Tensor, W: torch.Tensor | None, bias: torch.Tensor | None):
    """src = u_hat (B, I, J, D) with W None, or u (B, I, Din) with W (I, J, D, Din) (fused: u_hat
    is never stored); bias (I, J) or None; all contiguous -> (v (B, J, D), Q, s (B, J, D) fp32)."""
    with on_device(src):
        return _forward(src, W, bias)


def self_attention_routing_bwd(src, W, bias, Q, s, grad_v):
    """(dL/dsrc, dL/dW or None, dL/dbias or None) from the saved Q, s and dL/dv."""
    with on_device(src):
        return _backward(src, W, bias, Q, s, grad_v)


# ----------------------------------------------------------------------------------------------
# compile check (kernels/compile_check.py): the paper's DigitCaps shape (J = 10 -> BJ = 16, D = 16)
# ----------------------------------------------------------------------------------------------
def _compile_cases():
    dtypes = ("fp32", "fp16", "bf16")
    modes = [(MODE_SUM, False), (MODE_FORWARD, False), (MODE_FORWARD, True), (MODE_BACKWARD, False)]
    cases = pass_compile_cases("self_attention", dtypes, modes)
    f32 = "*fp32"
    for dtype in dtypes:
        cases.append(finish_compile_case(f"self_attention_fwd_finish[{dtype}]", exp_squash_fwd_finish_kernel,
                                         {"part_ptr": f32, "n_chunks": "i32", "s_ptr": f32, "v_ptr": f"*{dtype}"}))
        cases.append(finish_compile_case(f"self_attention_squash_bwd[{dtype}]", exp_squash_bwd_kernel,
                                         {"s_ptr": f32, "grad_v_ptr": f"*{dtype}", "gs_ptr": f32}))
    cases.append(finish_compile_case("attention_scaled_sum_finish", scaled_sum_finish_kernel,
                                     {"part_ptr": f32, "n_chunks": "i32", "out_ptr": f32, "scale": "fp32"}))
    return cases


COMPILE_CASES = _compile_cases()
