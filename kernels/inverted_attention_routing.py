"""Inverted dot-product attention routing kernels (Tsai et al. 2020), unfused (u_hat read from
memory) and fused with the transform (u_hat = W u recomputed, never stored).

Forward, per sample (u = u_hat (I, J, D); r iterations; LayerNorm over D with optional affine
w, b of shape (D,)).  With queries Q^t = p^t / sqrt(D) (Q^0 = 0: the first coupling is uniform):
    q^t_ij = softmax_j(u_ij . Q^{t-1}_j),  s^t_j = sum_i q^t_ij u_ij           pass t (MODE_FORWARD)
    p^t_j = LayerNorm(s^t_j) = xhat^t_j w + b,  xhat = (s - mean) rstd      finish: Q^t, or p^r out
Saved for the backward: s^t and Q^{t-1} for every t, (r, B, J, D) each.

Backward.  With g^t = dL/dp^t (g^r given):
    gs^t = rstd (gx - mean_d(gx) - xhat mean_d(gx xhat)),  gx = g^t w       (LayerNorm backward)
    dL/dw += sum_j g^t xhat^t,  dL/db += sum_j g^t        (per sample, then summed over the batch)
    gc^t_ij = u_ij . gs^t_j,  ga^t_ij = q^t_ij (gc^t_ij - sum_k q^t_ik gc^t_ik)
    g^{t-1}_j = sum_i ga^t_ij u_ij / sqrt(D)                 (p^{t-1} enters only through Q^{t-1})
    dL/du_ij = sum_t [ q^t_ij gs^t_j + ga^t_ij Q^{t-1}_j ]
So for t = r .. 2 one reduction pass (MODE_BACKWARD) gives g^{t-1}, each finish turns g^t into
gs^t, and one final pass (`attention_grad_kernel`) writes dL/du_hat, or fused dL/du and the
dL/dW partials.  The per-sample LayerNorm parameter gradients are summed over the batch in a
fixed order by `kernels/partials.py`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._attention import MODE_BACKWARD, MODE_FORWARD, Plan, finish_compile_case, pass_compile_cases
from ._common import empty, on_device
from .partials import sum_partials
from ._tiles3d import _sample_tile, _sum_partials


@triton.jit
def _layer_norm_stats(s, mask, D):
    """(xhat, rstd) of the rows of s (BJ, BD) over their D valid columns (eps added by the caller)."""
    mean = tl.sum(s, axis=1) / D
    diff = tl.where(mask, s - mean[:, None], 0.0)
    return diff, tl.sum(diff * diff, axis=1) / D


@triton.jit
def layer_norm_fwd_finish_kernel(
    part_ptr,         # (n_chunks, B, J, D) fp32 partial sums of s^t
    n_chunks,
    s_ptr,            # (B, J, D) fp32 out: s^t (saved for the backward)
    w_ptr,            # (D,) LayerNorm weight (HAS_AFFINE)
    b_ptr,            # (D,) LayerNorm bias (HAS_AFFINE)
    Q_next_ptr,       # (B, J, D) fp32 out: Q^t = p^t / sqrt(D) (unless LAST)
    p_ptr,            # (B, J, D) out, input dtype: p^r (LAST)
    B, J, D,
    eps,              # LayerNorm epsilon
    scale,            # 1 / sqrt(D)
    HAS_AFFINE: tl.constexpr,
    LAST: tl.constexpr,
    BJ: tl.constexpr,
    BD: tl.constexpr,
):
    offs, mask = _sample_tile(J, D, BJ, BD)
    s = _sum_partials(part_ptr, n_chunks, B * J * D, offs, mask, BJ, BD)
    tl.store(s_ptr + offs, s, mask=mask)
    diff, var = _layer_norm_stats(s, mask, D)
    p = diff / tl.sqrt(var + eps)[:, None]
    if HAS_AFFINE:
        d_offs = tl.arange(0, BD)
        d_mask = d_offs < D
        p = p * tl.load(w_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        p += tl.load(b_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if LAST:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(Q_next_ptr + offs, p * scale, mask=mask)


@triton.jit
def layer_norm_bwd_finish_kernel(
    part_ptr,         # (n_chunks, B, J, D) fp32 partials of sum_i ga^{t+1} u_hat (HAS_PARTS)
    n_chunks,
    grad_p_ptr,       # (B, J, D) dL/dp^r, any float dtype (not HAS_PARTS)
    s_ptr,            # (B, J, D) fp32: s^t
    w_ptr,            # (D,) LayerNorm weight (HAS_AFFINE)
    gs_ptr,           # (B, J, D) fp32 out: gs^t = dL/ds^t
    gw_ptr,           # (B, D) fp32 in/out: per-sample dL/dw (HAS_AFFINE)
    gb_ptr,           # (B, D) fp32 in/out: per-sample dL/db (HAS_AFFINE)
    B, J, D,
    eps,
    scale,            # 1 / sqrt(D)
    HAS_PARTS: tl.constexpr,   # t < r: g^t = scale * sum of the partials; else g^r = grad_p
    HAS_AFFINE: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add to gw / gb (every iteration after the first one visited)
    BJ: tl.constexpr,
    BD: tl.constexpr,
):
    offs, mask = _sample_tile(J, D, BJ, BD)
    if HAS_PARTS:
        g = _sum_partials(part_ptr, n_chunks, B * J * D, offs, mask, BJ, BD) * scale
    else:
        g = tl.load(grad_p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    diff, var = _layer_norm_stats(s, mask, D)
    rstd = 1.0 / tl.sqrt(var + eps)
    xhat = diff * rstd[:, None]
    gx = g
    if HAS_AFFINE:
        d_offs = tl.arange(0, BD)
        d_mask = d_offs < D
        gx = g * tl.load(w_ptr + d_offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        row = tl.program_id(0).to(tl.int64) * D + d_offs
        gw = tl.sum(g * xhat, axis=0)
        gb = tl.sum(g, axis=0)
        if ACCUMULATE:
            gw += tl.load(gw_ptr + row, mask=d_mask, other=0.0)
            gb += tl.load(gb_ptr + row, mask=d_mask, other=0.0)
        tl.store(gw_ptr + row, gw, mask=d_mask)
        tl.store(gb_ptr + row, gb, mask=d_mask)
    m1 = tl.sum(gx, axis=1) / D
    m2 = tl.sum(gx * xhat, axis=1) / D
    gs = tl.where(mask, (gx - m1[:, None] - xhat * m2[:, None]) * rstd[:, None], 0.0)
    tl.store(gs_ptr + offs, gs, mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _forward(src, W, iterations: int, weight, bias, eps: float):
    plan = Plan(src, W)
    scale = 1.0 / math.sqrt(plan.D)
    part = plan.stats(plan.n_chunks)
    s_all, Q_all = plan.stats(iterations), plan.stats(iterations)
    Q_all[0].zero_()  # Q^0 = 0: the first iteration's coupling is uniform
    p = empty(plan.B, plan.J, plan.D, dtype=src.dtype, device=plan.device)
    affine = weight is not None
    for t in range(iterations):
        last = t == iterations - 1
        plan.pass_(MODE_FORWARD, src, W, Q_all[t], None, None, part)
        layer_norm_fwd_finish_kernel[(plan.B,)](
            part, plan.n_chunks, s_all[t], weight if affine else part, bias if affine else part,
            Q_all[t] if last else Q_all[t + 1], p, plan.B, plan.J, plan.D, eps, scale,
            HAS_AFFINE=affine, LAST=last, **plan.dims)
    return p, s_all, Q_all


def _backward(src, W, iterations: int, weight, bias, eps: float, s_all, Q_all, grad_p):
    plan = Plan(src, W)
    scale = 1.0 / math.sqrt(plan.D)
    affine = weight is not None
    grad_p = grad_p.contiguous()
    gs_all = plan.stats(iterations)
    part = plan.stats(plan.n_chunks)
    gw = gb = part
    if affine:
        gw = empty(plan.B, plan.D, dtype=torch.float32, device=plan.device)
        gb = empty(plan.B, plan.D, dtype=torch.float32, device=plan.device)
    for t in range(iterations - 1, -1, -1):  # 0-based: Q_all[t] = Q^{t}, s_all[t] = s^{t+1}
        has_parts = t < iterations - 1
        if has_parts:  # sum_i ga^{t+2} u_hat (1-based), the gradient reaching p^{t+1}
            plan.pass_(MODE_BACKWARD, src, W, Q_all[t + 1], gs_all[t + 1], None, part)
        layer_norm_bwd_finish_kernel[(plan.B,)](
            part, plan.n_chunks, grad_p, s_all[t], weight if affine else part, gs_all[t], gw, gb,
            plan.B, plan.J, plan.D, eps, scale, HAS_PARTS=has_parts, HAS_AFFINE=affine, ACCUMULATE=has_parts,
            **plan.dims)
    grad_src, grad_W_part, _ = plan.grad(src, W, Q_all, gs_all, None, None, src.dtype)
    grad_W = sum_partials(grad_W_part, W.dtype) if W is not None else None
    grad_weight = sum_partials(gw, weight.dtype) if affine else None
    grad_bias = sum_partials(gb, bias.dtype) if affine else None
    return grad_src, grad_W, grad_weight, grad_bias


def inverted_attention_routing_fwd(src: torch.Tensor, W: torch.Tensor | None, iterations: int,
                                   weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """src = u_hat (B, I, J, D) with W None, or u (B, I, Din) with W (I, J, D, Din) (fused); weight
    and bias (D,) both given or both None; all contiguous -> (p (B, J, D), s_all, Q_all (r, B, J, D) fp32)."""
    with on_device(src):
        return _forward(src, W, iterations, weight, bias, eps)


def inverted_attention_routing_bwd(src, W, iterations: int, weight, bias, eps: float, s_all, Q_all, grad_p):
    """(dL/dsrc, dL/dW or None, dL/dweight or None, dL/dbias or None) from the saved s_all, Q_all."""
    with on_device(src):
        return _backward(src, W, iterations, weight, bias, eps, s_all, Q_all, grad_p)


# ----------------------------------------------------------------------------------------------
# compile check (kernels/compile_check.py): the paper's DigitCaps shape (J = 10 -> BJ = 16, D = 16)
# ----------------------------------------------------------------------------------------------
def _compile_cases():
    dtypes = ("fp32", "fp16", "bf16")
    cases = pass_compile_cases("inverted_attention", dtypes, [(MODE_FORWARD, False), (MODE_BACKWARD, False)])
    f32 = "*fp32"
    for dtype in dtypes:
        src = f"*{dtype}"
        for affine in (False, True):
            for last in (False, True):
                sig = {"part_ptr": f32, "n_chunks": "i32", "s_ptr": f32, "w_ptr": src, "b_ptr": src,
                       "Q_next_ptr": f32, "p_ptr": src, "eps": "fp32", "scale": "fp32"}
                cases.append(finish_compile_case(f"inverted_attention_fwd_finish[{dtype},affine={affine},last={last}]",
                                                 layer_norm_fwd_finish_kernel, sig,
                                                 {"HAS_AFFINE": affine, "LAST": last}))
            for has_parts in (False, True):
                sig = {"part_ptr": f32, "n_chunks": "i32", "grad_p_ptr": src, "s_ptr": f32, "w_ptr": src,
                       "gs_ptr": f32, "gw_ptr": f32, "gb_ptr": f32, "eps": "fp32", "scale": "fp32"}
                cases.append(finish_compile_case(
                    f"inverted_attention_bwd_finish[{dtype},affine={affine},parts={has_parts}]",
                    layer_norm_bwd_finish_kernel, sig,
                    {"HAS_PARTS": has_parts, "HAS_AFFINE": affine, "ACCUMULATE": has_parts}))
    return cases


COMPILE_CASES = _compile_cases()
