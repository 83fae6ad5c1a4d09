"""Plain-PyTorch reference for every capstriton op.

This is the CPU path (``backend="torch"``) and the oracle that the Triton kernels are
tested against (run in float64).  It is written for clarity, not speed: it materializes
the prediction vectors ``u_hat`` and keeps the routing logits ``b``.
"""
from __future__ import annotations

import torch

__all__ = [
    "squash_ref",
    "layer_norm_ref",
    "caps_transform_ref",
    "dynamic_routing_ref",
    "transform_route_ref",
    "exp_squash_ref",
    "self_attention_routing_ref",
    "inverted_attention_routing_ref",
    "self_attention_couplings_ref",
]


def _pow2_scale_ref(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-vector power of two near the largest |entry| (1 when that is below 1), detached: dividing
    by it is exact and keeps squared norms from overflowing (the kernels' _pow2_scale)."""
    max_abs = x.detach().abs().amax(dim=dim, keepdim=True)
    return torch.where(max_abs >= 1, torch.exp2(torch.floor(torch.log2(max_abs))), torch.ones_like(max_abs))


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim, finite for every finite x: LayerNorm is scale-invariant up to
    eps, so it is computed on z = x / s (s = _pow2_scale_ref) with epsilon eps / s^2 (underflowing
    to 0 for huge s: the exact limit), as the kernels do.  Half precision is computed in fp32."""
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    s = _pow2_scale_ref(work, -1)
    z = work / s
    diff = z - z.mean(dim=-1, keepdim=True)
    var = (diff * diff).mean(dim=-1, keepdim=True)
    out = diff / torch.sqrt(var + eps * (1.0 / s) ** 2)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out.to(x.dtype)


def squash_ref(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """v = x * |x|^2 / ((1 + |x|^2) * sqrt(|x|^2 + eps)); finite (with finite grads) at x = 0 and
    for every finite x: |x|^2 would overflow (fp32 above ~1.8e19, fp16 from 256), so each vector
    is first divided by a power of two s near its largest entry (s = 1 for short vectors) and
    the formula is written in z = x / s (kernels/squash.py derives it).  Half precision is
    computed in fp32, like the kernels."""
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    # s is a constant for autograd: the expression below equals squash(x) for any fixed s > 0
    s = _pow2_scale_ref(work, dim)
    z = work / s
    q = (z * z).sum(dim=dim, keepdim=True)
    inv_s2 = (1.0 / s) ** 2  # underflows to 0 for huge s: the exact limit
    t = 1.0 / (inv_s2 + q)  # s^2 / (1 + |x|^2)
    return (z * (q * t / torch.sqrt(q + eps * inv_s2))).to(x.dtype)


def caps_transform_ref(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """u (B, I, Din), W (I, J, Dout, Din) -> u_hat (B, I, J, Dout) with u_hat[b,i,j] = W[i,j] @ u[b,i]."""
    return torch.einsum("ijdk,bik->bijd", W, u)


def dynamic_routing_ref(u_hat: torch.Tensor, iterations: int = 3, detach: bool = False) -> torch.Tensor:
    """Procedure 1 of Sabour et al. (2017): routing-by-agreement.

    u_hat (B, I, J, D) -> v (B, J, D).  The coupling coefficients c are a softmax over the
    OUTPUT capsules j.  With ``detach=True`` the logits are computed from ``u_hat.detach()``,
    so gradients reach ``u_hat`` only through the last iteration's weighted sum.
    """
    B, I, J, _ = u_hat.shape
    u_hat_for_logits = u_hat.detach() if detach else u_hat
    b = u_hat.new_zeros(B, I, J)
    v = None
    for it in range(iterations):
        c = torch.softmax(b, dim=2)  # over output capsules j
        last = it == iterations - 1
        source = u_hat if (last or not detach) else u_hat_for_logits
        s = (c.unsqueeze(-1) * source).sum(dim=1)  # (B, J, D)
        v = squash_ref(s, dim=-1)
        if not last:
            v_for_logits = v.detach() if detach else v
            b = b + (u_hat_for_logits * v_for_logits.unsqueeze(1)).sum(dim=-1)
    return v


def transform_route_ref(u: torch.Tensor, W: torch.Tensor, iterations: int = 3, detach: bool = False) -> torch.Tensor:
    """dynamic_routing_ref(caps_transform_ref(u, W))."""
    return dynamic_routing_ref(caps_transform_ref(u, W), iterations=iterations, detach=detach)


# ----------------------------------------------------------------------------------------------
# attention routing family (self-attention: Mazzia et al. 2021; inverted dot-product
# attention: Tsai et al. 2020).  Softmax always over the output capsules j.
# ----------------------------------------------------------------------------------------------
def exp_squash_ref(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Efficient-CapsNet's squash v = (1 - exp(-|s|)) s / |s|, through expm1; v = s at |s| = 0
    (the limit), with finite gradients there (identity Jacobian); finite for every finite s."""
    scale_ = _pow2_scale_ref(s, dim)  # |s| computed on s / scale_: no overflow for any finite s
    n = scale_ * torch.linalg.vector_norm(s / scale_, dim=dim, keepdim=True)
    nonzero = n > 0
    n_safe = torch.where(nonzero, n, torch.ones_like(n))
    scale = torch.where(nonzero, -torch.expm1(-n_safe) / n_safe, torch.ones_like(n))
    return s * scale


def state_couplings_ref(u_hat: torch.Tensor, state: torch.Tensor | None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The couplings every routing forms from a per-sample state Q (B, J, D):
    c_ij = softmax_j(u_hat_ij . Q_j) (+ bias_ij), uniform 1/J (+ bias_ij) when state is None."""
    if state is None:
        c = u_hat.new_full(u_hat.shape[:3], 1.0 / u_hat.shape[2])
    else:
        c = torch.softmax((u_hat * state.unsqueeze(1)).sum(dim=-1), dim=2)
    return c + bias if bias is not None else c


def self_attention_couplings_ref(u_hat: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention routing's couplings c (B, I, J): softmax_j(u_hat_ij . S_j / sqrt(D)) + bias_ij,
    S_j = sum_k u_hat_kj (the row sums of the I x I attention matrix, which is never formed)."""
    return state_couplings_ref(u_hat, u_hat.sum(dim=1) / u_hat.shape[-1] ** 0.5, bias)


def self_attention_routing_ref(u_hat: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention routing (Efficient-CapsNet): u_hat (B, I, J, D), bias (I, J) -> v (B, J, D).

    c = self_attention_couplings_ref(u_hat, bias) (bias added after the softmax, as in the
    authors' code); s_j = sum_i c_ij u_hat_ij; v_j = exp_squash(s_j)."""
    c = self_attention_couplings_ref(u_hat, bias)
    return exp_squash_ref((c.unsqueeze(-1) * u_hat).sum(dim=1))


def _inverted_attention_couplings(u_hat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """r_ij = softmax_j(u_hat_ij . p_j / sqrt(D)): (B, I, J)."""
    return state_couplings_ref(u_hat, p / u_hat.shape[-1] ** 0.5)


def inverted_attention_routing_ref(u_hat: torch.Tensor, iterations: int = 2, weight: torch.Tensor | None = None,
                                   bias: torch.Tensor | None = None, eps: float = 1e-5,
                                   return_coupling: bool = False):
    """Inverted dot-product attention routing (Tsai et al. 2020): u_hat (B, I, J, D) -> p (B, J, D).

    p^0 = 0; for t = 1..iterations: r_ij = softmax_j(u_hat_ij . p^{t-1}_j / sqrt(D)),
    p^t_j = layer_norm_ref(sum_i r_ij u_hat_ij) (affine ``weight``, ``bias`` of shape (D,) when
    given).  The first iteration's coupling is uniform.  ``return_coupling``: also return the
    last iteration's r (B, I, J)."""
    B, I, J, D = u_hat.shape
    p = u_hat.new_zeros(B, J, D)
    for _ in range(iterations):
        r = _inverted_attention_couplings(u_hat, p)
        p = layer_norm_ref((r.unsqueeze(-1) * u_hat).sum(dim=1), weight, bias, eps)
    return (p, r) if return_coupling else p
