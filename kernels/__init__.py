"""Triton kernels and their launchers (tensors in, tensors out, no autograd).

Installed as ``capstriton.kernels``; the autograd wrappers live in ``capstriton``.
"""
from .squash import squash_bwd, squash_fwd

__all__ = ["squash_fwd", "squash_bwd"]
from .routing import dynamic_routing_bwd, dynamic_routing_fwd, transform_route_bwd, transform_route_fwd

__all__ += ["dynamic_routing_fwd", "dynamic_routing_bwd", "transform_route_fwd", "transform_route_bwd"]
from .caps_transform import caps_transform_bwd, caps_transform_fwd

__all__ += ["caps_transform_fwd", "caps_transform_bwd"]
from .self_attention_routing import self_attention_routing_bwd, self_attention_routing_fwd

__all__ += ["self_attention_routing_fwd", "self_attention_routing_bwd"]
from .inverted_attention_routing import inverted_attention_routing_bwd, inverted_attention_routing_fwd

__all__ += ["inverted_attention_routing_fwd", "inverted_attention_routing_bwd"]
from .couplings import routing_couplings_fwd

__all__ += ["routing_couplings_fwd"]
