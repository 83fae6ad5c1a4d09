"""Inverted dot-product attention routing kernels (Tsai et al. 2020), unfused (u_hat read from
memory) and fused with the transform (u_hat = W u recomputed, W in the kernel layout
(I, Din, J, D), never stored).  Built on the shared streaming passes of routing/streaming.py;
this file holds only what differs: the LayerNorm finishes and their launch order.

Tile layout, grid and launches (the machinery is shared: routing/streaming.py, routing/tiles.py):
    tile      (BDH, BLOCK_B, BJ, BDL): one sample's D-vector per thread, the J outputs over a warp's lanes
    grid      pass kernel: (cdiv(B, BLOCK_B), n_chunks); final gradient: streaming.plan
    forward   r launches of inverted_attention_pass_kernel: t = 0 modes.SUM (uniform couplings), then modes.FORWARD
    backward  r-1 launches of inverted_attention_pass_kernel (modes.BACKWARD), or with r = 1 one
              inverted_attention_bwd_init_kernel; then one final-gradient launch (the dynamic-routing variant:
              uniform first iteration; streaming.stream_grad_fused_kernel, unfused streaming.stream_grad_kernel),
              plus sum_partials for several weight-gradient groups

Forward, per sample (u = u_hat (I, J, D); r iterations, 0-based t; LayerNorm over D with
optional affine w, b of shape (D,)).  With queries Q^t = p^{t-1} / sqrt(D) (Q^0 absent: the
first coupling is uniform):
    q^t_ij = softmax_j(u_ij . Q^t_j),  s^t_j = sum_i q^t_ij u_ij        pass t (modes.SUM for t = 0)
    p^t_j = LayerNorm(s^t_j) = xhat^t_j w + b,  xhat = (s - mean) rstd   its finish: Q^{t+1}, or p^{r-1} out
Saved for the backward: s^0..s^{r-1} (r, B, J, D) and Q^1..Q^{r-1} (r-1, B, J, D).

Backward.  With g^t = dL/dp^t (g^{r-1} given):
    gs^t = rstd (gx - mean_d(gx) - xhat mean_d(gx xhat)),  gx = g^t w       (LayerNorm backward)
    dL/dw += sum_j g^t xhat^t,  dL/db += sum_j g^t        (per iteration and sample, then summed)
    gc^t_ij = u_ij . gs^t_j,  ga^t_ij = q^t_ij (gc^t_ij - sum_k q^t_ik gc^t_ik)
    g^{t-1}_j = sum_i ga^t_ij u_ij / sqrt(D)                 (p^{t-1} enters only through Q^t)
    dL/du_ij = sum_t [ q^t_ij gs^t_j + ga^t_ij Q^t_j ]       (no ga term at t = 0)
For t = r-1 .. 1 one reduction pass (modes.BACKWARD) sums ga^t u over i; its finish forms gs^{t-1}
(the first pass forms gs^{r-1} from dL/dp itself, chunk 0 stores it).  The shared final pass
(states Q^t, uniform first iteration) writes dL/du_hat, or fused dL/du and dL/dW.  With r = 1
a small kernel forms gs^0.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._common import batch_bucket, cdiv, empty, launch, on_device, target_programs
from ..autotune_cache import ensure_tuned_configs_loaded
from ..squash import _pow2_scale
from . import modes
from .compile_cases import F32, I32, case, over_shapes, pick
from .streaming import (
    PASS_CONFIGS,
    at,
    chunk_scratch,
    final_grad,
    finish_chunks,
    pass_autotune,
    pass_grid,
    plan,
    prune_pass_configs,
    sample_block,
    sizes,
    stream_capsules,
)
from .tiles import dot_d, expand, lanes_per_sample

INIT_WARPS = 4  # warps of inverted_attention_bwd_init_kernel


@triton.jit
def _d_index(b_offs, BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr):
    """d of every element of a (BDH, BLOCK_B, BJ, BDL) tile (so that a (D,) vector loads in the tile's layout)."""
    dh = tl.arange(0, BDH)[:, None, None, None]
    jj = tl.arange(0, BJ)[None, None, :, None]
    dl = tl.arange(0, BDL)[None, None, None, :]
    return dh * BDL + dl + jj * 0 + (b_offs * 0)[None, :, None, None]


@triton.jit
def _layer_norm(s, jd_mask, eps, D: tl.constexpr):
    """(xhat, rstd) of the D-vectors of a tile: xhat = (s - mean) rstd, rstd (BLOCK_B, BJ).  Scale-invariant
    form, finite for every finite s: with z = s / sc (sc = _pow2_scale(max |s|), exact), xhat is the
    LayerNorm of z with epsilon eps / sc^2 (underflowing to 0 for huge sc: the exact limit), rstd = rstd_z / sc."""
    sc = _pow2_scale(tl.max(tl.max(tl.abs(s), axis=3), axis=0))
    z = s / expand(sc)
    mean = tl.sum(tl.sum(z, axis=3), axis=0) / D
    diff = tl.where(jd_mask, z - expand(mean), 0.0)
    inv_sc = 1.0 / sc
    rstd = 1.0 / tl.sqrt(dot_d(diff, diff) / D + eps * (inv_sc * inv_sc))
    return diff * expand(rstd), rstd * inv_sc


@triton.jit
def _layer_norm_grad(s, g, w_ptr, jd_mask, eps, b_offs, D: tl.constexpr, HAS_AFFINE: tl.constexpr,
                     BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr):
    """(dL/ds, xhat) of p = LayerNorm(s) for g = dL/dp (tiles)."""
    xhat, rstd = _layer_norm(s, jd_mask, eps, D)
    gx = g
    if HAS_AFFINE:
        d = _d_index(b_offs, BJ, BDH, BDL)
        gx = g * tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    m1 = tl.sum(tl.sum(gx, axis=3), axis=0) / D
    m2 = dot_d(gx, xhat) / D
    return tl.where(jd_mask, (gx - expand(m1) - xhat * expand(m2)) * expand(rstd), 0.0), xhat


@triton.jit
def _store_affine_grads(g, xhat, gw_ptr, gb_ptr, b_offs, B, D: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr):
    """This iteration's per-sample dL/dw = sum_j g xhat and dL/db = sum_j g, stored at gw_ptr, gb_ptr (B, D)."""
    d = tl.arange(0, BDH)[:, None, None] * BDL + tl.arange(0, BDL)[None, None, :]
    offs = b_offs[None, :, None] * D + d
    mask = (b_offs < B)[None, :, None] & (d < D)
    tl.store(gw_ptr + offs, tl.sum(g * xhat, axis=2), mask=mask)
    tl.store(gb_ptr + offs, tl.sum(g, axis=2), mask=mask)


@pass_autotune("FUSED", "MODE", "HAS_AFFINE")
@triton.jit
def inverted_attention_pass_kernel(
    u_ptr,            # (B, I, DIN) input capsules (FUSED) - else unused
    W_ptr,            # (I, DIN, J, D) transform matrices, kernel layout (FUSED) - else unused
    uhat_ptr,         # (B, I, J, D) prediction vectors (not FUSED) - else unused
    Q_all_ptr,        # (r-1, B, J, D) fp32: Q^1 .. Q^{r-1}; reads Q^t (t >= 1), forward writes Q^{t+1} unless LAST
    s_all_ptr,        # (r, B, J, D) fp32: forward writes s^t; backward reads s^{t-1} (and s^t if GS_FROM_GRAD)
    gs_all_ptr,       # (r, B, J, D) fp32, backward: reads gs^t (chunk 0 writes it if GS_FROM_GRAD),
                      #   finish writes gs^{t-1}
    w_ptr, b_ptr,     # (D,) LayerNorm affine (HAS_AFFINE)
    gw_all_ptr,       # (r, B, D) fp32, backward out: per-iteration, per-sample dL/dw (HAS_AFFINE)
    gb_all_ptr,       # (r, B, D) fp32, backward out: per-iteration, per-sample dL/db (HAS_AFFINE)
    p_ptr,            # (B, J, D) forward, LAST: out, input dtype: p; backward, GS_FROM_GRAD: in: dL/dp
    part_ptr,         # (n_chunks, B, J, D) fp32 scratch: chunk partial sums (n_chunks > 1)
    count_ptr,        # (>= batch blocks,) int32 arrival counters, 0 on entry and on exit (n_chunks > 1)
    B, I,             # batch, input capsules
    caps_per_chunk,   # input capsules per program along grid axis 1
    n_chunks,         # programs along grid axis 1
    t,                # iteration (0-based): forward t, or backward the pass for t -> t-1
    eps,              # LayerNorm epsilon
    scale,            # 1 / sqrt(D)
    B_BUCKET,         # autotune key: batch rounded up to a power of two
    J: tl.constexpr, D: tl.constexpr, DIN: tl.constexpr,  # output capsules, their dim, input dim
    MODE: tl.constexpr,        # modes.SUM (forward t = 0), modes.FORWARD or modes.BACKWARD
    LAST: tl.constexpr,        # forward t = r-1: write p instead of Q^{t+1}
    GS_FROM_GRAD: tl.constexpr,  # backward t = r-1: form gs^t from s^t and dL/dp
    HAS_AFFINE: tl.constexpr,  # LayerNorm with the affine w, b
    FUSED: tl.constexpr,       # recompute u_hat = W u (else read u_hat)
    BLOCK_B: tl.constexpr,     # samples per program (the autotuned config)
    BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,  # tile widths (tiles.tile_dims)
):
    b_offs, b_mask, jd, jd_mask, bjd, mask, zero_b = sample_block(B, J, D, BLOCK_B, BJ, BDH, BDL)
    chunk = tl.program_id(1)
    stride = B * (J * D)
    Q = tl.zeros((BDH, BLOCK_B, BJ, BDL), dtype=tl.float32)
    gs = Q
    if MODE != modes.SUM:
        Q = tl.load(Q_all_ptr + at(t - 1, stride) + bjd, mask=mask, other=0.0)
    if MODE == modes.BACKWARD:
        if GS_FROM_GRAD:
            s_t = tl.load(s_all_ptr + at(t, stride) + bjd, mask=mask, other=0.0)
            g = tl.load(p_ptr + bjd, mask=mask, other=0.0).to(tl.float32)
            gs, xhat = _layer_norm_grad(s_t, g, w_ptr, jd_mask, eps, b_offs, D, HAS_AFFINE, BJ, BDH, BDL)
            if chunk == 0:  # for the final pass
                tl.store(gs_all_ptr + at(t, stride) + bjd, gs, mask=mask)
                if HAS_AFFINE:
                    _store_affine_grads(g, xhat, gw_all_ptr + at(t, B * D), gb_all_ptr + at(t, B * D), b_offs, B, D,
                                        BDH, BDL)
        else:
            gs = tl.load(gs_all_ptr + at(t, stride) + bjd, mask=mask, other=0.0)
    i_start = chunk * caps_per_chunk
    acc = stream_capsules(u_ptr, W_ptr, uhat_ptr, u_ptr, b_offs, b_mask, jd, mask, zero_b, Q, gs, i_start,
                          tl.minimum(i_start + caps_per_chunk, I), I, MODE, False, FUSED, J, D, DIN, BLOCK_B, BJ,
                          BDH, BDL)
    if MODE == modes.SUM:
        acc = acc * (1.0 / J)
    acc, finish = finish_chunks(acc, part_ptr, count_ptr, chunk, n_chunks, stride, bjd, mask)
    if finish:
        if MODE == modes.BACKWARD:  # acc * scale = g^{t-1}: gs^{t-1} = LayerNorm'(s^{t-1})^T g^{t-1}
            s = tl.load(s_all_ptr + at(t - 1, stride) + bjd, mask=mask, other=0.0)
            g = acc * scale
            gs, xhat = _layer_norm_grad(s, g, w_ptr, jd_mask, eps, b_offs, D, HAS_AFFINE, BJ, BDH, BDL)
            tl.store(gs_all_ptr + at(t - 1, stride) + bjd, gs, mask=mask)
            if HAS_AFFINE:
                _store_affine_grads(g, xhat, gw_all_ptr + at(t - 1, B * D), gb_all_ptr + at(t - 1, B * D), b_offs, B,
                                    D, BDH, BDL)
        else:  # acc = s^t: p^t = LayerNorm(s^t)
            tl.store(s_all_ptr + at(t, stride) + bjd, acc, mask=mask)
            p = _layer_norm(acc, jd_mask, eps, D)[0]
            if HAS_AFFINE:
                d = _d_index(b_offs, BJ, BDH, BDL)
                p = p * tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32) \
                    + tl.load(b_ptr + d, mask=d < D, other=0.0).to(tl.float32)
            if LAST:
                tl.store(p_ptr + bjd, p.to(p_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(Q_all_ptr + at(t, stride) + bjd, p * scale, mask=mask)


@triton.jit
def inverted_attention_bwd_init_kernel(
    s_ptr,            # (B, J, D) fp32: s^0
    grad_p_ptr,       # (B, J, D) dL/dp, any float dtype
    w_ptr,            # (D,) LayerNorm weight (HAS_AFFINE)
    gs_ptr,           # (B, J, D) fp32 out: gs^0
    gw_ptr, gb_ptr,   # (B, D) fp32 out: per-sample dL/dw, dL/db (HAS_AFFINE)
    B,                # batch
    eps,              # LayerNorm epsilon
    J: tl.constexpr, D: tl.constexpr,  # output capsules, their dim
    HAS_AFFINE: tl.constexpr,  # LayerNorm with the affine w (its gradients dL/dw, dL/db)
    BLOCK_B: tl.constexpr,  # samples per program: one per lane group (lanes_per_sample * INIT_WARPS)
    BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,  # tile widths (tiles.tile_dims)
):
    """gs^0 (and the affine gradients) when there is a single iteration: no reduction pass forms it."""
    b_offs, _, _, jd_mask, bjd, mask, _ = sample_block(B, J, D, BLOCK_B, BJ, BDH, BDL)
    s = tl.load(s_ptr + bjd, mask=mask, other=0.0)
    g = tl.load(grad_p_ptr + bjd, mask=mask, other=0.0).to(tl.float32)
    gs, xhat = _layer_norm_grad(s, g, w_ptr, jd_mask, eps, b_offs, D, HAS_AFFINE, BJ, BDH, BDL)
    tl.store(gs_ptr + bjd, gs, mask=mask)
    if HAS_AFFINE:
        _store_affine_grads(g, xhat, gw_ptr, gb_ptr, b_offs, B, D, BDH, BDL)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
class _Call:
    """Sizes, plan and scratch of one forward or backward call."""

    def __init__(self, src, W, weight, bias, eps: float):
        self.src, self.W, self.weight, self.bias, self.eps = src, W, weight, bias, float(eps)
        self.fused = W is not None
        u, u_hat = (src, None) if self.fused else (None, src)
        self.shape = sizes(u, W, u_hat)
        self.B, self.I, self.J, self.D, self.DIN = self.shape
        self.p = plan(*self.shape, target_programs(src.device))
        self.part, self.count = chunk_scratch(self.p, self.B, self.J, self.D, src)

    def stats(self, *lead):
        return empty(*lead, self.B, self.J, self.D, dtype=torch.float32, device=self.src.device)

    def run_pass(self, t: int, mode: int, Q_all, s_all, gs_all, gw, gb, p_or_grad, last=False,
                 from_grad=False):
        """One launch of inverted_attention_pass_kernel for iteration t in ``mode`` (modes.SUM,
        modes.FORWARD or modes.BACKWARD)."""
        affine = self.weight is not None
        src = self.src
        key = (inverted_attention_pass_kernel, src.device, src.dtype, self.p.key, self.fused, mode, affine)
        launch(inverted_attention_pass_kernel, pass_grid(self.B, self.p.n_chunks), key,
               u_ptr=src, W_ptr=self.W if self.fused else src, uhat_ptr=src, Q_all_ptr=Q_all, s_all_ptr=s_all,
               gs_all_ptr=gs_all, w_ptr=self.weight if affine else s_all, b_ptr=self.bias if affine else s_all,
               gw_all_ptr=gw, gb_all_ptr=gb, p_ptr=p_or_grad, part_ptr=self.part, count_ptr=self.count, B=self.B,
               I=self.I, caps_per_chunk=self.p.caps_per_chunk, n_chunks=self.p.n_chunks, t=t, eps=self.eps,
               scale=1.0 / math.sqrt(self.D), B_BUCKET=batch_bucket(self.B), J=self.J, D=self.D, DIN=self.DIN,
               MODE=mode, LAST=last, GS_FROM_GRAD=from_grad, HAS_AFFINE=affine, FUSED=self.fused,
               **self.p.dims)


def inverted_attention_routing_fwd(src: torch.Tensor, W: torch.Tensor | None, iterations: int,
                                   weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """src = u_hat (B, I, J, D) with W None, or u (B, I, Din) with W (I, Din, J, D) (the kernel
    layout; fused); weight and bias (D,) both given or both None; all contiguous -> (p (B, J, D),
    s_all (r, B, J, D), Q_all (r-1, B, J, D) fp32)."""
    with on_device(src):
        ensure_tuned_configs_loaded()
        c = _Call(src, W, weight, bias, eps)
        s_all, Q_all = c.stats(iterations), c.stats(iterations - 1)
        p = empty(c.B, c.J, c.D, dtype=src.dtype, device=src.device)
        Q_arg = Q_all if iterations > 1 else s_all
        for t in range(iterations):
            c.run_pass(t, modes.SUM if t == 0 else modes.FORWARD, Q_arg, s_all, s_all, s_all, s_all, p,
                       last=t == iterations - 1)
        return p, s_all, Q_all


def inverted_attention_routing_bwd(src, W, iterations: int, weight, bias, eps: float, s_all, Q_all, grad_p):
    """(dL/dsrc, dL/dW or None, dL/dweight or None, dL/dbias or None) from the saved s_all,
    Q_all (W and dL/dW in the kernel layout)."""
    with on_device(src):
        c = _Call(src, W, weight, bias, eps)
        affine = weight is not None
        grad_p = grad_p.contiguous()
        gs_all = c.stats(iterations)
        gw = empty(iterations, c.B, c.D, dtype=torch.float32, device=src.device) if affine else gs_all
        gb = empty(iterations, c.B, c.D, dtype=torch.float32, device=src.device) if affine else gs_all
        if iterations == 1:
            block = lanes_per_sample(c.p.dims["BJ"]) * INIT_WARPS
            inverted_attention_bwd_init_kernel[(cdiv(c.B, block),)](
                s_ptr=s_all, grad_p_ptr=grad_p, w_ptr=weight if affine else s_all, gs_ptr=gs_all, gw_ptr=gw, gb_ptr=gb,
                B=c.B, eps=c.eps, J=c.J, D=c.D, HAS_AFFINE=affine, BLOCK_B=block, num_warps=INIT_WARPS, **c.p.dims)
        for t in range(iterations - 1, 0, -1):  # sum_i ga^t u_hat -> gs^{t-1}
            c.run_pass(t, modes.BACKWARD, Q_all, s_all, gs_all, gw, gb, grad_p, from_grad=t == iterations - 1)
        Q_arg = Q_all if iterations > 1 else s_all
        c.part = c.count = None  # chunk scratch released before the final pass allocates its partials
        grad_src, grad_W, _ = final_grad(c.p, src, W, Q_arg, gs_all, iterations, uniform_first=True)
        if not affine:
            return grad_src, grad_W, None, None
        # r B partials of D values: torch's parallel tree sum (deterministic) instead of the
        # serial sum_partials loop, which suits a few large partials
        return (grad_src, grad_W, gw.view(-1, c.D).sum(dim=0).to(weight.dtype),
                gb.view(-1, c.D).sum(dim=0).to(bias.dtype))


# ----------------------------------------------------------------------------------------------
# compile-check cases: every config the autotune list keeps for fp32 at the paper's width
# (BJ = 16), else the default, at compile_cases.SHAPES.  The final gradient runs the variant of
# dynamic routing (uniform first iteration), compiled by routing/dynamic.py's cases.
# ----------------------------------------------------------------------------------------------
def _every(dtype, dims) -> bool:
    return dtype == "fp32" and dims["BJ"] == 16


def _pass_cases(src, dtype, tag, sizes, dims, din):
    sig = {"u_ptr": src, "W_ptr": src, "uhat_ptr": src, "Q_all_ptr": F32, "s_all_ptr": F32, "gs_all_ptr": F32,
           "w_ptr": src, "b_ptr": src, "gw_all_ptr": F32, "gb_all_ptr": F32, "p_ptr": src, "part_ptr": F32,
           "count_ptr": "*i32", "B": I32, "I": I32, "caps_per_chunk": I32, "n_chunks": I32, "t": I32,
           "eps": "fp32", "scale": "fp32", "B_BUCKET": I32}
    off = dict(LAST=False, GS_FROM_GRAD=False)
    variants = (("first", dict(off, MODE=modes.SUM)), ("forward", dict(off, MODE=modes.FORWARD)),
                ("forward-last", dict(off, MODE=modes.FORWARD, LAST=True)),
                ("backward", dict(off, MODE=modes.BACKWARD)),
                ("backward-first", dict(off, MODE=modes.BACKWARD, GS_FROM_GRAD=True)))
    cases = []
    for fused in (True, False):
        for what, flags in variants:
            for affine in (True, False):
                for cfg, default in pick(prune_pass_configs, PASS_CONFIGS, dims, _every(dtype, dims),
                                         MODE=flags["MODE"], HAS_AFFINE=affine):
                    cases.append(case(f"inverted_attention_pass[{tag},{what},affine={affine},fused={fused}]",
                                      inverted_attention_pass_kernel.fn, sig,
                                      {**sizes, **flags, "HAS_AFFINE": affine, "FUSED": fused, **dims}, cfg, default))
    return cases


def _init_cases(src, dtype, tag, sizes, dims, din):
    sig = {"s_ptr": F32, "grad_p_ptr": src, "w_ptr": src, "gs_ptr": F32, "gw_ptr": F32, "gb_ptr": F32, "B": I32,
           "eps": "fp32"}
    return [{"name": f"inverted_attention_bwd_init[{tag},affine={affine}]", "fn": inverted_attention_bwd_init_kernel,
             "signature": sig, "constexprs": {"J": sizes["J"], "D": sizes["D"], "HAS_AFFINE": affine,
                                              "BLOCK_B": lanes_per_sample(dims["BJ"]) * INIT_WARPS, **dims},
             "num_warps": INIT_WARPS, "num_stages": 1, "default": True} for affine in (True, False)]


COMPILE_CASES = over_shapes(_pass_cases, _init_cases)
