"""Every autotune config of the attention-routing kernels against the float64 reference (the
suite otherwise runs only the first config of each list), at the paper's J = 10, D = 16 with
odd B and I: the pass kernels, and the shared final-gradient kernels in their self-attention
variant (coupling bias and R; unfused, its dL/dbias rows per batch block)."""
import pytest
import torch

import capstriton as ct
from attention_cases import assert_matches_ref64, transform_inputs
from capstriton.kernels import _streaming, inverted_attention_routing as inverted, self_attention_routing as self_att
from capstriton.reference import caps_transform_ref, inverted_attention_routing_ref, self_attention_routing_ref

SHAPE = (19, 9, 10, 16, 3)


def _ids(configs):
    return [f"B{c.kwargs['BLOCK_B']}w{c.num_warps}" for c in configs]


def _self_attention(fused):
    u, W, u_hat, grad_v = transform_inputs(SHAPE, torch.float32)
    bias = (0.1 * torch.randn(SHAPE[1], SHAPE[2])).requires_grad_()
    if fused:
        v = ct.transform_self_attention_routing(u, W, bias, backend="triton")
        ref = lambda u_, W_, b_: self_attention_routing_ref(caps_transform_ref(u_, W_), b_)  # noqa: E731
        assert_matches_ref64(v, ref, (u, W, bias), grad_v, ("grad_u", "grad_W", "grad_bias"), torch.float32, "v")
    else:
        v = ct.self_attention_routing(u_hat, bias, backend="triton")
        assert_matches_ref64(v, self_attention_routing_ref, (u_hat, bias), grad_v, ("grad_u_hat", "grad_bias"),
                             torch.float32, "v")


def _inverted_attention(fused):
    u, W, u_hat, grad_v = transform_inputs(SHAPE, torch.float32)
    weight = (1 + 0.3 * torch.randn(SHAPE[3])).requires_grad_()
    bias = (0.3 * torch.randn(SHAPE[3])).requires_grad_()
    if fused:
        p = ct.transform_inverted_attention_routing(u, W, 3, weight, bias, backend="triton")
        ref = lambda u_, W_, w_, b_: inverted_attention_routing_ref(caps_transform_ref(u_, W_), 3, w_, b_)  # noqa: E731
        assert_matches_ref64(p, ref, (u, W, weight, bias), grad_v, ("grad_u", "grad_W", "grad_weight", "grad_bias"),
                             torch.float32, "p")
    else:
        p = ct.inverted_attention_routing(u_hat, 3, weight, bias, backend="triton")
        ref = lambda x, w_, b_: inverted_attention_routing_ref(x, 3, w_, b_)  # noqa: E731
        assert_matches_ref64(p, ref, (u_hat, weight, bias), grad_v, ("grad_u_hat", "grad_weight", "grad_bias"),
                             torch.float32, "p")


@pytest.mark.parametrize("config", _streaming.PASS_CONFIGS, ids=_ids(_streaming.PASS_CONFIGS))
def test_every_self_attention_pass_config(config, monkeypatch):
    monkeypatch.setattr(self_att.self_attention_pass_kernel, "configs", [config])
    _self_attention(fused=True)


@pytest.mark.parametrize("config", _streaming.PASS_CONFIGS, ids=_ids(_streaming.PASS_CONFIGS))
def test_every_inverted_attention_pass_config(config, monkeypatch):
    monkeypatch.setattr(inverted.inverted_attention_pass_kernel, "configs", [config])
    _inverted_attention(fused=True)


@pytest.mark.parametrize("config", _streaming.GRAD_CONFIGS, ids=_ids(_streaming.GRAD_CONFIGS))
def test_every_fused_grad_config_with_bias_and_R(config, monkeypatch):
    monkeypatch.setattr(_streaming.stream_grad_fused_kernel, "configs", [config])
    _self_attention(fused=True)


@pytest.mark.parametrize("config", _streaming.PASS_CONFIGS, ids=_ids(_streaming.PASS_CONFIGS))
def test_every_unfused_grad_config_with_bias_and_R(config, monkeypatch):
    monkeypatch.setattr(_streaming.stream_grad_kernel, "configs", [config])
    _self_attention(fused=False)
