"""Every autotune config of the attention-routing kernels against the float64 reference (the
suite otherwise runs only the first config of each list), at the paper's J = 10, D = 16 with
odd B and I: the pass kernels, and the shared final-gradient kernels in their self-attention
variant (coupling bias and R; unfused, its dL/dbias rows per batch block)."""
import pytest
import torch

from capstriton.kernels.routing import inverted_attention as inverted
from capstriton.kernels.routing import self_attention as self_att
from capstriton.kernels.routing import streaming
from tests.routing.test_inverted_attention import _check as _check_inverted_attention
from tests.routing.test_self_attention import _check as _check_self_attention

SHAPE = (19, 9, 10, 16, 3)


def _ids(configs):
    return [f"B{c.kwargs['BLOCK_B']}w{c.num_warps}" for c in configs]


def _self_attention(fused):
    _check_self_attention(fused, SHAPE, torch.float32, with_bias=True)


def _inverted_attention(fused):
    _check_inverted_attention(fused, SHAPE, torch.float32, iterations=3, affine=True)


@pytest.mark.parametrize("config", streaming.PASS_CONFIGS, ids=_ids(streaming.PASS_CONFIGS))
def test_every_self_attention_pass_config(config, monkeypatch):
    monkeypatch.setattr(self_att.self_attention_pass_kernel, "configs", [config])
    _self_attention(fused=True)


@pytest.mark.parametrize("config", streaming.PASS_CONFIGS, ids=_ids(streaming.PASS_CONFIGS))
def test_every_inverted_attention_pass_config(config, monkeypatch):
    monkeypatch.setattr(inverted.inverted_attention_pass_kernel, "configs", [config])
    _inverted_attention(fused=True)


@pytest.mark.parametrize("config", streaming.GRAD_CONFIGS, ids=_ids(streaming.GRAD_CONFIGS))
def test_every_fused_grad_config_with_bias_and_R(config, monkeypatch):
    monkeypatch.setattr(streaming.stream_grad_fused_kernel, "configs", [config])
    _self_attention(fused=True)


@pytest.mark.parametrize("config", streaming.PASS_CONFIGS, ids=_ids(streaming.PASS_CONFIGS))
def test_every_unfused_grad_config_with_bias_and_R(config, monkeypatch):
    monkeypatch.setattr(streaming.stream_grad_kernel, "configs", [config])
    _self_attention(fused=False)
