"""Deterministic reduction of per-group partial sums (weight gradients reduced over the batch).

Kernels that reduce over the batch write one fp32 partial per batch group (at most MAX_GROUPS,
a number that does not grow with the batch); `sum_partials` adds them in a fixed order, so
results are bitwise reproducible and no atomics are needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, empty

MAX_GROUPS = 8  # batch groups (partial buffers) of a weight-gradient reduction
SUM_BLOCK = 1024


@triton.jit
def sum_partials_kernel(
    p_ptr,            # (G, E) fp32 partial sums
    out_ptr,          # (E,) result, any float dtype (written)
    E,                # elements per partial
    G,                # number of partials, summed in order 0..G-1
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < E
    ptrs = p_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, G):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += E
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """partials (G, *shape) fp32, contiguous -> their sum (*shape) in ``dtype``; a single fp32
    partial is returned as it is."""
    if partials.shape[0] == 1 and dtype == partials.dtype:
        return partials[0]
    out = empty(*partials.shape[1:], dtype=dtype, device=partials.device)
    E = out.numel()
    sum_partials_kernel[(cdiv(E, SUM_BLOCK),)](p_ptr=partials, out_ptr=out, E=E, G=partials.shape[0], BLOCK=SUM_BLOCK,
                                               num_warps=4)
    return out


COMPILE_CASES = [
    dict(name=f"sum_partials_{dtype}", fn=sum_partials_kernel,
         signature={"p_ptr": "*fp32", "out_ptr": f"*{dtype}", "E": "i32", "G": "i32"},
         constexprs={"BLOCK": SUM_BLOCK}, num_warps=4, num_stages=1, default=True)
    for dtype in ("fp32", "fp16")
]
