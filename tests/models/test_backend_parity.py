"""CapsNet trains with backend="triton" (kernels under the interpreter) along the same loss
curve as backend="torch", to fp32 tolerance."""
import copy

import pytest
import torch

import capstriton as ct


def _train(model, images, labels, steps=4):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        lengths, recon, _ = model(images, labels)
        loss = ct.margin_loss(lengths, labels) + 0.0005 * ct.reconstruction_loss(recon, images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_capsnet_triton_and_torch_backends_share_the_loss_curve():
    small = dict(conv_channels=8, primary_caps=2, primary_dim=4, num_classes=5, digit_dim=6)
    torch_model = ct.CapsNet(backend="torch", **small)
    triton_model = copy.deepcopy(torch_model).set_backend("triton")
    images = torch.rand(6, 1, 28, 28)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    ref = _train(torch_model, images, labels)
    got = _train(triton_model, images, labels)
    assert ref[-1] < ref[0]
    for step, (a, b) in enumerate(zip(got, ref)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: triton {a:.7f} vs torch {b:.7f}"
    for (name, p), q in zip(triton_model.named_parameters(), torch_model.parameters()):
        assert (p - q).abs().max() <= 1e-4 * q.abs().max(), name
