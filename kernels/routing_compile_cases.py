"""Compile-check cases of the dynamic-routing kernels (``python -m capstriton.kernels.compile_check``).

Every kernel at the configs its autotune list keeps for the paper's DigitCaps shape (J = 10 ->
BJ = 16, D = 16, Din = 8; fp32 and fp16: every config, bf16: the default) and for the wider
shape J = 32 (fp32, fp16).  ``default`` marks the first config the autotune list keeps for the shape (the one used before any tuning).
"""
from __future__ import annotations

from ._capsule_tiles import lanes_per_sample, tile_dims
from ._streaming import smallest_pass_block
from .routing import (GRAD_CONFIGS, INIT_WARPS, PASS_CONFIGS, prune_grad_configs, prune_pass_configs,
                      prune_unfused_grad_configs,
                      routing_bwd_init_kernel, routing_grad_fused_kernel, routing_grad_kernel, routing_pass_kernel)

F32 = "*fp32"
SHAPES = ((10, 16, 8, ("fp32", "fp16", "bf16")), (32, 16, 8, ("fp32", "fp16")))


def _pick(prune, configs, dtype, dims, **flags):
    kept = prune(configs, {}, **dims, **flags)  # the first one kept is the default for this shape
    return [(c, c is kept[0]) for c in (kept if dtype != "bf16" else kept[:1])]


def _case(name, fn, signature, constexprs, config, default):
    return {"name": name, "fn": fn, "signature": signature, "constexprs": {**constexprs, **config.kwargs},
            "num_warps": config.num_warps, "num_stages": config.num_stages, "default": default}


def _pass_cases(src, dtype, tag, sizes, dims, din):
    sig = {"u_ptr": src, "W_ptr": src, "uhat_ptr": src, "P_all_ptr": F32, "gs_all_ptr": F32, "part_ptr": F32,
           "count_ptr": "*i32", "s_all_ptr": F32, "v_ptr": src, "B": "i32", "I": "i32",
           "caps_per_chunk": "i32", "n_chunks": "i32", "t": "i32", "eps": "fp32", "B_BUCKET": "i32"}
    off = dict(FIRST=False, LAST=False, ACCUMULATE=False, HAS_NEXT=False, GS_FROM_GRAD_V=False)
    variants = (("forward", dict(off, BACKWARD=False)),
                ("forward-first", dict(off, BACKWARD=False, FIRST=True)),
                ("forward-last", dict(off, BACKWARD=False, LAST=True)),
                ("backward", dict(off, BACKWARD=True, ACCUMULATE=True, HAS_NEXT=True)),
                ("backward-first", dict(off, BACKWARD=True, HAS_NEXT=True, GS_FROM_GRAD_V=True)))
    cases = []
    for fused in (True, False):
        for what, flags in variants:
            for cfg, default in _pick(prune_pass_configs, PASS_CONFIGS, dtype, dims, BACKWARD=flags["BACKWARD"]):
                cases.append(_case(f"routing_pass[{tag},{what},fused={fused}]", routing_pass_kernel.fn, sig,
                                   {**sizes, **flags, "FUSED": fused, **dims}, cfg, default))
    return cases


def _grad_cases(src, dtype, tag, sizes, dims, din):
    fused_sig = {"u_ptr": src, "W_ptr": src, "Q_all_ptr": F32, "gs_all_ptr": F32, "R_ptr": F32, "bias_ptr": src,
                 "grad_u_ptr": src, "grad_W_ptr": F32, "grad_bias_ptr": F32, "B": "i32", "I": "i32",
                 "iterations": "i32", "caps_per_chunk": "i32", "n_groups": "i32", "B_BUCKET": "i32"}
    unfused_sig = {"uhat_ptr": src, "Q_all_ptr": F32, "gs_all_ptr": F32, "R_ptr": F32, "bias_ptr": src,
                   "grad_uhat_ptr": src, "grad_bias_ptr": F32, "B": "i32", "I": "i32", "iterations": "i32",
                   "caps_per_chunk": "i32", "B_BUCKET": "i32"}
    extras = dict(UNIFORM_FIRST=True, HAS_R=False, HAS_BIAS=False)
    cases = []
    for detach in (False, True):
        for cfg, default in _pick(prune_grad_configs, GRAD_CONFIGS, dtype, dims):
            const = {**sizes, "BDIN": din, "DETACH": detach, **extras, "NEED_U": True, "NEED_W": True, **dims}
            cases.append(_case(f"routing_grad_fused[{tag},detach={detach}]", routing_grad_fused_kernel.fn,
                               fused_sig, const, cfg, default))
        for cfg, default in _pick(prune_unfused_grad_configs, PASS_CONFIGS, dtype, dims):
            const = {"J": sizes["J"], "D": sizes["D"], "DETACH": detach, **extras, "ROW_BLOCK": smallest_pass_block(), **dims}
            cases.append(_case(f"routing_grad[{tag},detach={detach}]", routing_grad_kernel.fn, unfused_sig, const,
                               cfg, default))
    return cases


def _init_case(src, dtype, tag, sizes, dims, din):
    sig = {"s_all_ptr": F32, "grad_v_ptr": src, "gs_all_ptr": F32, "B": "i32", "t": "i32", "eps": "fp32"}
    const = {"J": sizes["J"], "D": sizes["D"], "BLOCK_B": lanes_per_sample(dims["BJ"]) * INIT_WARPS, **dims}
    return [{"name": f"routing_bwd_init[{tag}]", "fn": routing_bwd_init_kernel, "signature": sig,
             "constexprs": const, "num_warps": INIT_WARPS, "num_stages": 1, "default": True}]


def cases_over_shapes(*builders) -> list[dict]:
    """Every builder(src, dtype, tag, sizes, dims, din) -> [case] at every shape and dtype of SHAPES."""
    cases = []
    for J, D, din, dtypes in SHAPES:
        dims = tile_dims(J, D)
        sizes = {"J": J, "D": D, "DIN": din}
        for dtype in dtypes:
            for build in builders:
                cases += build(f"*{dtype}", dtype, f"{dtype},J={J}", sizes, dims, din)
    return cases


COMPILE_CASES = cases_over_shapes(_pass_cases, _grad_cases, _init_case)
