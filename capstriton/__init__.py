"""capstriton: Triton GPU kernels for capsule networks.

Ops (``backend="auto" | "torch" | "triton"``: "torch" is the plain-PyTorch reference in
``capstriton.reference``, "triton" the kernels in ``capstriton.kernels``, "auto" picks triton
for CUDA tensors or under TRITON_INTERPRET=1, torch otherwise): squash, caps_transform, the
routing algorithms and transform_route (``capstriton.routing``), the losses.
Layers: PrimaryCaps, DigitCaps; set_backend switches a built layer or model.  Models
(``capstriton.models``): CapsNet, EfficientCapsNet, ConvBaseline.  Training, experiments and
data live in the subpackages of those names.
"""
from .caps_transform import caps_transform
from .layers import DigitCaps, PrimaryCaps, set_backend
from .loss import margin_loss, reconstruction_loss, spread_loss, spread_margin, spread_margin_sigmoid
from .matrix_caps import class_caps_votes, conv_caps_votes, matrix_transform
from .matrix_layers import ClassCaps, ConvCaps, PrimaryMatrixCaps
from .models import CapsNet, ConvBaseline, EfficientCapsNet, MatrixCapsNet
from .routing import (
    LayerParameter,
    Routed,
    Routing,
    class_caps_route,
    conv_caps_route,
    conv_em_routing,
    dynamic_routing,
    em_routing,
    get_routing,
    inverted_attention_routing,
    kernel_layout_weight,
    register_routing,
    routing_names,
    self_attention_routing,
    transform_inverted_attention_routing,
    transform_route,
    transform_self_attention_routing,
)
from .squash import squash
from .version import __version__

__all__ = [
    "squash", "caps_transform", "dynamic_routing", "transform_route", "self_attention_routing",
    "transform_self_attention_routing", "inverted_attention_routing", "transform_inverted_attention_routing",
    "Routing", "Routed", "LayerParameter", "register_routing", "get_routing", "routing_names", "kernel_layout_weight",
    "margin_loss", "reconstruction_loss", "PrimaryCaps", "DigitCaps", "set_backend", "CapsNet", "EfficientCapsNet",
    "ConvBaseline", "__version__",
    # matrix capsules with EM routing
    "em_routing", "class_caps_route", "conv_em_routing", "conv_caps_route", "matrix_transform", "conv_caps_votes",
    "class_caps_votes", "spread_loss", "spread_margin", "spread_margin_sigmoid", "PrimaryMatrixCaps", "ConvCaps",
    "ClassCaps", "MatrixCapsNet",
]
