"""Dynamic routing kernels (routing-by-agreement, Sabour et al. 2017, Procedure 1).

One set of kernels serves two ops, switched by the constexpr FUSED:
  * dynamic_routing: the prediction vectors u_hat (B, I, J, D) are read from memory;
  * transform_route: u_hat[b, i, j] = W[i, j] @ u[b, i] is recomputed on the fly from
    u (B, I, Din) and W (I, J, D, Din) in every pass, so no B*I*J*D tensor ever exists.

Forward (per sample; r iterations).  The logits b are never stored: b starts at 0 and only
accumulates agreements, so with V^t = v^1 + ... + v^t (V^0 = 0)

    b^t_ij = u_ij . V^{t-1}_j,   c^t_ij = softmax_j(b^t_ij),   s^t_j = sum_i c^t_ij u_ij,
    v^t = squash(s^t),           V^t = V^{t-1} + v^t,           output v^r.

Each iteration is ONE streaming pass over i (`routing_pass_kernel`): programs split the batch
into blocks of BLOCK_B samples and the input capsules into chunks, and write partial sums of
s^t; `routing_fwd_finish_kernel` reduces the partials, squashes, and updates V.  Saved for the
backward: s^t and V^{t-1} for every t, (r, B, J, D) each, tiny.

Backward.  With g^t = dL/dv^t, G^t = dL/dV^t (G^r = 0; V^r is never used):
    g^r = dL/dv (given),  g^t = G^t for t < r           (V^t = V^{t-1} + v^t)
    gs^t = squash'(s^t)^T g^t
    gc^t_ij = u_ij . gs^t_j                              (s^t = sum_i c^t_ij u_ij)
    gb^t_ij = c^t_ij (gc^t_ij - sum_k c^t_ik gc^t_ik)   (softmax over j)
    G^{t-1}_j = G^t_j + sum_i gb^t_ij u_ij               (b^t_ij = u_ij . V^{t-1}_j, t >= 2)
    dL/du_ij = sum_t [ c^t_ij gs^t_j + gb^t_ij V^{t-1}_j ]
So for t = r .. 2 one reduction pass (`routing_pass_kernel`, BACKWARD=True) produces
sum_i gb^t u for G^{t-1}, and `routing_bwd_finish_kernel` turns it into gs^{t-1}; then one
final pass (`routing_grad_kernel`) recomputes c^t and gb^t for every t and writes dL/du_hat
(unfused) or, fused, dL/du = sum_j W^T dL/du_hat and per-group partial sums of
dL/dW = sum_b dL/du_hat (x) u, reduced over the fixed number of groups by
`kernels/partials.py` (deterministic, no atomics).
With detach=True the logits do not depend on u_hat, so dL/du_ij = c^r_ij gs^r_j: no
reduction passes, only the final pass with t = r.

All statistics are fp32; inputs may be fp32, fp16 or bf16; results are cast to the input dtype.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (autotune_cache_kwargs, autotune_configs, batch_bucket, empty,
                      interpreter_enabled, on_device, use_tuned_configs)
from .partials import MAX_GROUPS, sum_partials
from .squash import _squash_scale

ROUTING_EPS = 1e-8  # eps of the squash inside routing (same as capstriton.reference)


# ----------------------------------------------------------------------------------------------
# tile helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _prediction_tile(u_ptr, W_ptr, uhat_ptr, b_offs, b_mask, i, I, J, D, DIN, jd_offs, jd_mask,
                     FUSED: tl.constexpr, BLOCK_B: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr):
    """u_hat[b, i, :, :] for a block of samples as a (BLOCK_B, BJ, BD) fp32 tile (zero padded).

    Fused: outer products over the Din inputs (exact fp32 FMAs; Din is small)."""
    if FUSED:
        tile = tl.zeros((BLOCK_B, BJ, BD), dtype=tl.float32)
        u_rows = u_ptr + (b_offs * I + i) * DIN       # (BLOCK_B,) pointers to u[b, i, 0]
        w_rows = W_ptr + (i * J * D + jd_offs) * DIN   # (BJ, BD) pointers to W[i, j, d, 0]
        for k in range(DIN):
            u_k = tl.load(u_rows + k, mask=b_mask, other=0.0).to(tl.float32)
            w_k = tl.load(w_rows + k, mask=jd_mask, other=0.0).to(tl.float32)
            tile += u_k[:, None, None] * w_k[None, :, :]
    else:
        offs = ((b_offs * I + i) * J * D)[:, None, None] + jd_offs[None, :, :]
        mask = b_mask[:, None, None] & jd_mask[None, :, :]
        tile = tl.load(uhat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tile


@triton.jit
def _coupling(uhat, V, j_mask):
    """c_ij = softmax over output capsules j of the logits b_ij = u_hat_ij . V_j: (BLOCK_B, BJ)."""
    logits = tl.sum(uhat * V, axis=2)
    logits = tl.where(j_mask[None, :], logits, float("-inf"))
    peak = tl.max(logits, axis=1)
    e = tl.exp(logits - peak[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _softmax_grad(c, uhat, gs):
    """gb_ij = c_ij (gc_ij - sum_k c_ik gc_ik) with gc_ij = u_hat_ij . gs_j."""
    gc = tl.sum(uhat * gs, axis=2)
    return c * (gc - tl.sum(c * gc, axis=1)[:, None])


# ----------------------------------------------------------------------------------------------
# streaming pass over the input capsules (forward iteration or backward reduction)
# ----------------------------------------------------------------------------------------------
def _elements_per_thread(config: triton.Config, BJ: int, BD: int) -> float:
    return config.kwargs["BLOCK_B"] * BJ * BD / (32 * config.num_warps)


def _fits_registers(config: triton.Config, BJ: int, BD: int) -> bool:
    """Rule of thumb for tile widths not in the measured tables: a (BLOCK_B, BJ, BD) fp32 tile of
    at most 16 elements per thread (8 with 16 warps, where the register cap falls to 128)."""
    per_thread = _elements_per_thread(config, BJ, BD)
    return per_thread <= (8 if config.num_warps >= 16 else 16)


def _register_pruner(measured: dict):
    """early_config_prune keeping the configs measured spill-free for the padded tile width
    BJ*BD (ptxas -v on sm_80/sm_90 under triton 3.6 and 3.8, see kernels/compile_check.py); for
    other widths the rule of thumb above, and the config with the smallest tile if none fits."""
    def prune(configs, named_args, **kwargs):
        BJ, BD = kwargs["BJ"], kwargs["BD"]
        known = measured.get(BJ * BD)
        if known is not None:
            fitting = [c for c in configs if (c.kwargs["BLOCK_B"], c.num_warps) in known]
        else:
            fitting = [c for c in configs if _fits_registers(c, BJ, BD)]
        return fitting or [min(configs, key=lambda c: _elements_per_thread(c, BJ, BD))]
    return prune


# (BLOCK_B, num_warps) measured spill-free, by padded tile width BJ*BD
PASS_MEASURED = {256: {(16, 8), (8, 4), (16, 16), (4, 4)}, 512: {(8, 8)}}
# 512 (J = 17..32): (8, 8) spills on sm_80 under triton 3.6 only; nothing wider is spill-free
GRAD_MEASURED = {256: {(16, 8)}, 512: {(8, 8)}}
prune_pass_configs = _register_pruner(PASS_MEASURED)
prune_grad_configs = _register_pruner(GRAD_MEASURED)

# The first config of each list is the default (the interpreter and the test suite run only it).
PASS_CONFIGS = [
    triton.Config({"BLOCK_B": 16}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_B": 8}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_B": 16}, num_warps=16, num_stages=1),
    triton.Config({"BLOCK_B": 4}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_B": 8}, num_warps=8, num_stages=1),
]


@triton.autotune(configs=autotune_configs(PASS_CONFIGS), key=["B_BUCKET", "I", "J", "D", "DIN", "FUSED", "BACKWARD"],
                 prune_configs_by={"early_config_prune": prune_pass_configs}, **autotune_cache_kwargs())
@triton.jit
def routing_pass_kernel(
    u_ptr,            # (B, I, DIN) input capsules (FUSED) - else unused
    W_ptr,            # (I, J, D, DIN) transform matrices (FUSED) - else unused
    uhat_ptr,         # (B, I, J, D) prediction vectors (not FUSED) - else unused
    V_ptr,            # (B, J, D) fp32: V^{t-1}, the sum of earlier outputs (logits = u_hat . V)
    gs_ptr,           # (B, J, D) fp32: gs^t (BACKWARD only)
    part_ptr,         # (n_chunks, B, J, D) fp32 out: this chunk's partial sum over its capsules
    B, I, J, D, DIN,  # sizes
    caps_per_chunk,   # input capsules per program along grid axis 1
    B_BUCKET,         # autotune key: batch rounded up to a power of two
    BACKWARD: tl.constexpr,  # False: sum_i c_ij u_hat_ij; True: sum_i gb_ij u_hat_ij
    FUSED: tl.constexpr,
    BLOCK_B: tl.constexpr,   # samples per program
    BJ: tl.constexpr,        # next power of two >= J
    BD: tl.constexpr,        # next power of two >= D
):
    pid_b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    b_offs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = b_offs < B
    j_offs = tl.arange(0, BJ)
    d_offs = tl.arange(0, BD)
    j_mask = j_offs < J
    jd_offs = j_offs[:, None] * D + d_offs[None, :]
    jd_mask = j_mask[:, None] & (d_offs[None, :] < D)
    bjd_offs = (b_offs * J * D)[:, None, None] + jd_offs[None, :, :]
    tile_mask = b_mask[:, None, None] & jd_mask[None, :, :]

    V = tl.load(V_ptr + bjd_offs, mask=tile_mask, other=0.0)
    if BACKWARD:
        gs = tl.load(gs_ptr + bjd_offs, mask=tile_mask, other=0.0)
    acc = tl.zeros((BLOCK_B, BJ, BD), dtype=tl.float32)
    i_start = chunk * caps_per_chunk
    i_end = tl.minimum(i_start + caps_per_chunk, I)
    for i in range(i_start, i_end):
        uhat = _prediction_tile(u_ptr, W_ptr, uhat_ptr, b_offs, b_mask, i, I, J, D, DIN, jd_offs, jd_mask,
                                FUSED, BLOCK_B, BJ, BD)
        c = _coupling(uhat, V, j_mask)
        if BACKWARD:
            c = _softmax_grad(c, uhat, gs)
        acc += c[:, :, None] * uhat
    tl.store(part_ptr + chunk * B * J * D + bjd_offs, acc, mask=tile_mask)


# ----------------------------------------------------------------------------------------------
# per-iteration finishing kernels: reduce the chunk partials, squash / squash backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sample_tile(J, D, BJ: tl.constexpr, BD: tl.constexpr):
    """Offsets and mask of sample program_id(0)'s (J, D) block of a (B, J, D) tensor, padded to (BJ, BD)."""
    b = tl.program_id(0).to(tl.int64)
    j_offs = tl.arange(0, BJ)
    d_offs = tl.arange(0, BD)
    mask = (j_offs[:, None] < J) & (d_offs[None, :] < D)
    return b * J * D + j_offs[:, None] * D + d_offs[None, :], mask


@triton.jit
def _sum_partials(part_ptr, n_chunks, chunk_stride, offs, mask, BJ: tl.constexpr, BD: tl.constexpr,
                  CHUNKS_PER_STEP: tl.constexpr = 8):
    """sum over p of part[p][offs], CHUNKS_PER_STEP partials per load, in a fixed order."""
    steps = tl.arange(0, CHUNKS_PER_STEP)
    acc = tl.zeros((CHUNKS_PER_STEP, BJ, BD), dtype=tl.float32)
    for p0 in range(0, n_chunks, CHUNKS_PER_STEP):
        chunk = p0 + steps
        ptrs = part_ptr + (chunk.to(tl.int64) * chunk_stride)[:, None, None] + offs[None, :, :]
        acc += tl.load(ptrs, mask=(chunk < n_chunks)[:, None, None] & mask[None, :, :], other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def routing_fwd_finish_kernel(
    part_ptr,         # (n_chunks, B, J, D) fp32 partial sums of s^t
    n_chunks,         # number of partials
    s_ptr,            # (B, J, D) fp32 out: s^t (saved for backward)
    V_prev_ptr,       # (B, J, D) fp32: V^{t-1}
    V_next_ptr,       # (B, J, D) fp32 out: V^t = V^{t-1} + v^t (unless LAST)
    v_ptr,            # (B, J, D) out, input dtype: v^r (LAST only)
    B, J, D,
    eps,              # squash epsilon
    LAST: tl.constexpr,   # t = r: write the output instead of V^t
    BJ: tl.constexpr,
    BD: tl.constexpr,
):
    offs, mask = _sample_tile(J, D, BJ, BD)
    s = _sum_partials(part_ptr, n_chunks, B * J * D, offs, mask, BJ, BD)
    tl.store(s_ptr + offs, s, mask=mask)
    f, _ = _squash_scale(tl.sum(s * s, axis=1), eps)
    v = s * f[:, None]
    if LAST:
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    else:
        v += tl.load(V_prev_ptr + offs, mask=mask, other=0.0)
        tl.store(V_next_ptr + offs, v, mask=mask)


@triton.jit
def routing_bwd_finish_kernel(
    part_ptr,         # (n_chunks, B, J, D) fp32 partials of sum_i gb^{t+1} u_hat (HAS_PARTS)
    n_chunks,
    G_ptr,            # (B, J, D) fp32 in/out: running G = dL/dV; holds G^{t+1} in, G^t out
    grad_v_ptr,       # (B, J, D) dL/dv^r, any float dtype (LAST only)
    s_ptr,            # (B, J, D) fp32: s^t
    gs_ptr,           # (B, J, D) fp32 out: gs^t = squash'(s^t)^T dL/dv^t
    B, J, D,
    eps,
    HAS_PARTS: tl.constexpr,  # t < r: G^t = G^{t+1} + partials
    ACCUMULATE: tl.constexpr,  # t < r - 1: G^{t+1} nonzero, read it from G_ptr
    LAST: tl.constexpr,        # t = r: dL/dv^t = grad_v
    BJ: tl.constexpr,
    BD: tl.constexpr,
):
    offs, mask = _sample_tile(J, D, BJ, BD)
    g = tl.zeros((BJ, BD), dtype=tl.float32)
    if HAS_PARTS:
        if ACCUMULATE:
            g += tl.load(G_ptr + offs, mask=mask, other=0.0)
        g += _sum_partials(part_ptr, n_chunks, B * J * D, offs, mask, BJ, BD)
        tl.store(G_ptr + offs, g, mask=mask)
    if LAST:
        g += tl.load(grad_v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    f, df = _squash_scale(tl.sum(s * s, axis=1), eps)
    gs = f[:, None] * g + (2.0 * df * tl.sum(s * g, axis=1))[:, None] * s
    tl.store(gs_ptr + offs, gs, mask=mask)


# ----------------------------------------------------------------------------------------------
# final backward pass: dL/du_hat (unfused) or dL/du and partial dL/dW (fused)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grad_prediction_tile(uhat, V_all_ptr, gs_all_ptr, bjd_offs, tile_mask, j_mask, B, J, D, iterations,
                          DETACH: tl.constexpr, BLOCK_B: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr):
    """dL/du_hat for one (BLOCK_B, BJ, BD) tile: sum over t of c^t gs^t + gb^t V^{t-1}."""
    grad = tl.zeros((BLOCK_B, BJ, BD), dtype=tl.float32)
    t_first = 0
    if DETACH:
        t_first = iterations - 1
    for t in range(t_first, iterations):  # 0-based: V_all[t] = V^{t}, gs_all[t] = gs^{t+1}
        V = tl.load(V_all_ptr + t * B * J * D + bjd_offs, mask=tile_mask, other=0.0)
        gs = tl.load(gs_all_ptr + t * B * J * D + bjd_offs, mask=tile_mask, other=0.0)
        c = _coupling(uhat, V, j_mask)
        grad += c[:, :, None] * gs
        if not DETACH:
            gb = _softmax_grad(c, uhat, gs)
            grad += gb[:, :, None] * V
    return grad


# For the paper's tile width one config is spill-free on sm_80 and sm_90 under both triton
# 3.6 and 3.8 (16 warps spills under 3.6, BLOCK_B = 8 under 3.8 on sm_80).
GRAD_CONFIGS = [
    triton.Config({"BLOCK_B": 16}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_B": 8}, num_warps=8, num_stages=1),
]
# the launcher makes at most cdiv(B, 32) batch groups: with BLOCK_B <= 32 each group gets a
# batch block, so every group's weight-gradient partial is written
assert all(c.kwargs["BLOCK_B"] <= 32 for c in GRAD_CONFIGS)


@triton.autotune(configs=autotune_configs(GRAD_CONFIGS), key=["B_BUCKET", "I", "J", "D", "DIN", "iterations", "FUSED", "DETACH"],
                 prune_configs_by={"early_config_prune": prune_grad_configs}, **autotune_cache_kwargs())
@triton.jit
def routing_grad_kernel(
    u_ptr,            # (B, I, DIN) input capsules (FUSED)
    W_ptr,            # (I, J, D, DIN) transform matrices (FUSED)
    uhat_ptr,         # (B, I, J, D) prediction vectors (not FUSED)
    V_all_ptr,        # (r, B, J, D) fp32: V^0 (= 0) .. V^{r-1}
    gs_all_ptr,       # (r, B, J, D) fp32: gs^1 .. gs^r (only gs^r with DETACH)
    grad_uhat_ptr,    # (B, I, J, D) out, input dtype: dL/du_hat (not FUSED)
    grad_u_ptr,       # (B, I, DIN) out, input dtype: dL/du (FUSED)
    grad_W_part_ptr,  # (n_groups, I, J, D, DIN) fp32 out: per-group dL/dW (FUSED)
    B, I, J, D, DIN,
    iterations,       # r
    caps_per_chunk,   # input capsules per program (along axis 0 if FUSED, else axis 1)
    n_groups,         # FUSED: batch groups along axis 1; group g takes batch blocks g, g+n_groups, ...
    B_BUCKET,         # autotune key
    DETACH: tl.constexpr,
    FUSED: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BJ: tl.constexpr,
    BD: tl.constexpr,
):
    j_offs = tl.arange(0, BJ)
    d_offs = tl.arange(0, BD)
    j_mask = j_offs < J
    jd_offs = j_offs[:, None] * D + d_offs[None, :]
    jd_mask = j_mask[:, None] & (d_offs[None, :] < D)
    if FUSED:
        chunk = tl.program_id(0).to(tl.int64)
        group = tl.program_id(1)
        n_blocks = tl.cdiv(B, BLOCK_B)
        i_start = chunk * caps_per_chunk
        i_end = tl.minimum(i_start + caps_per_chunk, I)
        # batch blocks outer, capsules inner: the block's V and gs tiles stay cache resident
        for blk in range(group, n_blocks, n_groups):
            b_offs = tl.arange(0, BLOCK_B).to(tl.int64) + blk * BLOCK_B
            b_mask = b_offs < B
            bjd_offs = (b_offs * J * D)[:, None, None] + jd_offs[None, :, :]
            tile_mask = b_mask[:, None, None] & jd_mask[None, :, :]
            for i in range(i_start, i_end):
                uhat = _prediction_tile(u_ptr, W_ptr, uhat_ptr, b_offs, b_mask, i, I, J, D, DIN, jd_offs,
                                        jd_mask, FUSED, BLOCK_B, BJ, BD)
                grad = _grad_prediction_tile(uhat, V_all_ptr, gs_all_ptr, bjd_offs, tile_mask, j_mask, B, J, D,
                                             iterations, DETACH, BLOCK_B, BJ, BD)
                u_rows = (b_offs * I + i) * DIN  # (BLOCK_B,) offsets of u[b, i, 0] and grad_u[b, i, 0]
                w_rows = W_ptr + (i * J * D + jd_offs) * DIN  # (BJ, BD) pointers to W[i, j, d, 0]
                gw_rows = grad_W_part_ptr + (group.to(tl.int64) * I * J * D + i * J * D + jd_offs) * DIN
                # this program alone owns grad_W_part[group, i]: it accumulates there over its batch
                # blocks (read-modify-write in a fixed order, so deterministic); the barrier makes the
                # previous block's stores visible to every thread of the program.
                tl.debug_barrier()
                for k in range(DIN):
                    w_k = tl.load(w_rows + k, mask=jd_mask, other=0.0).to(tl.float32)
                    grad_u_k = tl.sum(tl.sum(grad * w_k[None, :, :], axis=2), axis=1)  # sum_jd g W[:, :, k]
                    tl.store(grad_u_ptr + u_rows + k, grad_u_k.to(grad_u_ptr.dtype.element_ty), mask=b_mask)
                    u_k = tl.load(u_ptr + u_rows + k, mask=b_mask, other=0.0).to(tl.float32)
                    grad_W_k = tl.sum(grad * u_k[:, None, None], axis=0)  # sum_b g u[:, k]
                    if blk != group:
                        grad_W_k += tl.load(gw_rows + k, mask=jd_mask, other=0.0)
                    tl.store(gw_rows + k, grad_W_k, mask=jd_mask)
    else:
        pid_b = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        b_offs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        b_mask = b_offs < B
        bjd_offs = (b_offs * J * D)[:, None, None] + jd_offs[None, :, :]
        tile_mask = b_mask[:, None, None] & jd_mask[None, :, :]
        i_start = chunk * caps_per_chunk
        i_end = tl.minimum(i_start + caps_per_chunk, I)
        for i in range(i_start, i_end):
            uhat = _prediction_tile(u_ptr, W_ptr, uhat_ptr, b_offs, b_mask, i, I, J, D, DIN, jd_offs, jd_mask,
                                    FUSED, BLOCK_B, BJ, BD)
            grad = _grad_prediction_tile(uhat, V_all_ptr, gs_all_ptr, bjd_offs, tile_mask, j_mask, B, J, D,
                                         iterations, DETACH, BLOCK_B, BJ, BD)
            offs = ((b_offs * I + i) * J * D)[:, None, None] + jd_offs[None, :, :]
            tl.store(grad_uhat_ptr + offs, grad.to(grad_uhat_ptr.dtype.element_ty), mask=tile_mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
_GRID_BLOCK_B = 16  # BLOCK_B of the default config: sizes the chunk grid (the same for every config)


def _target_programs(device: torch.device) -> int:
    """About four programs per SM; the interpreter runs programs one by one, so few there."""
    if interpreter_enabled() or device.type != "cuda":
        return 4
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _chunking(B: int, I: int, device: torch.device) -> tuple[int, int]:
    """(n_chunks, caps_per_chunk): split the input capsules so that the grid fills the GPU."""
    batch_blocks = triton.cdiv(B, _GRID_BLOCK_B)
    n_chunks = max(1, min(I, triton.cdiv(_target_programs(device), batch_blocks)))
    caps = triton.cdiv(I, n_chunks)
    return triton.cdiv(I, caps), caps


def _pass_grid(B: int, n_chunks: int):
    """Grid of the streaming passes (and the unfused final pass): batch blocks x capsule chunks."""
    return lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), n_chunks)


def _dims(J: int, D: int) -> dict:
    return {"BJ": triton.next_power_of_2(J), "BD": triton.next_power_of_2(D)}


def _routing_forward(u, W, u_hat, iterations: int, fused: bool):
    use_tuned_configs()
    src = u if fused else u_hat
    B, I = src.shape[0], src.shape[1]
    J, D = (W.shape[1], W.shape[2]) if fused else (u_hat.shape[2], u_hat.shape[3])
    din = W.shape[3] if fused else 1
    dev = src.device
    n_chunks, caps = _chunking(B, I, dev)
    dims = _dims(J, D)
    dummy = src
    part = empty(n_chunks, B, J, D, dtype=torch.float32, device=dev)
    s_all = empty(iterations, B, J, D, dtype=torch.float32, device=dev)
    V_all = empty(iterations, B, J, D, dtype=torch.float32, device=dev)
    V_all[0].zero_()  # V^0 = 0: the first iteration's logits vanish, its coupling is uniform
    v = empty(B, J, D, dtype=src.dtype, device=dev)
    grid = _pass_grid(B, n_chunks)
    for t in range(iterations):
        last = t == iterations - 1
        routing_pass_kernel[grid](
            u if fused else dummy, W if fused else dummy, dummy if fused else u_hat, V_all[t], V_all[t], part,
            B, I, J, D, din, caps, batch_bucket(B), BACKWARD=False, FUSED=fused, **dims)
        routing_fwd_finish_kernel[(B,)](
            part, n_chunks, s_all[t], V_all[t], V_all[t + 1] if not last else V_all[t], v, B, J, D, ROUTING_EPS,
            LAST=last, **dims)
    return v, s_all, V_all


def _routing_backward(u, W, u_hat, s_all, V_all, grad_v, iterations: int, detach: bool, fused: bool):
    use_tuned_configs()
    src = u if fused else u_hat
    B, I = src.shape[0], src.shape[1]
    J, D = s_all.shape[2], s_all.shape[3]
    din = W.shape[3] if fused else 1
    dev = src.device
    n_chunks, caps = _chunking(B, I, dev)
    dims = _dims(J, D)
    dummy = src
    grad_v = grad_v.contiguous()
    gs_all = empty(iterations, B, J, D, dtype=torch.float32, device=dev)
    G = empty(B, J, D, dtype=torch.float32, device=dev)
    part = empty(n_chunks, B, J, D, dtype=torch.float32, device=dev)
    grid = _pass_grid(B, n_chunks)
    t_stop = iterations - 1 if detach else 0
    for t in range(iterations - 1, t_stop - 1, -1):  # 0-based iteration index
        has_parts = t < iterations - 1
        if has_parts:  # partials of sum_i gb^{t+2} u_hat (1-based) for G^{t+1}
            routing_pass_kernel[grid](
                u if fused else dummy, W if fused else dummy, dummy if fused else u_hat, V_all[t + 1],
                gs_all[t + 1], part, B, I, J, D, din, caps, batch_bucket(B),
                BACKWARD=True, FUSED=fused, **dims)
        routing_bwd_finish_kernel[(B,)](
            part, n_chunks, G, grad_v, s_all[t], gs_all[t], B, J, D, ROUTING_EPS,
            HAS_PARTS=has_parts, ACCUMULATE=t < iterations - 2, LAST=not has_parts, **dims)

    if fused:
        target = _target_programs(dev)
        n_groups = max(1, min(MAX_GROUPS, triton.cdiv(B, 32), triton.cdiv(target, I)))
        grad_caps = triton.cdiv(I, max(1, min(I, target)))
        grad_u = empty(B, I, din, dtype=u.dtype, device=dev)
        grad_W_part = empty(n_groups, I, J, D, din, dtype=torch.float32, device=dev)
        routing_grad_kernel[(triton.cdiv(I, grad_caps), n_groups)](
            u, W, dummy, V_all, gs_all, dummy, grad_u, grad_W_part, B, I, J, D, din, iterations, grad_caps,
            n_groups, batch_bucket(B), DETACH=detach, FUSED=True, **dims)
        return grad_u, sum_partials(grad_W_part, W.dtype)
    grad_uhat = empty(B, I, J, D, dtype=u_hat.dtype, device=dev)
    routing_grad_kernel[grid](
        dummy, dummy, u_hat, V_all, gs_all, grad_uhat, dummy, dummy, B, I, J, D, 1, iterations, caps, 1,
        batch_bucket(B), DETACH=detach, FUSED=False, **dims)
    return grad_uhat


def dynamic_routing_fwd(u_hat: torch.Tensor, iterations: int):
    """u_hat (B, I, J, D) contiguous -> (v (B, J, D) in u_hat's dtype, s_all, V_all (r, B, J, D) fp32)."""
    with on_device(u_hat):
        return _routing_forward(None, None, u_hat, iterations, fused=False)


def dynamic_routing_bwd(u_hat, s_all, V_all, grad_v, iterations: int, detach: bool) -> torch.Tensor:
    """dL/du_hat from the saved per-iteration s and V and dL/dv."""
    with on_device(u_hat):
        return _routing_backward(None, None, u_hat, s_all, V_all, grad_v, iterations, detach, fused=False)


def transform_route_fwd(u: torch.Tensor, W: torch.Tensor, iterations: int):
    """u (B, I, Din), W (I, J, D, Din) contiguous -> (v (B, J, D), s_all, V_all); u_hat never exists."""
    with on_device(u):
        return _routing_forward(u, W, None, iterations, fused=True)


def transform_route_bwd(u, W, s_all, V_all, grad_v, iterations: int, detach: bool):
    """(dL/du, dL/dW) recomputing u_hat = W u on the fly."""
    with on_device(u):
        return _routing_backward(u, W, None, s_all, V_all, grad_v, iterations, detach, fused=True)


# ----------------------------------------------------------------------------------------------
# compile check (kernels/compile_check.py): every kernel at the configs it uses for the paper's
# DigitCaps shape (J = 10 -> BJ = 16, D = 16; fp32, fp16 and bf16 inputs) and for the wider
# benchmark shape (J = 32 -> BJ = 32; fp32 and fp16).
# ----------------------------------------------------------------------------------------------
def _compile_cases():
    cases = []
    for dtype, BJ in (("fp32", 16), ("fp16", 16), ("bf16", 16), ("fp32", 32), ("fp16", 32)):
        dims = {"BJ": BJ, "BD": 16}
        src = f"*{dtype}"
        # every config that survives pruning for fp32/fp16; the default config for bf16
        pick = (lambda configs: configs) if dtype != "bf16" else (lambda configs: configs[:1])
        f32 = "*fp32"
        sizes = {"B": "i32", "I": "i32", "J": "i32", "D": "i32", "DIN": "i32"}
        for fused in (True, False):
            for backward in (False, True):
                for cfg in pick(prune_pass_configs(PASS_CONFIGS, {}, **dims)):
                    sig = {"u_ptr": src, "W_ptr": src, "uhat_ptr": src, "V_ptr": f32, "gs_ptr": f32, "part_ptr": f32,
                           **sizes, "caps_per_chunk": "i32", "B_BUCKET": "i32"}
                    const = {"BACKWARD": backward, "FUSED": fused, **cfg.kwargs, **dims}
                    cases.append({"name": f"routing_pass[{dtype},BJ={BJ},fused={fused},backward={backward}]",
                                  "fn": routing_pass_kernel.fn, "signature": sig, "constexprs": const,
                                  "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            for detach in (False, True):
                for cfg in pick(prune_grad_configs(GRAD_CONFIGS, {}, **dims)):
                    sig = {"u_ptr": src, "W_ptr": src, "uhat_ptr": src, "V_all_ptr": f32, "gs_all_ptr": f32,
                           "grad_uhat_ptr": src, "grad_u_ptr": src, "grad_W_part_ptr": f32, **sizes,
                           "iterations": "i32", "caps_per_chunk": "i32", "n_groups": "i32", "B_BUCKET": "i32"}
                    const = {"DETACH": detach, "FUSED": fused, **cfg.kwargs, **dims}
                    cases.append({"name": f"routing_grad[{dtype},BJ={BJ},fused={fused},detach={detach}]",
                                  "fn": routing_grad_kernel.fn, "signature": sig, "constexprs": const,
                                  "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        bjd = {"B": "i32", "J": "i32", "D": "i32", "eps": "fp32"}
        for last in (False, True):
            sig = {"part_ptr": f32, "n_chunks": "i32", "s_ptr": f32, "V_prev_ptr": f32, "V_next_ptr": f32,
                   "v_ptr": src, **bjd}
            cases.append({"name": f"routing_fwd_finish[{dtype},BJ={BJ},last={last}]",
                          "fn": routing_fwd_finish_kernel, "signature": sig,
                          "constexprs": {"LAST": last, **dims}, "num_warps": 4, "num_stages": 3})
        for has_parts, accumulate, last in ((False, False, True), (True, False, False), (True, True, False)):
            sig = {"part_ptr": f32, "n_chunks": "i32", "G_ptr": f32, "grad_v_ptr": src, "s_ptr": f32,
                   "gs_ptr": f32, **bjd}
            const = {"HAS_PARTS": has_parts, "ACCUMULATE": accumulate, "LAST": last, **dims}
            cases.append({"name": f"routing_bwd_finish[{dtype},BJ={BJ},parts={has_parts},acc={accumulate}]",
                          "fn": routing_bwd_finish_kernel, "signature": sig, "constexprs": const,
                          "num_warps": 4, "num_stages": 3})
    return cases


COMPILE_CASES = _compile_cases()
