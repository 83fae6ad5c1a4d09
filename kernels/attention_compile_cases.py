"""Compile-check cases of the attention-routing kernels (``python -m capstriton.kernels.compile_check``).

Self-attention and inverted-attention pass kernels, the inverted-attention init kernel, and the
shared final-gradient kernels in their attention variants (self-attention: one iteration with a
state, R and the coupling bias; inverted attention: a uniform first iteration), at the configs
their autotune lists keep for the paper's DigitCaps shape (J = 10 -> BJ = 16, D = 16, Din = 8;
fp32: every config; fp16, bf16: the default) and for J = 32 (fp32, fp16: the default).
"""
from __future__ import annotations

from ._capsule_tiles import lanes_per_sample
from ._streaming import (GRAD_CONFIGS, MODE_BACKWARD, MODE_FORWARD, MODE_SUM, PASS_CONFIGS, prune_grad_configs,
                         prune_pass_configs, prune_unfused_grad_configs, smallest_pass_block, stream_grad_fused_kernel,
                         stream_grad_kernel)
from .inverted_attention_routing import INIT_WARPS, inverted_attention_bwd_init_kernel, inverted_attention_pass_kernel
from .routing_compile_cases import F32, _case, cases_over_shapes
from .routing_compile_cases import _pick as _pick_all
from .self_attention_routing import self_attention_pass_kernel

I32 = "i32"


def _pick(prune, configs, dtype, dims, **flags):
    """Every kept config for fp32 at the paper's width (BJ = 16), else the default alone."""
    kept = _pick_all(prune, configs, dtype, dims, **flags)
    return kept if dtype == "fp32" and dims["BJ"] == 16 else kept[:1]


def _self_attention_pass(src, dtype, tag, sizes, dims, din):
    sig = {"u_ptr": src, "W_ptr": src, "uhat_ptr": src, "bias_ptr": src, "Q_ptr": F32, "s_ptr": F32, "gs_ptr": F32,
           "R_ptr": F32, "v_ptr": src, "part_ptr": F32, "count_ptr": "*i32", "B": I32, "I": I32,
           "caps_per_chunk": I32, "n_chunks": I32, "scale": "fp32", "B_BUCKET": I32}
    variants = (("S", MODE_SUM, False), ("forward", MODE_FORWARD, False), ("forward-bias", MODE_FORWARD, True),
                ("backward", MODE_BACKWARD, False))
    cases = []
    for fused in (True, False):
        for what, mode, has_bias in variants:
            for cfg, default in _pick(prune_pass_configs, PASS_CONFIGS, dtype, dims, MODE=mode):
                cases.append(_case(f"self_attention_pass[{tag},{what},fused={fused}]", self_attention_pass_kernel.fn,
                                   sig, {**sizes, "MODE": mode, "HAS_BIAS": has_bias, "FUSED": fused, **dims},
                                   cfg, default))
    return cases


def _inverted_attention_pass(src, dtype, tag, sizes, dims, din):
    sig = {"u_ptr": src, "W_ptr": src, "uhat_ptr": src, "Q_all_ptr": F32, "s_all_ptr": F32, "gs_all_ptr": F32,
           "w_ptr": src, "b_ptr": src, "gw_all_ptr": F32, "gb_all_ptr": F32, "p_ptr": src, "part_ptr": F32,
           "count_ptr": "*i32", "B": I32, "I": I32, "caps_per_chunk": I32, "n_chunks": I32, "t": I32,
           "eps": "fp32", "scale": "fp32", "B_BUCKET": I32}
    off = dict(LAST=False, GS_FROM_GRAD=False)
    variants = (("first", dict(off, MODE=MODE_SUM)), ("forward", dict(off, MODE=MODE_FORWARD)),
                ("forward-last", dict(off, MODE=MODE_FORWARD, LAST=True)),
                ("backward", dict(off, MODE=MODE_BACKWARD)),
                ("backward-first", dict(off, MODE=MODE_BACKWARD, GS_FROM_GRAD=True)))
    cases = []
    for fused in (True, False):
        for what, flags in variants:
            for affine in (True, False):
                for cfg, default in _pick(prune_pass_configs, PASS_CONFIGS, dtype, dims, MODE=flags["MODE"],
                                          HAS_AFFINE=affine):
                    cases.append(_case(f"inverted_attention_pass[{tag},{what},affine={affine},fused={fused}]",
                                       inverted_attention_pass_kernel.fn, sig,
                                       {**sizes, **flags, "HAS_AFFINE": affine, "FUSED": fused, **dims}, cfg, default))
    return cases


def _grad(src, dtype, tag, sizes, dims, din):
    fused_sig = {"u_ptr": src, "W_ptr": src, "Q_all_ptr": F32, "gs_all_ptr": F32, "R_ptr": F32, "bias_ptr": src,
                 "grad_u_ptr": src, "grad_W_ptr": F32, "grad_bias_ptr": F32, "B": I32, "I": I32,
                 "iterations": I32, "caps_per_chunk": I32, "n_groups": I32, "B_BUCKET": I32}
    unfused_sig = {"uhat_ptr": src, "Q_all_ptr": F32, "gs_all_ptr": F32, "R_ptr": F32, "bias_ptr": src,
                   "grad_uhat_ptr": src, "grad_bias_ptr": F32, "B": I32, "I": I32, "iterations": I32,
                   "caps_per_chunk": I32, "B_BUCKET": I32}
    variants = (("self_attention", dict(DETACH=False, UNIFORM_FIRST=False, HAS_R=True, HAS_BIAS=True)),
                ("self_attention-no-bias", dict(DETACH=False, UNIFORM_FIRST=False, HAS_R=True, HAS_BIAS=False)))
    cases = []
    for what, flags in variants:  # inverted attention runs the dynamic-routing variant (routing_compile_cases)
        for cfg, default in _pick(prune_grad_configs, GRAD_CONFIGS, dtype, dims):
            const = {**sizes, "BDIN": din, **flags, "NEED_U": True, "NEED_W": True, **dims}
            cases.append(_case(f"stream_grad_fused[{tag},{what}]", stream_grad_fused_kernel.fn, fused_sig, const,
                               cfg, default))
        for cfg, default in _pick(prune_unfused_grad_configs, PASS_CONFIGS, dtype, dims):
            const = {"J": sizes["J"], "D": sizes["D"], **flags, "ROW_BLOCK": smallest_pass_block(), **dims}
            cases.append(_case(f"stream_grad[{tag},{what}]", stream_grad_kernel.fn, unfused_sig, const, cfg, default))
    return cases


def _init_cases(src, dtype, tag, sizes, dims, din):
    sig = {"s_ptr": F32, "grad_p_ptr": src, "w_ptr": src, "gs_ptr": F32, "gw_ptr": F32, "gb_ptr": F32, "B": I32,
           "eps": "fp32"}
    return [{"name": f"inverted_attention_bwd_init[{tag},affine={affine}]", "fn": inverted_attention_bwd_init_kernel,
             "signature": sig, "constexprs": {"J": sizes["J"], "D": sizes["D"], "HAS_AFFINE": affine,
                                              "BLOCK_B": lanes_per_sample(dims["BJ"]) * INIT_WARPS, **dims},
             "num_warps": INIT_WARPS, "num_stages": 1, "default": True} for affine in (True, False)]


COMPILE_CASES = cases_over_shapes(_self_attention_pass, _inverted_attention_pass, _grad, _init_cases)
