"""capstriton: Triton GPU kernels for capsule networks.

Public API::

    squash, caps_transform, dynamic_routing, transform_route, margin_loss,
    PrimaryCaps, DigitCaps, CapsNet

Each op takes ``backend="auto" | "torch" | "triton"``: "torch" is the plain-PyTorch
reference (``capstriton.reference``), "triton" the kernels (``capstriton.kernels``), and
"auto" picks triton for CUDA tensors or under TRITON_INTERPRET=1, torch otherwise.
"""
from .loss import margin_loss, reconstruction_loss
from .squash import squash
from .transform import caps_transform
from .routing import dynamic_routing
from .transform_route import transform_route
from .layers import DigitCaps, PrimaryCaps
from .model import CapsNet

__version__ = "0.1.0"

__all__ = [
    "squash", "caps_transform", "dynamic_routing", "transform_route", "margin_loss",
    "reconstruction_loss", "PrimaryCaps", "DigitCaps", "CapsNet", "__version__",
]

# attention routing family (self-attention: Efficient-CapsNet; inverted dot-product attention)
from .self_attention_routing import self_attention_routing, transform_self_attention_routing  # noqa: E402
from .inverted_attention_routing import (inverted_attention_routing,  # noqa: E402
                                         transform_inverted_attention_routing)

__all__ += ["self_attention_routing", "transform_self_attention_routing", "inverted_attention_routing",
            "transform_inverted_attention_routing"]
from .efficient_capsnet import EFFICIENT_CAPSNET_RECIPE, EfficientCapsNet  # noqa: E402

__all__ += ["EfficientCapsNet", "EFFICIENT_CAPSNET_RECIPE"]
from .routings import Routing, register_routing  # noqa: E402
from .transform_route import kernel_layout_weight  # noqa: E402

__all__ += ["Routing", "register_routing", "kernel_layout_weight"]
