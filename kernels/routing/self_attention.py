"""Self-attention routing kernels (Mazzia et al. 2021, Efficient-CapsNet), unfused (u_hat read
from memory) and fused with the transform (u_hat = W u recomputed, W in the kernel layout
(I, Din, J, D), never stored).  Built on the shared streaming passes of routing/streaming.py;
this file holds only what differs: the finishes and their launch order.

Tile layout, grid and launches (the machinery is shared: routing/streaming.py, routing/tiles.py):
    tile      (BDH, BLOCK_B, BJ, BDL): one sample's D-vector per thread, the J outputs over a warp's lanes
    grid      pass kernel: (cdiv(B, BLOCK_B), n_chunks); final gradient: streaming.plan
    forward   2 launches of self_attention_pass_kernel: modes.SUM (S, Q), modes.FORWARD (s, v)
    backward  1 launch of self_attention_pass_kernel (modes.BACKWARD: gs, R), then one final-gradient launch
              (one iteration with state Q, R and the bias; streaming.stream_grad_fused_kernel, unfused
              streaming.stream_grad_kernel), plus sum_partials for the weight and bias gradients

Forward, per sample (u = u_hat (I, J, D), bias (I, J) optional), two streaming passes:
    S_j = sum_k u_kj                                      pass modes.SUM, finish: Q = S / sqrt(D)
    q_ij = softmax_j(u_ij . Q_j),  c_ij = q_ij + bias_ij,  s_j = sum_i c_ij u_ij      pass modes.FORWARD
    v_j = f(n_j) s_j,  n = |s_j|,  f(n) = (1 - exp(-n)) / n   (f(0) = 1)              its finish
The I x I attention matrix u_ij . u_kj is never formed: only its row sums u_ij . S_j enter.
Saved for the backward: Q and s, (B, J, D) each.
Range: |s| is taken on s / sc (sc = squash._pow2_scale), so the squash is finite for every finite s;
the fp32 logits u . Q overflow for entries beyond about 1e18 / sqrt(I D), and then give NaN (never
a finite wrong value).

Backward.  With g = dL/dv and s_hat = s / n (0 at n = 0), since v = (1 - exp(-n)) s_hat:
    gs = f g + (exp(-n) - f) (s_hat . g) s_hat                       (finite at s = 0: gs = g)
    gc_ij = u_ij . gs_j,  dL/dbias_ij = sum_b gc_ij
    ga_ij = q_ij (gc_ij - sum_k q_ik gc_ik)                           (softmax over j)
    R_j = sum_k ga_kj u_kj / sqrt(D)                                  (through S_j = sum_k u_kj)
    dL/du_ij = c_ij gs_j + ga_ij Q_j + R_j
One reduction pass (modes.BACKWARD; every program forms gs from s and dL/dv, chunk 0 stores it)
gives R; the shared final pass (one iteration, state Q, plus R and the bias terms) writes
dL/du_hat, or fused dL/du and dL/dW, and dL/dbias.  f and exp(-n) - f are evaluated by a series
below n = 0.1, where 1 - exp(-n) would cancel (fp32).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._common import batch_bucket, empty, launch, on_device, target_programs
from ..autotune_cache import ensure_tuned_configs_loaded
from ..squash import _pow2_scale
from . import modes
from .compile_cases import F32, I32, case, final_grad_cases, over_shapes, pick
from .streaming import (
    PASS_CONFIGS,
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
from .tiles import dot_d, expand


@triton.jit
def _exp_squash_scale(s):
    """Exp-squash factors of a tile s, overflow-safe: with sc = _pow2_scale(max |s|) (exact), z = s / sc,
    n = |s| = sc |z|: returns (z, zhat = s / |s|, F, f, e), v = F z, f = F / sc = (1 - exp(-n)) / n, e = exp(-n)
    (expanded).  n < 0.1 implies sc = 1: there f is the series, accurate in fp32 down to n = 0."""
    sc = _pow2_scale(tl.max(tl.max(tl.abs(s), axis=3), axis=0))
    z = s / expand(sc)
    nz = tl.sqrt(dot_d(z, z))
    n = sc * nz
    e = tl.exp(-n)
    series = 1.0 + n * (-0.5 + n * (1.0 / 6.0 + n * (-1.0 / 24.0 + n * (1.0 / 120.0 - n / 720.0))))
    small = n < 0.1
    F = tl.where(small, series, (1.0 - e) / tl.where(small, 1.0, nz))
    zhat = z / expand(tl.where(nz > 0, nz, 1.0))
    return z, zhat, expand(F), expand(F / sc), expand(e)


@triton.jit
def _exp_squash_grad(s, g):
    """dL/ds for a tile from s and g = dL/dv (module docstring): f g + (e - f) (zhat . g) zhat."""
    _, zhat, _, f, e = _exp_squash_scale(s)
    return f * g + (e - f) * expand(dot_d(zhat, g)) * zhat


@pass_autotune("FUSED", "MODE", "HAS_BIAS")
@triton.jit
def self_attention_pass_kernel(
    u_ptr,            # (B, I, DIN) input capsules (FUSED) - else unused
    W_ptr,            # (I, DIN, J, D) transform matrices, kernel layout (FUSED) - else unused
    uhat_ptr,         # (B, I, J, D) prediction vectors (not FUSED) - else unused
    bias_ptr,         # (I, J) coupling bias added after the softmax (modes.FORWARD, HAS_BIAS)
    Q_ptr,            # (B, J, D) fp32 query S / sqrt(D): modes.SUM writes it, the other modes read it
    s_ptr,            # (B, J, D) fp32: modes.FORWARD writes s, modes.BACKWARD reads it
    gs_ptr,           # (B, J, D) fp32, modes.BACKWARD out: dL/ds (stored by chunk 0)
    R_ptr,            # (B, J, D) fp32, modes.BACKWARD out: R = sum_k ga_k u_k / sqrt(D)
    v_ptr,            # (B, J, D) modes.FORWARD out, input dtype: v; modes.BACKWARD in, any float dtype: dL/dv
    part_ptr,         # (n_chunks, B, J, D) fp32 scratch: chunk partial sums (n_chunks > 1)
    count_ptr,        # (>= batch blocks,) int32 arrival counters, 0 on entry and on exit (n_chunks > 1)
    B, I,             # batch, input capsules
    caps_per_chunk,   # input capsules per program along grid axis 1
    n_chunks,         # programs along grid axis 1
    scale,            # 1 / sqrt(D)
    B_BUCKET,         # autotune key: batch rounded up to a power of two
    J: tl.constexpr, D: tl.constexpr, DIN: tl.constexpr,  # output capsules, their dim, input dim
    MODE: tl.constexpr,        # modes.SUM (S), modes.FORWARD (s, v) or modes.BACKWARD (gs, R)
    HAS_BIAS: tl.constexpr,    # add the coupling bias (modes.FORWARD)
    FUSED: tl.constexpr,       # recompute u_hat = W u (else read u_hat)
    BLOCK_B: tl.constexpr,     # samples per program (the autotuned config)
    BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,  # tile widths (tiles.tile_dims)
):
    b_offs, b_mask, jd, jd_mask, bjd, mask, zero_b = sample_block(B, J, D, BLOCK_B, BJ, BDH, BDL)
    chunk = tl.program_id(1)
    Q = tl.zeros((BDH, BLOCK_B, BJ, BDL), dtype=tl.float32)
    gs = Q
    if MODE != modes.SUM:
        Q = tl.load(Q_ptr + bjd, mask=mask, other=0.0)
    if MODE == modes.BACKWARD:
        s = tl.load(s_ptr + bjd, mask=mask, other=0.0)
        gs = _exp_squash_grad(s, tl.load(v_ptr + bjd, mask=mask, other=0.0).to(tl.float32))
        if chunk == 0:  # for the final pass
            tl.store(gs_ptr + bjd, gs, mask=mask)
    i_start = chunk * caps_per_chunk
    acc = stream_capsules(u_ptr, W_ptr, uhat_ptr, bias_ptr, b_offs, b_mask, jd, mask, zero_b, Q, gs, i_start,
                          tl.minimum(i_start + caps_per_chunk, I), I, MODE, HAS_BIAS, FUSED, J, D, DIN, BLOCK_B, BJ,
                          BDH, BDL)
    acc, finish = finish_chunks(acc, part_ptr, count_ptr, chunk, n_chunks, B * (J * D), bjd, mask)
    if finish:
        if MODE == modes.SUM:
            tl.store(Q_ptr + bjd, acc * scale, mask=mask)
        elif MODE == modes.FORWARD:  # acc = s: v = f(|s|) s
            tl.store(s_ptr + bjd, acc, mask=mask)
            z, _, F, _, _ = _exp_squash_scale(acc)
            tl.store(v_ptr + bjd, (F * z).to(v_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(R_ptr + bjd, acc * scale, mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _setup(src, W):
    u, u_hat = (src, None) if W is not None else (None, src)
    shape = sizes(u, W, u_hat)
    p = plan(*shape, target_programs(src.device))
    return (shape, p) + chunk_scratch(p, shape[0], shape[2], shape[3], src)


def _pass(mode: int, src, W, bias, Q, s, gs, R, v, part, count, shape, p) -> None:
    """One launch of self_attention_pass_kernel in ``mode`` (modes.SUM, modes.FORWARD or modes.BACKWARD)."""
    B, I, J, D, DIN = shape
    fused = W is not None
    key = (self_attention_pass_kernel, src.device, src.dtype, p.key, fused, mode, bias is not None)
    launch(self_attention_pass_kernel, pass_grid(B, p.n_chunks), key,
           u_ptr=src, W_ptr=W if fused else src, uhat_ptr=src, bias_ptr=bias if bias is not None else Q, Q_ptr=Q,
           s_ptr=s, gs_ptr=gs, R_ptr=R, v_ptr=v, part_ptr=part, count_ptr=count, B=B, I=I,
           caps_per_chunk=p.caps_per_chunk, n_chunks=p.n_chunks, scale=1.0 / math.sqrt(D), B_BUCKET=batch_bucket(B),
           J=J, D=D, DIN=DIN, MODE=mode, HAS_BIAS=bias is not None, FUSED=fused, **p.dims)


def self_attention_routing_fwd(src: torch.Tensor, W: torch.Tensor | None, bias: torch.Tensor | None):
    """src = u_hat (B, I, J, D) with W None, or u (B, I, Din) with W (I, Din, J, D) (the kernel
    layout; fused: u_hat is never stored); bias (I, J) or None; all contiguous -> (v (B, J, D),
    Q, s (B, J, D) fp32)."""
    with on_device(src):
        ensure_tuned_configs_loaded()
        shape, p, part, count = _setup(src, W)
        B, _, J, D, _ = shape
        Q = empty(B, J, D, dtype=torch.float32, device=src.device)
        s = empty(B, J, D, dtype=torch.float32, device=src.device)
        v = empty(B, J, D, dtype=src.dtype, device=src.device)
        _pass(modes.SUM, src, W, None, Q, s, Q, Q, v, part, count, shape, p)
        _pass(modes.FORWARD, src, W, bias, Q, s, Q, Q, v, part, count, shape, p)
        return v, Q, s


def self_attention_routing_bwd(src, W, bias, Q, s, grad_v):
    """(dL/dsrc, dL/dW or None, dL/dbias or None) from the saved Q, s and dL/dv (W, dL/dW in the
    kernel layout)."""
    with on_device(src):
        shape, p, part, count = _setup(src, W)
        B, _, J, D, _ = shape
        gs = empty(B, J, D, dtype=torch.float32, device=src.device)
        R = empty(B, J, D, dtype=torch.float32, device=src.device)
        _pass(modes.BACKWARD, src, W, None, Q, s, gs, R, grad_v.contiguous(), part, count, shape, p)
        del part, count  # chunk scratch released before the final pass allocates its partials
        return final_grad(p, src, W, Q, gs, 1, uniform_first=False, R=R, bias=bias)


# ----------------------------------------------------------------------------------------------
# compile-check cases: every config the autotune list keeps for fp32 at the paper's width
# (BJ = 16), else the default, at compile_cases.SHAPES
# ----------------------------------------------------------------------------------------------
def _every(dtype, dims) -> bool:
    return dtype == "fp32" and dims["BJ"] == 16


def _pass_cases(src, dtype, tag, sizes, dims, din):
    sig = {"u_ptr": src, "W_ptr": src, "uhat_ptr": src, "bias_ptr": src, "Q_ptr": F32, "s_ptr": F32, "gs_ptr": F32,
           "R_ptr": F32, "v_ptr": src, "part_ptr": F32, "count_ptr": "*i32", "B": I32, "I": I32,
           "caps_per_chunk": I32, "n_chunks": I32, "scale": "fp32", "B_BUCKET": I32}
    variants = (("S", modes.SUM, False), ("forward", modes.FORWARD, False), ("forward-bias", modes.FORWARD, True),
                ("backward", modes.BACKWARD, False))
    cases = []
    for fused in (True, False):
        for what, mode, has_bias in variants:
            for cfg, default in pick(prune_pass_configs, PASS_CONFIGS, dims, _every(dtype, dims), MODE=mode):
                cases.append(case(f"self_attention_pass[{tag},{what},fused={fused}]", self_attention_pass_kernel.fn,
                                  sig, {**sizes, "MODE": mode, "HAS_BIAS": has_bias, "FUSED": fused, **dims},
                                  cfg, default))
    return cases


def _final_grad_cases(src, dtype, tag, sizes, dims, din):
    """One iteration with a state (UNIFORM_FIRST off), R, with and without the coupling bias."""
    variants = {f"self_attention{label}": dict(DETACH=False, UNIFORM_FIRST=False, HAS_R=True, HAS_BIAS=has_bias)
                for label, has_bias in (("", True), ("-no-bias", False))}
    return final_grad_cases(src, tag, sizes, dims, din, variants, every=_every(dtype, dims))


COMPILE_CASES = over_shapes(_pass_cases, _final_grad_cases)
