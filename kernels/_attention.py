"""Streaming-pass machinery shared by the attention routings (self-attention and inverted
dot-product attention): the kernels, the launch plan and the memory bound.

Both algorithms form couplings from u_hat and a small per-sample query Q (B, J, D):
    q_ij = softmax_j(u_hat_ij . Q_j)      (Q already holds the 1/sqrt(D) scale)
and need, per pass over the input capsules, one of three per-output sums (`attention_pass_kernel`):
    MODE_SUM:      sum_i u_hat_ij                                  (self-attention's S)
    MODE_FORWARD:  sum_i (q_ij + bias_ij) u_hat_ij                 (s; bias only for self-attention)
    MODE_BACKWARD: sum_i ga_ij u_hat_ij,  ga_ij = q_ij (gc_ij - sum_k q_ik gc_ik),  gc_ij = u_hat_ij . gs_j
written as per-chunk partials (n_chunks, B, J, D) that a per-sample finishing kernel of the
algorithm reduces (in a fixed order) into its next state.  The final backward pass
(`attention_grad_kernel`) recomputes, for every iteration t, q^t and ga^t from the saved
queries Q^t and gradients gs^t and writes
    dL/du_hat_ij = sum_t [ q^t_ij gs^t_j + ga^t_ij Q^t_j ] + bias_ij gs_j + R_j
(the last two terms for self-attention only), either to memory (unfused) or, fused, as
dL/du = sum_jd W^T dL/du_hat and per-batch-group partials of dL/dW = sum_b dL/du_hat (x) u and
dL/dbias = sum_b gc, reduced in a fixed order by `kernels/partials.py` (deterministic).

Memory bound (the same as dynamic routing's): the chunk partials hold at most
max(B*J*D, B*I*J*D/4) fp32 values (at least 4 capsules per chunk), and the weight-gradient
partials at most max(I*J*D*Din, B*I*J*D/4).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import empty, target_programs
from .partials import MAX_GROUPS
from ._tiles3d import _coupling, _grad_prediction_tile, _prediction_tile, _sample_tile, _softmax_grad, _sum_partials

MODE_SUM, MODE_FORWARD, MODE_BACKWARD = 0, 1, 2
MIN_CAPS_PER_CHUNK = 4   # floor: chunk partials stay <= B*I*J*D/4 elements
MAX_GROUP_BLOCK_B = 32   # largest BLOCK_B of a grad launch (every batch group gets a batch block)

# launch configs (BLOCK_B, num_warps), checked spill-free by kernels/compile_check.py
PASS_CONFIG = {"BLOCK_B": 16, "num_warps": 8}
GRAD_CONFIG = {"BLOCK_B": 16, "num_warps": 8}
assert GRAD_CONFIG["BLOCK_B"] <= MAX_GROUP_BLOCK_B


@triton.jit
def attention_pass_kernel(
    u_ptr,            # (B, I, DIN) input capsules (FUSED) - else unused
    W_ptr,            # (I, J, D, DIN) transform matrices (FUSED) - else unused
    uhat_ptr,         # (B, I, J, D) prediction vectors (not FUSED) - else unused
    Q_ptr,            # (B, J, D) fp32 query (logits = u_hat . Q); unused in MODE_SUM
    gs_ptr,           # (B, J, D) fp32 gradient of the weighted sum (MODE_BACKWARD only)
    bias_ptr,         # (I, J) coupling bias added after the softmax (HAS_BIAS, MODE_FORWARD)
    part_ptr,         # (n_chunks, B, J, D) fp32 out: this chunk's partial sum
    B, I, J, D, DIN,  # sizes
    caps_per_chunk,   # input capsules per program along grid axis 1
    MODE: tl.constexpr,      # MODE_SUM, MODE_FORWARD or MODE_BACKWARD (module docstring)
    HAS_BIAS: tl.constexpr,
    FUSED: tl.constexpr,     # recompute u_hat = W u instead of reading it
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

    if MODE != 0:
        Q = tl.load(Q_ptr + bjd_offs, mask=tile_mask, other=0.0)
    if MODE == 2:
        gs = tl.load(gs_ptr + bjd_offs, mask=tile_mask, other=0.0)
    acc = tl.zeros((BLOCK_B, BJ, BD), dtype=tl.float32)
    i_start = chunk * caps_per_chunk
    i_end = tl.minimum(i_start + caps_per_chunk, I)
    for i in range(i_start, i_end):
        uhat = _prediction_tile(u_ptr, W_ptr, uhat_ptr, b_offs, b_mask, i, I, J, D, DIN, jd_offs, jd_mask,
                                FUSED, BLOCK_B, BJ, BD)
        if MODE == 0:
            acc += uhat
        else:
            c = _coupling(uhat, Q, j_mask)
            if MODE == 2:
                c = _softmax_grad(c, uhat, gs)
            elif HAS_BIAS:
                c += tl.load(bias_ptr + i * J + j_offs, mask=j_mask, other=0.0).to(tl.float32)[None, :]
            acc += c[:, :, None] * uhat
    tl.store(part_ptr + chunk * B * J * D + bjd_offs, acc, mask=tile_mask)


@triton.jit
def attention_grad_kernel(
    u_ptr,            # (B, I, DIN) input capsules (FUSED)
    W_ptr,            # (I, J, D, DIN) transform matrices (FUSED)
    uhat_ptr,         # (B, I, J, D) prediction vectors (not FUSED)
    Q_all_ptr,        # (T, B, J, D) fp32: the query of every iteration
    gs_all_ptr,       # (T, B, J, D) fp32: gradient of every iteration's weighted sum
    R_ptr,            # (B, J, D) fp32: gradient through self-attention's S (HAS_R)
    bias_ptr,         # (I, J) coupling bias (HAS_BIAS)
    grad_uhat_ptr,    # (B, I, J, D) out, input dtype: dL/du_hat (not FUSED)
    grad_u_ptr,       # (B, I, DIN) out, input dtype: dL/du (FUSED)
    grad_W_part_ptr,  # (n_groups, I, J, D, DIN) fp32 out: per-group dL/dW (FUSED)
    grad_bias_part_ptr,  # (n_groups, I, J) fp32 out: per-group dL/dbias (HAS_BIAS)
    B, I, J, D, DIN,
    iterations,       # T
    caps_per_chunk,   # input capsules per program along grid axis 0
    n_groups,         # batch groups along grid axis 1; group g takes batch blocks g, g+n_groups, ...
    HAS_R: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FUSED: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BJ: tl.constexpr,
    BD: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    j_offs = tl.arange(0, BJ)
    d_offs = tl.arange(0, BD)
    j_mask = j_offs < J
    jd_offs = j_offs[:, None] * D + d_offs[None, :]
    jd_mask = j_mask[:, None] & (d_offs[None, :] < D)
    n_blocks = tl.cdiv(B, BLOCK_B)
    i_start = chunk * caps_per_chunk
    i_end = tl.minimum(i_start + caps_per_chunk, I)
    # batch blocks outer, capsules inner: the block's Q and gs tiles stay cache resident.  This
    # program alone owns the group partials of its capsules and accumulates there over its
    # batch blocks in a fixed order (deterministic); the barrier makes the previous block's
    # stores visible to every thread of the program.
    for blk in range(group, n_blocks, n_groups):
        b_offs = tl.arange(0, BLOCK_B).to(tl.int64) + blk * BLOCK_B
        b_mask = b_offs < B
        bjd_offs = (b_offs * J * D)[:, None, None] + jd_offs[None, :, :]
        tile_mask = b_mask[:, None, None] & jd_mask[None, :, :]
        if HAS_R:
            R = tl.load(R_ptr + bjd_offs, mask=tile_mask, other=0.0)
        if HAS_BIAS:
            gs_last = tl.load(gs_all_ptr + (iterations - 1) * B * J * D + bjd_offs, mask=tile_mask, other=0.0)
        for i in range(i_start, i_end):
            uhat = _prediction_tile(u_ptr, W_ptr, uhat_ptr, b_offs, b_mask, i, I, J, D, DIN, jd_offs, jd_mask,
                                    FUSED, BLOCK_B, BJ, BD)
            grad = _grad_prediction_tile(uhat, Q_all_ptr, gs_all_ptr, bjd_offs, tile_mask, j_mask, B, J, D,
                                         iterations, False, BLOCK_B, BJ, BD)
            if HAS_R:
                grad += R
            tl.debug_barrier()
            if HAS_BIAS:
                beta = tl.load(bias_ptr + i * J + j_offs, mask=j_mask, other=0.0).to(tl.float32)
                grad += beta[None, :, None] * gs_last
                gbias = tl.sum(tl.sum(uhat * gs_last, axis=2), axis=0)  # sum_b gc_ij
                gbias_ptrs = grad_bias_part_ptr + group.to(tl.int64) * I * J + i * J + j_offs
                if blk != group:
                    gbias += tl.load(gbias_ptrs, mask=j_mask, other=0.0)
                tl.store(gbias_ptrs, gbias, mask=j_mask)
            if FUSED:
                u_rows = (b_offs * I + i) * DIN  # (BLOCK_B,) offsets of u[b, i, 0] and grad_u[b, i, 0]
                w_rows = W_ptr + (i * J * D + jd_offs) * DIN  # (BJ, BD) pointers to W[i, j, d, 0]
                gw_rows = grad_W_part_ptr + (group.to(tl.int64) * I * J * D + i * J * D + jd_offs) * DIN
                for k in range(DIN):
                    w_k = tl.load(w_rows + k, mask=jd_mask, other=0.0).to(tl.float32)
                    grad_u_k = tl.sum(tl.sum(grad * w_k[None, :, :], axis=2), axis=1)
                    tl.store(grad_u_ptr + u_rows + k, grad_u_k.to(grad_u_ptr.dtype.element_ty), mask=b_mask)
                    u_k = tl.load(u_ptr + u_rows + k, mask=b_mask, other=0.0).to(tl.float32)
                    grad_W_k = tl.sum(grad * u_k[:, None, None], axis=0)
                    if blk != group:
                        grad_W_k += tl.load(gw_rows + k, mask=jd_mask, other=0.0)
                    tl.store(gw_rows + k, grad_W_k, mask=jd_mask)
            else:
                offs = ((b_offs * I + i) * J * D)[:, None, None] + jd_offs[None, :, :]
                tl.store(grad_uhat_ptr + offs, grad.to(grad_uhat_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def scaled_sum_finish_kernel(
    part_ptr,         # (n_chunks, B, J, D) fp32 partial sums
    n_chunks,         # number of partials
    out_ptr,          # (B, J, D) fp32 out: scale * sum of the partials
    B, J, D,
    scale,            # fp32 factor (1/sqrt(D) for queries and for the gradient through them)
    BJ: tl.constexpr,
    BD: tl.constexpr,
):
    offs, mask = _sample_tile(J, D, BJ, BD)
    total = _sum_partials(part_ptr, n_chunks, B * J * D, offs, mask, BJ, BD)
    tl.store(out_ptr + offs, total * scale, mask=mask)


# ----------------------------------------------------------------------------------------------
# launch plan
# ----------------------------------------------------------------------------------------------
class Plan:
    """Sizes of one attention-routing launch: problem, tile widths, chunking and batch groups.

    src: u (B, I, Din) with W (I, J, D, Din) when fused, else u_hat (B, I, J, D)."""

    def __init__(self, src: torch.Tensor, W: torch.Tensor | None):
        self.fused = W is not None
        self.B, self.I = src.shape[0], src.shape[1]
        self.J, self.D = (W.shape[1], W.shape[2]) if self.fused else (src.shape[2], src.shape[3])
        self.din = W.shape[3] if self.fused else 1
        self.device = src.device
        self.dims = {"BJ": triton.next_power_of_2(self.J), "BD": triton.next_power_of_2(self.D)}
        target = target_programs(self.device)
        # streaming passes: batch blocks x capsule chunks, at least MIN_CAPS_PER_CHUNK capsules each
        batch_blocks = triton.cdiv(self.B, PASS_CONFIG["BLOCK_B"])
        chunks = max(1, min(self.I // MIN_CAPS_PER_CHUNK, triton.cdiv(target, batch_blocks)))
        self.caps = triton.cdiv(self.I, chunks)
        self.n_chunks = triton.cdiv(self.I, self.caps)
        # final pass: capsule chunks x batch groups; n_groups partials of dL/dW stay within the bound
        self.grad_caps = triton.cdiv(self.I, max(1, min(self.I, target)))
        self.grad_chunks = triton.cdiv(self.I, self.grad_caps)
        weight_cap = max(1, (self.B * self.D) // (4 * self.din)) if self.fused else MAX_GROUPS
        self.n_groups = max(1, min(MAX_GROUPS, triton.cdiv(self.B, MAX_GROUP_BLOCK_B),
                                   triton.cdiv(target, self.grad_chunks), weight_cap))

    def stats(self, *lead: int) -> torch.Tensor:
        """An fp32 (*lead, B, J, D) kernel output."""
        return empty(*lead, self.B, self.J, self.D, dtype=torch.float32, device=self.device)

    def pass_(self, mode: int, src, W, Q, gs, bias, part) -> None:
        """One streaming pass writing the chunk partials ``part`` (n_chunks, B, J, D)."""
        grid = (triton.cdiv(self.B, PASS_CONFIG["BLOCK_B"]), self.n_chunks)
        attention_pass_kernel[grid](
            src, W if self.fused else src, src, Q if Q is not None else part, gs if gs is not None else part,
            bias if bias is not None else part, part, self.B, self.I, self.J, self.D, self.din, self.caps,
            MODE=mode, HAS_BIAS=bias is not None, FUSED=self.fused, BLOCK_B=PASS_CONFIG["BLOCK_B"],
            num_warps=PASS_CONFIG["num_warps"], num_stages=1, **self.dims)

    def reduce(self, part, out, scale: float) -> None:
        """out (B, J, D) fp32 = scale * the sum of the chunk partials ``part``."""
        scaled_sum_finish_kernel[(self.B,)](part, part.shape[0], out, self.B, self.J, self.D, scale, **self.dims)

    def grad(self, src, W, Q_all, gs_all, R, bias, out_dtype):
        """The final backward pass: (dL/du, dL/dW) fused or (dL/du_hat,) unfused, plus dL/dbias
        partials (n_groups, I, J) when ``bias`` is given (else None)."""
        B, I, J, D, din = self.B, self.I, self.J, self.D, self.din
        dummy = Q_all
        if self.fused:
            grad_src = empty(B, I, din, dtype=out_dtype, device=self.device)
            grad_W_part = empty(self.n_groups, I, J, D, din, dtype=torch.float32, device=self.device)
        else:
            grad_src = empty(B, I, J, D, dtype=out_dtype, device=self.device)
            grad_W_part = None
        grad_bias_part = None
        if bias is not None:
            grad_bias_part = empty(self.n_groups, I, J, dtype=torch.float32, device=self.device)
        attention_grad_kernel[(self.grad_chunks, self.n_groups)](
            src, W if self.fused else src, src, Q_all, gs_all, R if R is not None else dummy,
            bias if bias is not None else dummy, grad_src, grad_src,
            grad_W_part if grad_W_part is not None else dummy,
            grad_bias_part if grad_bias_part is not None else dummy,
            B, I, J, D, din, Q_all.shape[0], self.grad_caps, self.n_groups,
            HAS_R=R is not None, HAS_BIAS=bias is not None, FUSED=self.fused, BLOCK_B=GRAD_CONFIG["BLOCK_B"],
            num_warps=GRAD_CONFIG["num_warps"], num_stages=1, **self.dims)
        return grad_src, grad_W_part, grad_bias_part


def pass_compile_cases(label: str, dtypes, modes) -> list[dict]:
    """compile_check cases of the shared kernels for the paper's DigitCaps tile (J = 10 -> BJ = 16,
    D = 16): ``modes`` is a list of (MODE, HAS_BIAS) of the pass kernel; grad cases follow HAS_BIAS."""
    dims = {"BJ": 16, "BD": 16}
    sizes = {"B": "i32", "I": "i32", "J": "i32", "D": "i32", "DIN": "i32"}
    f32 = "*fp32"
    cases = []
    for dtype in dtypes:
        src = f"*{dtype}"
        for fused in (True, False):
            for mode, has_bias in modes:
                sig = {"u_ptr": src, "W_ptr": src, "uhat_ptr": src, "Q_ptr": f32, "gs_ptr": f32, "bias_ptr": src,
                       "part_ptr": f32, **sizes, "caps_per_chunk": "i32"}
                const = {"MODE": mode, "HAS_BIAS": has_bias, "FUSED": fused, "BLOCK_B": PASS_CONFIG["BLOCK_B"], **dims}
                cases.append({"name": f"{label}_pass[{dtype},fused={fused},mode={mode},bias={has_bias}]",
                              "fn": attention_pass_kernel, "signature": sig, "constexprs": const,
                              "num_warps": PASS_CONFIG["num_warps"], "num_stages": 1})
            for has_bias in sorted({b for _, b in modes}):
                has_r = label == "self_attention"
                sig = {"u_ptr": src, "W_ptr": src, "uhat_ptr": src, "Q_all_ptr": f32, "gs_all_ptr": f32,
                       "R_ptr": f32, "bias_ptr": src, "grad_uhat_ptr": src, "grad_u_ptr": src,
                       "grad_W_part_ptr": f32, "grad_bias_part_ptr": f32, **sizes, "iterations": "i32",
                       "caps_per_chunk": "i32", "n_groups": "i32"}
                const = {"HAS_R": has_r, "HAS_BIAS": has_bias, "FUSED": fused, "BLOCK_B": GRAD_CONFIG["BLOCK_B"],
                         **dims}
                cases.append({"name": f"{label}_grad[{dtype},fused={fused},bias={has_bias}]",
                              "fn": attention_grad_kernel, "signature": sig, "constexprs": const,
                              "num_warps": GRAD_CONFIG["num_warps"], "num_stages": 1})
    return cases


def finish_compile_case(name: str, fn, signature: dict, constexprs: dict | None = None) -> dict:
    """compile_check case of a per-sample finishing kernel at the paper's tile (BJ = BD = 16)."""
    return {"name": name, "fn": fn, "signature": {**signature, "B": "i32", "J": "i32", "D": "i32"},
            "constexprs": {**(constexprs or {}), "BJ": 16, "BD": 16}, "num_warps": 4, "num_stages": 3}
