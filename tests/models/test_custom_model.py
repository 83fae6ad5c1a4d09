"""A model the library does not ship, built from the public API alone: a CIFAR-like 100-class
capsule network (3 x 32 x 32 images, a custom convolutional stem, PrimaryCaps, DigitCaps with
its capsule count inferred).  Its first 10 Adam steps reduce the margin loss, on both backends
(the former fixed init_std=0.01 left it flat at 0.81), and the backends share the loss curve."""
import pytest
import torch
from torch import nn

import capstriton as ct


def cifar_like(backend: str, routing: str = "dynamic", **digit) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=9, stride=4), nn.ReLU(),                      # 32 x 32 -> 6 x 6
        ct.PrimaryCaps(32, num_caps=4, caps_dim=8, kernel_size=3, stride=2, backend=backend),  # 4 x 2 x 2 capsules
        ct.DigitCaps(in_caps=None, in_dim=8, out_caps=100, out_dim=8, routing=routing, backend=backend, **digit),
    )


def _first_steps(model: nn.Module, steps: int = 10) -> list[float]:
    torch.manual_seed(1)
    images, labels = torch.rand(4, 3, 32, 32), torch.randint(0, 100, (4,))
    model(images)  # materializes DigitCaps (in_caps = 16) before the optimizer sees the parameters
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = ct.margin_loss(model(images).norm(dim=-1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _built(backend: str, routing: str = "dynamic", **digit) -> nn.Sequential:
    torch.manual_seed(0)
    return cifar_like(backend, routing, **digit)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_cifar_like_100_class_model_learns_in_its_first_steps(backend):
    model = _built(backend)
    losses = _first_steps(model)
    assert model[-1].in_caps == 16
    assert losses[-1] < 0.8 * losses[0], losses
    if backend == "triton":  # the same curve as the plain-PyTorch backend
        reference = _first_steps(_built("torch"))
        for step, (got, ref) in enumerate(zip(losses, reference)):
            assert abs(got - ref) <= 1e-4 * abs(ref), f"step {step}: triton {got:.7f} vs torch {ref:.7f}"


def test_the_same_model_with_the_former_initialization_does_not_learn():
    losses = _first_steps(_built("torch", init_std=0.01))
    assert losses[-1] > 0.95 * losses[0], losses


def test_the_cifar_like_model_under_self_attention():
    losses = _first_steps(_built("torch", "self-attention"))
    assert losses[-1] < 0.8 * losses[0], losses
