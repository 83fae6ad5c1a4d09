"""transform_route: the capsule transform u_hat = W u followed by any registered routing
algorithm, fused on the triton backend.  The dispatcher alone: the algorithms live in their own
modules and are found through the registry."""
from __future__ import annotations

import torch

from .common import kernel_layout_weight
from .couplings import couplings_from_state
from .registry import Routed, Routing, get_routing, resolve_inputs, resolve_options

__all__ = ["transform_route"]


def transform_route(u: torch.Tensor, W: torch.Tensor, iterations: int | None = None, detach: bool | None = None,
                    backend: str = "auto", routing: str = "dynamic", return_coupling: bool = False, **options):
    """Routing of the predictions u_hat = W u: u (B, I, Din), W (I, J, Dout, Din) -> v (B, J, Dout).

    On the triton backend the prediction vectors u_hat = W u (B*I*J*Dout elements) are never
    materialized: every routing pass, forward and backward, recomputes them from u and W, and
    the backward produces dL/du and dL/dW directly (dL/dW reduced over the batch
    deterministically).  The kernels read W as (I, Din, J, Dout) in memory; a W stored in the
    usual contiguous layout costs one transposed copy per call (``DigitCaps`` stores its weight
    in the kernel layout).

    routing: the name of a registered algorithm (``capstriton.routing.routing_names()``):
      * "dynamic" (default): dynamic_routing(caps_transform(u, W)); ``iterations`` (default 3)
        and ``detach``, see ``dynamic_routing``;
      * "self-attention": ``transform_self_attention_routing(u, W, bias)``, bias (I, J); no
        iterations or detach;
      * "inverted-attention": ``transform_inverted_attention_routing(u, W, iterations, weight,
        bias, eps)``, iterations default 2, LayerNorm affine weight / bias (Dout,), eps default 1e-5.
    ``**options`` are the algorithm's other keywords and extra input tensors (its registry entry
    lists them); an argument the algorithm does not take raises ValueError when set.

    Returns v, or (v, *extra outputs) for an algorithm that declares outputs.  With
    ``return_coupling=True`` the final couplings c (B, I, J) come last, for analysis (c does not
    require grad): on the triton backend one more kernel forms them from the last iteration's
    state, recomputing u_hat = W u; the torch backend computes them with the reference.
    """
    algorithm = get_routing(routing)
    given = dict(options, iterations=iterations, detach=detach)
    inputs = resolve_inputs(algorithm, given)
    chosen = resolve_options(algorithm, {k: v for k, v in given.items() if k not in algorithm.inputs})
    routed = algorithm.route(u, W, backend, **chosen, **inputs)
    results = (routed.v, *routed.outputs)
    if return_coupling:
        results += (_couplings(algorithm, routed, u, W, chosen, inputs),)
    return results[0] if len(results) == 1 else results


def _couplings(algorithm: Routing, routed: Routed, u, W, options: dict, inputs: dict) -> torch.Tensor:
    if routed.on_triton and algorithm.state_couplings:  # from the last state, u_hat recomputed: never materialized
        bias = options[algorithm.coupling_bias] if algorithm.coupling_bias else None
        return couplings_from_state(u, kernel_layout_weight(W), routed.state, bias)
    with torch.no_grad():
        return algorithm.couplings_ref(u, W, **options, **inputs)
