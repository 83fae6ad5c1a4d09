"""Triton kernels and their launchers (tensors in, tensors out, no autograd).

Installed as ``capstriton.kernels``; the autograd wrappers live in ``capstriton``.
"""
from .squash import squash_bwd, squash_fwd

__all__ = ["squash_fwd", "squash_bwd"]
