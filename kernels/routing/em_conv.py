"""Fused convolutional EM routing kernels (Hinton, Sabour & Frosst 2018; spec section 4, C1-C5).

Inputs: pose (B, H, W, A, 16) (4x4 matrices row-major), W (K, K, A, C, 16), activations (B, H, W, A),
stride s, VALID windows: OH = (H - K) // s + 1.  The vote of child (h, w, a) for parent (oh, ow, c),
with h = oh*s + kh and w = ow*s + kw (0 <= kh, kw < K), is

    V[r, cc] = sum_k pose[b, h, w, a, 4r + k] W[kh, kw, a, c, 4k + cc]

and is RECOMPUTED in every pass: neither the votes (B, OH, OW, K, K, A, C, 16) nor the assignments R
ever exist in memory (R only when the caller asks for it, `return_assignments`).  Every child is
normalised over ALL the parents it feeds, across positions and types (C5):
R_ij = exp(ln q_ij - logZ_i), logZ_i = logsumexp over the <= ceil(K/s)^2 * C parents of child i,
ln q_ij = logsigmoid(logit_j) - sum_h [(V - mu_j)^2 / (2 var_j) + ln var_j / 2] (the constant
8 ln 2pi cancels).  Children that no window covers feed no parent: they take no part (R = 0).

VOTES mode (constexpr VOTES, ``conv_em_routing`` on given votes): the child and parent kernels read
the votes (B, OH, OW, K, K, A, C, 16) instead of recomputing them, and the final child pass writes
dL/dvotes pair by pair instead of contracting it with W (no weight-gradient pass).

Tile layout: every kernel works on (BA, BC, 4, 4) tiles = (child types a, parent types c, vote row r,
vote column cc) of one (child position, parent position) pair: a block of BA child types at one
child position against all C parent types (BC = next_pow2(C)) of one parent position.  The pose
rows (BA, 1, 4, 1) and the W columns (BA, BC, 1, 4) broadcast into 4 rank-1 updates over k.
Per-parent statistics (mu, 1/var: (1, BC, 4, 4); scalars (1, BC)) broadcast over a, per-child
scalars (BA, 1) over c.  All arithmetic is fp32; inputs may be fp32, fp16 or bf16.

Three kernels, each a loop over (child, parent position) pairs with a different owner:
    em_conv_child_kernel   grid (B*H*W, cdiv(A, BA)): one child position x a child-type block; loops
                           over the parent positions covering it (runtime bounds, <= ceil(K/s)^2)
        MODE_LOGZ   E-step normaliser logZ^t (online logsumexp over positions and types)
        MODE_RDR    backward: S^t_i = sum_j R^t_ij dR^t_ij (the softmax backward's per-child sum)
        MODE_GRAD   final: dL/dpose (contracted with W^T) and dL/dactivations, summed over t
    em_conv_parent_kernel  grid (B*OH*OW,): one parent position x all C types; loops over its K*K*A
                           children (kh, kw, a-blocks)
        MODE_MSTEP  m = sum r, sum1 = sum r (V - shift), sum2 = sum r (V - shift)^2, shift = mu^{t-1}
                    (t = 0: the vote of the parent's first child, written out; both avoid the cancellation
                    of sum r V^2 - m mu^2); optionally writes R (WRITE_R)
        MODE_DSUM   backward: D0 = sum g, D1 = sum g (V - mu^{t-1}), D2 = sum g (V - mu^{t-1})^2,
                    g = dL/dln q = R (dR - S^t)
    em_conv_weight_grad_kernel  grid (K*K, A, n_groups): one kernel offset x one child type (BA = 1)
                           x a batch group; loops over the group's samples and all parent
                           positions; writes per-group partials of dL/dW summed in a fixed order by
                           kernels/partials.sum_partials (deterministic, no atomics)

Launches.  Forward, T iterations: t = 0 one parent pass; t >= 1 one child pass (LOGZ) + one parent
pass (MSTEP); after every parent pass the torch finish (em_statistics.finish_m_step) turns the sums
into (mu, var, logit)^t.  Backward (em_statistics' algebra, see the FC design): for t = T-1 .. 1 one
child pass (RDR) and one parent pass (DSUM) -> e_step_backward -> the gradients of state t-1, then
m_step_backward of t-1; finally one child pass (GRAD) and one weight-gradient pass (+ sum_partials).

Scratch memory per call: per-parent statistics (T, B, OH, OW, C, 16) x (mu, var, 1/var, beta, gamma)
and (T, B, OH, OW, C) scalars, per-child (T, B, H, W, A) x (logZ, S), the sums of one pass
(B, OH, OW, C, 16) x 2, and n_groups <= kernels/partials.MAX_GROUPS weight-gradient partials
(K, K, A, C, 16): never the votes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._common import autotune_cache_kwargs, autotune_configs, batch_bucket, cdiv, empty, next_pow2, on_device
from ..autotune_cache import ensure_tuned_configs_loaded
from ..partials import MAX_GROUPS, sum_partials
from .em_statistics import e_step_backward, finish_m_step, m_step_backward

MODE_LOGZ, MODE_RDR, MODE_GRAD = 0, 1, 2   # em_conv_child_kernel
MODE_MSTEP, MODE_DSUM = 0, 1               # em_conv_parent_kernel
TILE_ELEMENTS = 512  # BA * BC * 16 per program (4 elements per thread at 4 warps)
NUM_WARPS = 4        # warps of every kernel's default config

# Autotune lists (num_warps only: the tile widths stay those of tile_dims / child_tile_dims /
# weight_tile_dims, so the grids do not depend on the config).  The first config is the hand-picked
# default (what runs before tuning, in the interpreter and under CAPSTRITON_SINGLE_CONFIG=1); the
# compile check (COMPILE_CASES) covers every config the pruners keep at the smallNORB and
# small-network shapes.  Measured with it (sm_80, sm_90, fp32, fp16; triton 3.8) and left out: the
# parent kernel at 2 warps (spills at C = 16 and 32, sm_80), the child kernel at 8 warps for C = 32
# (spills, sm_80), at 2 warps for C = 32 on given votes (spills, sm_90) and in MODE_GRAD (155
# registers: 12 resident warps per SM on sm_80).
CHILD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (NUM_WARPS, 8, 2)]
PARENT_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (NUM_WARPS, 8)]
WEIGHT_GRAD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (NUM_WARPS, 2)]


def prune_conv_configs(configs, named_args, **kwargs):
    """early_config_prune: the default config, and the others with at least one tile element per
    thread (smaller tiles would only replicate work across the warps)."""
    elements = kwargs["BA"] * kwargs["BC"] * 16
    return [c for i, c in enumerate(configs) if i == 0 or elements >= 32 * c.num_warps]


def prune_child_configs(configs, named_args, **kwargs):
    """prune_conv_configs, less the child-kernel configs measured spilling or below 16 resident warps
    per SM (see CHILD_CONFIGS)."""
    def bad(c):
        if c.num_warps == 8:
            return kwargs["BC"] >= 32
        if c.num_warps == 2:
            return kwargs["MODE"] == MODE_GRAD or (kwargs["BC"] >= 32 and bool(kwargs["VOTES"]))
        return False
    kept = prune_conv_configs(configs, named_args, **kwargs)
    return [c for i, c in enumerate(kept) if i == 0 or not bad(c)]


_CONV_KEY = ["B_BUCKET", "H", "W", "OH", "OW", "stride", "K", "A", "C", "BA", "BC"]


def tile_dims(A: int, C: int) -> dict:
    """BA (child types per program) and BC (parent types, all of them) for a TILE_ELEMENTS tile."""
    BC = next_pow2(C)
    return {"BA": max(1, min(next_pow2(A), TILE_ELEMENTS // (16 * BC))), "BC": BC}


def child_tile_dims(A: int, C: int, mode: int, votes: bool) -> dict:
    """The child kernel's tile: tile_dims, but twice the child types per program in the LOGZ pass on given
    votes (at BA = 1, C = 32 ptxas holds that kernel at 32 registers and spills on sm_90; measured with
    the compile check: other variants spill at the larger tile)."""
    if votes and mode == MODE_LOGZ:
        BC = next_pow2(C)
        return {"BA": max(1, min(next_pow2(A), 2 * TILE_ELEMENTS // (16 * BC))), "BC": BC}
    return tile_dims(A, C)


def weight_tile_dims(A: int, C: int) -> dict:
    """The weight-gradient kernel keeps a dL/dW accumulator tile besides the votes: one child type
    per program (BA = 1; wider tiles spill at C = 16, fp32)."""
    return {"BA": 1, "BC": next_pow2(C)}


# ----------------------------------------------------------------------------------------------
# tile helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _parent_range(h, K: tl.constexpr, stride, OH):
    """First and last parent index oh with 0 <= h - oh*stride < K and 0 <= oh < OH (last < first: none)."""
    return tl.maximum(h - K + stride, 0) // stride, tl.minimum(h // stride, OH - 1)


@triton.jit
def _sum_hw(x):
    """(BA, BC, 4, 4) -> (BA, BC): the sum over the 16 vote elements."""
    return tl.sum(tl.sum(x, axis=3), axis=2)


@triton.jit
def _x4(x):
    """(BA, BC) -> (BA, BC, 1, 1)."""
    return x[:, :, None, None]


@triton.jit
def _votes(pose_ptr, W_ptr, p_row, w_off, am4, wm4, rr, kk, BA: tl.constexpr, BC: tl.constexpr):
    """V (BA, BC, 4, 4) fp32: V[a, c, r, cc] = sum_k pose[a, 4r + k] W[a, c, 4k + cc].
    p_row (BA, 1, 1, 1): offsets of the children's poses; w_off (BA, BC, 1, 1): offsets of W[kh, kw, a, c]."""
    p = pose_ptr + p_row + rr * 4
    w = W_ptr + w_off + kk
    V = tl.zeros((BA, BC, 4, 4), dtype=tl.float32)
    for k in tl.static_range(4):
        P = tl.load(p + k, mask=am4, other=0.0).to(tl.float32)          # (BA, 1, 4, 1): pose[a, 4r + k]
        Wk = tl.load(w + k * 4, mask=wm4, other=0.0).to(tl.float32)     # (BA, BC, 1, 4): W[a, c, 4k + cc]
        V += P * Wk
    return V


@triton.jit
def _load_state(mu_ptr, ivar_ptr, qc_ptr, p16, p1, cm4, cm2):
    """The E-step state of the parents at offsets p16 (1, BC, 4, 4) / p1 (1, BC): mu, 1/var (1, BC, 4, 4),
    qc = logsigmoid(logit) - sum ln var / 2 (1, BC)."""
    return (tl.load(mu_ptr + p16, mask=cm4, other=0.0), tl.load(ivar_ptr + p16, mask=cm4, other=0.0),
            tl.load(qc_ptr + p1, mask=cm2, other=0.0))


@triton.jit
def _load_coef(mu_ptr, alpha_ptr, beta_ptr, gamma_ptr, p16, p1, cm4, cm2):
    """The backward coefficients of the parents (m_step_backward): mu, beta, gamma (1, BC, 4, 4), alpha (1, BC)."""
    return (tl.load(mu_ptr + p16, mask=cm4, other=0.0), tl.load(beta_ptr + p16, mask=cm4, other=0.0),
            tl.load(gamma_ptr + p16, mask=cm4, other=0.0), tl.load(alpha_ptr + p1, mask=cm2, other=0.0))


@triton.jit
def _lnq(V, mu, iv, qc, cm2):
    """ln q (BA, BC) of the votes V (padded parent types: -inf) and d = V - mu."""
    d = V - mu
    lq = qc - 0.5 * _sum_hw(d * d * iv)
    return tl.where(cm2, lq, float("-inf")), d


@triton.jit
def _pair_votes(pose_ptr, W_ptr, p_row, w_off, v_off, am4, wm4, rr, kk, VOTES: tl.constexpr, BA: tl.constexpr,
                BC: tl.constexpr):
    """The votes of a tile: recomputed from pose and W (_votes), or VOTES: read at the vote offsets v_off
    (BA, BC, 1, 1) of the (B, OH, OW, K, K, A, C, 16) tensor pose_ptr points to."""
    if VOTES:
        V = tl.load(pose_ptr + v_off + rr * 4 + kk, mask=wm4, other=0.0).to(tl.float32)
    else:
        V = _votes(pose_ptr, W_ptr, p_row, w_off, am4, wm4, rr, kk, BA, BC)
    return V


@triton.jit
def _log_q(V, mu_ptr, ivar_ptr, qc_ptr, p16, p1, cm4, cm2):
    """_lnq of the state loaded at the parent offsets; returns (ln q, V - mu, 1/var)."""
    mu, iv, qc = _load_state(mu_ptr, ivar_ptr, qc_ptr, p16, p1, cm4, cm2)
    lq, d = _lnq(V, mu, iv, qc, cm2)
    return lq, d, iv


@triton.jit
def _drv(V, mu, be, ga, al):
    """dL/dr (BA, BC) = alpha + sum_h [beta Vc + gamma Vc^2] with Vc = V - mu^t, and the direct
    vote-gradient factor beta + 2 gamma Vc (BA, BC, 4, 4)."""
    Vc = V - mu
    return al + _sum_hw((be + ga * Vc) * Vc), be + 2.0 * ga * Vc


@triton.jit
def _dr(V, mu_ptr, alpha_ptr, beta_ptr, gamma_ptr, p16, p1, cm4, cm2):
    """_drv of the coefficients loaded at the parent offsets."""
    mu, be, ga, al = _load_coef(mu_ptr, alpha_ptr, beta_ptr, gamma_ptr, p16, p1, cm4, cm2)
    return _drv(V, mu, be, ga, al)


@triton.jit
def _pair_grad(V, act2, n_par, mu_ptr, ivar_ptr, qc_ptr, alpha_ptr, beta_ptr, gamma_ptr, logz_ptr, s_ptr,
               p16, p1, ch2, cm4, cm2, am2, par16_stride, par_stride, child_stride, iterations):
    """Summed over the iterations t: dL/dV (BA, BC, 4, 4) of the pairs of the tile and the
    activation gradient sum_j dr R (BA,).  n_par: parents of the child (t = 0: R = 1/n_par)."""
    ok2 = am2 & cm2
    R = tl.where(ok2, 1.0 / n_par, 0.0)
    dr, fac = _dr(V, mu_ptr, alpha_ptr, beta_ptr, gamma_ptr, p16, p1, cm4, cm2)
    dV = _x4(R * act2) * fac
    da = tl.sum(dr * R, axis=1)
    for t in range(1, iterations):
        lq, d, iv = _log_q(V, mu_ptr + (t - 1) * par16_stride, ivar_ptr + (t - 1) * par16_stride,
                           qc_ptr + (t - 1) * par_stride, p16, p1, cm4, cm2)
        logz = tl.load(logz_ptr + t * child_stride + ch2, mask=am2, other=0.0)
        R = tl.where(ok2, tl.exp(lq - logz), 0.0)
        dr, fac = _dr(V, mu_ptr + t * par16_stride, alpha_ptr + t * par_stride, beta_ptr + t * par16_stride,
                      gamma_ptr + t * par16_stride, p16, p1, cm4, cm2)
        S = tl.load(s_ptr + t * child_stride + ch2, mask=am2, other=0.0)
        g = R * (dr * act2 - S)  # dL/d ln q
        dV += _x4(R * act2) * fac - _x4(g) * d * iv
        da += tl.sum(dr * R, axis=1)
    return dV, da


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=autotune_configs(CHILD_CONFIGS), key=[*_CONV_KEY, "MODE", "VOTES"],
                 prune_configs_by={"early_config_prune": prune_child_configs}, **autotune_cache_kwargs())
@triton.jit
def em_conv_child_kernel(
    pose_ptr,         # (B, H, W, A, 16) child poses, input dtype; VOTES: the votes (B, OH, OW, K, K, A, C, 16)
    W_ptr,            # (K, K, A, C, 16) transform matrices, input dtype (VOTES: unused)
    act_ptr,          # (B, H, W, A) child activations, input dtype
    mu_ptr,           # (T, B, OH, OW, C, 16) fp32 parent means mu^t
    ivar_ptr,         # (T, B, OH, OW, C, 16) fp32 1 / var^t
    qc_ptr,           # (T, B, OH, OW, C) fp32 logsigmoid(logit^t) - sum_h ln var^t / 2
    alpha_ptr,        # (T, B, OH, OW, C) fp32 backward coefficients (m_step_backward) - RDR, GRAD
    beta_ptr,         # (T, B, OH, OW, C, 16) fp32 - RDR, GRAD
    gamma_ptr,        # (T, B, OH, OW, C, 16) fp32 - RDR, GRAD
    logz_ptr,         # (T, B, H, W, A) fp32 per-child normaliser (slot 0 unused): LOGZ writes slot t, others read
    s_ptr,            # (T, B, H, W, A) fp32 sum_j R dR per child (slot 0 unused): RDR writes slot t, GRAD reads
    grad_pose_ptr,    # (B, H, W, A, 16) GRAD: dL/dpose out, input dtype; VOTES: dL/dvotes, the votes' shape
    grad_act_ptr,     # (B, H, W, A) GRAD: dL/dactivations out, input dtype
    B, H, W, OH, OW,  # batch, child grid, parent grid
    stride,           # convolution stride
    B_BUCKET,         # autotune key: batch_bucket(B) (unused by the code)
    t,                # iteration: LOGZ reads state t-1 and writes logZ^t; RDR uses t-1 (R) and t (dr)
    iterations,       # T (GRAD loops over every t)
    K: tl.constexpr, A: tl.constexpr, C: tl.constexpr,  # kernel size, child types, parent types
    MODE: tl.constexpr,                                   # MODE_LOGZ, MODE_RDR or MODE_GRAD
    VOTES: tl.constexpr,                                  # read given votes instead of recomputing them
    BA: tl.constexpr, BC: tl.constexpr,                   # child-type block, parent types padded (tile_dims)
):
    pid = tl.program_id(0)
    w = pid % W
    h = (pid // W) % H
    b = pid // (W * H)
    a0 = tl.program_id(1) * BA
    a4 = a0 + tl.arange(0, BA)[:, None, None, None]
    c4 = tl.arange(0, BC)[None, :, None, None]
    rr = tl.arange(0, 4)[None, None, :, None]
    kk = tl.arange(0, 4)[None, None, None, :]
    a2 = a0 + tl.arange(0, BA)[:, None]
    c2 = tl.arange(0, BC)[None, :]
    am4, cm4, am2, cm2 = a4 < A, c4 < C, a2 < A, c2 < C
    wm4 = am4 & cm4
    ch2 = pid * A + a2                       # child offsets (BA, 1)
    p_row = (pid * A + a4) * 16              # pose rows (BA, 1, 1, 1)
    act2 = tl.load(act_ptr + ch2, mask=am2, other=0.0).to(tl.float32)
    oh_lo, oh_hi = _parent_range(h, K, stride, OH)
    ow_lo, ow_hi = _parent_range(w, K, stride, OW)
    n_par = (tl.maximum(oh_hi - oh_lo + 1, 0) * tl.maximum(ow_hi - ow_lo + 1, 0) * C).to(tl.float32)
    child_stride = B * H * W * A
    par_stride = B * OH * OW * C
    par16_stride = par_stride * 16
    tp = tl.maximum(t - 1, 0)
    mx = tl.full((BA,), -1e30, dtype=tl.float32)
    acc = tl.zeros((BA,), dtype=tl.float32)
    G = tl.zeros((BA, BC, 4, 4), dtype=tl.float32)  # GRAD: dL/dpose per parent type, axes (a, c, r, k)
    mu_prev, ivar_prev, qc_prev = mu_ptr + tp * par16_stride, ivar_ptr + tp * par16_stride, qc_ptr + tp * par_stride
    ac_off = ((a4 - a0) * C + c4) * 16       # (a, c) offsets inside one (kernel offset, a0) block of W / votes
    for oh in range(oh_lo, oh_hi + 1):
        kh = h - oh * stride
        for ow in range(ow_lo, ow_hi + 1):
            kw = w - ow * stride
            w_off = ((kh * K + kw) * A + a0) * (C * 16) + ac_off
            ppos = (b * OH + oh) * OW + ow
            v_off = (((ppos * K + kh) * K + kw) * A + a0) * (C * 16) + ac_off
            V = _pair_votes(pose_ptr, W_ptr, p_row, w_off, v_off, am4, wm4, rr, kk, VOTES, BA, BC)
            par = ppos * C
            p1 = par + c2
            p16 = (par + c4) * 16 + rr * 4 + kk
            if MODE == 0:  # MODE_LOGZ: online logsumexp of ln q^{t-1} over positions and types
                lq, _, _ = _log_q(V, mu_prev, ivar_prev, qc_prev, p16, p1, cm4, cm2)
                new = tl.maximum(mx, tl.max(lq, axis=1))
                acc = acc * tl.exp(mx - new) + tl.sum(tl.exp(lq - new[:, None]), axis=1)
                mx = new
            elif MODE == 1:  # MODE_RDR: S^t = sum_j R^t dR^t
                lq, _, _ = _log_q(V, mu_prev, ivar_prev, qc_prev, p16, p1, cm4, cm2)
                logz = tl.load(logz_ptr + t * child_stride + ch2, mask=am2, other=0.0)
                R = tl.where(am2 & cm2, tl.exp(lq - logz), 0.0)
                dr, _ = _dr(V, mu_ptr + t * par16_stride, alpha_ptr + t * par_stride, beta_ptr + t * par16_stride,
                            gamma_ptr + t * par16_stride, p16, p1, cm4, cm2)
                acc += tl.sum(R * dr * act2, axis=1)
            else:  # MODE_GRAD: dL/dpose[a, r, k] = sum_{c, cc} dV[a, c, r, cc] W[a, c, k, cc]
                dV, da = _pair_grad(V, act2, n_par, mu_ptr, ivar_ptr, qc_ptr, alpha_ptr, beta_ptr, gamma_ptr,
                                    logz_ptr, s_ptr, p16, p1, ch2, cm4, cm2, am2, par16_stride, par_stride,
                                    child_stride, iterations)
                acc += da
                if VOTES:
                    tl.store(grad_pose_ptr + v_off + rr * 4 + kk, dV.to(grad_pose_ptr.dtype.element_ty), mask=wm4)
                else:  # G[a, c, r, k] += sum_cc dV[a, c, r, cc] W[a, c, k, cc]; the sum over c waits for the end
                    for k in tl.static_range(4):
                        Wk = tl.load(W_ptr + w_off + k * 4 + kk, mask=wm4, other=0.0).to(tl.float32)  # (BA, BC, 1, 4)
                        G += tl.where(kk == k, tl.sum(dV * Wk, axis=3)[:, :, :, None], 0.0)
    a1 = a0 + tl.arange(0, BA)
    am1 = a1 < A
    ch1 = pid * A + a1
    if MODE == 0:
        logz = tl.where(acc > 0, mx + tl.log(tl.where(acc > 0, acc, 1.0)), float("inf"))  # uncovered: R = 0
        tl.store(logz_ptr + t * child_stride + ch1, logz, mask=am1)
    elif MODE == 1:
        tl.store(s_ptr + t * child_stride + ch1, acc, mask=am1)
    else:
        tl.store(grad_act_ptr + ch1, acc.to(grad_act_ptr.dtype.element_ty), mask=am1)
        if not VOTES:  # dL/dpose[a, 4r + k] = sum_c G[a, c, r, k]
            dP = tl.sum(G, axis=1)[:, None, :, :]
            tl.store(grad_pose_ptr + p_row + rr * 4 + kk, dP.to(grad_pose_ptr.dtype.element_ty), mask=am4)


@triton.autotune(configs=autotune_configs(PARENT_CONFIGS), key=[*_CONV_KEY, "MODE", "FIRST", "WRITE_R", "VOTES"],
                 prune_configs_by={"early_config_prune": prune_conv_configs}, **autotune_cache_kwargs())
@triton.jit
def em_conv_parent_kernel(
    pose_ptr,         # (B, H, W, A, 16) child poses, input dtype; VOTES: the votes (B, OH, OW, K, K, A, C, 16)
    W_ptr,            # (K, K, A, C, 16) transform matrices, input dtype (VOTES: unused)
    act_ptr,          # (B, H, W, A) child activations, input dtype
    mu_ptr,           # (T, B, OH, OW, C, 16) fp32 parent means (MSTEP t >= 1 reads mu^{t-1}; DSUM mu^{t-1}, mu^t)
    ivar_ptr,         # (T, B, OH, OW, C, 16) fp32 1 / var
    qc_ptr,           # (T, B, OH, OW, C) fp32 logsigmoid(logit) - sum_h ln var / 2
    alpha_ptr,        # (T, B, OH, OW, C) fp32 backward coefficients - DSUM
    beta_ptr,         # (T, B, OH, OW, C, 16) fp32 - DSUM
    gamma_ptr,        # (T, B, OH, OW, C, 16) fp32 - DSUM
    logz_ptr,         # (T, B, H, W, A) fp32 per-child normaliser logZ^t (t >= 1)
    s_ptr,            # (T, B, H, W, A) fp32 per-child sum_j R dR (DSUM)
    m_ptr,            # (B, OH, OW, C) fp32 out: MSTEP m, DSUM D0
    sum1_ptr,         # (B, OH, OW, C, 16) fp32 out: MSTEP sum r (V - shift), DSUM D1
    sum2_ptr,         # (B, OH, OW, C, 16) fp32 out: MSTEP sum r (V - shift)^2, DSUM D2
    R_ptr,            # (B, OH, OW, K, K, A, C) fp32 out: the assignments R^t (WRITE_R) - else unused
    shift_ptr,        # (B, OH, OW, C, 16) fp32 out, MSTEP FIRST: the shift of the sums (else unused)
    B, H, W, OH, OW,  # batch, child grid, parent grid
    stride,           # convolution stride
    B_BUCKET,         # autotune key: batch_bucket(B) (unused by the code)
    t,                # iteration: MSTEP forms the sums of M-step t; DSUM the E-step sums of t (>= 1)
    K: tl.constexpr, A: tl.constexpr, C: tl.constexpr,  # kernel size, child types, parent types
    MODE: tl.constexpr,                                   # MODE_MSTEP or MODE_DSUM
    FIRST: tl.constexpr,                                  # t = 0: uniform R = 1/(P_h P_w C), no shift
    WRITE_R: tl.constexpr,                                # MSTEP: store R
    VOTES: tl.constexpr,                                  # read given votes instead of recomputing them
    BA: tl.constexpr, BC: tl.constexpr,                   # child-type block, parent types padded (tile_dims)
):
    pid = tl.program_id(0)
    ow = pid % OW
    oh = (pid // OW) % OH
    b = pid // (OW * OH)
    c4 = tl.arange(0, BC)[None, :, None, None]
    rr = tl.arange(0, 4)[None, None, :, None]
    kk = tl.arange(0, 4)[None, None, None, :]
    c2 = tl.arange(0, BC)[None, :]
    cm4, cm2 = c4 < C, c2 < C
    child_stride = B * H * W * A
    par_stride = B * OH * OW * C
    par16_stride = par_stride * 16
    tp = tl.maximum(t - 1, 0)
    par = pid * C
    p1 = par + c2
    p16 = (par + c4) * 16 + rr * 4 + kk
    acc0 = tl.zeros((BA, BC), dtype=tl.float32)
    acc1 = tl.zeros((BA, BC, 4, 4), dtype=tl.float32)
    acc2 = tl.zeros((BA, BC, 4, 4), dtype=tl.float32)
    if FIRST:  # shift = the vote of the first child (kh = kw = 0, a = 0): sums about a value inside the spread
        a4 = tl.arange(0, BA)[:, None, None, None]
        pos = (b * H + oh * stride) * W + ow * stride
        v0_off = ((pid * K * K * A + a4) * C + c4) * 16
        V0 = _pair_votes(pose_ptr, W_ptr, (pos * A + a4) * 16, (a4 * C + c4) * 16, v0_off, a4 == 0, (a4 == 0) & cm4,
                         rr, kk, VOTES, BA, BC)
        shift = tl.sum(V0, axis=0)[None, :, :, :]
        if MODE == 0:
            tl.store(shift_ptr + p16, shift, mask=cm4)
    else:  # the state of iteration t-1 (E-step) and, DSUM, the coefficients of t: the same for every child
        shift, iv_p, qc_p = _load_state(mu_ptr + tp * par16_stride, ivar_ptr + tp * par16_stride,
                                     qc_ptr + tp * par_stride, p16, p1, cm4, cm2)
        if MODE == 1:
            mu_t, be_t, ga_t, al_t = _load_coef(mu_ptr + t * par16_stride, alpha_ptr + t * par_stride,
                                             beta_ptr + t * par16_stride, gamma_ptr + t * par16_stride, p16, p1,
                                             cm4, cm2)
    for kh in range(0, K):
        h = oh * stride + kh
        oh_lo, oh_hi = _parent_range(h, K, stride, OH)
        for kw in range(0, K):
            w = ow * stride + kw
            ow_lo, ow_hi = _parent_range(w, K, stride, OW)
            n_par = ((oh_hi - oh_lo + 1) * (ow_hi - ow_lo + 1) * C).to(tl.float32)
            pos = (b * H + h) * W + w
            for a0 in range(0, A, BA):
                a4 = a0 + tl.arange(0, BA)[:, None, None, None]
                a2 = a0 + tl.arange(0, BA)[:, None]
                am4, am2 = a4 < A, a2 < A
                ok2 = am2 & cm2
                ch2 = pos * A + a2
                p_row = (pos * A + a4) * 16
                w_off = (((kh * K + kw) * A + a4) * C + c4) * 16
                v_off = ((((pid * K + kh) * K + kw) * A + a4) * C + c4) * 16
                V = _pair_votes(pose_ptr, W_ptr, p_row, w_off, v_off, am4, am4 & cm4, rr, kk, VOTES, BA, BC)
                act2 = tl.load(act_ptr + ch2, mask=am2, other=0.0).to(tl.float32)
                if FIRST:
                    R = tl.where(ok2, 1.0 / n_par, 0.0)
                else:
                    lq, d = _lnq(V, shift, iv_p, qc_p, cm2)
                    logz = tl.load(logz_ptr + t * child_stride + ch2, mask=am2, other=0.0)
                    R = tl.where(ok2, tl.exp(lq - logz), 0.0)
                if MODE == 0:  # MODE_MSTEP
                    r = R * act2
                    Vs = V - shift
                    acc0 += r
                    acc1 += _x4(r) * Vs
                    acc2 += _x4(r) * Vs * Vs
                    if WRITE_R:
                        r_off = ((((pid * K + kh) * K + kw) * A + a2) * C + c2)
                        tl.store(R_ptr + r_off, R, mask=ok2)
                else:  # MODE_DSUM: g = R (dR - S), sums of g, g d, g d^2 with d = V - mu^{t-1}
                    dr, _ = _drv(V, mu_t, be_t, ga_t, al_t)
                    S = tl.load(s_ptr + t * child_stride + ch2, mask=am2, other=0.0)
                    g = R * (dr * act2 - S)
                    acc0 += g
                    acc1 += _x4(g) * d
                    acc2 += _x4(g) * d * d
    c1 = tl.arange(0, BC)
    tl.store(m_ptr + par + c1, tl.sum(acc0, axis=0), mask=c1 < C)
    o16 = (par + c4) * 16 + rr * 4 + kk
    tl.store(sum1_ptr + o16, tl.sum(acc1, axis=0)[None, :, :, :], mask=cm4)
    tl.store(sum2_ptr + o16, tl.sum(acc2, axis=0)[None, :, :, :], mask=cm4)


@triton.autotune(configs=autotune_configs(WEIGHT_GRAD_CONFIGS), key=_CONV_KEY,
                 prune_configs_by={"early_config_prune": prune_conv_configs}, **autotune_cache_kwargs())
@triton.jit
def em_conv_weight_grad_kernel(
    pose_ptr,         # (B, H, W, A, 16) child poses, input dtype
    W_ptr,            # (K, K, A, C, 16) transform matrices, input dtype
    act_ptr,          # (B, H, W, A) child activations, input dtype
    mu_ptr,           # (T, B, OH, OW, C, 16) fp32 parent means
    ivar_ptr,         # (T, B, OH, OW, C, 16) fp32 1 / var
    qc_ptr,           # (T, B, OH, OW, C) fp32 logsigmoid(logit) - sum_h ln var / 2
    alpha_ptr,        # (T, B, OH, OW, C) fp32 backward coefficients
    beta_ptr,         # (T, B, OH, OW, C, 16) fp32
    gamma_ptr,        # (T, B, OH, OW, C, 16) fp32
    logz_ptr,         # (T, B, H, W, A) fp32 per-child normaliser (slot 0 unused)
    s_ptr,            # (T, B, H, W, A) fp32 per-child sum_j R dR (slot 0 unused)
    part_ptr,         # (n_groups, K, K, A, C, 16) fp32 out: per-batch-group partials of dL/dW
    B, H, W, OH, OW,  # batch, child grid, parent grid
    stride,           # convolution stride
    B_BUCKET,         # autotune key: batch_bucket(B) (unused by the code)
    iterations,       # T
    per_group,        # samples per batch group (grid axis 2)
    K: tl.constexpr, A: tl.constexpr, C: tl.constexpr,  # kernel size, child types, parent types
    BA: tl.constexpr, BC: tl.constexpr,                   # child-type block, parent types padded (tile_dims)
):
    off = tl.program_id(0)
    kh = off // K
    kw = off % K
    a0 = tl.program_id(1) * BA
    grp = tl.program_id(2)
    a4 = a0 + tl.arange(0, BA)[:, None, None, None]
    c4 = tl.arange(0, BC)[None, :, None, None]
    rr = tl.arange(0, 4)[None, None, :, None]
    kk = tl.arange(0, 4)[None, None, None, :]
    a2 = a0 + tl.arange(0, BA)[:, None]
    c2 = tl.arange(0, BC)[None, :]
    am4, cm4, am2, cm2 = a4 < A, c4 < C, a2 < A, c2 < C
    wm4 = am4 & cm4
    w_off = (((kh * K + kw) * A + a4) * C + c4) * 16
    child_stride = B * H * W * A
    par_stride = B * OH * OW * C
    par16_stride = par_stride * 16
    dW = tl.zeros((BA, BC, 4, 4), dtype=tl.float32)  # axes (a, c, k, cc)
    b_end = tl.minimum(B, (grp + 1) * per_group)
    for b in range(grp * per_group, b_end):
        for oh in range(0, OH):
            h = oh * stride + kh
            oh_lo, oh_hi = _parent_range(h, K, stride, OH)
            for ow in range(0, OW):
                w = ow * stride + kw
                ow_lo, ow_hi = _parent_range(w, K, stride, OW)
                n_par = ((oh_hi - oh_lo + 1) * (ow_hi - ow_lo + 1) * C).to(tl.float32)
                pos = (b * H + h) * W + w
                ch2 = pos * A + a2
                p_row = (pos * A + a4) * 16
                V = _votes(pose_ptr, W_ptr, p_row, w_off, am4, wm4, rr, kk, BA, BC)
                act2 = tl.load(act_ptr + ch2, mask=am2, other=0.0).to(tl.float32)
                par = ((b * OH + oh) * OW + ow) * C
                p1 = par + c2
                p16 = (par + c4) * 16 + rr * 4 + kk
                dV, _ = _pair_grad(V, act2, n_par, mu_ptr, ivar_ptr, qc_ptr, alpha_ptr, beta_ptr, gamma_ptr,
                                   logz_ptr, s_ptr, p16, p1, ch2, cm4, cm2, am2, par16_stride, par_stride,
                                   child_stride, iterations)
                # dW[a, c, k, cc] = sum_r pose[a, r, k] dV[a, c, r, cc]
                for k in tl.static_range(4):
                    P = tl.load(pose_ptr + p_row + rr * 4 + k, mask=am4, other=0.0).to(tl.float32)  # (BA, 1, 4, 1)
                    g_k = tl.sum(P * dV, axis=2)                                                    # (BA, BC, 4)
                    dW += tl.where(rr == k, g_k[:, :, None, :], 0.0)
    tl.store(part_ptr + grp * (K * K * A * C * 16) + w_off + rr * 4 + kk, dW, mask=wm4)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _out(size: int, K: int, stride: int) -> int:
    return (size - K) // stride + 1


def _e_state(mu: torch.Tensor, var: torch.Tensor, logit: torch.Tensor):
    """The E-step's per-parent state the kernels read: (mu, 1/var, logsigmoid(logit) - sum ln var / 2)."""
    return mu.contiguous(), var.reciprocal().contiguous(), (F.logsigmoid(logit) - 0.5 * var.log().sum(-1)).contiguous()


class _Geometry:
    """Sizes, tile widths and the common keyword arguments of one call: from pose and W, or (VOTES,
    W None) from the votes (B, OH, OW, K, K, A, C, 16) and the activations (B, H, W, A)."""

    def __init__(self, pose: torch.Tensor, W: torch.Tensor | None, act: torch.Tensor, stride: int):
        self.votes = W is None
        self.B, self.H, self.W, self.A = act.shape
        self.K, self.C = (pose.shape[3], pose.shape[6]) if self.votes else (W.shape[0], W.shape[3])
        self.stride = stride
        self.OH, self.OW = _out(self.H, self.K, stride), _out(self.W, self.K, stride)
        self.dims = tile_dims(self.A, self.C)
        self.sizes = dict(B=self.B, H=self.H, W=self.W, OH=self.OH, OW=self.OW, stride=stride,
                          B_BUCKET=batch_bucket(self.B))
        self.const = dict(K=self.K, A=self.A, C=self.C, VOTES=self.votes, **self.dims)

    def child(self, mode: int) -> tuple[tuple, dict]:
        """(grid, constexprs) of an em_conv_child_kernel launch in ``mode``."""
        dims = child_tile_dims(self.A, self.C, mode, self.votes)
        return (self.B * self.H * self.W, cdiv(self.A, dims["BA"])), {**self.const, **dims, "MODE": mode}

    def parent_grid(self):
        return (self.B * self.OH * self.OW,)


def conv_em_fwd(pose: torch.Tensor, W: torch.Tensor | None, act: torch.Tensor, beta_u: torch.Tensor,
                beta_a: torch.Tensor, stride: int, lambdas: list[float], scale: float, eps: float, min_var: float,
                return_R: bool):
    """pose (B, H, W, A, 16), W (K, K, A, C, 16), act (B, H, W, A) contiguous; beta_u, beta_a (C,)
    -> (poses (B, OH, OW, C, 16), acts (B, OH, OW, C)) in the input dtype, R (B, OH, OW, K, K, A, C)
    fp32 of the last M-step (empty unless return_R), and the saved statistics (T, ...) fp32:
    mu, var, logit, m (parents) and logZ (children, slot 0 unused).  W None: pose holds given votes
    (B, OH, OW, K, K, A, C, 16) (VOTES mode)."""
    W = pose if W is None else W
    ensure_tuned_configs_loaded()
    with on_device(pose):
        g = _Geometry(pose, None if W is pose else W, act, stride)
        T = len(lambdas)
        dev = pose.device
        B, OH, OW, C = g.B, g.OH, g.OW, g.C
        mu_all = empty(T, B, OH, OW, C, 16, dtype=torch.float32, device=dev)
        ivar_all = empty(T, B, OH, OW, C, 16, dtype=torch.float32, device=dev)
        qc_all = empty(T, B, OH, OW, C, dtype=torch.float32, device=dev)
        var_all = torch.empty_like(mu_all)
        logit_all = torch.empty_like(qc_all)
        m_all = empty(T, B, OH, OW, C, dtype=torch.float32, device=dev)
        logz_all = empty(T, B, g.H, g.W, g.A, dtype=torch.float32, device=dev)
        sum1 = empty(B, OH, OW, C, 16, dtype=torch.float32, device=dev)
        sum2 = torch.empty_like(sum1)
        R = empty(B, OH, OW, g.K, g.K, g.A, C, dtype=torch.float32, device=dev) if return_R else \
            torch.empty(0, dtype=torch.float32, device=dev)
        bu, ba = beta_u.float(), beta_a.float()
        state = dict(mu_ptr=mu_all, ivar_ptr=ivar_all, qc_ptr=qc_all)
        unused = dict(alpha_ptr=qc_all, beta_ptr=mu_all, gamma_ptr=mu_all)
        for t in range(T):
            if t >= 1:
                grid, const = g.child(MODE_LOGZ)
                em_conv_child_kernel[grid](
                    pose_ptr=pose, W_ptr=W, act_ptr=act, **state, **unused, logz_ptr=logz_all, s_ptr=logz_all,
                    grad_pose_ptr=pose, grad_act_ptr=act, **g.sizes, t=t, iterations=T, **const)
            write_R = return_R and t == T - 1
            em_conv_parent_kernel[g.parent_grid()](
                pose_ptr=pose, W_ptr=W, act_ptr=act, **state, **unused, logz_ptr=logz_all, s_ptr=logz_all,
                m_ptr=m_all[t], sum1_ptr=sum1, sum2_ptr=sum2, R_ptr=R if write_R else sum1, shift_ptr=mu_all[0],
                **g.sizes, t=t,
                MODE=MODE_MSTEP, FIRST=t == 0, WRITE_R=write_R, **g.const)
            mu, var, logit = finish_m_step(m_all[t], sum1, sum2, mu_all[max(t - 1, 0)], bu, ba,
                                           lambdas[t], scale, eps, min_var)
            mu_all[t], var_all[t], logit_all[t] = mu, var, logit
            if t < T - 1:
                _, ivar_all[t], qc_all[t] = _e_state(mu, var, logit)
        poses = mu_all[T - 1].to(pose.dtype, copy=True)
        acts = torch.sigmoid(logit_all[T - 1]).to(pose.dtype)
        return poses, acts, R, mu_all, var_all, logit_all, m_all, logz_all


def conv_em_bwd(pose, W, act, beta_u, stride: int, lambdas: list[float], scale: float, eps: float, min_var: float,
                mu_all, var_all, logit_all, m_all, logz_all, grad_poses, grad_acts, need_W: bool = True):
    """(dL/dpose (B, H, W, A, 16), dL/dact (B, H, W, A), dL/dW (K, K, A, C, 16) or None,
    dL/dbeta_u (C,), dL/dbeta_a (C,)) from the saved statistics (module docstring).  W None: pose
    holds given votes and the first result is dL/dvotes (VOTES mode)."""
    votes = W is None
    W = pose if votes else W
    need_W = need_W and not votes
    ensure_tuned_configs_loaded()
    with on_device(pose):
        g = _Geometry(pose, None if votes else W, act, stride)
        T = len(lambdas)
        dev = pose.device
        B, OH, OW, C = g.B, g.OH, g.OW, g.C
        bu = beta_u.float()
        ivar_all = var_all.reciprocal()
        qc_all = (F.logsigmoid(logit_all) - 0.5 * var_all.log().sum(-1)).contiguous()
        alpha_all = empty(T, B, OH, OW, C, dtype=torch.float32, device=dev)
        beta_all = empty(T, B, OH, OW, C, 16, dtype=torch.float32, device=dev)
        gamma_all = torch.empty_like(beta_all)
        s_all = empty(T, B, g.H, g.W, g.A, dtype=torch.float32, device=dev)
        D0 = empty(B, OH, OW, C, dtype=torch.float32, device=dev)
        D1 = empty(B, OH, OW, C, 16, dtype=torch.float32, device=dev)
        D2 = torch.empty_like(D1)
        g_mu = grad_poses.float() if grad_poses is not None else torch.zeros_like(mu_all[0])
        a_out = torch.sigmoid(logit_all[T - 1])
        g_logit = grad_acts.float() * a_out * (1 - a_out) if grad_acts is not None else torch.zeros_like(a_out)
        g_var = torch.zeros_like(mu_all[0])
        g_bu = torch.zeros(C, dtype=torch.float32, device=dev)
        g_ba = torch.zeros(C, dtype=torch.float32, device=dev)
        common = dict(pose_ptr=pose, W_ptr=W, act_ptr=act, mu_ptr=mu_all, ivar_ptr=ivar_all, qc_ptr=qc_all,
                      alpha_ptr=alpha_all, beta_ptr=beta_all, gamma_ptr=gamma_all, logz_ptr=logz_all, s_ptr=s_all)
        for t in range(T - 1, -1, -1):
            alpha, beta, gamma, gbu, gba = m_step_backward(mu_all[t], var_all[t], m_all[t], g_mu, g_var, g_logit, bu,
                                                           lambdas[t], scale, eps, min_var)
            alpha_all[t], beta_all[t], gamma_all[t] = alpha, beta, gamma
            g_bu += gbu.reshape(-1, C).sum(0)
            g_ba += gba.reshape(-1, C).sum(0)
            if t == 0:
                break
            grid, const = g.child(MODE_RDR)
            em_conv_child_kernel[grid](
                **common, grad_pose_ptr=pose, grad_act_ptr=act, **g.sizes, t=t, iterations=T, **const)
            em_conv_parent_kernel[g.parent_grid()](
                **common, m_ptr=D0, sum1_ptr=D1, sum2_ptr=D2, R_ptr=D1, shift_ptr=D1, **g.sizes, t=t,
                MODE=MODE_DSUM, FIRST=False, WRITE_R=False, **g.const)
            g_mu, g_var, g_logit = e_step_backward(D0, D1, D2, var_all[t - 1], logit_all[t - 1])
        grad_pose = empty(*pose.shape, dtype=pose.dtype, device=dev)
        grad_act = empty(*act.shape, dtype=act.dtype, device=dev)
        grid, const = g.child(MODE_GRAD)
        em_conv_child_kernel[grid](
            **common, grad_pose_ptr=grad_pose, grad_act_ptr=grad_act, **g.sizes, t=0, iterations=T, **const)
        grad_W = None
        if need_W:
            n_groups = min(MAX_GROUPS, B)
            per_group = cdiv(B, n_groups)
            n_groups = cdiv(B, per_group)
            part = empty(n_groups, *W.shape, dtype=torch.float32, device=dev)
            wdims = weight_tile_dims(g.A, C)
            em_conv_weight_grad_kernel[(g.K * g.K, cdiv(g.A, wdims["BA"]), n_groups)](  # never VOTES
                **common, part_ptr=part, **g.sizes, iterations=T, per_group=per_group, K=g.K, A=g.A, C=C, **wdims)
            grad_W = sum_partials(part, W.dtype)
        return grad_pose, grad_act, grad_W, g_bu, g_ba


# ----------------------------------------------------------------------------------------------
# compile-check cases (``python -m capstriton.kernels.compile_check``): every kernel variant the
# launchers use at the paper's layer shapes.  The stride is a runtime argument, so ConvCaps1
# (14x14 -> 6x6, s = 2) and ConvCaps2 (6x6 -> 4x4, s = 1) share one compile per (K, A, C).
# ----------------------------------------------------------------------------------------------
COMPILE_SHAPES = (  # (label, K, A, C)
    ("smallNORB,A=B=C=D=32", 3, 32, 32),  # ConvCaps1 and ConvCaps2
    ("small,B=8->C=16", 3, 8, 16),         # small network, ConvCaps1
    ("small,C=16->D=16", 3, 16, 16),       # small network, ConvCaps2
)


def _compile_cases() -> list[dict]:
    F32, I32 = "*fp32", "i32"
    grid_args = {"B": I32, "H": I32, "W": I32, "OH": I32, "OW": I32, "stride": I32, "B_BUCKET": I32}
    stats = {"mu_ptr": F32, "ivar_ptr": F32, "qc_ptr": F32, "alpha_ptr": F32, "beta_ptr": F32, "gamma_ptr": F32,
             "logz_ptr": F32, "s_ptr": F32}
    cases = []
    for label, k, A, C in COMPILE_SHAPES:
        const = {"K": k, "A": A, "C": C, "VOTES": False, **tile_dims(A, C)}
        for dtype in ("fp32", "fp16"):
            src = f"*{dtype}"
            inputs = {"pose_ptr": src, "W_ptr": src, "act_ptr": src}
            tag = f"{dtype},{label}"
            for votes in (False, True):  # fused (pose, W) and given votes (conv_em_routing)
                vtag = ",votes" if votes else ""
                for mode, name in ((MODE_LOGZ, "logz"), (MODE_RDR, "rdr"), (MODE_GRAD, "grad")):
                    sig = {**inputs, **stats, "grad_pose_ptr": src, "grad_act_ptr": src, **grid_args, "t": I32,
                           "iterations": I32}
                    cdims = child_tile_dims(A, C, mode, votes)
                    for n, cfg in enumerate(prune_child_configs(CHILD_CONFIGS, {}, MODE=mode, VOTES=votes, **cdims)):
                        cases.append({"name": f"em_conv_child[{tag},{name}{vtag}]", "fn": em_conv_child_kernel,
                                      "signature": sig, "constexprs": {**const, "MODE": mode, "VOTES": votes, **cdims},
                                      "num_warps": cfg.num_warps, "num_stages": 1, "default": n == 0})
                for mode, first, write_r, name in ((MODE_MSTEP, True, False, "mstep-first"),
                                                   (MODE_MSTEP, False, False, "mstep"),
                                                   (MODE_MSTEP, False, True, "mstep-write-R"),
                                                   (MODE_DSUM, False, False, "dsum")):
                    sig = {**inputs, **stats, "m_ptr": F32, "sum1_ptr": F32, "sum2_ptr": F32, "R_ptr": F32,
                           "shift_ptr": F32, **grid_args, "t": I32}
                    for n, cfg in enumerate(prune_conv_configs(PARENT_CONFIGS, {}, **tile_dims(A, C))):
                        cases.append({"name": f"em_conv_parent[{tag},{name}{vtag}]", "fn": em_conv_parent_kernel,
                                      "signature": sig, "constexprs": {**const, "MODE": mode, "FIRST": first,
                                                                       "WRITE_R": write_r, "VOTES": votes},
                                      "num_warps": cfg.num_warps, "num_stages": 1, "default": n == 0})
            sig = {**inputs, **stats, "part_ptr": F32, **grid_args, "iterations": I32, "per_group": I32}
            for n, cfg in enumerate(prune_conv_configs(WEIGHT_GRAD_CONFIGS, {}, **weight_tile_dims(A, C))):
                cases.append({"name": f"em_conv_weight_grad[{tag}]", "fn": em_conv_weight_grad_kernel,
                              "signature": sig, "constexprs": {"K": k, "A": A, "C": C, **weight_tile_dims(A, C)},
                              "num_warps": cfg.num_warps, "num_stages": 1, "default": n == 0})
    return cases


COMPILE_CASES = _compile_cases()
