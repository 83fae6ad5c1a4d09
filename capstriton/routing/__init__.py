"""Routing algorithms: one module each (public functions, custom ops with autograd, registry
entry), the registry, and the ``transform_route`` dispatcher.  Their kernels mirror this
package in ``capstriton.kernels.routing``.

Adding an algorithm: a kernel module ``kernels/routing/<alg>.py``, a module here holding its
public function and its ``ROUTING`` entry, and one line in ``ALGORITHMS`` (or, outside the
library, one ``register_routing`` call)."""
from . import dynamic, em, inverted_attention, self_attention
from .common import kernel_layout_weight
from .couplings import couplings_from_state, routing_couplings
from .dynamic import dynamic_routing
from .em import class_caps_route, em_routing
from .em_conv import conv_caps_route, conv_em_routing
from .inverted_attention import inverted_attention_routing, transform_inverted_attention_routing
from .registry import LayerParameter, Routed, Routing, get_routing, register_routing, routing_names
from .self_attention import self_attention_routing, transform_self_attention_routing
from .transform_route import transform_route

ALGORITHMS = (dynamic.ROUTING, self_attention.ROUTING, inverted_attention.ROUTING, em.ROUTING)
for _algorithm in ALGORITHMS:
    register_routing(_algorithm, builtin=True)

__all__ = ["ALGORITHMS", "Routing", "Routed", "LayerParameter", "register_routing", "get_routing", "routing_names",
           "transform_route", "dynamic_routing", "self_attention_routing", "transform_self_attention_routing",
           "inverted_attention_routing", "transform_inverted_attention_routing", "routing_couplings",
           "couplings_from_state", "kernel_layout_weight", "em_routing", "class_caps_route",
           "conv_em_routing", "conv_caps_route"]
