"""Building blocks of the routing kernels' compile-check cases (``python -m capstriton.kernels.compile_check``).

Each algorithm module builds its own ``COMPILE_CASES`` from these: its pass kernels at the configs
their autotune lists keep, and the shared final-gradient kernels in the variants it launches
(`final_grad_cases`).  Shapes (`SHAPES`): the paper's DigitCaps (J = 10 -> BJ = 16, D = 16, Din = 8;
fp32, fp16, bf16) and the wider J = 32 (fp32, fp16).  A case's ``default`` marks the first config
the autotune list keeps for the shape (the one a launcher uses before any tuning).
"""
from __future__ import annotations

import triton

from .streaming import (
    GRAD_CONFIGS,
    PASS_CONFIGS,
    prune_grad_configs,
    prune_unfused_grad_configs,
    smallest_pass_block,
    stream_grad_fused_kernel,
    stream_grad_kernel,
)
from .tiles import tile_dims

F32 = "*fp32"
I32 = "i32"
SHAPES = ((10, 16, 8, ("fp32", "fp16", "bf16")), (32, 16, 8, ("fp32", "fp16")))  # (J, D, Din, dtypes)


def pick(prune, configs: list[triton.Config], dims: dict, every: bool, **flags) -> list[tuple[triton.Config, bool]]:
    """(config, default) for the configs the autotune list keeps at these tile widths: all of them
    when ``every``, else the default (the first kept) alone."""
    kept = prune(configs, {}, **dims, **flags)
    return [(c, c is kept[0]) for c in (kept if every else kept[:1])]


def case(name: str, fn, signature: dict, constexprs: dict, config: triton.Config, default: bool) -> dict:
    """One compile case: ``fn`` at ``config`` (its kwargs join the constexprs)."""
    return {"name": name, "fn": fn, "signature": signature, "constexprs": {**constexprs, **config.kwargs},
            "num_warps": config.num_warps, "num_stages": config.num_stages, "default": default}


def over_shapes(*builders) -> list[dict]:
    """Every builder(src, dtype, tag, sizes, dims, din) -> [case] at every shape and dtype of SHAPES:
    src is the input pointer type ("*fp16"), tag labels the shape ("fp16,J=10"), sizes holds the
    J, D, DIN constexprs and dims the tile widths."""
    cases = []
    for J, D, din, dtypes in SHAPES:
        dims = tile_dims(J, D)
        sizes = {"J": J, "D": D, "DIN": din}
        for dtype in dtypes:
            for build in builders:
                cases += build(f"*{dtype}", dtype, f"{dtype},J={J}", sizes, dims, din)
    return cases


def final_grad_cases(src: str, tag: str, sizes: dict, dims: dict, din: int, variants: dict[str, dict],
                     every: bool) -> list[dict]:
    """The shared final-gradient kernels (fused and unfused) in each variant {label: DETACH,
    UNIFORM_FIRST, HAS_R, HAS_BIAS flags} an algorithm launches."""
    fused_sig = {"u_ptr": src, "W_ptr": src, "Q_all_ptr": F32, "gs_all_ptr": F32, "R_ptr": F32, "bias_ptr": src,
                 "grad_u_ptr": src, "grad_W_ptr": F32, "grad_bias_ptr": F32, "B": I32, "I": I32,
                 "iterations": I32, "caps_per_chunk": I32, "n_groups": I32, "B_BUCKET": I32}
    unfused_sig = {"uhat_ptr": src, "Q_all_ptr": F32, "gs_all_ptr": F32, "R_ptr": F32, "bias_ptr": src,
                   "grad_uhat_ptr": src, "grad_bias_ptr": F32, "B": I32, "I": I32, "iterations": I32,
                   "caps_per_chunk": I32, "B_BUCKET": I32}
    cases = []
    for what, flags in variants.items():
        for cfg, default in pick(prune_grad_configs, GRAD_CONFIGS, dims, every):
            const = {**sizes, "BDIN": din, **flags, "NEED_U": True, "NEED_W": True, **dims}
            cases.append(case(f"stream_grad_fused[{tag},{what}]", stream_grad_fused_kernel.fn, fused_sig, const,
                              cfg, default))
        for cfg, default in pick(prune_unfused_grad_configs, PASS_CONFIGS, dims, every):
            const = {"J": sizes["J"], "D": sizes["D"], **flags, "ROW_BLOCK": smallest_pass_block(), **dims}
            cases.append(case(f"stream_grad[{tag},{what}]", stream_grad_kernel.fn, unfused_sig, const, cfg, default))
    return cases
