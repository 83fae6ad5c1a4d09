"""Coupling coefficients of a routing iteration from its state, for analysis (no backward).

Every routing algorithm forms its couplings from the prediction vectors u_hat (B, I, J, D) and a
per-sample fp32 state Q (B, J, D) (dynamic routing: P = v^1 + ... + v^{r-1}; attention: a
query that already holds the 1/sqrt(D) scale):

    c_ij = softmax_j(u_hat_ij . Q_j) (+ bias_ij)      (uniform 1/J when there is no state)

`couplings_kernel` writes c (B, I, J).  FUSED: u_hat[b, i, j, :] = sum_k u[b, i, k] W[i, j, :, k]
is recomputed from u (B, I, Din) and W in the kernel layout (I, Din, J, D), so it never exists;
otherwise u_hat is read.

Tile layout, grid and launches:
    tile      (BDH, BLOCK_B, BJ, BDL): one sample's D-vector per thread (routing/tiles.py): the dot
              products over D are thread-local, the softmax over j is a few shuffles inside a warp
    grid      (cdiv(B, BLOCK_B), capsule chunks); every (sample, capsule) row of c is written by exactly
              one program, so there is no scratch memory and no reduction across programs
    forward   one launch of couplings_kernel; no backward

fp32 math; inputs fp32, fp16 or bf16; c is stored in the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import (
    autotune_cache_kwargs,
    autotune_configs,
    batch_bucket,
    cdiv,
    empty,
    launch,
    on_device,
    target_programs,
)
from .streaming import autotune_config, bias_tile, config_pruner, sample_block
from .tiles import dot_d, prediction_tile, softmax_j, tile_dims

# First config = default (the interpreter and the test suite run only it): at the paper's width
# (J = 10 -> BJ = 16) one sample per lane group (2 samples x 16 capsules per warp, 4 warps), no
# shared memory or barrier (`python -m capstriton.kernels.compile_check --only couplings`).  Two
# samples per thread convert c's layout through shared memory before the store; (4, 4) is the
# one-sample-per-thread block at J = 32.
COUPLING_CONFIGS = [autotune_config(b, w) for b, w in ((8, 4), (4, 2), (2, 1), (16, 8), (4, 4), (16, 4), (32, 8))]
# the kernel keeps two tiles (u_hat and Q): at most 32 fp32 values of one per thread
prune_coupling_configs = config_pruner(32, {})


@triton.autotune(configs=autotune_configs(COUPLING_CONFIGS),
                 key=["B_BUCKET", "I", "J", "D", "DIN", "FUSED", "HAS_STATE", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": prune_coupling_configs}, **autotune_cache_kwargs())
@triton.jit
def couplings_kernel(
    u_ptr,            # (B, I, DIN) input capsules (FUSED) - else unused
    W_ptr,            # (I, DIN, J, D) transform matrices, kernel layout (FUSED) - else unused
    uhat_ptr,         # (B, I, J, D) prediction vectors (HAS_STATE, not FUSED) - else unused
    Q_ptr,            # (B, J, D) fp32 state (HAS_STATE): logits u_hat_ij . Q_j - else unused
    bias_ptr,         # (I, J) added after the softmax (HAS_BIAS) - else unused
    c_ptr,            # (B, I, J) out, input dtype: the couplings
    B, I,             # batch, input capsules
    caps_per_chunk,   # input capsules per program along grid axis 1
    B_BUCKET,         # autotune key: batch rounded up to a power of two
    J: tl.constexpr, D: tl.constexpr, DIN: tl.constexpr,  # output capsules, their dim, input dim
    FUSED: tl.constexpr,      # recompute u_hat = W u (else read u_hat)
    HAS_STATE: tl.constexpr,  # False: uniform couplings 1/J (u_hat is not read)
    HAS_BIAS: tl.constexpr,   # add the coupling bias
    BLOCK_B: tl.constexpr,     # samples per program (the autotuned config)
    BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,  # tile widths (tiles.tile_dims)
):
    b_offs, b_mask, jd, _, bjd, mask, zero_b = sample_block(B, J, D, BLOCK_B, BJ, BDH, BDL)
    jj = tl.arange(0, BJ)
    c_row = c_ptr + (b_offs * I)[:, None] * J + jj[None, :]  # (BLOCK_B, BJ) pointers to c[b, 0, j]
    c_mask = b_mask[:, None] & (jj < J)[None, :]
    if HAS_STATE:
        Q = tl.load(Q_ptr + bjd, mask=mask, other=0.0)  # loaded once, reused for every capsule
    i_start = tl.program_id(1) * caps_per_chunk
    for i in range(i_start, tl.minimum(i_start + caps_per_chunk, I)):
        if HAS_STATE:
            uhat = prediction_tile(u_ptr, W_ptr, uhat_ptr, b_offs, b_mask, i, I, jd, mask, zero_b, FUSED, J, D, DIN)
            c = softmax_j(dot_d(uhat, Q), J, BJ)
        else:
            c = tl.full((BLOCK_B, BJ), 1.0 / J, tl.float32)
        if HAS_BIAS:
            c += bias_tile(bias_ptr, i, b_offs, J, BJ)
        tl.store(c_row + i * J, c.to(c_ptr.dtype.element_ty), mask=c_mask)


def _chunks(B: int, I: int, target: int) -> tuple[int, int]:
    """(capsule chunks, capsules per chunk): enough (batch blocks x chunks) programs for target."""
    batch_blocks = cdiv(B, COUPLING_CONFIGS[0].kwargs["BLOCK_B"])
    caps = cdiv(I, max(1, min(I, cdiv(target, batch_blocks))))
    return cdiv(I, caps), caps


def routing_couplings_fwd(src: torch.Tensor, W_k: torch.Tensor | None, state: torch.Tensor | None,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """c (B, I, J) in src's dtype: softmax_j(u_hat_ij . state_j) (+ bias_ij), or 1/J (+ bias_ij)
    when state is None.  src = u (B, I, Din) with W_k (I, Din, J, D) (u_hat recomputed), or
    u_hat (B, I, J, D) with W_k None; state (B, J, D) fp32; bias (I, J).  Contiguous inputs."""
    fused = W_k is not None
    if fused:
        (B, I, DIN), J, D = src.shape, W_k.shape[2], W_k.shape[3]
    else:
        (B, I, J, D), DIN = src.shape, 1
    has_state, has_bias = state is not None, bias is not None
    fused = fused and has_state  # without a state u_hat is never needed: one kernel variant
    DIN = DIN if fused else 1
    dev = src.device
    with on_device(src):
        c = empty(B, I, J, dtype=src.dtype, device=dev)
        n_chunks, caps = _chunks(B, I, target_programs(dev))
        key = (couplings_kernel, dev, src.dtype, bias.dtype if has_bias else None, batch_bucket(B), I, J, D, DIN,
               fused, has_state, has_bias)
        unused = src  # any tensor: the kernel never reads a pointer its flags switch off
        launch(couplings_kernel, lambda meta: (cdiv(B, meta["BLOCK_B"]), n_chunks), key,
               u_ptr=src if fused else unused, W_ptr=W_k if fused else unused, uhat_ptr=unused if fused else src,
               Q_ptr=state if has_state else unused, bias_ptr=bias if has_bias else unused, c_ptr=c, B=B, I=I,
               caps_per_chunk=caps, B_BUCKET=batch_bucket(B), J=J, D=D, DIN=DIN, FUSED=fused,
               HAS_STATE=has_state, HAS_BIAS=has_bias, **tile_dims(J, D))
    return c


# ----------------------------------------------------------------------------------------------
# compile-check cases (python -m capstriton.kernels.compile_check)
# ----------------------------------------------------------------------------------------------
def _compile_cases() -> list[dict]:
    """Paper shape J = 10, D = 16, Din = 8 (fp32 with a state: every kept config; otherwise and for
    fp16, bf16: the default) and J = 32 (the default); fused and unfused, with and without state
    and bias."""
    cases = []
    for J, D, din, dtypes in ((10, 16, 8, ("fp32", "fp16", "bf16")), (32, 16, 8, ("fp32",))):
        dims = tile_dims(J, D)
        kept = prune_coupling_configs(COUPLING_CONFIGS, {}, **dims)
        for dtype in dtypes:
            src = f"*{dtype}"
            sig = {"u_ptr": src, "W_ptr": src, "uhat_ptr": src, "Q_ptr": "*fp32", "bias_ptr": src, "c_ptr": src,
                   "B": "i32", "I": "i32", "caps_per_chunk": "i32", "B_BUCKET": "i32"}
            variants = [(fused, True, bias) for fused in (True, False) for bias in (True, False)] \
                + [(False, False, bias) for bias in (True, False)]
            for fused, has_state, has_bias in variants:
                configs = kept if dtype == "fp32" and J == 10 and has_state else kept[:1]
                for cfg in configs:
                    what = (f"fused={fused}" if has_state else "uniform") + f",bias={has_bias}"
                    cases.append({
                        "name": f"couplings[{dtype},J={J},{what}]", "fn": couplings_kernel.fn, "signature": sig,
                        "constexprs": {"J": J, "D": D, "DIN": din if fused else 1, "FUSED": fused,
                                       "HAS_STATE": has_state, "HAS_BIAS": has_bias, **dims, **cfg.kwargs},
                        "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "default": cfg is kept[0]})
    return cases


COMPILE_CASES = _compile_cases()
