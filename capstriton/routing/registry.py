"""The routing registry: ``transform_route``, ``DigitCaps``, the tuner, the benchmark and the tests
find every algorithm here by name.  This module imports no algorithm; ``capstriton.routing``
registers the built-in ones from one list.

An entry (`Routing`) declares everything a caller needs, so adding an algorithm is one kernel
module, one routing module and one line:

* ``options``: the keyword arguments it takes, with their defaults (``None``: unset);
* ``inputs``: extra tensors it routes beside u and W (EM routing: the input activations), each
  with a function making an example from (u, W) for the tuner, the benchmark and the tests;
* ``outputs``: the names of extra outputs returned after v (EM routing: output activations);
* ``parameters``: the tensors a layer owns and passes as options (a coupling bias, a LayerNorm
  affine, per-output-type betas), with their initial values;
* ``route``: the computation, returning a `Routed`;
* ``couplings_ref``: the final couplings by the plain-PyTorch reference, for analysis.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple

import torch

__all__ = ["Routing", "Routed", "LayerParameter", "register_routing", "get_routing", "routing_names",
           "resolve_options"]

# keywords transform_route and DigitCaps keep for themselves: no option or input may take them
RESERVED = frozenset({"u", "W", "backend", "routing", "return_coupling"})


class Routed(NamedTuple):
    """What ``Routing.route`` returns.

    v: the output capsules (B, J, D); outputs: the extra outputs, in the order of
    ``Routing.outputs``; state: on the triton backend, the fp32 state (B, J, D) the last
    couplings softmax_j(u_hat . state) were formed from (None: uniform, or not kept);
    on_triton: whether the kernels ran."""
    v: torch.Tensor
    outputs: tuple = ()
    state: torch.Tensor | None = None
    on_triton: bool = False


class LayerParameter(NamedTuple):
    """A tensor a layer owns for its routing: created as ``init`` and passed as ``option``."""
    init: torch.Tensor
    option: str


def _no_parameters(in_caps: int, out_caps: int, out_dim: int) -> dict[str, LayerParameter]:
    return {}


@dataclass(frozen=True)
class Routing:
    """One routing algorithm (see the module docstring).

    route(u, W, backend, **options, **inputs) -> Routed, with u (B, I, Din), W (I, J, D, Din).
    couplings_ref(u, W, **options, **inputs) -> c (B, I, J).
    parameters(in_caps, out_caps, out_dim) -> {layer attribute: LayerParameter}.
    coupling_bias: the option added to the couplings after the softmax, if any (the couplings
        kernel adds it too).
    state_couplings: the couplings are softmax_j(u_hat . state) (+ coupling bias) of the state
        ``route`` returns, so on the triton backend the couplings kernel forms them (u_hat
        recomputed); otherwise ``couplings_ref`` always does.
    init_gain: a layer's default W is N(0, std^2) with std = init_gain * out_caps^(7/8) /
        sqrt(in_caps * out_dim) (``DigitCaps(init_std=None)``); the gain sets how long the
        initial outputs are for squashed inputs (0.7: mean length about 0.2 under dynamic
        routing at every size).
    """
    name: str
    route: Callable[..., Routed]
    couplings_ref: Callable[..., torch.Tensor]
    options: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    parameters: Callable[[int, int, int], dict[str, LayerParameter]] = _no_parameters
    coupling_bias: str | None = None
    state_couplings: bool = False
    summary: str = ""
    init_gain: float = 0.7

    def example_kwargs(self, u: torch.Tensor, W: torch.Tensor) -> dict:
        """Keyword arguments for ``transform_route(u, W, routing=self.name, **kwargs)``: the layer
        parameters at their initial values and an example of every extra input, on u's device in
        u's dtype (what the tuner, the benchmark and the tests route with)."""
        in_caps, out_caps, out_dim = W.shape[0], W.shape[1], W.shape[2]
        kwargs = {p.option: p.init.to(device=u.device, dtype=u.dtype)
                  for p in self.parameters(in_caps, out_caps, out_dim).values()}
        kwargs.update({name: make(u, W) for name, make in self.inputs.items()})
        return kwargs


_REGISTRY: dict[str, Routing] = {}
_BUILTIN: set[str] = set()


def _check_entry(routing) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"register_routing expects a capstriton.routing.Routing, got {type(routing).__name__}")
    if not isinstance(routing.name, str) or not routing.name.strip():
        raise ValueError(f"a routing's name must be a non-empty str, got {routing.name!r}")
    for what in ("route", "couplings_ref", "parameters"):
        if not callable(getattr(routing, what)):
            raise TypeError(f"routing {routing.name!r}: {what} must be callable, "
                            f"got {type(getattr(routing, what)).__name__}")
    for what in ("options", "inputs"):
        if not isinstance(getattr(routing, what), Mapping):
            raise TypeError(f"routing {routing.name!r}: {what} must be a mapping, "
                            f"got {type(getattr(routing, what)).__name__}")
    if any(not callable(make) for make in routing.inputs.values()):
        raise TypeError(f"routing {routing.name!r}: every input needs a callable making an example from (u, W)")
    if not isinstance(routing.outputs, tuple) or not all(isinstance(o, str) for o in routing.outputs):
        raise TypeError(f"routing {routing.name!r}: outputs must be a tuple of names, got {routing.outputs!r}")
    keywords = list(routing.options) + list(routing.inputs)
    taken = sorted(RESERVED.intersection(keywords))
    if taken:
        raise ValueError(f"routing {routing.name!r}: option and input names must not be among "
                         f"{sorted(RESERVED)}, got {taken}")
    if len(set(keywords)) != len(keywords):
        raise ValueError(f"routing {routing.name!r}: an option and an input share a name: {keywords}")
    if isinstance(routing.init_gain, bool) or not isinstance(routing.init_gain, (int, float)) \
            or not 0 < routing.init_gain < float("inf"):
        raise ValueError(f"routing {routing.name!r}: init_gain must be a positive number, got {routing.init_gain!r}")
    if routing.coupling_bias is not None and routing.coupling_bias not in routing.options:
        raise ValueError(f"routing {routing.name!r}: coupling_bias must name one of its options "
                         f"{sorted(routing.options)}, got {routing.coupling_bias!r}")


def register_routing(routing: Routing, *, replace: bool = False, builtin: bool = False) -> None:
    """Add an algorithm to the registry, checked now rather than at first use.

    A taken name raises ValueError unless ``replace=True``; a built-in algorithm (``dynamic``,
    ``self-attention``, ``inverted-attention``, ...) can never be replaced.  ``builtin`` is for
    ``capstriton.routing`` itself."""
    _check_entry(routing)
    if routing.name in _REGISTRY:
        if routing.name in _BUILTIN:
            raise ValueError(f"routing {routing.name!r} is built in and cannot be replaced; "
                             "register the algorithm under another name")
        if not replace:
            raise ValueError(f"routing {routing.name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[routing.name] = routing
    if builtin:
        _BUILTIN.add(routing.name)


def routing_names() -> tuple[str, ...]:
    """The registered algorithms, in registration order."""
    return tuple(_REGISTRY)


def get_routing(name: str) -> Routing:
    if not isinstance(name, str):
        raise TypeError(f"routing must be a str, one of {routing_names()}, got {type(name).__name__} {name!r}")
    if name not in _REGISTRY:
        raise ValueError(f"routing must be one of {routing_names()}, got {name!r}")
    return _REGISTRY[name]


def resolve_options(routing: Routing, given: Mapping[str, Any]) -> dict:
    """The algorithm's options: those ``given`` (set: not None, not False) over its defaults.
    An option it does not take raises ValueError naming what it takes."""
    extra = sorted(k for k, v in given.items() if v is not None and v is not False and k not in routing.options)
    if extra:
        raise ValueError(f"routing={routing.name!r} takes {sorted(routing.options) or 'no extra arguments'}, "
                         f"got {extra}")
    return {k: (given[k] if given.get(k) is not None else default) for k, default in routing.options.items()}


def resolve_inputs(routing: Routing, given: Mapping[str, Any]) -> dict:
    """The algorithm's extra input tensors, every one required."""
    missing = sorted(k for k in routing.inputs if given.get(k) is None)
    if missing:
        raise ValueError(f"routing={routing.name!r} needs the input tensors {sorted(routing.inputs)}, "
                         f"missing {missing}")
    return {k: given[k] for k in routing.inputs}
