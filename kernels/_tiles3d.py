"""Three-dimensional (BLOCK_B, BJ, BD) tile helpers of the first routing kernels.

The dynamic-routing kernels (kernels/routing.py) moved to the four-dimensional layout of
kernels/_capsule_tiles.py; the attention-routing kernels still build on these.
"""
from __future__ import annotations

import triton
import triton.language as tl


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
