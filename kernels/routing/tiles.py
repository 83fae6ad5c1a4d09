"""Tile layout shared by the streaming capsule kernels: one thread owns the D-vector of one
(sample, output capsule) pair.

A program works on a block of BLOCK_B samples x all J output capsules x all D dimensions, held
as a 4-D tile of shape (BDH, BLOCK_B, BJ, BDL) with d = dh * BDL + dl.  The dims J, D and DIN are
constexprs, so a D-vector's memory offsets are provably contiguous and aligned: Triton gives
every thread BDL (<= 4) consecutive elements along dl (one 128-bit load), spreads the J output
capsules over the lanes of a warp and the samples over the remaining lanes and the warps, and
keeps the BDH slices of the D-vector as per-thread repetitions.  The tile then lives in
registers as "one D-vector per thread":

* dot products over D (routing logits, u_hat . gs) are thread-local FMA chains;
* the softmax over the output capsules j is a few shuffles inside one warp (no shared memory,
  no CTA-wide barrier) as long as BJ <= 32;
* every (BLOCK_B, BJ) row statistic broadcasts back to the tile for free.

That layout needs BLOCK_B = (32 // BJ) * num_warps (one sample per lane group); the autotune
lists also keep larger blocks (several samples per thread).  Operands that are the same for
every sample (the transform matrices W[i]) are loaded in the full tile shape (a zero offset
per sample) so that they get the same layout; a warp's lanes of different samples read the
same addresses, which the memory system merges.

The transform matrices are read in the kernel layout (I, DIN, J, D) (W[i, j, d, k] at
((i * DIN + k) * J + j) * D + d), so the D-vector of W[i, j, :, k] is contiguous too.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import next_pow2


def tile_dims(J: int, D: int) -> dict:
    """Constexpr tile widths for J output capsules of dimension D (plain Python: cheap on the host)."""
    BJ, BD = next_pow2(J), next_pow2(D)
    BDL = min(4, BD)
    return {"BJ": BJ, "BDH": BD // BDL, "BDL": BDL}


def lanes_per_sample(BJ: int) -> int:
    """Lanes of a warp that hold different samples when the J output capsules span the rest."""
    return max(1, 32 // BJ)


@triton.jit
def tile_offsets(b_offs, B, J: tl.constexpr, D: tl.constexpr, BJ: tl.constexpr, BDH: tl.constexpr,
                 BDL: tl.constexpr):
    """Offsets and masks of a (BDH, BLOCK_B, BJ, BDL) tile of a (B, J, D) tensor for the samples b_offs.

    Returns (jd, jd_mask, bjd, mask, zero_b): jd (BDH, 1, BJ, BDL) offsets of (j, d) inside one
    sample's (J, D) block and their mask; bjd, mask: the full tile's offsets and mask; zero_b
    (1, BLOCK_B, 1, 1) zeros that broadcast a per-sample-independent load to the tile's layout."""
    dh = tl.arange(0, BDH)[:, None, None, None]
    jj = tl.arange(0, BJ)[None, None, :, None]
    dl = tl.arange(0, BDL)[None, None, None, :]
    d = dh * BDL + dl
    jd = jj * D + d
    jd_mask = (jj < J) & (d < D)
    bb = b_offs[None, :, None, None]
    bjd = bb * (J * D) + jd
    mask = jd_mask & (bb < B)
    return jd, jd_mask, bjd, mask, bb * 0


@triton.jit
def prediction_tile(u_ptr, W_ptr, uhat_ptr, b_offs, b_mask, i, I, jd, mask, zero_b, FUSED: tl.constexpr,
                    J: tl.constexpr, D: tl.constexpr, DIN: tl.constexpr):
    """u_hat[b, i] for the tile's samples as an fp32 tile (zero where masked).

    FUSED: u_hat[b, i, j, :] = sum_k u[b, i, k] W[i, j, :, k] (W in the kernel layout); each
    thread accumulates its D-vector with DIN exact fp32 FMAs per element.  Otherwise the
    prediction vectors are read from u_hat (B, I, J, D)."""
    if FUSED:
        w_row = W_ptr + i * (DIN * J * D) + jd + zero_b
        u_row = u_ptr + (b_offs * I + i) * DIN
        u_k = tl.load(u_row, mask=b_mask, other=0.0).to(tl.float32)
        tile = u_k[None, :, None, None] * tl.load(w_row, mask=mask, other=0.0).to(tl.float32)
        for k in range(1, DIN):  # a loop, not unrolled: the W loads are not all hoisted
            u_k = tl.load(u_row + k, mask=b_mask, other=0.0).to(tl.float32)
            tile += u_k[None, :, None, None] * tl.load(w_row + k * (J * D), mask=mask, other=0.0).to(tl.float32)
    else:
        offs = (b_offs * I + i)[None, :, None, None] * (J * D) + jd
        tile = tl.load(uhat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tile


@triton.jit
def dot_d(x, y):
    """sum over d of x * y for two tiles: (BLOCK_B, BJ), thread-local."""
    return tl.sum(tl.sum(x * y, axis=3), axis=0)


@triton.jit
def softmax_j(logits, J: tl.constexpr, BJ: tl.constexpr):
    """Softmax over the output capsules (axis 1) of (BLOCK_B, BJ) logits; padded j get 0."""
    j_mask = (tl.arange(0, BJ) < J)[None, :]
    logits = tl.where(j_mask, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def softmax_j_grad(c, gc):
    """gb = c (gc - sum_k c_k gc_k): the softmax's vector-Jacobian product over axis 1."""
    return c * (gc - tl.sum(c * gc, axis=1)[:, None])


@triton.jit
def expand(x):
    """(BLOCK_B, BJ) row statistic -> broadcastable against a (BDH, BLOCK_B, BJ, BDL) tile."""
    return x[None, :, :, None]


@triton.jit
def sum_chunk_partials(part_ptr, n_chunks, chunk_stride, bjd, mask):
    """sum over p = 0 .. n_chunks-1 of part[p][bjd], in that order (bitwise reproducible); read
    through L2 (.cg) since other programs wrote the partials."""
    total = tl.load(part_ptr + bjd, mask=mask, other=0.0, cache_modifier=".cg")
    for p in range(1, n_chunks):
        total += tl.load(part_ptr + p * chunk_stride + bjd, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def last_to_arrive(count_ptr, n_arrivals):
    """True in the one program that arrives last at count_ptr (n_arrivals programs call this):
    it may then read what the others stored before arriving, and it resets the counter to 0."""
    tl.debug_barrier()  # every thread of this program has issued its stores
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    last = arrived == n_arrivals - 1
    if last:
        tl.atomic_xchg(count_ptr, 0)
    return last
