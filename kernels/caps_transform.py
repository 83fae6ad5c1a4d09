"""Capsule transform kernels: u_hat[b, i, j, :] = W[i, j] @ u[b, i, :].

Layout: u (B, I, Din), W (I, J, Dout, Din), u_hat (B, I, J, Dout), all contiguous.  J and Dout
are merged into N = J * Dout, so for one input capsule i the op is a small matmul
    u_hat[:, i, :] (B, N) = u[:, i, :] (B, Din) @ W[i]^T (Din, N).

Tiling: a program owns one capsule i, a block of BLOCK_B samples and a block of BLOCK_N outputs,
so one W tile is loaded once and serves BLOCK_B samples.  The products go through tl.dot, with
Din padded (masked loads) to the dot's minimum K: 8 for fp32, 16 for fp16/bf16.  fp16/bf16 run on
tensor cores, fp32 follows kernels._common.dot_precision ("ieee" = exact fp32 FMAs unless torch
allows TF32), and any Din works through a loop over K blocks.  A static loop of outer products
over Din would need Din as a constexpr (one compile per Din, fully unrolled) and could not use
tensor cores.  The op is memory-bound (Din multiply-adds per u_hat element), so the padding
costs no bandwidth.

Backward, with g = grad u_hat viewed as (B, I, N):
    grad_u[:, i, :] (B, Din) = g[:, i, :] (B, N) @ W[i] (N, Din)
    grad_W[i]       (N, Din) = g[:, i, :]^T (N, B) @ u[:, i, :] (B, Din)
grad_W reduces over the batch without atomics: G (<= 8, independent of B) batch groups, the
program of group g sums the batch blocks g, g + G, g + 2G, ... into its own fp32 partial
buffer slot, and a second kernel sums the G slots in a fixed order.  With G == 1 the first
kernel writes grad_W directly.  Every program writes its whole tile once (no accumulation in
place), so autotuning needs no reset_to_zero and results are bitwise reproducible.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    autotune_cache_kwargs,
    autotune_configs,
    batch_bucket,
    dot_precision,
    empty,
    interpreter_enabled,
    on_device,
)
from .autotune_cache import ensure_tuned_configs_loaded
from .partials import MAX_GROUPS, sum_partials

_TARGET_PROGRAMS = 1024  # grad_W programs wanted before adding batch groups
_GROUP_ROWS = 16         # at least this many batch rows per group

_KEY = ["I", "N", "DIN", "B_BUCKET", "INPUT_PRECISION"]


def _cfg(block_b: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_B": block_b, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# First entry = the default (the only one under the interpreter / test suite).
FWD_CONFIGS = [_cfg(32, 64, 4, 2), _cfg(64, 32, 4, 2), _cfg(32, 32, 4, 2), _cfg(64, 64, 8, 2),
               _cfg(32, 128, 8, 2), _cfg(128, 64, 8, 2)]
# grad_u reduces over N: BLOCK_N is the dot's K, keep it small (registers of the fp32 FMA dot).
BWD_U_CONFIGS = [_cfg(32, 32, 4, 2), _cfg(64, 32, 4, 2), _cfg(32, 64, 4, 2), _cfg(64, 64, 8, 2),
                 _cfg(128, 32, 8, 2)]
BWD_W_CONFIGS = [_cfg(32, 64, 4, 2), _cfg(64, 64, 4, 2), _cfg(32, 128, 4, 2), _cfg(128, 32, 4, 3),
                 _cfg(64, 128, 8, 2)]
_FMA_DOT_BUDGET = 256  # BLOCK_B * BLOCK_N * BLOCK_K per thread above which fp32 "ieee" tiles spill


def prune_fp32_fma_configs(configs, named_args, **kwargs):
    """An fp32 "ieee" tl.dot runs on the FMA units with both operands replicated in registers, so
    large tiles spill (tensor-core dots do not).  Drop those (keep the smallest if none fits)."""
    first = next(v for v in {**named_args, **kwargs}.values() if isinstance(v, torch.Tensor))  # launched by keyword
    if kwargs.get("INPUT_PRECISION") != "ieee" or first.dtype != torch.float32:
        return configs

    def per_thread(c):
        return c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_N"] * kwargs["BLOCK_K"] / (32 * c.num_warps)

    return [c for c in configs if per_thread(c) <= _FMA_DOT_BUDGET] or [min(configs, key=per_thread)]


def _autotune(configs):
    return triton.autotune(configs=autotune_configs(configs), key=_KEY,
                           prune_configs_by={"early_config_prune": prune_fp32_fma_configs}, **autotune_cache_kwargs())


@_autotune(FWD_CONFIGS)
@triton.jit
def caps_transform_fwd_kernel(
    u_ptr,            # (B, I, DIN) input capsules
    w_ptr,            # (I, N, DIN) weights, N = J * Dout
    out_ptr,          # (B, I, N) u_hat (written), dtype of u
    B,                # batch size
    I,                # input capsules
    N,                # J * Dout
    DIN,              # input capsule dim
    B_BUCKET,         # autotune key only: next power of two >= B
    BLOCK_B: tl.constexpr,   # samples per program
    BLOCK_N: tl.constexpr,   # outputs (of N) per program
    BLOCK_K: tl.constexpr,   # Din chunk, power of two >= 16
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 ("ieee" / "tf32")
    UPCAST: tl.constexpr,    # fp32 operands for tl.dot (bf16 under the interpreter: _upcast)
):
    pid = tl.program_id(0).to(tl.int64)
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = pid % n_blocks
    i = (pid // n_blocks) % I
    pid_b = pid // n_blocks // I
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)          # int64 sample ids
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # int64 output ids in [0, N)
    row_ok = rows < B
    col_ok = cols < N
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, DIN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < DIN
        u = tl.load(u_ptr + (rows[:, None] * I + i) * DIN + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + (i * N + cols[None, :]) * DIN + ks[:, None],      # W[i]^T tile (K, N)
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            u, wt = u.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(u, wt, acc, input_precision=INPUT_PRECISION)
    tl.store(out_ptr + (rows[:, None] * I + i) * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@_autotune(BWD_U_CONFIGS)
@triton.jit
def caps_transform_bwd_u_kernel(
    g_ptr,            # (B, I, N) gradient of u_hat
    w_ptr,            # (I, N, DIN) weights
    gu_ptr,           # (B, I, DIN) grad_u (written)
    B, I, N, DIN,     # sizes as in the forward
    B_BUCKET,         # autotune key only
    BLOCK_B: tl.constexpr,   # samples per program
    BLOCK_N: tl.constexpr,   # reduction chunk over N
    BLOCK_K: tl.constexpr,   # grad_u columns (of Din) per program, power of two >= 16
    INPUT_PRECISION: tl.constexpr,  # as in the forward
    UPCAST: tl.constexpr,    # as in the forward
):
    pid = tl.program_id(0).to(tl.int64)
    k_blocks = tl.cdiv(DIN, BLOCK_K)
    pid_k = pid % k_blocks
    i = (pid // k_blocks) % I
    pid_b = pid // k_blocks // I
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < B
    k_ok = ks < DIN
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        g = tl.load(g_ptr + (rows[:, None] * I + i) * N + ns[None, :],
                    mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptr + (i * N + ns[:, None]) * DIN + ks[None, :],           # W[i] tile (N, K)
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            g, w = g.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION)
    tl.store(gu_ptr + (rows[:, None] * I + i) * DIN + ks[None, :], acc.to(gu_ptr.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


@_autotune(BWD_W_CONFIGS)
@triton.jit
def caps_transform_bwd_w_kernel(
    g_ptr,            # (B, I, N) gradient of u_hat
    u_ptr,            # (B, I, DIN) forward input
    out_ptr,          # (G, I, N, DIN) fp32 partial sums, or grad_W (I, N, DIN) itself when G == 1
    B, I, N, DIN,     # sizes as in the forward
    B_BUCKET,         # autotune key only
    G,                # batch groups: program group g sums batch blocks g, g + G, ...
    BLOCK_B: tl.constexpr,   # batch rows per step of the reduction
    BLOCK_N: tl.constexpr,   # rows of the grad_W tile
    BLOCK_K: tl.constexpr,   # columns of the grad_W tile (of Din), power of two >= 16
    INPUT_PRECISION: tl.constexpr,  # as in the forward
    UPCAST: tl.constexpr,    # as in the forward
):
    pid = tl.program_id(0).to(tl.int64)
    k_blocks = tl.cdiv(DIN, BLOCK_K)
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_k = pid % k_blocks
    pid_n = (pid // k_blocks) % n_blocks
    i = (pid // k_blocks // n_blocks) % I
    grp = pid // k_blocks // n_blocks // I
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = ns < N
    k_ok = ks < DIN
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for b0 in range(0, B, G * BLOCK_B):
        rows = b0 + grp * BLOCK_B + tl.arange(0, BLOCK_B)              # int64 (grp is int64)
        row_ok = rows < B
        gt = tl.load(g_ptr + (rows[None, :] * I + i) * N + ns[:, None],          # g^T tile (N, B)
                     mask=n_ok[:, None] & row_ok[None, :], other=0.0)
        u = tl.load(u_ptr + (rows[:, None] * I + i) * DIN + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            gt, u = gt.to(tl.float32), u.to(tl.float32)
        acc = tl.dot(gt, u, acc, input_precision=INPUT_PRECISION)
    tl.store(out_ptr + ((grp * I + i) * N + ns[:, None]) * DIN + ks[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & k_ok[None, :])


# triton >= 3.8 accepts K = 8 for fp32 tl.dot; older releases (3.6, 3.7) need K >= 16
_FP32_K8 = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 8)


def _upcast(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584): there the
    kernels upcast bf16 operands to fp32 (exact products, fp32 accumulation as on the GPU).  Compiled
    code is unchanged."""
    return dtype == torch.bfloat16 and interpreter_enabled()


def _k_min(dtype: torch.dtype) -> int:
    """Smallest tl.dot K: 8 for fp32 operands (16 before triton 3.8), 16 for fp16/bf16."""
    return 8 if dtype == torch.float32 and _FP32_K8 else 16


def _block_k(din: int, dtype: torch.dtype) -> int:
    """Din tile of the backward kernels (a grad tile dim): all of Din when it is <= 64, so that
    grad u_hat is read once; power of two >= the tl.dot minimum."""
    return max(_k_min(dtype), min(64, triton.next_power_of_2(din)))


def num_batch_groups(B: int, I: int, N: int, Din: int) -> int:
    """Batch groups for grad_W: enough programs to fill the GPU, at most MAX_GROUPS, at least
    _GROUP_ROWS rows each.  Depends on the shapes only, never on the autotuned config."""
    tiles = I * triton.cdiv(N, 64) * triton.cdiv(Din, 64)
    return max(1, min(MAX_GROUPS, triton.cdiv(B, _GROUP_ROWS), triton.cdiv(_TARGET_PROGRAMS, tiles)))


def caps_transform_fwd(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """u (B, I, Din), W (I, J, Dout, Din), contiguous, same dtype -> u_hat (B, I, J, Dout)."""
    ensure_tuned_configs_loaded()
    with on_device(u):
        return _caps_transform_fwd(u, W)


def _caps_transform_fwd(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    B, I, Din = u.shape
    _, J, Dout, _ = W.shape
    N = J * Dout
    out = empty(B, I, J, Dout, dtype=u.dtype, device=u.device)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * I * triton.cdiv(B, meta["BLOCK_B"]),)

    caps_transform_fwd_kernel[grid](u_ptr=u, w_ptr=W, out_ptr=out, B=B, I=I, N=N, DIN=Din, B_BUCKET=batch_bucket(B),
                                    BLOCK_K=_k_min(u.dtype), INPUT_PRECISION=dot_precision(u.dtype),
                                    UPCAST=_upcast(u.dtype))
    return out


def caps_transform_bwd(u: torch.Tensor, W: torch.Tensor, grad: torch.Tensor,
                       groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (grad_u, grad_W) of caps_transform_fwd given grad = dL/du_hat (all contiguous).
    ``groups`` overrides the number of batch groups of the grad_W reduction (tests)."""
    ensure_tuned_configs_loaded()
    with on_device(u):
        return _caps_transform_bwd(u, W, grad, groups)


def _caps_transform_bwd(u: torch.Tensor, W: torch.Tensor, grad: torch.Tensor,
                        groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, I, Din = u.shape
    _, J, Dout, _ = W.shape
    N = J * Dout
    block_k = _block_k(Din, u.dtype)
    precision = dot_precision(u.dtype)
    bucket = batch_bucket(B)
    k_blocks = triton.cdiv(Din, block_k)

    grad_u = empty(B, I, Din, dtype=u.dtype, device=u.device)
    caps_transform_bwd_u_kernel[lambda meta: (k_blocks * I * triton.cdiv(B, meta["BLOCK_B"]),)](
        g_ptr=grad, w_ptr=W, gu_ptr=grad_u, B=B, I=I, N=N, DIN=Din, B_BUCKET=bucket, BLOCK_K=block_k,
        INPUT_PRECISION=precision, UPCAST=_upcast(u.dtype))

    G = num_batch_groups(B, I, N, Din) if groups is None else int(groups)
    if not 1 <= G <= MAX_GROUPS:
        raise ValueError(f"groups must be in [1, {MAX_GROUPS}], got {G}")
    # with one group the kernel writes grad_W itself, in W's dtype
    partial = empty(G, *W.shape, dtype=W.dtype if G == 1 else torch.float32, device=W.device)
    caps_transform_bwd_w_kernel[lambda meta: (k_blocks * triton.cdiv(N, meta["BLOCK_N"]) * I * G,)](
        g_ptr=grad, u_ptr=u, out_ptr=partial, B=B, I=I, N=N, DIN=Din, B_BUCKET=bucket, G=G, BLOCK_K=block_k,
        INPUT_PRECISION=precision, UPCAST=_upcast(u.dtype))
    return grad_u, sum_partials(partial, W.dtype)


def _compile_cases() -> list[dict]:
    """One entry per kernel, default config, for fp32 (true fp32 dot) and fp16, CapsNet's Din = 8."""
    sizes = {"B": "i32", "I": "i32", "N": "i32", "DIN": "i32", "B_BUCKET": "i32"}
    kernels = [
        ("caps_transform_fwd", caps_transform_fwd_kernel, FWD_CONFIGS[0], ("u_ptr", "w_ptr", "out_ptr"), {}),
        ("caps_transform_bwd_u", caps_transform_bwd_u_kernel, BWD_U_CONFIGS[0], ("g_ptr", "w_ptr", "gu_ptr"), {}),
        ("caps_transform_bwd_w", caps_transform_bwd_w_kernel, BWD_W_CONFIGS[0], ("g_ptr", "u_ptr", "out_ptr"),
         {"G": "i32"}),
    ]
    cases = []
    for dtype, torch_dtype, precision in (("fp32", torch.float32, "ieee"), ("fp16", torch.float16, "ieee")):
        for name, tuner, cfg, ptrs, extra in kernels:
            sig = {p: f"*{dtype}" for p in ptrs}
            if name == "caps_transform_bwd_w":
                sig["out_ptr"] = "*fp32"  # fp32 partial sums (G > 1)
            sig.update(sizes)
            sig.update(extra)
            block_k = _k_min(torch_dtype) if name == "caps_transform_fwd" else _block_k(8, torch_dtype)
            constexprs = dict(cfg.kwargs, BLOCK_K=block_k, INPUT_PRECISION=precision, UPCAST=False)
            cases.append(dict(name=f"{name}_{dtype}", fn=tuner.fn, signature=sig, constexprs=constexprs,
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages, default=True))
    return cases


COMPILE_CASES = _compile_cases()
