"""Triton kernels and their launchers (tensors in, tensors out, no autograd).

Installed as ``capstriton.kernels``; the autograd wrappers live in the library above, which this
package never imports.
"""
from .caps_transform import caps_transform_bwd, caps_transform_fwd
from .routing.couplings import routing_couplings_fwd
from .routing.dynamic import dynamic_routing_bwd, dynamic_routing_fwd, transform_route_bwd, transform_route_fwd
from .routing.inverted_attention import inverted_attention_routing_bwd, inverted_attention_routing_fwd
from .routing.self_attention import self_attention_routing_bwd, self_attention_routing_fwd
from .squash import squash_bwd, squash_fwd

__all__ = [
    "squash_fwd", "squash_bwd",
    "caps_transform_fwd", "caps_transform_bwd",
    "dynamic_routing_fwd", "dynamic_routing_bwd", "transform_route_fwd", "transform_route_bwd",
    "self_attention_routing_fwd", "self_attention_routing_bwd",
    "inverted_attention_routing_fwd", "inverted_attention_routing_bwd",
    "routing_couplings_fwd",
]
