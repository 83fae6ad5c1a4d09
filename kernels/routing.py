"""Dynamic routing kernels (routing-by-agreement, Sabour et al. 2017, Procedure 1).

Two ops share the kernels, switched by the constexpr FUSED:
  * dynamic_routing: the prediction vectors u_hat (B, I, J, D) are read from memory;
  * transform_route: u_hat[b, i, j] = W[i, j] @ u[b, i] is recomputed on the fly from
    u (B, I, Din) and W (given in the kernel layout (I, Din, J, D)) in every pass, so no
    B*I*J*D tensor ever exists.
Tiles hold one D-vector per thread (kernels/_capsule_tiles.py).

Forward (per sample; r iterations, 0-based t).  The logits are never stored: they start at 0
and only accumulate agreements, so with P^t = v^0 + ... + v^{t-1} (P^0 = 0)

    c^t_ij = softmax_j(u_ij . P^t_j),   s^t_j = sum_i c^t_ij u_ij,   v^t = squash(s^t),
    P^{t+1} = P^t + v^t,                output v^{r-1}.

c^0 is uniform (1/J).  Each iteration is ONE streaming pass over i (`routing_pass_kernel`):
programs take a block of samples and a chunk of input capsules; with several chunks each writes
its partial sum of s^t and the last program of a batch block to finish (an arrival counter)
adds the partials in chunk order, squashes and writes P^{t+1} (or v), so one launch per
iteration.  Saved for the backward: s^t (r, B, J, D) and P^1..P^{r-1} (r-1, B, J, D), fp32.

Backward.  With g^t = dL/dv^t and G^t = dL/dP^{t+1} (G^{r-1} = 0: P^r is never used):
    g^{r-1} = dL/dv (given),   g^t = G^t for t < r-1          (P^{t+1} = P^t + v^t)
    gs^t = squash'(s^t)^T g^t
    gb^t_ij = c^t_ij (gc^t_ij - sum_k c^t_ik gc^t_ik),  gc^t_ij = u_ij . gs^t_j   (softmax over j)
    G^{t-1}_j = G^t_j + sum_i gb^t_ij u_ij                     (logits u . P^t, t >= 1)
    dL/du_ij = c^0_ij gs^0_j + sum_{t>=1} [ c^t_ij gs^t_j + gb^t_ij P^t_j ]
(the t = 0 term has no gb part: P^0 = 0).  `routing_bwd_init_kernel` computes gs^{r-1}; then
for t = r-1 .. 1 one reduction pass (`routing_pass_kernel`, BACKWARD) sums gb^t u over i and its
last-arriving programs form G^{t-1} and gs^{t-1}.  G^t waits for its finisher in the slot of
gs^t, which then overwrites it.  A final pass recomputes c^t and gb^t for every t and writes
dL/du_hat (`routing_grad_kernel`) or, fused (`routing_grad_fused_kernel`), dL/du = sum_jd W^T
dL/du_hat and dL/dW = sum_b dL/du_hat (x) u, accumulated in registers over a batch group's
samples per capsule and stored once per (group, capsule); groups are summed in a fixed order
by kernels/partials.py (deterministic, no floating-point atomics).
With detach=True the logits do not depend on u_hat: dL/du_ij = c^{r-1}_ij gs^{r-1}_j, no
reduction passes.

Scratch memory of one call (outputs and the per-iteration statistics s, P, gs excluded) is at
most max(B*I*J*D/4, I*J*D*Din) elements: chunk partials only when there are several chunks
(at least MIN_CAPS_PER_CHUNK capsules each), weight-gradient partials for at most as many
batch groups as that bound holds (see `plan`).

All statistics are fp32; inputs may be fp32, fp16 or bf16; results are cast to the input dtype.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._capsule_tiles import (dot_d, expand, lanes_per_sample, last_to_arrive, prediction_tile, softmax_j,
                             softmax_j_grad, sum_chunk_partials, tile_dims, tile_offsets)
from ._common import (autotune_cache_kwargs, autotune_configs, autotune_restore, batch_bucket, cdiv, empty,
                      launch, next_pow2, on_device, target_programs)
from ._common import use_tuned_configs
from .partials import MAX_GROUPS, sum_partials
from .squash import _squash_scale

ROUTING_EPS = 1e-8  # eps of the squash inside routing (same as capstriton.reference)
MIN_CAPS_PER_CHUNK = 4  # chunk partials hold at most B*I*J*D/4 elements


# ----------------------------------------------------------------------------------------------
# autotune lists
# ----------------------------------------------------------------------------------------------
def _config(block_b: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_B": block_b}, num_warps=warps, num_stages=1)


# The first config is the default (the interpreter and the test suite run only it): one sample
# per lane group at the paper's width (BJ = 16: 2 samples x 16 capsules per warp), 78 registers
# forward and 101 backward on sm_90, no barrier in the capsule loop.  The rest: other one-sample-per-lane-group blocks,
# then two samples per thread, then the configs of the first (3-D tile) kernels.
PASS_CONFIGS = [_config(8, 4), _config(4, 2), _config(2, 1), _config(16, 8), _config(16, 4),
                _config(16, 16), _config(4, 4)]
# The fused gradient keeps dL/dW[i] of its batch group in registers (DIN x the tile): one warp
# per program (250 registers on sm_90, no barrier in the loops) is the default.
GRAD_CONFIGS = [_config(2, 1), _config(1, 1), _config(2, 2), _config(4, 2), _config(8, 4), _config(8, 8),
                _config(16, 8)]


def _elements_per_thread(config: triton.Config, BJ: int, BD: int) -> float:
    return config.kwargs["BLOCK_B"] * BJ * BD / (32 * config.num_warps)


def _key(config: triton.Config) -> tuple[int, int]:
    return config.kwargs["BLOCK_B"], config.num_warps


# (BLOCK_B, num_warps) that `python -m capstriton.kernels.compile_check` measured spilling
# (sm_80 or sm_90, triton 3.6 or 3.8, fp32 or fp16), by padded J
PASS_SPILLS = {32: {(16, 16), (4, 4)}}
PASS_BACKWARD_SPILLS = {16: {(16, 16), (4, 4)}, 32: {(16, 16), (4, 4)}}
GRAD_SPILLS = {16: {(4, 2), (8, 4), (16, 8)}, 32: {(2, 2), (8, 8)}}
UNFUSED_GRAD_SPILLS = {16: {(2, 1)}}


def _pruner(max_per_thread: int, spills: dict, backward_spills: dict | None = None):
    """early_config_prune: keep configs whose (BLOCK_B, BJ, BD) tile has at most max_per_thread
    fp32 values per thread and that were not measured spilling; if none is left, the config
    with the smallest tile."""
    def prune(configs, named_args, **kwargs):
        BJ, BD = kwargs["BJ"], kwargs["BDH"] * kwargs["BDL"]
        bad = spills.get(BJ, set())
        if backward_spills and kwargs.get("BACKWARD"):
            bad = bad | backward_spills.get(BJ, set())
        fitting = [c for c in configs if _elements_per_thread(c, BJ, BD) <= max_per_thread and _key(c) not in bad]
        return fitting or [min(configs, key=lambda c: _elements_per_thread(c, BJ, BD))]
    return prune


prune_pass_configs = _pruner(32, PASS_SPILLS, PASS_BACKWARD_SPILLS)
prune_grad_configs = _pruner(16, GRAD_SPILLS)
prune_unfused_grad_configs = _pruner(16, UNFUSED_GRAD_SPILLS)


# ----------------------------------------------------------------------------------------------
# streaming pass over the input capsules (forward iteration or backward reduction) + finish
# ----------------------------------------------------------------------------------------------
@triton.jit
def _squash_tile(s, eps):
    """squash(s) over d for a tile, and the (f, f') factors of kernels/squash.py (expanded)."""
    f, df = _squash_scale(dot_d(s, s), eps)
    return expand(f), expand(df)


@triton.jit
def _squash_grad(s, g, eps):
    """squash'(s)^T g for a tile: f g + 2 f' (s . g) s."""
    f, df = _squash_tile(s, eps)
    return f * g + 2.0 * df * expand(dot_d(s, g)) * s


@triton.jit
def _at(t, stride):
    """Offset of entry t of an (r, B, J, D) statistics tensor, in int64."""
    return (t + tl.zeros((), tl.int64)) * stride


@triton.autotune(configs=autotune_configs(PASS_CONFIGS), key=["B_BUCKET", "I", "J", "D", "DIN", "FUSED", "BACKWARD"],
                 prune_configs_by={"early_config_prune": prune_pass_configs}, **autotune_restore("gs_all_ptr"))
@triton.jit
def routing_pass_kernel(
    u_ptr,            # (B, I, DIN) input capsules (FUSED) - else unused
    W_ptr,            # (I, DIN, J, D) transform matrices, kernel layout (FUSED) - else unused
    uhat_ptr,         # (B, I, J, D) prediction vectors (not FUSED) - else unused
    P_all_ptr,        # (r-1, B, J, D) fp32: P^1 .. P^{r-1}; reads P^t (logits u_hat . P^t) unless FIRST,
                      #   forward writes P^{t+1} unless LAST
    gs_all_ptr,       # (r, B, J, D) fp32, BACKWARD: reads gs^t; its finisher reads G^t from the slot of
                      #   gs^{t-1} (ACCUMULATE), writes gs^{t-1} there and G^{t-1} to the slot of gs^{t-2} (HAS_NEXT)
    part_ptr,         # (n_chunks, B, J, D) fp32 scratch: chunk partial sums (n_chunks > 1)
    count_ptr,        # (>= batch blocks,) int32 arrival counters, 0 on entry and on exit (n_chunks > 1)
    s_all_ptr,        # (r, B, J, D) fp32: forward writes s^t; BACKWARD reads s^{t-1} (and s^t if GS_FROM_GRAD_V)
    v_ptr,            # (B, J, D) forward, LAST: out, input dtype: v = squash(s^{r-1});
                      #   BACKWARD, GS_FROM_GRAD_V: in, any float dtype: dL/dv
    B, I,             # batch, input capsules
    caps_per_chunk,   # input capsules per program along grid axis 1
    n_chunks,         # programs along grid axis 1
    t,                # iteration (0-based): forward t, or BACKWARD the pass for t -> t-1
    eps,              # squash epsilon
    B_BUCKET,         # autotune key: batch rounded up to a power of two
    J: tl.constexpr, D: tl.constexpr, DIN: tl.constexpr,  # output capsules, their dim, input dim
    BACKWARD: tl.constexpr,    # False: s = sum_i c u_hat; True: sum_i gb u_hat
    FUSED: tl.constexpr,
    FIRST: tl.constexpr,       # forward t = 0: uniform coupling, P^0 = 0
    LAST: tl.constexpr,        # forward t = r-1: write v instead of P^{t+1}
    ACCUMULATE: tl.constexpr,  # BACKWARD: G^t is nonzero (t < r-1)
    HAS_NEXT: tl.constexpr,    # BACKWARD: another reduction pass follows (t >= 2)
    GS_FROM_GRAD_V: tl.constexpr,  # BACKWARD, t = r-1: form gs^t from s^t and dL/dv (chunk 0 stores it)
    BLOCK_B: tl.constexpr, BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,
):
    pid_b = tl.program_id(0)
    chunk = tl.program_id(1)
    b_offs = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = b_offs < B
    jd, jd_mask, bjd, mask, zero_b = tile_offsets(b_offs, B, J, D, BJ, BDH, BDL)
    stride = B * (J * D)

    if not FIRST:
        P = tl.load(P_all_ptr + _at(t - 1, stride) + bjd, mask=mask, other=0.0)
    if BACKWARD:
        if GS_FROM_GRAD_V:
            s_t = tl.load(s_all_ptr + _at(t, stride) + bjd, mask=mask, other=0.0)
            g = tl.load(v_ptr + bjd, mask=mask, other=0.0).to(tl.float32)
            gs = _squash_grad(s_t, g, eps)
            if chunk == 0:  # for the final pass
                tl.store(gs_all_ptr + _at(t, stride) + bjd, gs, mask=mask)
        else:
            gs = tl.load(gs_all_ptr + _at(t, stride) + bjd, mask=mask, other=0.0)
    acc = tl.zeros((BDH, BLOCK_B, BJ, BDL), dtype=tl.float32)
    i_start = chunk * caps_per_chunk
    i_end = tl.minimum(i_start + caps_per_chunk, I)
    for i in range(i_start, i_end):
        uhat = prediction_tile(u_ptr, W_ptr, uhat_ptr, b_offs, b_mask, i, I, jd, mask, zero_b, FUSED, J, D, DIN)
        if FIRST:
            acc += uhat
        else:
            c = softmax_j(dot_d(uhat, P), J, BJ)
            if BACKWARD:
                c = softmax_j_grad(c, dot_d(uhat, gs))
            acc += expand(c) * uhat
    if FIRST:
        acc = acc * (1.0 / J)

    finish = n_chunks <= 1
    if n_chunks > 1:  # the last program of this batch block to arrive adds the partials in chunk order
        tl.store(part_ptr + chunk * stride + bjd, acc, mask=mask)
        finish = last_to_arrive(count_ptr + pid_b, n_chunks)
        if finish:
            acc = sum_chunk_partials(part_ptr, n_chunks, stride, bjd, mask)
    if finish:
        if BACKWARD:  # acc = sum_i gb^t u_hat: G^{t-1} = G^t + acc, gs^{t-1} = squash'(s^{t-1})^T G^{t-1}
            out = gs_all_ptr + _at(t - 1, stride) + bjd
            if ACCUMULATE:
                acc += tl.load(out, mask=mask, other=0.0)
            if HAS_NEXT:
                tl.store(gs_all_ptr + _at(t - 2, stride) + bjd, acc, mask=mask)
            s = tl.load(s_all_ptr + _at(t - 1, stride) + bjd, mask=mask, other=0.0)
            tl.store(out, _squash_grad(s, acc, eps), mask=mask)
        else:  # acc = s^t: v^t = squash(s^t), P^{t+1} = P^t + v^t
            tl.store(s_all_ptr + _at(t, stride) + bjd, acc, mask=mask)
            f, _ = _squash_tile(acc, eps)
            v = f * acc
            if LAST:
                tl.store(v_ptr + bjd, v.to(v_ptr.dtype.element_ty), mask=mask)
            else:
                if not FIRST:
                    v += P
                tl.store(P_all_ptr + _at(t, stride) + bjd, v, mask=mask)


INIT_WARPS = 4


@triton.jit
def routing_bwd_init_kernel(
    s_all_ptr,        # (r, B, J, D) fp32: reads s^t
    grad_v_ptr,       # (B, J, D) dL/dv, any float dtype
    gs_all_ptr,       # (r, B, J, D) fp32: writes gs^t = squash'(s^t)^T dL/dv
    B,
    t,                # r - 1
    eps,
    J: tl.constexpr, D: tl.constexpr,
    BLOCK_B: tl.constexpr, BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,
):
    b_offs = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    _, _, bjd, mask, _ = tile_offsets(b_offs, B, J, D, BJ, BDH, BDL)
    at = _at(t, B * (J * D))
    s = tl.load(s_all_ptr + at + bjd, mask=mask, other=0.0)
    g = tl.load(grad_v_ptr + bjd, mask=mask, other=0.0).to(tl.float32)
    tl.store(gs_all_ptr + at + bjd, _squash_grad(s, g, eps), mask=mask)


# ----------------------------------------------------------------------------------------------
# final backward pass: dL/du_hat (unfused) or dL/du and dL/dW (fused)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grad_uhat_tile(uhat, P_all_ptr, gs_all_ptr, bjd, mask, B, iterations, DETACH: tl.constexpr,
                    J: tl.constexpr, D: tl.constexpr, BJ: tl.constexpr):
    """dL/du_hat for one tile: sum over t of c^t gs^t (+ gb^t P^t unless DETACH)."""
    if DETACH:
        t_first = iterations - 1
    else:
        t_first = iterations * 0
    stride = B * J * D
    grad = uhat * 0.0
    if t_first == 0:  # uniform c^0, no gb term (P^0 = 0)
        grad = tl.load(gs_all_ptr + bjd, mask=mask, other=0.0) * (1.0 / J)
        t_first = t_first + 1
    for t in range(t_first, iterations):  # P_all[t - 1] = P^t, gs_all[t] = gs^t
        P = tl.load(P_all_ptr + (t - 1) * stride + bjd, mask=mask, other=0.0)
        gs = tl.load(gs_all_ptr + t * stride + bjd, mask=mask, other=0.0)
        c = softmax_j(dot_d(uhat, P), J, BJ)
        grad += expand(c) * gs
        if not DETACH:
            grad += expand(softmax_j_grad(c, dot_d(uhat, gs))) * P
    return grad


@triton.autotune(configs=autotune_configs(PASS_CONFIGS), key=["B_BUCKET", "I", "J", "D", "iterations", "DETACH"],
                 prune_configs_by={"early_config_prune": prune_unfused_grad_configs}, **autotune_cache_kwargs())
@triton.jit
def routing_grad_kernel(
    uhat_ptr,         # (B, I, J, D) prediction vectors
    P_all_ptr,        # (r-1, B, J, D) fp32: P^1 .. P^{r-1}
    gs_all_ptr,       # (r, B, J, D) fp32: gs^0 .. gs^{r-1} (only gs^{r-1} with DETACH)
    grad_uhat_ptr,    # (B, I, J, D) out, input dtype: dL/du_hat
    B, I,
    iterations,       # r
    caps_per_chunk,   # input capsules per program along grid axis 1
    B_BUCKET,         # autotune key
    J: tl.constexpr, D: tl.constexpr,
    DETACH: tl.constexpr,
    BLOCK_B: tl.constexpr, BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,
):
    b_offs = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = b_offs < B
    jd, _, bjd, mask, zero_b = tile_offsets(b_offs, B, J, D, BJ, BDH, BDL)
    i_start = tl.program_id(1) * caps_per_chunk
    for i in range(i_start, tl.minimum(i_start + caps_per_chunk, I)):
        uhat = prediction_tile(uhat_ptr, uhat_ptr, uhat_ptr, b_offs, b_mask, i, I, jd, mask, zero_b, False, J, D, 1)
        grad = _grad_uhat_tile(uhat, P_all_ptr, gs_all_ptr, bjd, mask, B, iterations, DETACH, J, D, BJ)
        offs = (b_offs * I + i)[None, :, None, None] * (J * D) + jd
        tl.store(grad_uhat_ptr + offs, grad.to(grad_uhat_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=autotune_configs(GRAD_CONFIGS), key=["B_BUCKET", "I", "J", "D", "DIN", "iterations", "DETACH"],
                 prune_configs_by={"early_config_prune": prune_grad_configs}, **autotune_cache_kwargs())
@triton.jit
def routing_grad_fused_kernel(
    u_ptr,            # (B, I, DIN) input capsules
    W_ptr,            # (I, DIN, J, D) transform matrices, kernel layout
    P_all_ptr,        # (r-1, B, J, D) fp32: P^1 .. P^{r-1}
    gs_all_ptr,       # (r, B, J, D) fp32: gs^0 .. gs^{r-1}
    grad_u_ptr,       # (B, I, DIN) out, input dtype: dL/du
    grad_W_ptr,       # (n_groups, I, DIN, J, D) out: dL/dW per batch group (fp32), or the sum if n_groups = 1
    B, I,
    iterations,       # r
    caps_per_chunk,   # input capsules per program along grid axis 0
    n_groups,         # batch groups along grid axis 1; group g takes batch blocks g, g + n_groups, ...
    B_BUCKET,         # autotune key
    J: tl.constexpr, D: tl.constexpr, DIN: tl.constexpr,
    BDIN: tl.constexpr,        # next power of two >= DIN
    DETACH: tl.constexpr,
    NEED_U: tl.constexpr,      # write dL/du
    NEED_W: tl.constexpr,      # write dL/dW
    BLOCK_B: tl.constexpr, BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,
):
    group = tl.program_id(1)
    n_blocks = tl.cdiv(B, BLOCK_B)
    i_start = tl.program_id(0) * caps_per_chunk
    lanes = tl.arange(0, BLOCK_B).to(tl.int64)
    k_offs = tl.arange(0, BDIN)
    # capsules outer, this group's batch blocks inner: dL/dW[i] stays in registers as a
    # (BDIN, BDH, BLOCK_B, BJ, BDL) per-sample-lane accumulator and is reduced over the samples once
    for i in range(i_start, tl.minimum(i_start + caps_per_chunk, I)):
        w_row = W_ptr + i * (DIN * J * D)
        gw = tl.zeros((BDIN, BDH, BLOCK_B, BJ, BDL), dtype=tl.float32)
        for blk in range(group, n_blocks, n_groups):
            b_offs = blk * BLOCK_B + lanes
            b_mask = b_offs < B
            jd, _, bjd, mask, zero_b = tile_offsets(b_offs, B, J, D, BJ, BDH, BDL)
            uhat = prediction_tile(u_ptr, W_ptr, u_ptr, b_offs, b_mask, i, I, jd, mask, zero_b, True, J, D, DIN)
            grad = _grad_uhat_tile(uhat, P_all_ptr, gs_all_ptr, bjd, mask, B, iterations, DETACH, J, D, BJ)
            u_rows = (b_offs * I + i) * DIN  # offsets of u[b, i, 0] and grad_u[b, i, 0]
            if NEED_U:
                for k in range(DIN):  # dL/du[b, i, k] = sum_jd grad W[i, j, d, k]
                    w_k = tl.load(w_row + k * (J * D) + jd + zero_b, mask=mask, other=0.0).to(tl.float32)
                    grad_u_k = tl.sum(dot_d(grad, w_k), axis=1)
                    tl.store(grad_u_ptr + u_rows + k, grad_u_k.to(grad_u_ptr.dtype.element_ty), mask=b_mask)
            if NEED_W:
                u_blk = tl.load(u_ptr + u_rows[None, :] + k_offs[:, None], mask=b_mask[None, :] & (k_offs[:, None] < DIN),
                                other=0.0)
                gw += grad[None, :, :, :, :] * u_blk.to(tl.float32)[:, None, :, None, None]
        if NEED_W:  # dL/dW[i, :, :, k] of this group: reduce over the sample lanes, one store
            k5 = k_offs[:, None, None, None]
            dh = tl.arange(0, BDH)[None, :, None, None]
            jj = tl.arange(0, BJ)[None, None, :, None]
            dl = tl.arange(0, BDL)[None, None, None, :]
            d = dh * BDL + dl
            offs = ((group.to(tl.int64) * I + i) * DIN + k5) * (J * D) + jj * D + d
            tl.store(grad_W_ptr + offs, tl.sum(gw, axis=2).to(grad_W_ptr.dtype.element_ty),
                     mask=(jj < J) & (d < D) & (k5 < DIN))


# ----------------------------------------------------------------------------------------------
# launch plan (cached per shape and device) and launchers
# ----------------------------------------------------------------------------------------------
class Plan(NamedTuple):
    dims: dict            # constexpr tile widths BJ, BDH, BDL
    n_chunks: int         # capsule chunks of the streaming passes
    caps_per_chunk: int
    count_len: int        # arrival counters (one per batch block of the smallest BLOCK_B)
    grad_chunks: int      # capsule chunks of the fused gradient pass
    grad_caps: int
    n_groups: int         # batch groups of the fused weight gradient
    budget: int           # scratch bound in elements: max(B*I*J*D/4, I*J*D*Din)
    key: tuple            # the autotune key's shape part: (B bucket, I, J, D, DIN)


@functools.lru_cache(maxsize=1024)
def plan(B: int, I: int, J: int, D: int, DIN: int, target: int) -> Plan:
    """Grid and scratch sizes for a shape; `target` is the number of programs that fills the GPU.

    Chunks: enough (batch blocks x chunks) programs for the target, at least MIN_CAPS_PER_CHUNK
    capsules each, and chunk partials (only allocated with several chunks) within the budget.
    Batch groups of the fused weight gradient: enough (capsule chunks x groups) programs for the
    target, a batch block per group, at most MAX_GROUPS, and their partials within the budget
    (one group writes the result directly)."""
    dims = tile_dims(J, D)
    budget = max(B * I * J * D // 4, I * J * D * DIN)
    batch_blocks = cdiv(B, PASS_CONFIGS[0].kwargs["BLOCK_B"])
    counters = cdiv(B, min(c.kwargs["BLOCK_B"] for c in PASS_CONFIGS))  # int32, as many as batch blocks
    max_chunks = min(cdiv(I, MIN_CAPS_PER_CHUNK), (budget - counters) // (B * J * D))
    n_chunks = max(1, min(max_chunks, cdiv(target, batch_blocks)))
    caps = cdiv(I, n_chunks)
    n_chunks = cdiv(I, caps)
    count_len = counters if n_chunks > 1 else 1

    grad_block = max(c.kwargs["BLOCK_B"] for c in GRAD_CONFIGS)
    group_cap = min(MAX_GROUPS, cdiv(B, grad_block), budget // (I * J * D * DIN))
    grad_chunks = max(1, min(I, target))
    n_groups = max(1, min(group_cap, cdiv(target, grad_chunks)))
    if n_groups > 1:  # fewer capsule chunks when the groups already fill the GPU
        grad_chunks = max(1, min(I, cdiv(target, n_groups)))
    grad_caps = cdiv(I, grad_chunks)
    return Plan(dims, n_chunks, caps, count_len, cdiv(I, grad_caps), grad_caps, n_groups, budget,
                (batch_bucket(B), I, J, D, DIN))


def _pass_grid(B: int, n_chunks: int):
    return lambda meta: (cdiv(B, meta["BLOCK_B"]), n_chunks)


def _sizes(u, W, u_hat, fused: bool):
    if fused:
        B, I, DIN = u.shape
        return B, I, W.shape[2], W.shape[3], DIN
    B, I, J, D = u_hat.shape
    return B, I, J, D, 1


def _routing_forward(u, W, u_hat, iterations: int, fused: bool):
    use_tuned_configs()
    src = u if fused else u_hat
    B, I, J, D, DIN = _sizes(u, W, u_hat, fused)
    dev = src.device
    p = plan(B, I, J, D, DIN, target_programs(dev))
    f32 = torch.float32
    part = empty(p.n_chunks, B, J, D, dtype=f32, device=dev) if p.n_chunks > 1 else src
    count = torch.zeros(p.count_len, dtype=torch.int32, device=dev) if p.n_chunks > 1 else src
    s_all = empty(iterations, B, J, D, dtype=f32, device=dev)
    P_all = empty(iterations - 1, B, J, D, dtype=f32, device=dev)
    v = empty(B, J, D, dtype=src.dtype, device=dev)
    grid = _pass_grid(B, p.n_chunks)
    args = ((u, W, src) if fused else (src, src, u_hat)) + (P_all if iterations > 1 else src, src, part, count,
                                                            s_all, v, B, I, p.caps_per_chunk, p.n_chunks)
    key = (routing_pass_kernel, dev, src.dtype, p.key, fused, False)
    for t in range(iterations):
        launch(routing_pass_kernel, grid, key, *args, t, ROUTING_EPS, batch_bucket(B), J=J, D=D, DIN=DIN,
               BACKWARD=False, FUSED=fused, FIRST=t == 0, LAST=t == iterations - 1, ACCUMULATE=False, HAS_NEXT=False,
               GS_FROM_GRAD_V=False, **p.dims)
    return v, s_all, P_all


def _backward_stats(ins, src, s_all, P_all, grad_v, iterations: int, detach: bool, fused: bool, p: Plan, sizes):
    """gs_all (r, B, J, D): gs^{r-1} from dL/dv, then (unless detach) gs^{r-2} .. gs^0 from one
    reduction pass each (the first pass forms gs^{r-1} itself)."""
    B, I, J, D, DIN = sizes
    dev = src.device
    gs_all = empty(iterations, B, J, D, dtype=torch.float32, device=dev)
    if detach or iterations == 1:
        init_block = lanes_per_sample(p.dims["BJ"]) * INIT_WARPS
        routing_bwd_init_kernel[(cdiv(B, init_block),)](
            s_all, grad_v, gs_all, B, iterations - 1, ROUTING_EPS, J=J, D=D, BLOCK_B=init_block,
            num_warps=INIT_WARPS, **p.dims)
        return gs_all
    part = empty(p.n_chunks, B, J, D, dtype=torch.float32, device=dev) if p.n_chunks > 1 else src
    count = torch.zeros(p.count_len, dtype=torch.int32, device=dev) if p.n_chunks > 1 else src
    grid = _pass_grid(B, p.n_chunks)
    args = ins + (P_all, gs_all, part, count, s_all, grad_v, B, I, p.caps_per_chunk, p.n_chunks)
    key = (routing_pass_kernel, dev, src.dtype, p.key, fused, True)
    for t in range(iterations - 1, 0, -1):  # sum_i gb^t u_hat -> G^{t-1}, gs^{t-1}
        launch(routing_pass_kernel, grid, key, *args, t, ROUTING_EPS, batch_bucket(B), J=J, D=D, DIN=DIN,
               BACKWARD=True, FUSED=fused, FIRST=False, LAST=False, ACCUMULATE=t < iterations - 1, HAS_NEXT=t >= 2,
               GS_FROM_GRAD_V=t == iterations - 1, **p.dims)
    return gs_all


def dynamic_routing_fwd(u_hat: torch.Tensor, iterations: int):
    """u_hat (B, I, J, D) contiguous -> (v (B, J, D) in u_hat's dtype, s_all (r, B, J, D),
    P_all (r-1, B, J, D) fp32)."""
    with on_device(u_hat):
        return _routing_forward(None, None, u_hat, iterations, fused=False)


def dynamic_routing_bwd(u_hat, s_all, P_all, grad_v, iterations: int, detach: bool) -> torch.Tensor:
    """dL/du_hat from the saved per-iteration s and P and dL/dv (all contiguous)."""
    with on_device(u_hat):
        sizes = _sizes(None, None, u_hat, False)
        B, I, J, D, _ = sizes
        p = plan(*sizes, target_programs(u_hat.device))
        gs_all = _backward_stats((u_hat, u_hat, u_hat), u_hat, s_all, P_all, grad_v, iterations, detach, False, p,
                                 sizes)
        grad_uhat = empty(B, I, J, D, dtype=u_hat.dtype, device=u_hat.device)
        launch(routing_grad_kernel, _pass_grid(B, p.n_chunks), (routing_grad_kernel, u_hat.device, u_hat.dtype, p.key,
                                                                 iterations, detach),
               u_hat, P_all, gs_all, grad_uhat, B, I, iterations, p.caps_per_chunk, batch_bucket(B), J=J, D=D,
               DETACH=detach, **p.dims)
        return grad_uhat


def transform_route_fwd(u: torch.Tensor, W: torch.Tensor, iterations: int):
    """u (B, I, Din), W (I, Din, J, D) (the kernel layout), contiguous -> (v (B, J, D), s_all,
    P_all); u_hat never exists."""
    with on_device(u):
        return _routing_forward(u, W, None, iterations, fused=True)


def transform_route_bwd(u, W, s_all, P_all, grad_v, iterations: int, detach: bool, need_u: bool = True,
                        need_W: bool = True):
    """(dL/du (B, I, Din) or None, dL/dW (I, Din, J, D) or None), recomputing u_hat = W u."""
    with on_device(u):
        sizes = _sizes(u, W, None, True)
        B, I, J, D, DIN = sizes
        dev = u.device
        p = plan(*sizes, target_programs(dev))
        gs_all = _backward_stats((u, W, u), u, s_all, P_all, grad_v, iterations, detach, True, p, sizes)
        grad_u = empty(B, I, DIN, dtype=u.dtype, device=dev) if need_u else u
        n_groups = p.n_groups
        direct = n_groups == 1
        grad_W = empty(n_groups, I, DIN, J, D, dtype=W.dtype if direct else torch.float32, device=dev) \
            if need_W else W
        grid = (p.grad_chunks, n_groups)
        launch(routing_grad_fused_kernel, lambda meta: grid,
               (routing_grad_fused_kernel, dev, u.dtype, p.key, iterations, detach, need_u, need_W),
               u, W, P_all, gs_all, grad_u, grad_W, B, I, iterations, p.grad_caps, n_groups, batch_bucket(B),
               J=J, D=D, DIN=DIN, BDIN=next_pow2(DIN), DETACH=detach, NEED_U=need_u, NEED_W=need_W, **p.dims)
        if need_W:
            grad_W = grad_W[0] if direct else sum_partials(grad_W, W.dtype)
        return (grad_u if need_u else None), (grad_W if need_W else None)
