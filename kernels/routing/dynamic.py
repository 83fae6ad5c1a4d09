"""Dynamic routing kernels (routing-by-agreement, Sabour et al. 2017, Procedure 1).

Two ops share the kernels, switched by the constexpr FUSED:
  * dynamic_routing: the prediction vectors u_hat (B, I, J, D) are read from memory;
  * transform_route: u_hat[b, i, j] = W[i, j] @ u[b, i] is recomputed on the fly from
    u (B, I, Din) and W (given in the kernel layout (I, Din, J, D)) in every pass, so no
    B*I*J*D tensor ever exists.

Tile layout, grid and launches (the machinery is shared: routing/streaming.py, routing/tiles.py):
    tile      (BDH, BLOCK_B, BJ, BDL): one sample's D-vector per thread, the J outputs over a warp's lanes
    grid      pass kernels: (cdiv(B, BLOCK_B), n_chunks); final gradient: streaming.plan
    forward   r launches of routing_pass_kernel: t = 0 modes.SUM (uniform couplings), then modes.FORWARD
    backward  r-1 launches of routing_pass_kernel (modes.BACKWARD), or with detach or r = 1 one
              routing_bwd_init_kernel; then one final-gradient launch (streaming.stream_grad_fused_kernel,
              unfused streaming.stream_grad_kernel), plus sum_partials for several weight-gradient groups

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

import torch
import triton
import triton.language as tl

from .._common import batch_bucket, cdiv, empty, launch, on_device, target_programs
from ..autotune_cache import ensure_tuned_configs_loaded
from ..squash import _pow2_scale, _squash_scale_rescaled
from . import modes
from .compile_cases import F32, I32, case, final_grad_cases, over_shapes, pick
from .streaming import (
    PASS_CONFIGS,
    Plan,
    at,
    chunk_scratch,
    final_grad,
    finish_chunks,
    pass_autotune,
    pass_grid,
    plan,
    prune_pass_configs,
    sample_block,
    sizes,
    stream_capsules,
)
from .tiles import dot_d, expand, lanes_per_sample

ROUTING_EPS = 1e-8  # eps of the squash inside routing (same as the reference)


# ----------------------------------------------------------------------------------------------
# streaming pass over the input capsules (forward iteration or backward reduction) + finish
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rescaled_tile(s, eps):
    """Overflow-safe squash of kernels/squash.py for a tile: (z, sc, F, C) with z = s / sc (sc a power
    of two per D-vector), squash(s) = F z, squash'(s)^T g = (F g + C (z . g) z) / sc (F, C, sc expanded)."""
    sc = _pow2_scale(tl.max(tl.max(tl.abs(s), axis=3), axis=0))
    z = s / expand(sc)
    F, C = _squash_scale_rescaled(dot_d(z, z), sc, eps)
    return z, expand(sc), expand(F), expand(C)


@triton.jit
def _squash_vec(s, eps):
    """squash(s) over d for a tile, finite for every finite s."""
    z, _, F, _ = _rescaled_tile(s, eps)
    return F * z


@triton.jit
def _squash_grad(s, g, eps):
    """squash'(s)^T g for a tile."""
    z, sc, F, C = _rescaled_tile(s, eps)
    return (F * g + C * expand(dot_d(z, g)) * z) / sc


@pass_autotune("FUSED", "BACKWARD", restore=("gs_all_ptr",))
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
    FUSED: tl.constexpr,       # recompute u_hat = W u (else read u_hat)
    FIRST: tl.constexpr,       # forward t = 0: uniform coupling, P^0 = 0
    LAST: tl.constexpr,        # forward t = r-1: write v instead of P^{t+1}
    ACCUMULATE: tl.constexpr,  # BACKWARD: G^t is nonzero (t < r-1)
    HAS_NEXT: tl.constexpr,    # BACKWARD: another reduction pass follows (t >= 2)
    GS_FROM_GRAD_V: tl.constexpr,  # BACKWARD, t = r-1: form gs^t from s^t and dL/dv (chunk 0 stores it)
    BLOCK_B: tl.constexpr,     # samples per program (the autotuned config)
    BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,  # tile widths (tiles.tile_dims)
):
    b_offs, b_mask, jd, _, bjd, mask, zero_b = sample_block(B, J, D, BLOCK_B, BJ, BDH, BDL)
    chunk = tl.program_id(1)
    stride = B * (J * D)

    P = tl.zeros((BDH, BLOCK_B, BJ, BDL), dtype=tl.float32)  # P^0 = 0
    gs = P
    if not FIRST:
        P = tl.load(P_all_ptr + at(t - 1, stride) + bjd, mask=mask, other=0.0)
    if BACKWARD:
        if GS_FROM_GRAD_V:
            s_t = tl.load(s_all_ptr + at(t, stride) + bjd, mask=mask, other=0.0)
            g = tl.load(v_ptr + bjd, mask=mask, other=0.0).to(tl.float32)
            gs = _squash_grad(s_t, g, eps)
            if chunk == 0:  # for the final pass
                tl.store(gs_all_ptr + at(t, stride) + bjd, gs, mask=mask)
        else:
            gs = tl.load(gs_all_ptr + at(t, stride) + bjd, mask=mask, other=0.0)
    i_start = chunk * caps_per_chunk
    mode = modes.SUM if FIRST else (modes.BACKWARD if BACKWARD else modes.FORWARD)
    acc = stream_capsules(u_ptr, W_ptr, uhat_ptr, u_ptr, b_offs, b_mask, jd, mask, zero_b, P, gs, i_start,
                          tl.minimum(i_start + caps_per_chunk, I), I, mode, False, FUSED, J, D, DIN, BLOCK_B, BJ,
                          BDH, BDL)
    if FIRST:
        acc = acc * (1.0 / J)
    acc, finish = finish_chunks(acc, part_ptr, count_ptr, chunk, n_chunks, stride, bjd, mask)
    if finish:
        if BACKWARD:  # acc = sum_i gb^t u_hat: G^{t-1} = G^t + acc, gs^{t-1} = squash'(s^{t-1})^T G^{t-1}
            out = gs_all_ptr + at(t - 1, stride) + bjd
            if ACCUMULATE:
                acc += tl.load(out, mask=mask, other=0.0)
            if HAS_NEXT:
                tl.store(gs_all_ptr + at(t - 2, stride) + bjd, acc, mask=mask)
            s = tl.load(s_all_ptr + at(t - 1, stride) + bjd, mask=mask, other=0.0)
            tl.store(out, _squash_grad(s, acc, eps), mask=mask)
        else:  # acc = s^t: v^t = squash(s^t), P^{t+1} = P^t + v^t
            tl.store(s_all_ptr + at(t, stride) + bjd, acc, mask=mask)
            v = _squash_vec(acc, eps)
            if LAST:
                tl.store(v_ptr + bjd, v.to(v_ptr.dtype.element_ty), mask=mask)
            else:
                if not FIRST:
                    v += P
                tl.store(P_all_ptr + at(t, stride) + bjd, v, mask=mask)


INIT_WARPS = 4  # warps of routing_bwd_init_kernel


@triton.jit
def routing_bwd_init_kernel(
    s_all_ptr,        # (r, B, J, D) fp32: reads s^t
    grad_v_ptr,       # (B, J, D) dL/dv, any float dtype
    gs_all_ptr,       # (r, B, J, D) fp32: writes gs^t = squash'(s^t)^T dL/dv
    B,                # batch
    t,                # r - 1
    eps,              # squash epsilon
    J: tl.constexpr, D: tl.constexpr,  # output capsules, their dim
    BLOCK_B: tl.constexpr,  # samples per program: one per lane group (lanes_per_sample * INIT_WARPS)
    BJ: tl.constexpr, BDH: tl.constexpr, BDL: tl.constexpr,  # tile widths (tiles.tile_dims)
):
    _, _, _, _, bjd, mask, _ = sample_block(B, J, D, BLOCK_B, BJ, BDH, BDL)
    offs = at(t, B * (J * D)) + bjd
    s = tl.load(s_all_ptr + offs, mask=mask, other=0.0)
    g = tl.load(grad_v_ptr + bjd, mask=mask, other=0.0).to(tl.float32)
    tl.store(gs_all_ptr + offs, _squash_grad(s, g, eps), mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _pass_inputs(u, W, u_hat) -> dict:
    """The u_ptr, W_ptr, uhat_ptr arguments of routing_pass_kernel (an unused pointer gets the source)."""
    src = u if u_hat is None else u_hat
    return dict(u_ptr=src, W_ptr=W if u_hat is None else src, uhat_ptr=src)


def _routing_forward(u, W, u_hat, iterations: int):
    ensure_tuned_configs_loaded()
    fused = u_hat is None
    src = u if fused else u_hat
    B, I, J, D, DIN = sizes(u, W, u_hat)
    dev = src.device
    p = plan(B, I, J, D, DIN, target_programs(dev))
    part, count = chunk_scratch(p, B, J, D, src)
    s_all = empty(iterations, B, J, D, dtype=torch.float32, device=dev)
    P_all = empty(iterations - 1, B, J, D, dtype=torch.float32, device=dev)
    v = empty(B, J, D, dtype=src.dtype, device=dev)
    args = dict(_pass_inputs(u, W, u_hat), P_all_ptr=P_all if iterations > 1 else src, gs_all_ptr=src,
                part_ptr=part, count_ptr=count, s_all_ptr=s_all, v_ptr=v, B=B, I=I, caps_per_chunk=p.caps_per_chunk,
                n_chunks=p.n_chunks)
    key = (routing_pass_kernel, dev, src.dtype, p.key, fused, False)
    for t in range(iterations):
        launch(routing_pass_kernel, pass_grid(B, p.n_chunks), key, **args, t=t, eps=ROUTING_EPS,
               B_BUCKET=batch_bucket(B), J=J, D=D, DIN=DIN, BACKWARD=False, FUSED=fused, FIRST=t == 0,
               LAST=t == iterations - 1, ACCUMULATE=False, HAS_NEXT=False, GS_FROM_GRAD_V=False, **p.dims)
    return v, s_all, P_all


def _backward_stats(ins, src, s_all, P_all, grad_v, iterations: int, detach: bool, p: Plan):
    """gs_all (r, B, J, D): gs^{r-1} from dL/dv, then (unless detach) gs^{r-2} .. gs^0 from one
    reduction pass each (the first pass forms gs^{r-1} itself)."""
    fused = ins[2] is None
    B, I, J, D, DIN = sizes(*ins)
    dev = src.device
    gs_all = empty(iterations, B, J, D, dtype=torch.float32, device=dev)
    if detach or iterations == 1:
        init_block = lanes_per_sample(p.dims["BJ"]) * INIT_WARPS
        routing_bwd_init_kernel[(cdiv(B, init_block),)](
            s_all_ptr=s_all, grad_v_ptr=grad_v, gs_all_ptr=gs_all, B=B, t=iterations - 1, eps=ROUTING_EPS, J=J, D=D,
            BLOCK_B=init_block, num_warps=INIT_WARPS, **p.dims)
        return gs_all
    part, count = chunk_scratch(p, B, J, D, src)
    args = dict(_pass_inputs(*ins), P_all_ptr=P_all, gs_all_ptr=gs_all, part_ptr=part, count_ptr=count,
                s_all_ptr=s_all, v_ptr=grad_v, B=B, I=I, caps_per_chunk=p.caps_per_chunk, n_chunks=p.n_chunks)
    key = (routing_pass_kernel, dev, src.dtype, p.key, fused, True)
    for t in range(iterations - 1, 0, -1):  # sum_i gb^t u_hat -> G^{t-1}, gs^{t-1}
        launch(routing_pass_kernel, pass_grid(B, p.n_chunks), key, **args, t=t, eps=ROUTING_EPS,
               B_BUCKET=batch_bucket(B), J=J, D=D, DIN=DIN, BACKWARD=True, FUSED=fused, FIRST=False, LAST=False,
               ACCUMULATE=t < iterations - 1, HAS_NEXT=t >= 2, GS_FROM_GRAD_V=t == iterations - 1, **p.dims)
    return gs_all


def dynamic_routing_fwd(u_hat: torch.Tensor, iterations: int):
    """u_hat (B, I, J, D) contiguous -> (v (B, J, D) in u_hat's dtype, s_all (r, B, J, D),
    P_all (r-1, B, J, D) fp32)."""
    with on_device(u_hat):
        return _routing_forward(None, None, u_hat, iterations)


def dynamic_routing_bwd(u_hat, s_all, P_all, grad_v, iterations: int, detach: bool) -> torch.Tensor:
    """dL/du_hat from the saved per-iteration s and P and dL/dv (all contiguous)."""
    with on_device(u_hat):
        p = plan(*sizes(None, None, u_hat), target_programs(u_hat.device))
        gs_all = _backward_stats((None, None, u_hat), u_hat, s_all, P_all, grad_v, iterations, detach, p)
        return final_grad(p, u_hat, None, P_all, gs_all, iterations, detach=detach, uniform_first=True)[0]


def transform_route_fwd(u: torch.Tensor, W: torch.Tensor, iterations: int):
    """u (B, I, Din), W (I, Din, J, D) (the kernel layout), contiguous -> (v (B, J, D), s_all,
    P_all); u_hat never exists."""
    with on_device(u):
        return _routing_forward(u, W, None, iterations)


def transform_route_bwd(u, W, s_all, P_all, grad_v, iterations: int, detach: bool, need_u: bool = True,
                        need_W: bool = True):
    """(dL/du (B, I, Din) or None, dL/dW (I, Din, J, D) or None), recomputing u_hat = W u."""
    with on_device(u):
        p = plan(*sizes(u, W, None), target_programs(u.device))
        gs_all = _backward_stats((u, W, None), u, s_all, P_all, grad_v, iterations, detach, p)
        grad_u, grad_W, _ = final_grad(p, u, W, P_all, gs_all, iterations, detach=detach, uniform_first=True,
                                       need_src=need_u, need_W=need_W)
        return grad_u, grad_W


# ----------------------------------------------------------------------------------------------
# compile-check cases: every config the autotune lists keep (bf16: the default) at compile_cases.SHAPES
# ----------------------------------------------------------------------------------------------
def _pass_cases(src, dtype, tag, sizes, dims, din):
    sig = {"u_ptr": src, "W_ptr": src, "uhat_ptr": src, "P_all_ptr": F32, "gs_all_ptr": F32, "part_ptr": F32,
           "count_ptr": "*i32", "s_all_ptr": F32, "v_ptr": src, "B": I32, "I": I32, "caps_per_chunk": I32,
           "n_chunks": I32, "t": I32, "eps": "fp32", "B_BUCKET": I32}
    off = dict(FIRST=False, LAST=False, ACCUMULATE=False, HAS_NEXT=False, GS_FROM_GRAD_V=False)
    variants = (("forward", dict(off, BACKWARD=False)),
                ("forward-first", dict(off, BACKWARD=False, FIRST=True)),
                ("forward-last", dict(off, BACKWARD=False, LAST=True)),
                ("backward", dict(off, BACKWARD=True, ACCUMULATE=True, HAS_NEXT=True)),
                ("backward-first", dict(off, BACKWARD=True, HAS_NEXT=True, GS_FROM_GRAD_V=True)))
    cases = []
    for fused in (True, False):
        for what, flags in variants:
            for cfg, default in pick(prune_pass_configs, PASS_CONFIGS, dims, dtype != "bf16",
                                     BACKWARD=flags["BACKWARD"]):
                cases.append(case(f"routing_pass[{tag},{what},fused={fused}]", routing_pass_kernel.fn, sig,
                                  {**sizes, **flags, "FUSED": fused, **dims}, cfg, default))
    return cases


def _final_grad_cases(src, dtype, tag, sizes, dims, din):
    variants = {f"dynamic,detach={detach}": dict(DETACH=detach, UNIFORM_FIRST=True, HAS_R=False, HAS_BIAS=False)
                for detach in (False, True)}
    return final_grad_cases(src, tag, sizes, dims, din, variants, every=dtype != "bf16")


def _init_cases(src, dtype, tag, sizes, dims, din):
    sig = {"s_all_ptr": F32, "grad_v_ptr": src, "gs_all_ptr": F32, "B": I32, "t": I32, "eps": "fp32"}
    const = {"J": sizes["J"], "D": sizes["D"], "BLOCK_B": lanes_per_sample(dims["BJ"]) * INIT_WARPS, **dims}
    return [{"name": f"routing_bwd_init[{tag}]", "fn": routing_bwd_init_kernel, "signature": sig,
             "constexprs": const, "num_warps": INIT_WARPS, "num_stages": 1, "default": True}]


COMPILE_CASES = over_shapes(_pass_cases, _final_grad_cases, _init_cases)
