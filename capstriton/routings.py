"""The routing algorithms ``transform_route`` and ``DigitCaps`` dispatch to, by name.

An algorithm is described once (`Routing`): the keyword arguments it takes with their
defaults, how it routes u (B, I, Din) through W (I, J, D, Din), its reference couplings, and the
parameters a layer owns for it.  Adding one (EM routing is next) takes its kernel file, its
public function in ``capstriton/`` and one ``register_routing`` call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Routing", "register_routing", "get_routing", "routing_names"]

OPTIONS = ("iterations", "detach", "bias", "weight", "eps")  # every keyword transform_route forwards


@dataclass(frozen=True)
class Routing:
    """One routing algorithm.

    options: the keywords of OPTIONS it takes, with their defaults.
    route(u, W, backend, **options) -> (v, state, on_triton): the output, and on the triton
        backend the fp32 state (B, J, D) its last couplings softmax_j(u_hat . state) were formed
        from (None when they are uniform); on_triton says whether the kernels ran.
    couplings_ref(u, W, **options) -> c (B, I, J): the final couplings by the reference.
    coupling_bias: the option added to the couplings after the softmax, if any.
    parameters(in_caps, out_caps, out_dim) -> {layer attribute: (initial value, option)}: what a
        ``DigitCaps`` owns and passes as that option.
    """
    name: str
    options: dict
    route: Callable
    couplings_ref: Callable
    coupling_bias: str | None = None
    parameters: Callable = field(default=lambda in_caps, out_caps, out_dim: {})


_REGISTRY: dict[str, Routing] = {}


def register_routing(routing: Routing) -> None:
    unknown = set(routing.options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"routing {routing.name!r}: options must be among {OPTIONS}, got {sorted(unknown)}")
    _REGISTRY[routing.name] = routing


def routing_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_routing(name: str) -> Routing:
    if name not in _REGISTRY:
        raise ValueError(f"routing must be one of {routing_names()}, got {name!r}")
    return _REGISTRY[name]


def resolve_options(routing: Routing, given: dict) -> dict:
    """The algorithm's options: ``given`` (those set, i.e. not None / False) over its defaults;
    an option it does not take raises ValueError."""
    extra = sorted(k for k, v in given.items() if v is not None and v is not False and k not in routing.options)
    if extra:
        raise ValueError(f"routing={routing.name!r} takes {sorted(routing.options) or 'no extra arguments'}, "
                         f"got {extra}")
    return {k: (given[k] if given.get(k) is not None else default) for k, default in routing.options.items()}


# ---------------------------------------------------------------------------------------------- the three
def _dynamic(u, W, backend, iterations, detach):
    from .transform_route import transform_route_with_state
    return transform_route_with_state(u, W, iterations, bool(detach), backend)


def _self_attention(u, W, backend, bias):
    from .self_attention_routing import transform_with_state
    return transform_with_state(u, W, bias, backend)


def _inverted_attention(u, W, backend, iterations, bias, weight, eps):
    from .inverted_attention_routing import transform_with_state
    return transform_with_state(u, W, iterations, weight, bias, eps, backend)


def _couplings_ref(routing: str):
    def couplings(u, W, iterations=1, detach=False, bias=None, weight=None, eps=1e-5):
        from .couplings import routing_couplings
        return routing_couplings(u, W, routing, iterations, bias, weight, eps)
    return couplings


register_routing(Routing("dynamic", {"iterations": 3, "detach": False}, _dynamic, _couplings_ref("dynamic")))
register_routing(Routing(
    "self-attention", {"bias": None}, _self_attention, _couplings_ref("self-attention"), coupling_bias="bias",
    parameters=lambda in_caps, out_caps, out_dim: {"coupling_bias": (torch.zeros(in_caps, out_caps), "bias")}))
register_routing(Routing(
    "inverted-attention", {"iterations": 2, "bias": None, "weight": None, "eps": 1e-5}, _inverted_attention,
    _couplings_ref("inverted-attention"),
    parameters=lambda in_caps, out_caps, out_dim: {"ln_weight": (torch.ones(out_dim), "weight"),
                                                   "ln_bias": (torch.zeros(out_dim), "bias")}))
