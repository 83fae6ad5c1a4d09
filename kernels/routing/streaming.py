"""Streaming-pass machinery shared by every routing algorithm (dynamic, self-attention, inverted
dot-product attention).

Every algorithm forms, per sample, couplings of the prediction vectors u = u_hat (B, I, J, D)
from a small per-output state Q (B, J, D) (dynamic routing: the summed outputs P; attention: a
query that already holds the 1/sqrt(D) scale):

    q_ij = softmax_j(u_ij . Q_j)         (uniform 1/J when the iteration has no state yet)

and turns per-output sums over the input capsules into its next state.  A pass over the input
capsules (`stream_capsules`) computes one of three sums:

    modes.SUM:       sum_i u_ij                                (uniform couplings, self-attention's S)
    modes.FORWARD:   sum_i (q_ij + bias_ij) u_ij               (bias: self-attention's, after the softmax)
    modes.BACKWARD:  sum_i ga_ij u_ij,  ga_ij = q_ij (gc_ij - sum_k q_ik gc_ik),  gc_ij = u_ij . gs_j

An algorithm's pass kernel is `stream_capsules` + `finish_chunks` (the last program of a batch
block to arrive adds the chunk partials in a fixed order) + its own finish, which turns the sum
into the next state (squash, exp-squash, LayerNorm, their backward).  So one launch per pass.

The final backward pass is shared too (`stream_grad_kernel`, unfused: dL/du_hat;
`stream_grad_fused_kernel`: dL/du and dL/dW, u_hat = W u recomputed).  With the states Q^t and
gradients gs^t = dL/ds^t of every iteration t it writes

    dL/du_ij = sum_t [ q^t_ij gs^t_j + ga^t_ij Q^t_j ]  (+ bias_ij gs_j + R_j, self-attention)

(an iteration with uniform couplings has no ga term), and dL/dbias = sum_b gc.  Weight and bias
gradients are per-batch-group partials summed in a fixed order by kernels/partials.py.

Tiles hold one D-vector per thread (kernels/routing/tiles.py).  Scratch memory of one call is
at most max(B*I*J*D/4, I*J*D*Din) elements (see `plan`).

Launch plan shared by every algorithm (`plan`, cached per shape and device):
    pass kernels    grid (cdiv(B, BLOCK_B), n_chunks): a batch block x a chunk of >= MIN_CAPS_PER_CHUNK
                    input capsules; with n_chunks > 1, chunk partials (n_chunks, B, J, D) fp32 and
                    one int32 arrival counter per batch block
    final gradient  fused: grid (grad_chunks, n_groups), capsules outer, a batch group's blocks inner;
                    unfused: the pass grid
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._common import (
    autotune_cache_kwargs,
    autotune_configs,
    autotune_restore,
    batch_bucket,
    cdiv,
    empty,
    launch,
    next_pow2,
)
from ..partials import MAX_GROUPS, sum_partials
from . import modes
from .tiles import (
    dot_d,
    expand,
    last_to_arrive,
    prediction_tile,
    softmax_j,
    softmax_j_grad,
    sum_chunk_partials,
    tile_dims,
    tile_offsets,
)

MIN_CAPS_PER_CHUNK = 4  # chunk partials hold at most B*I*J*D/4 elements


# ----------------------------------------------------------------------------------------------
# autotune lists (shared by every algorithm's kernels)
# ----------------------------------------------------------------------------------------------
def autotune_config(block_b: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_B": block_b}, num_warps=warps, num_stages=1)


# The first config is the default (the interpreter and the test suite run only it): one sample
# per lane group at the paper's width (BJ = 16: 2 samples x 16 capsules per warp), 78 registers
# forward and 101 backward on sm_90 (dynamic routing), no barrier in the capsule loop.  The
# rest: other one-sample-per-lane-group blocks, then two samples per thread, then the configs of
# the first (3-D tile) kernels.
PASS_CONFIGS = [autotune_config(b, w) for b, w in ((8, 4), (4, 2), (2, 1), (16, 8), (16, 4), (16, 16), (4, 4))]
# The fused gradient keeps dL/dW[i] of its batch group in registers (DIN x the tile): one warp
# per program (250 registers on sm_90, no barrier in the loops) is the default.
GRAD_CONFIGS = [autotune_config(b, w) for b, w in ((2, 1), (1, 1), (2, 2), (4, 2), (8, 4), (8, 8), (16, 8))]


def _elements_per_thread(config: triton.Config, BJ: int, BD: int) -> float:
    return config.kwargs["BLOCK_B"] * BJ * BD / (32 * config.num_warps)


def _key(config: triton.Config) -> tuple[int, int]:
    return config.kwargs["BLOCK_B"], config.num_warps


# (BLOCK_B, num_warps) that `python -m capstriton.kernels.compile_check` measured spilling
# (sm_80 or sm_90, triton 3.6 or 3.8, fp32 or fp16, any algorithm), by padded J
PASS_SPILLS = {32: {(16, 16), (4, 4)}}
PASS_BACKWARD_SPILLS = {16: {(16, 16), (4, 4)}, 32: {(16, 16), (4, 4)}}
GRAD_SPILLS = {16: {(4, 2), (8, 4), (16, 8)}, 32: {(2, 2), (8, 8)}}
UNFUSED_GRAD_SPILLS = {16: {(2, 1)}, 32: {(16, 16)}}
AFFINE_PASS_SPILLS = {16: {(4, 4)}}  # inverted attention's LayerNorm affine (fused forward, sm_90)


def config_pruner(max_per_thread: int, spills: dict, backward_spills: dict | None = None,
                  affine_spills: dict | None = None):
    """early_config_prune: keep configs whose (BLOCK_B, BJ, BD) tile has at most max_per_thread
    fp32 values per thread and that were not measured spilling; if none is left, the config
    with the smallest tile.  A pass runs its backward sum when BACKWARD (dynamic routing) or
    MODE == modes.BACKWARD (attention) is set, and a LayerNorm affine when HAS_AFFINE is."""
    def prune(configs, named_args, **kwargs):
        BJ, BD = kwargs["BJ"], kwargs["BDH"] * kwargs["BDL"]
        bad = spills.get(BJ, set())
        if backward_spills and (kwargs.get("BACKWARD") or kwargs.get("MODE") == modes.BACKWARD):
            bad = bad | backward_spills.get(BJ, set())
        if affine_spills and kwargs.get("HAS_AFFINE"):
            bad = bad | affine_spills.get(BJ, set())
        fitting = [c for c in configs if _elements_per_thread(c, BJ, BD) <= max_per_thread and _key(c) not in bad]
        return fitting or [min(configs, key=lambda c: _elements_per_thread(c, BJ, BD))]
    return prune


prune_pass_configs = config_pruner(32, PASS_SPILLS, PASS_BACKWARD_SPILLS, AFFINE_PASS_SPILLS)
prune_grad_configs = config_pruner(16, GRAD_SPILLS)
prune_unfused_grad_configs = config_pruner(16, UNFUSED_GRAD_SPILLS)


def pass_autotune(*flags: str, restore: tuple[str, ...] = ()):
    """triton.autotune for a routing's pass kernel: the shared list and pruning, keyed by the shape
    and the kernel's own constexpr flags; ``restore``: arguments the kernel updates in place."""
    cache = autotune_restore(*restore) if restore else autotune_cache_kwargs()
    return triton.autotune(configs=autotune_configs(PASS_CONFIGS), key=["B_BUCKET", "I", "J", "D", "DIN", *flags],
                           prune_configs_by={"early_config_prune": prune_pass_configs}, **cache)


# ----------------------------------------------------------------------------------------------
# building blocks of a pass kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def sample_block(B, J: tl.constexpr, D: tl.constexpr, BLOCK_B: tl.constexpr, BJ: tl.constexpr,
                 BDH: tl.constexpr, BDL: tl.constexpr):
    """The samples of program_id(0) and their tile: (b_offs, b_mask, jd, jd_mask, bjd, mask, zero_b),
    see tiles.tile_offsets."""
    b_offs = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    jd, jd_mask, bjd, mask, zero_b = tile_offsets(b_offs, B, J, D, BJ, BDH, BDL)
    return b_offs, b_offs < B, jd, jd_mask, bjd, mask, zero_b


@triton.jit
def bias_tile(bias_ptr, i, b_offs, J: tl.constexpr, BJ: tl.constexpr):
    """bias[i, :] (I, J) as a (BLOCK_B, BJ) fp32 tile (the same row for every sample)."""
    jj = tl.arange(0, BJ)[None, :] + (b_offs * 0)[:, None]
    return tl.load(bias_ptr + i * J + jj, mask=jj < J, other=0.0).to(tl.float32)


@triton.jit
def stream_capsules(u_ptr, W_ptr, uhat_ptr, bias_ptr, b_offs, b_mask, jd, mask, zero_b, Q, gs, i_start, i_end, I,
                    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED: tl.constexpr, J: tl.constexpr,
                    D: tl.constexpr, DIN: tl.constexpr, BLOCK_B: tl.constexpr, BJ: tl.constexpr,
                    BDH: tl.constexpr, BDL: tl.constexpr):
    """The module docstring's MODE sum over the capsules i_start .. i_end-1 for the tile's samples:
    a (BDH, BLOCK_B, BJ, BDL) fp32 tile.  Q (state) and gs are tiles (unused where the mode has
    no use for them); u_hat is read (not FUSED) or recomputed from u and W (FUSED)."""
    acc = tl.zeros((BDH, BLOCK_B, BJ, BDL), dtype=tl.float32)
    for i in range(i_start, i_end):
        uhat = prediction_tile(u_ptr, W_ptr, uhat_ptr, b_offs, b_mask, i, I, jd, mask, zero_b, FUSED, J, D, DIN)
        if MODE == modes.SUM:
            acc += uhat
        else:
            c = softmax_j(dot_d(uhat, Q), J, BJ)
            if MODE == modes.BACKWARD:
                c = softmax_j_grad(c, dot_d(uhat, gs))
            elif HAS_BIAS:
                c += bias_tile(bias_ptr, i, b_offs, J, BJ)
            acc += expand(c) * uhat
    return acc


@triton.jit
def finish_chunks(acc, part_ptr, count_ptr, chunk, n_chunks, stride, bjd, mask):
    """(total, finish): with one chunk, (acc, True).  Otherwise every program stores its partial
    and the last one of its batch block to arrive gets the sum of the partials in chunk order
    (bitwise reproducible) and finish = True; the others get finish = False."""
    finish = n_chunks <= 1
    if n_chunks > 1:
        tl.store(part_ptr + chunk * stride + bjd, acc, mask=mask)
        finish = last_to_arrive(count_ptr + tl.program_id(0), n_chunks)
        if finish:
            acc = sum_chunk_partials(part_ptr, n_chunks, stride, bjd, mask)
    return acc, finish


@triton.jit
def at(t, stride):
    """Offset of entry t of a (T, B, J, D) statistics tensor, in int64."""
    return (t + tl.zeros((), tl.int64)) * stride


# ----------------------------------------------------------------------------------------------
# final backward pass: dL/du_hat (unfused) or dL/du and dL/dW (fused)
# ----------------------------------------------------------------------------------------------
@triton.jit
def grad_uhat_tile(uhat, Q_all_ptr, gs_all_ptr, bjd, mask, B, iterations, DETACH: tl.constexpr,
                   UNIFORM_FIRST: tl.constexpr, J: tl.constexpr, BJ: tl.constexpr, D: tl.constexpr):
    """dL/du_hat for one tile: sum over the iterations t of q^t gs^t (+ ga^t Q^t unless DETACH:
    only the last iteration, couplings as constants).  gs^t is gs_all[t]; Q^t is Q_all[t - 1]
    with UNIFORM_FIRST (iteration 0 is uniform and has no ga term), else Q_all[t]."""
    if DETACH:
        t_first = iterations - 1
    else:
        t_first = iterations * 0
    stride = B * J * D
    grad = uhat * 0.0
    if UNIFORM_FIRST:
        if t_first == 0:
            grad = tl.load(gs_all_ptr + bjd, mask=mask, other=0.0) * (1.0 / J)
            t_first = t_first + 1
    for t in range(t_first, iterations):
        Q = tl.load(Q_all_ptr + at(t - UNIFORM_FIRST, stride) + bjd, mask=mask, other=0.0)
        gs = tl.load(gs_all_ptr + at(t, stride) + bjd, mask=mask, other=0.0)
        c = softmax_j(dot_d(uhat, Q), J, BJ)
        grad += expand(c) * gs
        if not DETACH:
            grad += expand(softmax_j_grad(c, dot_d(uhat, gs))) * Q
    return grad


@triton.autotune(configs=autotune_configs(PASS_CONFIGS),
                 key=["B_BUCKET", "I", "J", "D", "iterations", "DETACH", "UNIFORM_FIRST", "HAS_R", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": prune_unfused_grad_configs}, **autotune_cache_kwargs())
@triton.jit
def stream_grad_kernel(
    uhat_ptr,         # (B, I, J, D) prediction vectors
    Q_all_ptr,        # (T, B, J, D) fp32: the states Q^t (see grad_uhat_tile for the indexing)
    gs_all_ptr,       # (iterations, B, J, D) fp32: gs^t = dL/ds^t (only the last one with DETACH)
    R_ptr,            # (B, J, D) fp32: gradient added to every capsule's dL/du_hat (HAS_R)
    bias_ptr,         # (I, J) coupling bias added after the softmax (HAS_BIAS)
    grad_uhat_ptr,    # (B, I, J, D) out, input dtype: dL/du_hat
    grad_bias_ptr,    # (cdiv(B, ROW_BLOCK), I, J) fp32 out (HAS_BIAS): per-row-block partials of dL/dbias;
                      #   a program writes its sum to its first row and zeros to its other rows
    B, I,             # batch, input capsules
    iterations,       # number of iterations T
    caps_per_chunk,   # input capsules per program along grid axis 1
    B_BUCKET,         # autotune key
    J: tl.constexpr, D: tl.constexpr,  # output capsules, their dim
    DETACH: tl.constexpr,         # only the last iteration, couplings as constants
    UNIFORM_FIRST: tl.constexpr,  # iteration 0 has uniform couplings (no state)
    HAS_R: tl.constexpr,          # add R (self-attention)
    HAS_BIAS: tl.constexpr,       # coupling bias: its terms and dL/dbias
    ROW_BLOCK: tl.constexpr,      # samples per dL/dbias row: the smallest BLOCK_B of the autotune list
    BLOCK_B: tl.constexpr,     # samples per program (the autotuned config)
    BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,  # tile widths (tiles.tile_dims)
):
    b_offs, b_mask, jd, _, bjd, mask, zero_b = sample_block(B, J, D, BLOCK_B, BJ, BDH, BDL)
    n_rows = tl.cdiv(B, ROW_BLOCK)
    j_offs = tl.arange(0, BJ)
    i_start = tl.program_id(1) * caps_per_chunk
    for i in range(i_start, tl.minimum(i_start + caps_per_chunk, I)):
        uhat = prediction_tile(uhat_ptr, uhat_ptr, uhat_ptr, b_offs, b_mask, i, I, jd, mask, zero_b, False, J, D, 1)
        grad = grad_uhat_tile(uhat, Q_all_ptr, gs_all_ptr, bjd, mask, B, iterations, DETACH, UNIFORM_FIRST, J, BJ, D)
        if HAS_R:  # self-attention: through S = sum_k u_hat_k
            grad += tl.load(R_ptr + bjd, mask=mask, other=0.0)
        if HAS_BIAS:  # c = q + bias: + bias gs; dL/dbias = sum_b u_hat . gs (gs of the last iteration)
            gs = tl.load(gs_all_ptr + at(iterations - 1, B * J * D) + bjd, mask=mask, other=0.0)
            grad += expand(bias_tile(bias_ptr, i, b_offs, J, BJ)) * gs
            row = tl.program_id(0).to(tl.int64) * (BLOCK_B // ROW_BLOCK)  # every row written, whatever the config
            tl.store(grad_bias_ptr + (row * I + i) * J + j_offs, tl.sum(dot_d(uhat, gs), axis=0), mask=j_offs < J)
            for k in range(1, BLOCK_B // ROW_BLOCK):
                tl.store(grad_bias_ptr + ((row + k) * I + i) * J + j_offs, tl.zeros((BJ,), dtype=tl.float32),
                         mask=(j_offs < J) & (row + k < n_rows))
        offs = (b_offs * I + i)[None, :, None, None] * (J * D) + jd
        tl.store(grad_uhat_ptr + offs, grad.to(grad_uhat_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=autotune_configs(GRAD_CONFIGS),
                 key=["B_BUCKET", "I", "J", "D", "DIN", "iterations", "DETACH", "UNIFORM_FIRST", "HAS_R", "HAS_BIAS",
                      "NEED_U", "NEED_W"],
                 prune_configs_by={"early_config_prune": prune_grad_configs}, **autotune_cache_kwargs())
@triton.jit
def stream_grad_fused_kernel(
    u_ptr,            # (B, I, DIN) input capsules
    W_ptr,            # (I, DIN, J, D) transform matrices, kernel layout
    Q_all_ptr,        # (T, B, J, D) fp32: the states Q^t (see grad_uhat_tile)
    gs_all_ptr,       # (iterations, B, J, D) fp32: gs^t
    R_ptr,            # (B, J, D) fp32 (HAS_R)
    bias_ptr,         # (I, J) coupling bias (HAS_BIAS)
    grad_u_ptr,       # (B, I, DIN) out, input dtype: dL/du (NEED_U)
    grad_W_ptr,       # (n_groups, I, DIN, J, D) out: dL/dW per batch group (fp32), or the sum if n_groups = 1 (NEED_W)
    grad_bias_ptr,    # (n_groups, I, J) fp32 out: dL/dbias per batch group (HAS_BIAS)
    B, I,             # batch, input capsules
    iterations,       # number of iterations T
    caps_per_chunk,   # input capsules per program along grid axis 0
    n_groups,         # batch groups along grid axis 1; group g takes batch blocks g, g + n_groups, ...
    B_BUCKET,         # autotune key
    J: tl.constexpr, D: tl.constexpr, DIN: tl.constexpr,  # output capsules, their dim, input dim
    BDIN: tl.constexpr,        # next power of two >= DIN
    DETACH: tl.constexpr, UNIFORM_FIRST: tl.constexpr, HAS_R: tl.constexpr, HAS_BIAS: tl.constexpr,  # as above
    NEED_U: tl.constexpr,      # write dL/du
    NEED_W: tl.constexpr,      # write dL/dW
    BLOCK_B: tl.constexpr,     # samples per program (the autotuned config)
    BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,  # tile widths (tiles.tile_dims)
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
        gbias = tl.zeros((BLOCK_B, BJ), dtype=tl.float32)
        for blk in range(group, n_blocks, n_groups):
            b_offs = blk * BLOCK_B + lanes
            b_mask = b_offs < B
            jd, _, bjd, mask, zero_b = tile_offsets(b_offs, B, J, D, BJ, BDH, BDL)
            uhat = prediction_tile(u_ptr, W_ptr, u_ptr, b_offs, b_mask, i, I, jd, mask, zero_b, True, J, D, DIN)
            grad = grad_uhat_tile(uhat, Q_all_ptr, gs_all_ptr, bjd, mask, B, iterations, DETACH, UNIFORM_FIRST,
                                  J, BJ, D)
            if HAS_R:
                grad += tl.load(R_ptr + bjd, mask=mask, other=0.0)
            if HAS_BIAS:
                gs = tl.load(gs_all_ptr + at(iterations - 1, B * J * D) + bjd, mask=mask, other=0.0)
                grad += expand(bias_tile(bias_ptr, i, b_offs, J, BJ)) * gs
                gbias += dot_d(uhat, gs)
            u_rows = (b_offs * I + i) * DIN  # offsets of u[b, i, 0] and grad_u[b, i, 0]
            if NEED_U:
                for k in range(DIN):  # dL/du[b, i, k] = sum_jd grad W[i, j, d, k]
                    w_k = tl.load(w_row + k * (J * D) + jd + zero_b, mask=mask, other=0.0).to(tl.float32)
                    grad_u_k = tl.sum(dot_d(grad, w_k), axis=1)
                    tl.store(grad_u_ptr + u_rows + k, grad_u_k.to(grad_u_ptr.dtype.element_ty), mask=b_mask)
            if NEED_W:
                u_blk = tl.load(u_ptr + u_rows[None, :] + k_offs[:, None],
                                mask=b_mask[None, :] & (k_offs[:, None] < DIN), other=0.0)
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
        if HAS_BIAS:
            j_offs = tl.arange(0, BJ)
            tl.store(grad_bias_ptr + (group.to(tl.int64) * I + i) * J + j_offs, tl.sum(gbias, axis=0),
                     mask=j_offs < J)


# ----------------------------------------------------------------------------------------------
# launch plan (cached per shape and device)
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


def smallest_pass_block() -> int:
    return min(c.kwargs["BLOCK_B"] for c in PASS_CONFIGS)


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
    counters = cdiv(B, smallest_pass_block())  # int32, as many as batch blocks
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


def chunk_scratch(p: Plan, B: int, J: int, D: int, like):
    """(chunk partials (n_chunks, B, J, D) fp32, arrival counters (zeros)) of a pass launch, or
    ``like`` twice when a single chunk needs neither."""
    if p.n_chunks <= 1:
        return like, like
    return (empty(p.n_chunks, B, J, D, dtype=torch.float32, device=like.device),
            torch.zeros(p.count_len, dtype=torch.int32, device=like.device))


def pass_grid(B: int, n_chunks: int):
    """Grid of a pass kernel: (batch blocks of the config's BLOCK_B, capsule chunks)."""
    return lambda meta: (cdiv(B, meta["BLOCK_B"]), n_chunks)


def sizes(u, W, u_hat):
    """(B, I, J, D, DIN) of a fused call (u (B, I, DIN), W (I, DIN, J, D)) or of u_hat (B, I, J, D) (DIN = 1)."""
    if u_hat is None:
        B, I, DIN = u.shape
        return B, I, W.shape[2], W.shape[3], DIN
    B, I, J, D = u_hat.shape
    return B, I, J, D, 1


def final_grad(p: Plan, src, W, Q_all, gs_all, iterations: int, *, detach: bool = False, uniform_first: bool,
               R=None, bias=None, need_src: bool = True, need_W: bool = True):
    """The final backward pass of any routing algorithm: (dL/dsrc or None, dL/dW or None,
    dL/dbias or None).  src = u (B, I, DIN) with W (I, DIN, J, D) (fused), or u_hat (B, I, J, D)
    with W None; Q_all, gs_all, R, bias: see the kernels.  Weight and bias gradients are reduced
    over the batch in a fixed order (deterministic)."""
    B, I, J, D, DIN = sizes(src, W, None if W is not None else src)
    dev, dtype = src.device, src.dtype
    flags = dict(DETACH=detach, UNIFORM_FIRST=uniform_first, HAS_R=R is not None, HAS_BIAS=bias is not None)
    R = R if R is not None else gs_all
    bias_arg = bias if bias is not None else gs_all
    if W is None:
        grad_uhat = empty(B, I, J, D, dtype=dtype, device=dev)
        # dL/dbias partials per ROW_BLOCK samples, so that their number does not depend on the config
        row_block = smallest_pass_block()
        grad_bias = empty(cdiv(B, row_block), I, J, dtype=torch.float32, device=dev) if bias is not None else gs_all
        key = (stream_grad_kernel, dev, dtype, p.key, iterations, tuple(flags.values()))
        launch(stream_grad_kernel, pass_grid(B, p.n_chunks), key,
               uhat_ptr=src, Q_all_ptr=Q_all, gs_all_ptr=gs_all, R_ptr=R, bias_ptr=bias_arg, grad_uhat_ptr=grad_uhat,
               grad_bias_ptr=grad_bias, B=B, I=I, iterations=iterations, caps_per_chunk=p.caps_per_chunk,
               B_BUCKET=batch_bucket(B), J=J, D=D, **flags, ROW_BLOCK=row_block, **p.dims)
        return grad_uhat, None, (sum_partials(grad_bias, bias.dtype) if bias is not None else None)
    direct = p.n_groups == 1
    grad_u = empty(B, I, DIN, dtype=dtype, device=dev) if need_src else src
    grad_W = empty(p.n_groups, I, DIN, J, D, dtype=W.dtype if direct else torch.float32, device=dev) \
        if need_W else W
    grad_bias = empty(p.n_groups, I, J, dtype=torch.float32, device=dev) if bias is not None else gs_all
    grid = (p.grad_chunks, p.n_groups)
    key = (stream_grad_fused_kernel, dev, dtype, p.key, iterations, tuple(flags.values()), need_src, need_W)
    launch(stream_grad_fused_kernel, lambda meta: grid, key,
           u_ptr=src, W_ptr=W, Q_all_ptr=Q_all, gs_all_ptr=gs_all, R_ptr=R, bias_ptr=bias_arg, grad_u_ptr=grad_u,
           grad_W_ptr=grad_W, grad_bias_ptr=grad_bias, B=B, I=I, iterations=iterations, caps_per_chunk=p.grad_caps,
           n_groups=p.n_groups, B_BUCKET=batch_bucket(B), J=J, D=D, DIN=DIN, BDIN=next_pow2(DIN), **flags,
           NEED_U=need_src, NEED_W=need_W, **p.dims)
    if need_W:
        grad_W = grad_W[0] if direct else sum_partials(grad_W, W.dtype)
    return (grad_u if need_src else None), (grad_W if need_W else None), \
        (sum_partials(grad_bias, bias.dtype) if bias is not None else None)
