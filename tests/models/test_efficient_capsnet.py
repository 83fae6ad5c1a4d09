"""Efficient-CapsNet: the paper's size, CapsNet's forward contract, gradients reaching the
self-attention routing's parameters, and both backends agreeing."""

import pytest
import torch

import capstriton as ct


def test_parameter_count_matches_the_paper():
    # trainable parameters of the authors' Keras model: 161,824 ("161k"); decoder 1,411,344
    assert sum(p.numel() for p in ct.EfficientCapsNet(decoder=False).parameters()) == 161_824
    assert sum(p.numel() for p in ct.EfficientCapsNet().parameters()) == 161_824 + 1_411_344


def test_forward_contract_and_gradients():
    model = ct.EfficientCapsNet(backend="torch")
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([1, 7, 3])
    lengths, recon, caps = model(x, y)
    assert lengths.shape == (3, 10) and recon.shape == (3, 784) and caps.shape == (3, 10, 16)
    assert torch.all(lengths < 1.0)
    (ct.margin_loss(lengths, y) + 0.0005 * ct.reconstruction_loss(recon, x)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.digit.coupling_bias.grad.abs().sum() > 0 and model.digit.weight.grad.abs().sum() > 0
    assert ct.EfficientCapsNet(decoder=False)(x)[1] is None
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\), got \(3, 28, 28\)"):
        model(x[:, 0])


def test_backends_agree():
    torch.manual_seed(0)
    model = ct.EfficientCapsNet(decoder=False, backend="torch").eval()
    x = torch.rand(2, 1, 28, 28)
    ref = model(x)[2]
    model.backend = "triton"
    torch.testing.assert_close(model(x)[2], ref, rtol=1e-4, atol=1e-5)
