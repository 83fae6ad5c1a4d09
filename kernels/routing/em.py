"""Fused fully connected EM routing kernels (Hinton, Sabour & Frosst 2018; the spec's E1-E13, K1-K2).

Three sources of the votes V_ij (B, I, J, H), switched by the constexprs FUSED and MATRIX:
  * votes read from memory (not FUSED): V (B, I, J, H);
  * matrix votes (FUSED, MATRIX): pose (B, I, 16) and W (IW, J, 16), both flattened row-major from
    4x4, child i uses the W row i % IW (IW = I: fully connected; IW = A: class capsules, W shared by
    the positions); V[j, 4r + c] = sum_k M[4r + k] W[j, 4k + c] (4 FMAs per element), plus with
    COORD the coordinate addition (K2): element 3 += (h + 1/2) / GH, element 7 += (w + 1/2) / GW for
    child i = (h GW + w) IW + a;
  * vector votes (FUSED, not MATRIX): u (B, I, DIN), W (I, DIN, J, H) (the kernel layout of
    kernels/routing/tiles.py): V[j, :] = sum_k u[k] W[k, j, :] (DIN FMAs per element).
The fused paths recompute the votes in every pass, forward and backward: neither the votes nor the
assignments R are ever stored.

Tile layout, grid and launches (tiles.py's layout: a (sample, parent) H-vector per thread or two):
    tile      (BDH, BLOCK_B, BJ, BDL), h = dh * BDL + dl.  Pass kernels (`pass_dims`): for H = 16 and
              BJ <= 16, BDH = 2, BDL = 8: the 16-vector spans two lanes (8 values per thread and tile,
              one shuffle per dot product over h), BJ x 2 lanes per sample; 72 / 95 registers
              (forward / backward pass, J = 10, sm_90), 28 / 20 resident warps per SM, no spills.
              Gradient kernel: BDH = BDL = 4, a thread holds a whole 4x4 vote (dh = row r, dl =
              column c): dL/dW = M^T dV sums over r in the thread, dL/dM = dV W^T over c in the thread
              and over j across lanes; 2 warps, about 158 registers, 12 resident warps per SM.  Either
              way the matrix vote is 4 rank-1 updates V[4r + c] += M[4r + k] W[4k + c] (no tl.dot)
    grid      pass kernel (`em_pass_kernel`): (cdiv(B, BLOCK_B), n_chunks), a batch block x a chunk of
              children; final gradient (`em_grad_kernel`): (IW * position chunks, batch groups), a
              program owns one W row and loops over its positions and its group's batch blocks
    forward   T launches of em_pass_kernel (t = 0 FIRST: uniform R; then the E-step of t - 1 inline),
              each followed by the per-parent finish (kernels/routing/em_statistics.finish_m_step, torch
              on (B, J, H) statistics)
    backward  T - 1 launches of em_pass_kernel (BACKWARD, t = T-1 .. 1), each between the per-parent
              m_step_backward / e_step_backward (torch), then one launch of em_grad_kernel, plus
              sum_partials of the weight-gradient partials

Forward pass t (per sample; i children, j parents, h < H).  With the state of M-step t - 1 as
    shift_j = mu^{t-1}_j,  hiv_j = 1 / (2 var^{t-1}_j),  cq_j = logsigmoid(logit^{t-1}_j) - sum_h ln var^{t-1}_jh / 2
each child's   R_ij = softmax_j(cq_j - sum_h (V_ij - shift_j)^2 hiv_j)   (1/J at t = 0),  r_ij = R_ij a_i,
and the programs sum per parent  m = sum_i r,  S1 = sum_i r (V - shift),  S2 = sum_i r (V - shift)^2.
At t = 0 the shift is the vote of child 0 (every program recomputes it; chunk 0 stores it): summing
about a value near the mean avoids the cancellation of sum r V^2 - m mu^2.  Every chunk writes
its partials (n_chunks, B, J) and (n_chunks, 2, B, J, H) fp32; they are summed in chunk order
(deterministic) and finished in torch: mu, var, logit of M-step t.  Saved for the backward:
mu, var, logit, m of every t (statistics only).

Backward (kernels/routing/em_statistics.py holds the per-parent formulas).  M-step t gives
coefficients with dL/dr_ij = alpha_j + sum_h [beta_jh Vs + gamma_jh Vs^2] and a direct
dL/dV_ij = r_ij (beta_j + 2 gamma_j Vs), rewritten here about the E-step's centre shift^t = mu^{t-1}
(Vs = V - shift^t) rather than mu^t; t = 0 has no E-step and keeps shift^0 = mu^0.  The per-parent
algebra of the backward runs in float64 (m_step_backward's alpha is a difference of large terms).
For t >= 1 the E-step's g_ij = dL/dln q_ij = R_ij (dR_ij - sum_k R_ik dR_ik),
dR = a_i dL/dr, adds dL/dV_ij -= 2 g_ij Vs hiv_j and, summed over the children by one BACKWARD pass
(D0 = sum g, D1 = sum g Vs, D2 = sum g Vs^2), the gradients of state t - 1.  The final pass
(`em_grad_kernel`) recomputes V and every R^t and writes dL/dV (votes), dL/dpose or dL/du, the
weight-gradient partials (one per position chunk and batch group, registers over the samples) and
dL/da_i = sum_t sum_j R^t_ij dL/dr^t_ij.

All statistics are fp32; inputs may be fp32, fp16 or bf16 (no tl.dot anywhere: FMA loops), results
are cast to the input dtype.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._common import (
    autotune_cache_kwargs,
    autotune_configs,
    batch_bucket,
    cdiv,
    empty,
    next_pow2,
    on_device,
    target_programs,
)
from ..autotune_cache import ensure_tuned_configs_loaded
from ..partials import MAX_GROUPS, sum_partials
from .compile_cases import F32, I32
from .em_statistics import e_step_backward, finish_m_step, m_step_backward
from .streaming import sample_block
from .tiles import (
    dot_d,
    expand,
    lanes_per_sample,
    prediction_tile,
    softmax_j,
    softmax_j_grad,
    tile_dims,
    tile_offsets,
)

PASS_WARPS = 4       # warps of em_pass_kernel's default config: one sample per lane group
GRAD_WARPS = 2       # warps of em_grad_kernel's default config

# Autotune lists: the configs differ in num_warps only; the batch block follows from it (a heuristic:
# BLOCK_B = samples per warp of the tile * num_warps), so one list fits every tile width.  The first
# config is the hand-picked default (what runs before tuning, in the interpreter and under
# CAPSTRITON_SINGLE_CONFIG=1).  Registers per thread do not change with the warps (the tile per
# thread is the same); the compile check (COMPILE_CASES) covers every config at the MNIST and
# smallNORB class-layer shapes.
PASS_WARPS_LIST = (PASS_WARPS, 2)  # 8 warps: spills (fp16, J = 5, sm_90)
GRAD_WARPS_LIST = (GRAD_WARPS, 4)  # 1 warp: spills (J = 5, sm_80)
PASS_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in PASS_WARPS_LIST]
GRAD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in GRAD_WARPS_LIST]


def min_caps_per_chunk(H: int) -> int:
    """Children per pass program at least: the chunk partials (1 + 2H values per sample and parent)
    then hold at most B*I*J*H/4 elements, the bound of the other routings' scratch."""
    return cdiv(4 * (2 * H + 1), H)


# ----------------------------------------------------------------------------------------------
# votes
# ----------------------------------------------------------------------------------------------
@triton.jit
def vote_tile(src_ptr, W_ptr, b_offs, b_mask, i, I, jd, mask, zero_b, GH, GW, J: tl.constexpr, H: tl.constexpr,
              DIN: tl.constexpr, IW, FUSED: tl.constexpr, MATRIX: tl.constexpr, COORD: tl.constexpr,
              BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr, BLOCK_B: tl.constexpr):
    """V[b, i] (the module docstring's three sources) as an fp32 (BDH, BLOCK_B, BJ, BDL) tile, zero
    where masked."""
    if MATRIX:  # 4 rank-1 updates: V[4r + c] += M[b, 4r + k] W[j, 4k + c] (h = dh * BDL + dl, BDL a multiple of 4)
        if BDL == 4:  # a thread row is a matrix row: M[b, 4r + k] broadcast along c
            d = tl.arange(0, BDH)[:, None, None, None] * 4
        else:
            d = tl.arange(0, BDH)[:, None, None, None] * BDL + tl.arange(0, BDL)[None, None, None, :]
        m_row = src_ptr + (b_offs[None, :, None, None] * I + i) * 16 + (d // 4) * 4
        m_mask = b_mask[None, :, None, None] & (d < 16)
        jc = tl.arange(0, BJ)[None, None, :, None] * 16 + tl.arange(0, BDL)[None, None, None, :] % 4
        w_row = W_ptr + (i % IW) * (J * 16) + jc + zero_b
        w_mask = (jc < J * 16) & (zero_b == 0)
        V = tl.zeros((BDH, BLOCK_B, BJ, BDL), dtype=tl.float32)
        for k in tl.static_range(4):
            V += (tl.load(m_row + k, mask=m_mask, other=0.0).to(tl.float32)
                  * tl.load(w_row + k * 4, mask=w_mask, other=0.0).to(tl.float32))
        if COORD:  # (K2): child i = (h GW + w) IW + a
            pos = i // IW
            d = tl.arange(0, BDH)[:, None, None, None] * BDL + tl.arange(0, BDL)[None, None, None, :]
            V += tl.where(d == 3, ((pos // GW) + 0.5) / GH, 0.0) + tl.where(d == 7, ((pos % GW) + 0.5) / GW, 0.0)
        V = tl.where(mask, V, 0.0)
    else:
        V = prediction_tile(src_ptr, W_ptr, src_ptr, b_offs, b_mask, i, I, jd, mask, zero_b, FUSED, J, H, DIN)
    return V


@triton.jit
def _row_offsets(b_offs, J: tl.constexpr, BJ: tl.constexpr):
    """Offsets and mask of a (BLOCK_B, BJ) tile of a (B, J) tensor."""
    jj = tl.arange(0, BJ)[None, :]
    return b_offs[:, None] * J + jj, jj < J


# ----------------------------------------------------------------------------------------------
# streaming pass over the children: forward M-step sums, or the backward E-step sums
# ----------------------------------------------------------------------------------------------
def _batch_pruner(block):
    """early_config_prune: the default config, and the others whose batch block does not exceed the
    batch bucket (a larger block only idles lanes)."""
    def prune(configs, named_args, **kwargs):
        return [c for i, c in enumerate(configs) if i == 0 or block(kwargs, c.num_warps) <= kwargs["B_BUCKET"]]
    return prune


def _pass_block(args: dict, warps: int) -> int:
    return pass_samples_per_warp({"BJ": args["BJ"], "BDL": args["BDL"]}) * warps


def _grad_block(args: dict, warps: int) -> int:
    return lanes_per_sample(args["BJ"]) * warps


prune_em_pass_configs = _batch_pruner(_pass_block)
prune_em_grad_configs = _batch_pruner(_grad_block)


@triton.autotune(configs=autotune_configs(PASS_CONFIGS),
                 key=["B_BUCKET", "I", "J", "H", "DIN", "IW", "FUSED", "MATRIX", "COORD", "FIRST", "BACKWARD"],
                 prune_configs_by={"early_config_prune": prune_em_pass_configs}, **autotune_cache_kwargs())
@triton.heuristics({"BLOCK_B": lambda args: _pass_block(args, args["num_warps"])})
@triton.jit
def em_pass_kernel(
    src_ptr,          # votes (B, I, J, H) (not FUSED), poses (B, I, 16) (MATRIX) or u (B, I, DIN)
    W_ptr,            # MATRIX: (IW, J, 16), child i uses row i % IW; vector: (I, DIN, J, H); else unused
    act_ptr,          # (B, I) input activations a_i
    shift_ptr,        # (B, J, H) fp32: the shift of the sums, mu^{t-1}; FIRST: written by chunk 0 (child 0's votes)
    hiv_ptr,          # (B, J, H) fp32: 1 / (2 var^{t-1}) (not FIRST)
    cq_ptr,           # (B, J) fp32: logsigmoid(logit^{t-1}) - sum_h ln var^{t-1} / 2 (not FIRST)
    alpha_ptr,        # (B, J) fp32 BACKWARD: dL/dr coefficient of M-step t (constant), about the shift
    beta_ptr,         # (B, J, H) fp32 BACKWARD: ... (linear in V - shift)
    gamma_ptr,        # (B, J, H) fp32 BACKWARD: ... (quadratic in V - shift)
    part_w_ptr,       # (n_chunks, B, J) fp32 out: sum_i w_ij of the chunk (w = r forward, g = dL/dln q backward)
    part_s_ptr,       # (n_chunks, 2, B, J, H) fp32 out: sum_i w (V - shift), sum_i w (V - shift)^2
    B, I,             # batch, children
    caps_per_chunk,   # children per program along grid axis 1
    GH, GW,           # COORD: the children's grid (I = GH * GW * IW)
    J: tl.constexpr, H: tl.constexpr, DIN: tl.constexpr,  # parents, vote length, vector input length
    IW,               # MATRIX: rows of W (child i uses row i % IW); else I
    B_BUCKET,         # autotune key: batch_bucket(B) (unused by the code)
    FUSED: tl.constexpr,       # votes recomputed from src and W (else read)
    MATRIX: tl.constexpr,      # matrix votes V = M @ W (else vector)
    COORD: tl.constexpr,       # coordinate addition (MATRIX)
    FIRST: tl.constexpr,       # forward t = 0: uniform R, shift = child 0's votes
    BACKWARD: tl.constexpr,    # sum g = dL/dln q (the E-step of iteration t, t >= 1) instead of r
    BLOCK_B: tl.constexpr,     # samples per program: pass_samples_per_warp * num_warps (heuristic)
    BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,  # tile widths (tiles.tile_dims)
):
    b_offs, b_mask, jd, _, bjd, mask, zero_b = sample_block(B, J, H, BLOCK_B, BJ, BDH, BDL)
    chunk = tl.program_id(1)
    row, row_mask = _row_offsets(b_offs, J, BJ)
    row_mask = row_mask & b_mask[:, None]
    if FIRST:
        shift = vote_tile(src_ptr, W_ptr, b_offs, b_mask, 0, I, jd, mask, zero_b, GH, GW, J, H, DIN, IW, FUSED,
                          MATRIX, COORD, BJ, BDH, BDL, BLOCK_B)
        if chunk == 0:
            tl.store(shift_ptr + bjd, shift, mask=mask)
        hiv = shift * 0.0
        cq = tl.zeros((BLOCK_B, BJ), dtype=tl.float32)
    else:
        shift = tl.load(shift_ptr + bjd, mask=mask, other=0.0)
        hiv = tl.load(hiv_ptr + bjd, mask=mask, other=0.0)
        cq = tl.load(cq_ptr + row, mask=row_mask, other=0.0)
    if BACKWARD:
        alpha = tl.load(alpha_ptr + row, mask=row_mask, other=0.0)
        beta = tl.load(beta_ptr + bjd, mask=mask, other=0.0)
        gamma = tl.load(gamma_ptr + bjd, mask=mask, other=0.0)
    acc0 = tl.zeros((BLOCK_B, BJ), dtype=tl.float32)
    acc1 = tl.zeros((BDH, BLOCK_B, BJ, BDL), dtype=tl.float32)
    acc2 = tl.zeros((BDH, BLOCK_B, BJ, BDL), dtype=tl.float32)
    i_start = chunk * caps_per_chunk
    for i in range(i_start, tl.minimum(i_start + caps_per_chunk, I)):
        Vs = vote_tile(src_ptr, W_ptr, b_offs, b_mask, i, I, jd, mask, zero_b, GH, GW, J, H, DIN, IW, FUSED, MATRIX,
                       COORD, BJ, BDH, BDL, BLOCK_B) - shift
        a = tl.load(act_ptr + b_offs * I + i, mask=b_mask, other=0.0).to(tl.float32)[:, None]
        if FIRST:
            R = tl.where(tl.arange(0, BJ)[None, :] < J, 1.0 / J, 0.0) + cq
        else:
            R = softmax_j(cq - dot_d(Vs * Vs, hiv), J, BJ)
        if BACKWARD:
            dr = alpha + dot_d(beta + gamma * Vs, Vs)
            w = softmax_j_grad(R, dr * a)
        else:
            w = R * a
        acc0 += w
        wv = expand(w) * Vs
        acc1 += wv
        acc2 += wv * Vs
    tl.store(part_w_ptr + chunk * (B * J) + row, acc0, mask=row_mask)
    stride = B * (J * H)
    out = part_s_ptr + chunk.to(tl.int64) * (2 * stride) + bjd
    tl.store(out, acc1, mask=mask)
    tl.store(out + stride, acc2, mask=mask)


# ----------------------------------------------------------------------------------------------
# final backward pass: dL/dV -> dL/dsrc, dL/dW partials, dL/da
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=autotune_configs(GRAD_CONFIGS),
                 key=["B_BUCKET", "I", "J", "H", "DIN", "IW", "FUSED", "MATRIX", "COORD", "NEED_SRC", "NEED_W",
                      "NEED_ACT"],
                 prune_configs_by={"early_config_prune": prune_em_grad_configs}, **autotune_cache_kwargs())
@triton.heuristics({"BLOCK_B": lambda args: _grad_block(args, args["num_warps"])})
@triton.jit
def em_grad_kernel(
    src_ptr,          # as em_pass_kernel
    W_ptr,            # as em_pass_kernel
    act_ptr,          # (B, I) input activations
    shift_ptr,        # (T, B, J, H) fp32: shift^t (t = 0: child 0's votes; then mu^{t-1})
    hiv_ptr,          # (T, B, J, H) fp32: 1 / (2 var^{t-1}); entry 0 zeros (uniform R^0, no E-step term)
    cq_ptr,           # (T, B, J) fp32: logsigmoid(logit^{t-1}) - sum_h ln var^{t-1} / 2; entry 0 zeros
    alpha_ptr,        # (T, B, J) fp32: dL/dr coefficients of every M-step, about shift^t
    beta_ptr,         # (T, B, J, H) fp32
    gamma_ptr,        # (T, B, J, H) fp32
    grad_src_ptr,     # out, input dtype (NEED_SRC): dL/dvotes (B, I, J, H), dL/dpose (B, I, 16) or dL/du (B, I, DIN)
    grad_W_ptr,       # fp32 out (NEED_W, FUSED): per (batch group, position chunk) partials, (n_parts, IW, J, 16)
                      #   (MATRIX) or (n_parts, I, DIN, J, H); part = group * position chunks + chunk
    grad_act_ptr,     # (B, I) out, input dtype (NEED_ACT): dL/da
    B, I,             # batch, children
    iterations,       # T
    pos_per_chunk,    # positions (children i = p * IW + row) per program
    n_groups,         # batch groups along grid axis 1; group g takes batch blocks g, g + n_groups, ...
    GH, GW,           # COORD: the children's grid
    J: tl.constexpr, H: tl.constexpr, DIN: tl.constexpr, BDIN: tl.constexpr,  # BDIN: next power of two >= DIN
    IW,               # rows of W for MATRIX (else I): grid axis 0 is IW * position chunks
    B_BUCKET,         # autotune key: batch_bucket(B) (unused by the code)
    FUSED: tl.constexpr, MATRIX: tl.constexpr, COORD: tl.constexpr,  # as em_pass_kernel
    NEED_SRC: tl.constexpr, NEED_W: tl.constexpr, NEED_ACT: tl.constexpr,  # which gradients to write
    BLOCK_B: tl.constexpr,     # samples per block: lanes_per_sample(BJ) * num_warps (heuristic)
    BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,  # tile widths
):
    wrow = tl.program_id(0) % IW
    pchunk = tl.program_id(0) // IW
    group = tl.program_id(1)
    n_pos = I // IW
    n_blocks = tl.cdiv(B, BLOCK_B)
    lanes = tl.arange(0, BLOCK_B).to(tl.int64)
    stride = B * (J * H)
    if MATRIX:  # dL/dW[wrow, j, 4k + c] per sample lane, one accumulator per k
        gw0 = tl.zeros((BLOCK_B, BJ, BDL), dtype=tl.float32)
        gw1 = gw0
        gw2 = gw0
        gw3 = gw0
    else:
        gw = tl.zeros((BDIN, BDH, BLOCK_B, BJ, BDL), dtype=tl.float32)
    p_start = pchunk * pos_per_chunk
    for p in range(p_start, tl.minimum(p_start + pos_per_chunk, n_pos)):
        i = p * IW + wrow
        for blk in range(group, n_blocks, n_groups):
            b_offs = blk * BLOCK_B + lanes
            b_mask = b_offs < B
            jd, _, bjd, mask, zero_b = tile_offsets(b_offs, B, J, H, BJ, BDH, BDL)
            row, row_mask = _row_offsets(b_offs, J, BJ)
            row_mask = row_mask & b_mask[:, None]
            V = vote_tile(src_ptr, W_ptr, b_offs, b_mask, i, I, jd, mask, zero_b, GH, GW, J, H, DIN, IW, FUSED,
                          MATRIX, COORD, BJ, BDH, BDL, BLOCK_B)
            a = tl.load(act_ptr + b_offs * I + i, mask=b_mask, other=0.0).to(tl.float32)[:, None]
            dV = V * 0.0
            da = tl.zeros((BLOCK_B, BJ), dtype=tl.float32)
            for t in range(iterations):
                t_off = t * stride
                Vs = V - tl.load(shift_ptr + t_off + bjd, mask=mask, other=0.0)
                hiv = tl.load(hiv_ptr + t_off + bjd, mask=mask, other=0.0)
                R = softmax_j(tl.load(cq_ptr + t * (B * J) + row, mask=row_mask, other=0.0) - dot_d(Vs * Vs, hiv),
                              J, BJ)
                beta = tl.load(beta_ptr + t_off + bjd, mask=mask, other=0.0)
                gamma = tl.load(gamma_ptr + t_off + bjd, mask=mask, other=0.0)
                dr = tl.load(alpha_ptr + t * (B * J) + row, mask=row_mask, other=0.0) + dot_d(beta + gamma * Vs, Vs)
                da += dr * R
                g = softmax_j_grad(R, dr * a)  # dL/dln q (zero effect at t = 0: hiv = 0)
                dV += expand(R * a) * (beta + 2.0 * gamma * Vs) - expand(2.0 * g) * Vs * hiv
            if NEED_ACT:
                tl.store(grad_act_ptr + b_offs * I + i, tl.sum(da, axis=1).to(grad_act_ptr.dtype.element_ty),
                         mask=b_mask)
            if not FUSED:
                if NEED_SRC:
                    offs = (b_offs * I + i)[None, :, None, None] * (J * H) + jd
                    tl.store(grad_src_ptr + offs, dV.to(grad_src_ptr.dtype.element_ty), mask=mask)
            elif MATRIX:
                if NEED_SRC:  # dL/dM[b, 4r + k] = sum_jc dV[r, b, j, c] W[j, 4k + c]
                    jc = tl.arange(0, BJ)[None, None, :, None] * 16 + tl.arange(0, BDL)[None, None, None, :]
                    w_row = W_ptr + wrow * (J * 16) + jc + zero_b
                    w_mask = (jc < J * 16) & (zero_b == 0)
                    rr = tl.arange(0, BDH)[:, None]
                    g_row = grad_src_ptr + (b_offs[None, :] * I + i) * 16 + rr * 4  # (BDH r, BLOCK_B)
                    g_mask = b_mask[None, :] & (rr < 4)
                    for k in tl.static_range(4):
                        w_k = tl.load(w_row + k * 4, mask=w_mask, other=0.0).to(tl.float32)
                        tl.store(g_row + k, tl.sum(tl.sum(dV * w_k, axis=3), axis=2).to(grad_src_ptr.dtype.element_ty),
                                 mask=g_mask)
                if NEED_W:  # dL/dW[j, 4k + c] += sum_r M[b, 4r + k] dV[r, b, j, c]
                    rr4 = tl.arange(0, BDH)[:, None, None, None]
                    m_row = src_ptr + (b_offs[None, :, None, None] * I + i) * 16 + rr4 * 4
                    m_mask = b_mask[None, :, None, None] & (rr4 < 4)
                    gw0 += tl.sum(tl.load(m_row, mask=m_mask, other=0.0).to(tl.float32) * dV, axis=0)
                    gw1 += tl.sum(tl.load(m_row + 1, mask=m_mask, other=0.0).to(tl.float32) * dV, axis=0)
                    gw2 += tl.sum(tl.load(m_row + 2, mask=m_mask, other=0.0).to(tl.float32) * dV, axis=0)
                    gw3 += tl.sum(tl.load(m_row + 3, mask=m_mask, other=0.0).to(tl.float32) * dV, axis=0)
            else:
                u_rows = (b_offs * I + i) * DIN
                if NEED_SRC:
                    w_row = W_ptr + i * (DIN * J * H)
                    for k in range(DIN):  # dL/du[b, i, k] = sum_jh dV W[i, k, j, h]
                        w_k = tl.load(w_row + k * (J * H) + jd + zero_b, mask=mask, other=0.0).to(tl.float32)
                        tl.store(grad_src_ptr + u_rows + k, tl.sum(dot_d(dV, w_k), axis=1)
                                 .to(grad_src_ptr.dtype.element_ty), mask=b_mask)
                if NEED_W:  # dL/dW[i, k, j, h] += u[b, i, k] dV[b, j, h]
                    k_offs = tl.arange(0, BDIN)
                    u_blk = tl.load(src_ptr + u_rows[None, :] + k_offs[:, None],
                                    mask=b_mask[None, :] & (k_offs[:, None] < DIN), other=0.0)
                    gw += dV[None, :, :, :, :] * u_blk.to(tl.float32)[:, None, :, None, None]
    if FUSED:
        if NEED_W:  # this program's part of dL/dW[wrow]: reduce over the sample lanes, one store
            part = (group * tl.cdiv(n_pos, pos_per_chunk) + pchunk).to(tl.int64)
            if MATRIX:
                jc = tl.arange(0, BJ)[:, None] * 16 + tl.arange(0, BDL)[None, :]
                out = grad_W_ptr + (part * IW + wrow) * (J * 16) + jc
                ok = jc < J * 16
                tl.store(out, tl.sum(gw0, axis=0), mask=ok)
                tl.store(out + 4, tl.sum(gw1, axis=0), mask=ok)
                tl.store(out + 8, tl.sum(gw2, axis=0), mask=ok)
                tl.store(out + 12, tl.sum(gw3, axis=0), mask=ok)
            else:  # IW = I: one position, the W row of child wrow
                _store_vector_weight_grad(grad_W_ptr, gw, part, wrow, I, J, H, DIN, BDIN, BJ, BDH, BDL)


@triton.jit
def _store_vector_weight_grad(grad_W_ptr, gw, part, i, I, J: tl.constexpr, H: tl.constexpr, DIN: tl.constexpr,
                              BDIN: tl.constexpr, BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr):
    """dL/dW[i, k, j, h] of a batch group (vector votes; part: the group): gw reduced over the sample lanes."""
    k5 = tl.arange(0, BDIN)[:, None, None, None]
    dh = tl.arange(0, BDH)[None, :, None, None]
    jj = tl.arange(0, BJ)[None, None, :, None]
    dl = tl.arange(0, BDL)[None, None, None, :]
    d = dh * BDL + dl
    offs = ((part * I + i) * DIN + k5) * (J * H) + jj * H + d
    tl.store(grad_W_ptr + offs, tl.sum(gw, axis=2), mask=(jj < J) & (d < H) & (k5 < DIN))


@triton.jit
def em_assignments_kernel(
    src_ptr, W_ptr,   # as em_pass_kernel
    shift_ptr,        # (B, J, H) fp32: mu^{T-2}
    hiv_ptr,          # (B, J, H) fp32: 1 / (2 var^{T-2})
    cq_ptr,           # (B, J) fp32
    R_ptr,            # (B, I, J) out, input dtype: the assignments the last M-step used
    B, I, caps_per_chunk, GH, GW,
    IW,               # as em_pass_kernel
    J: tl.constexpr, H: tl.constexpr, DIN: tl.constexpr, FUSED: tl.constexpr,
    MATRIX: tl.constexpr, COORD: tl.constexpr, BLOCK_B: tl.constexpr, BJ: tl.constexpr, BDH: tl.constexpr,
    BDL: tl.constexpr,
):
    b_offs, b_mask, jd, _, bjd, mask, zero_b = sample_block(B, J, H, BLOCK_B, BJ, BDH, BDL)
    row, row_mask = _row_offsets(b_offs, J, BJ)
    row_mask = row_mask & b_mask[:, None]
    shift = tl.load(shift_ptr + bjd, mask=mask, other=0.0)
    hiv = tl.load(hiv_ptr + bjd, mask=mask, other=0.0)
    cq = tl.load(cq_ptr + row, mask=row_mask, other=0.0)
    jj = tl.arange(0, BJ)[None, :]
    i_start = tl.program_id(1) * caps_per_chunk
    for i in range(i_start, tl.minimum(i_start + caps_per_chunk, I)):
        Vs = vote_tile(src_ptr, W_ptr, b_offs, b_mask, i, I, jd, mask, zero_b, GH, GW, J, H, DIN, IW, FUSED, MATRIX,
                       COORD, BJ, BDH, BDL, BLOCK_B) - shift
        R = softmax_j(cq - dot_d(Vs * Vs, hiv), J, BJ)
        tl.store(R_ptr + (b_offs[:, None] * I + i) * J + jj, R.to(R_ptr.dtype.element_ty), mask=row_mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
class Source(NamedTuple):
    """Where the votes come from (the kernels' constexprs and grid sizes)."""
    B: int
    I: int
    J: int
    H: int
    DIN: int
    IW: int
    FUSED: bool
    MATRIX: bool
    COORD: bool
    GH: int
    GW: int

    def constexprs(self) -> dict:
        return dict(J=self.J, H=self.H, DIN=self.DIN, FUSED=self.FUSED, MATRIX=self.MATRIX,
                    COORD=self.COORD)


def source(src: torch.Tensor, W: torch.Tensor | None, matrix: bool, coord: bool = False,
           grid: tuple = (1, 1)) -> Source:
    """votes (B, I, J, H) with W None; pose (B, I, 16) with W (IW, J, 16) (matrix); u (B, I, DIN) with
    W (I, DIN, J, H) (vector).  grid: (GH, GW) of the children for the coordinate addition."""
    if W is None:
        B, I, J, H = src.shape
        return Source(B, I, J, H, 1, I, False, False, False, 1, 1)
    if matrix:
        B, I, _ = src.shape
        return Source(B, I, W.shape[1], 16, 4, W.shape[0], True, True, bool(coord), int(grid[0]), int(grid[1]))
    B, I, DIN = src.shape
    return Source(B, I, W.shape[2], W.shape[3], DIN, I, True, False, False, 1, 1)


class Plan(NamedTuple):
    dims: dict          # tile widths BJ, BDH, BDL of the gradient kernel
    pass_dims: dict     # tile widths of the pass kernels (pass_dims)
    pass_block: int     # BLOCK_B of the pass kernels' default config (sets n_chunks; the launch takes the config's)
    n_chunks: int       # child chunks of a pass
    caps_per_chunk: int
    grad_block: int     # BLOCK_B of the gradient kernel's default config (sets n_groups)
    n_groups: int       # batch groups of the gradient kernel
    pos_chunks: int     # position chunks per W row of the gradient kernel
    pos_per_chunk: int


def pass_dims(J: int, H: int) -> dict:
    """Tile widths of the pass kernels: tiles.tile_dims, with an H-vector split over two lanes (BDL = 8)
    when H = 16 and BJ <= 16, so that a thread holds 8 values per tile (fewer registers, more
    resident warps; dot products over h take one shuffle)."""
    dims = tile_dims(J, H)
    if H == 16 and dims["BJ"] <= 16:
        return {"BJ": dims["BJ"], "BDH": 2, "BDL": 8}
    return dims


def pass_samples_per_warp(dims: dict) -> int:
    """Samples per warp of a pass tile: one per lane group of BJ x (BDL / 4) lanes."""
    return max(1, 32 // (dims["BJ"] * max(1, dims["BDL"] // 4)))


@functools.lru_cache(maxsize=1024)
def plan(B: int, I: int, J: int, H: int, IW: int, target: int) -> Plan:
    """Grid sizes: pass programs (batch blocks x child chunks of >= min_caps_per_chunk(H) children) and
    gradient programs (W rows x position chunks x batch groups, at most MAX_GROUPS) near ``target``."""
    dims = tile_dims(J, H)
    lanes = lanes_per_sample(dims["BJ"])
    pdims = pass_dims(J, H)
    pass_block = pass_samples_per_warp(pdims) * PASS_WARPS
    n_chunks = max(1, min(cdiv(I, min_caps_per_chunk(H)), cdiv(target, cdiv(B, pass_block))))
    caps = cdiv(I, n_chunks)
    grad_block = lanes * GRAD_WARPS
    n_pos = I // IW
    n_groups = max(1, min(MAX_GROUPS, cdiv(B, grad_block), cdiv(target, IW)))
    pos_chunks = max(1, min(n_pos, cdiv(target, IW * n_groups)))
    pos_per = cdiv(n_pos, pos_chunks)
    return Plan(dims, pdims, pass_block, cdiv(I, caps), caps, grad_block, n_groups, cdiv(n_pos, pos_per), pos_per)


def _plan(s: Source, device) -> Plan:
    return plan(s.B, s.I, s.J, s.H, s.IW, target_programs(device))


def _pass(s: Source, p: Plan, src, W, act, shift, hiv, cq, coef, first: bool):
    """One em_pass_kernel launch -> the chunk-summed (w (B, J), S1 (B, J, H), S2 (B, J, H)) fp32."""
    dev = src.device
    part_w = empty(p.n_chunks, s.B, s.J, dtype=torch.float32, device=dev)
    part_s = empty(p.n_chunks, 2, s.B, s.J, s.H, dtype=torch.float32, device=dev)
    alpha, beta, gamma = coef if coef is not None else (shift, shift, shift)
    ensure_tuned_configs_loaded()
    em_pass_kernel[lambda meta: (cdiv(s.B, meta["BLOCK_B"]), p.n_chunks)](
        src_ptr=src, W_ptr=W if W is not None else src, act_ptr=act, shift_ptr=shift,
        hiv_ptr=hiv if hiv is not None else shift, cq_ptr=cq if cq is not None else shift, alpha_ptr=alpha,
        beta_ptr=beta, gamma_ptr=gamma, part_w_ptr=part_w, part_s_ptr=part_s, B=s.B, I=s.I,
        caps_per_chunk=p.caps_per_chunk, GH=s.GH, GW=s.GW, IW=s.IW, **s.constexprs(), FIRST=first,
        B_BUCKET=batch_bucket(s.B), BACKWARD=coef is not None, **p.pass_dims)
    if p.n_chunks == 1:
        return part_w[0], part_s[0, 0], part_s[0, 1]
    total_s = part_s.sum(0)  # chunk order: torch's reduction over a leading dim is deterministic
    return part_w.sum(0), total_s[0], total_s[1]


def _e_state(var: torch.Tensor, logit: torch.Tensor):
    """(1 / (2 var), logsigmoid(logit) - sum_h ln var / 2): what the E-step reads."""
    return 0.5 / var, F.logsigmoid(logit) - 0.5 * torch.log(var).sum(-1)


def em_forward(src, W, act, beta_u, beta_a, lams: list[float], scale: float, eps: float, min_var: float,
               matrix: bool, coord: bool = False, grid: tuple = (1, 1)):
    """Fused EM routing forward (contiguous inputs; see ``source`` for src and W) ->
    (poses (B, J, H), activations (B, J) in src's dtype, mu_all, var_all (T, B, J, H), logit_all,
    m_all (T, B, J), shift0 (B, J, H) fp32)."""
    with on_device(src):
        s = source(src, W, matrix, coord, grid)
        p = _plan(s, src.device)
        T = len(lams)
        dev = src.device
        bu, ba = beta_u.float(), beta_a.float()
        mu_all = empty(T, s.B, s.J, s.H, dtype=torch.float32, device=dev)
        var_all = empty(T, s.B, s.J, s.H, dtype=torch.float32, device=dev)
        logit_all = empty(T, s.B, s.J, dtype=torch.float32, device=dev)
        m_all = empty(T, s.B, s.J, dtype=torch.float32, device=dev)
        shift0 = empty(s.B, s.J, s.H, dtype=torch.float32, device=dev)
        hiv = cq = None
        for t in range(T):
            shift = shift0 if t == 0 else mu_all[t - 1]
            m, s1, s2 = _pass(s, p, src, W, act, shift, hiv, cq, None, first=t == 0)
            mu, var, logit = finish_m_step(m, s1, s2, shift, bu, ba, lams[t], scale, eps, min_var)
            mu_all[t], var_all[t], logit_all[t], m_all[t] = mu, var, logit, m
            hiv, cq = _e_state(var, logit)
        return (mu_all[-1].to(src.dtype, copy=True), torch.sigmoid(logit_all[-1]).to(src.dtype), mu_all, var_all,
                logit_all, m_all, shift0)


def em_assignments(src, W, mu_prev, var_prev, logit_prev, matrix: bool, coord: bool = False,
                   grid: tuple = (1, 1)) -> torch.Tensor:
    """R (B, I, J) in src's dtype formed by the E-step from the state (mu, var, logit) of an M-step
    (None: the uniform first assignments 1/J)."""
    s = source(src, W, matrix, coord, grid)
    if mu_prev is None:
        return torch.full((s.B, s.I, s.J), 1.0 / s.J, dtype=src.dtype, device=src.device)
    with on_device(src):
        p = _plan(s, src.device)
        hiv, cq = _e_state(var_prev, logit_prev)
        R = empty(s.B, s.I, s.J, dtype=src.dtype, device=src.device)
        em_assignments_kernel[(cdiv(s.B, p.pass_block), p.n_chunks)](
            src_ptr=src, W_ptr=W if W is not None else src, shift_ptr=mu_prev.contiguous(), hiv_ptr=hiv.contiguous(),
            cq_ptr=cq.contiguous(), R_ptr=R, B=s.B, I=s.I, caps_per_chunk=p.caps_per_chunk, GH=s.GH, GW=s.GW,
            IW=s.IW, **s.constexprs(), BLOCK_B=p.pass_block, num_warps=PASS_WARPS, num_stages=1, **p.pass_dims)
        return R


def _about_shift(alpha, beta, gamma, mu, shift):
    """Coefficients about Vc = V - mu rewritten about Vs = V - shift (Vc = Vs - delta)."""
    delta = mu - shift
    return (alpha + (gamma * delta.square() - beta * delta).sum(-1), beta - 2.0 * gamma * delta, gamma)


def em_backward(src, W, act, beta_u, lams: list[float], scale: float, eps: float, min_var: float, mu_all, var_all,
                logit_all, m_all, shift0, grad_poses, grad_acts, matrix: bool, coord: bool = False,
                grid: tuple = (1, 1), need_src: bool = True, need_W: bool = True, need_act: bool = True):
    """(dL/dsrc or None, dL/dW or None, dL/dact or None, dL/dbeta_u, dL/dbeta_a) of em_forward, the
    votes recomputed (contiguous inputs; grad_poses (B, J, H), grad_acts (B, J))."""
    with on_device(src):
        s = source(src, W, matrix, coord, grid)
        p = _plan(s, src.device)
        T = len(lams)
        dev = src.device
        # the per-parent backward algebra runs in float64: m_step_backward's alpha is a sum of terms
        # that cancel (|g_mu . mu| against a small dL/dr), and so is the shift rewrite
        f64 = torch.float64
        bu = beta_u.to(f64)
        mu_all, var_all, logit_all, m_all = (x.to(f64) for x in (mu_all, var_all, logit_all, m_all))
        # shift^t of the backward passes: mu^{t-1} (the E-step's centre) for t >= 1; t = 0 has no E-step,
        # so its coefficients stay about mu^0 (shift0 of the forward is not needed)
        shift_all = torch.cat([mu_all[:1], mu_all[:-1]])
        shift32 = shift_all.float()
        hiv_all = torch.zeros(T, s.B, s.J, s.H, dtype=torch.float32, device=dev)
        cq_all = torch.zeros(T, s.B, s.J, dtype=torch.float32, device=dev)
        if T > 1:
            hiv_all[1:], cq_all[1:] = _e_state(var_all[:-1], logit_all[:-1])
        alpha_all = empty(T, s.B, s.J, dtype=torch.float32, device=dev)
        beta_all = empty(T, s.B, s.J, s.H, dtype=torch.float32, device=dev)
        gamma_all = empty(T, s.B, s.J, s.H, dtype=torch.float32, device=dev)
        a_out = torch.sigmoid(logit_all[-1])
        g_mu = grad_poses.to(f64)
        g_var = torch.zeros_like(g_mu)
        g_logit = grad_acts.to(f64) * a_out * (1 - a_out)
        g_bu = torch.zeros(s.J, dtype=f64, device=dev)
        g_ba = torch.zeros(s.J, dtype=f64, device=dev)
        for t in range(T - 1, -1, -1):
            alpha, beta, gamma, gbu, gba = m_step_backward(mu_all[t], var_all[t], m_all[t], g_mu, g_var, g_logit, bu,
                                                           lams[t], scale, eps, min_var)
            g_bu += gbu.sum(0)
            g_ba += gba.sum(0)
            alpha_all[t], beta_all[t], gamma_all[t] = _about_shift(alpha, beta, gamma, mu_all[t], shift_all[t])
            if t >= 1:
                D0, D1, D2 = _pass(s, p, src, W, act, shift32[t], hiv_all[t], cq_all[t],
                                   (alpha_all[t], beta_all[t], gamma_all[t]), first=False)
                g_mu, g_var, g_logit = e_step_backward(D0.to(f64), D1.to(f64), D2.to(f64), var_all[t - 1],
                                                       logit_all[t - 1])
        grad_src, grad_W, grad_act = _final_grad(s, p, src, W, act, shift32, hiv_all, cq_all, alpha_all, beta_all,
                                                 gamma_all, T, need_src, need_W and W is not None, need_act)
        return grad_src, grad_W, grad_act, g_bu.to(beta_u.dtype), g_ba.to(beta_u.dtype)


def _final_grad(s: Source, p: Plan, src, W, act, shift_all, hiv_all, cq_all, alpha_all, beta_all, gamma_all, T: int,
                need_src: bool, need_W: bool, need_act: bool):
    dev, dtype = src.device, src.dtype
    grad_src = empty(*src.shape, dtype=dtype, device=dev) if need_src else src
    grad_act = empty(*act.shape, dtype=act.dtype, device=dev) if need_act else act
    if need_W:
        parts = p.n_groups * p.pos_chunks
        grad_W = empty(parts, *W.shape, dtype=torch.float32, device=dev)
    else:
        grad_W = shift_all
    ensure_tuned_configs_loaded()
    em_grad_kernel[(s.IW * p.pos_chunks, p.n_groups)](
        src_ptr=src, W_ptr=W if W is not None else src, act_ptr=act, shift_ptr=shift_all, hiv_ptr=hiv_all,
        cq_ptr=cq_all, alpha_ptr=alpha_all, beta_ptr=beta_all, gamma_ptr=gamma_all, grad_src_ptr=grad_src,
        grad_W_ptr=grad_W, grad_act_ptr=grad_act, B=s.B, I=s.I, iterations=T, pos_per_chunk=p.pos_per_chunk,
        n_groups=p.n_groups, GH=s.GH, GW=s.GW, IW=s.IW, **s.constexprs(), BDIN=next_pow2(s.DIN), NEED_SRC=need_src,
        NEED_W=need_W, NEED_ACT=need_act, B_BUCKET=batch_bucket(s.B), **p.dims)
    if need_W:
        grad_W = sum_partials(grad_W, W.dtype)
    return (grad_src if need_src else None), (grad_W if need_W else None), (grad_act if need_act else None)


# ----------------------------------------------------------------------------------------------
# compile-check cases: MNIST (J = 10) and smallNORB (J = 5) class layers, I = 4*4*32 = 512 (A = 32),
# plain FC (IW = I) and class capsules (IW = A, coordinate addition), fp32 and fp16
# ----------------------------------------------------------------------------------------------
def _compile_cases() -> list[dict]:
    """Every config of the autotune lists (PASS_CONFIGS, GRAD_CONFIGS; default = the first); the
    assignments kernel at its single config."""
    cases = []
    for J in (10, 5):
        dims, pdims = tile_dims(J, 16), pass_dims(J, 16)
        spw = pass_samples_per_warp(pdims)
        for dtype in ("fp32", "fp16"):
            src = f"*{dtype}"
            for what, coord in (("fc", False), ("class", True)):
                tag = f"{dtype},J={J},{what}"
                base = dict(J=J, H=16, DIN=4, FUSED=True, MATRIX=True, COORD=coord)
                pass_sig = {"src_ptr": src, "W_ptr": src, "act_ptr": src, "shift_ptr": F32, "hiv_ptr": F32,
                            "cq_ptr": F32, "alpha_ptr": F32, "beta_ptr": F32, "gamma_ptr": F32, "part_w_ptr": F32,
                            "part_s_ptr": F32, "B": I32, "I": I32, "caps_per_chunk": I32, "GH": I32, "GW": I32,
                            "IW": I32, "B_BUCKET": I32}
                for flags in (dict(FIRST=True, BACKWARD=False), dict(FIRST=False, BACKWARD=False),
                              dict(FIRST=False, BACKWARD=True)):
                    label = "first" if flags["FIRST"] else ("backward" if flags["BACKWARD"] else "forward")
                    for n, cfg in enumerate(PASS_CONFIGS):
                        cases.append(dict(name=f"em_pass[{tag},{label}]", fn=em_pass_kernel.fn.fn, signature=pass_sig,
                                          constexprs={**base, **pdims, **flags, "BLOCK_B": spw * cfg.num_warps},
                                          num_warps=cfg.num_warps, num_stages=1, default=n == 0))
                grad_sig = {"src_ptr": src, "W_ptr": src, "act_ptr": src, "shift_ptr": F32, "hiv_ptr": F32,
                            "cq_ptr": F32, "alpha_ptr": F32, "beta_ptr": F32, "gamma_ptr": F32, "grad_src_ptr": src,
                            "grad_W_ptr": F32, "grad_act_ptr": src, "B": I32, "I": I32, "iterations": I32,
                            "pos_per_chunk": I32, "n_groups": I32, "GH": I32, "GW": I32, "IW": I32, "B_BUCKET": I32}
                for n, cfg in enumerate(GRAD_CONFIGS):
                    cases.append(dict(name=f"em_grad[{tag}]", fn=em_grad_kernel.fn.fn, signature=grad_sig,
                                      constexprs={**base, **dims, "BDIN": 4, "NEED_SRC": True, "NEED_W": True,
                                                  "NEED_ACT": True,
                                                  "BLOCK_B": lanes_per_sample(dims["BJ"]) * cfg.num_warps},
                                      num_warps=cfg.num_warps, num_stages=1, default=n == 0))
                assign_sig = {"src_ptr": src, "W_ptr": src, "shift_ptr": F32, "hiv_ptr": F32, "cq_ptr": F32,
                              "R_ptr": src, "B": I32, "I": I32, "caps_per_chunk": I32, "GH": I32, "GW": I32,
                              "IW": I32}
                cases.append(dict(name=f"em_assignments[{tag}]", fn=em_assignments_kernel, signature=assign_sig,
                                  constexprs={**base, **pdims, "BLOCK_B": spw * PASS_WARPS}, num_warps=PASS_WARPS,
                                  num_stages=1, default=True))
    return cases


COMPILE_CASES = _compile_cases()
