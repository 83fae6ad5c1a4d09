"""Efficient-CapsNet: the paper's size, CapsNet's forward contract, gradients reaching the
self-attention routing's parameters, and both backends agreeing."""
import pytest
import torch

import capstriton as ct
from capstriton.efficient_capsnet import EFFICIENT_CAPSNET_CPU_DEMO, augment


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
    assert model.coupling_bias.grad.abs().sum() > 0 and model.weight.grad.abs().sum() > 0
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


def test_recipe_and_augmentation():
    assert ct.EFFICIENT_CAPSNET_RECIPE["lr"] == 5e-4 and ct.EFFICIENT_CAPSNET_RECIPE["batch_size"] == 16
    x = torch.rand(5, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    out = augment(x, gen, **ct.EFFICIENT_CAPSNET_RECIPE["augmentation"])
    assert out.shape == x.shape and not torch.equal(out, x)
    still = augment(x, gen, rotate_deg=0.0, shift_px=0.0)
    torch.testing.assert_close(still, x, rtol=0, atol=1e-5)  # identity transform
    assert EFFICIENT_CAPSNET_CPU_DEMO["time_budget"] < 15 * 60


@pytest.mark.parametrize("routing", ["self-attention", "inverted-attention"])
def test_digitcaps_routing_owns_its_parameters(routing):
    layer = ct.DigitCaps(in_caps=7, in_dim=4, out_caps=3, out_dim=5, routing=routing, backend="triton", init_std=0.5)
    own = {"self-attention": ["coupling_bias"], "inverted-attention": ["ln_weight", "ln_bias"]}[routing]
    with torch.no_grad():
        for name in own:  # nonzero, non-default values
            getattr(layer, name).add_(0.1 * torch.randn_like(getattr(layer, name)))
    u = torch.randn(4, 7, 4)
    v = layer(u)
    v.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    layer.backend = "torch"
    v_ref = layer(u)
    v_ref.square().sum().backward()
    torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-5)
    for name in ["weight", *own]:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], getattr(layer, name).grad, rtol=1e-4, atol=1e-5)


def test_digitcaps_routing_arguments():
    assert ct.DigitCaps(6, 4, 3, 5).iterations == 3  # dynamic routing as before
    assert ct.DigitCaps(6, 4, 3, 5, routing="inverted-attention").iterations == 2
    with pytest.raises(ValueError, match=r"routing='self-attention' takes \['bias'\], got \['iterations'\]"):
        ct.DigitCaps(6, 4, 3, 5, iterations=3, routing="self-attention")
    with pytest.raises(ValueError, match="routing must be one of"):
        ct.DigitCaps(6, 4, 3, 5, routing="em")


def test_inverted_attention_trains_on_mnist(mnist_root, monkeypatch):
    """A linear head per class capsule + cross-entropy learns MNIST through inverted-attention
    routing: 80 steps of 64 images give far better than chance on 500 test images."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("CAPSTRITON_DATA_DIR", str(mnist_root))
    path = Path(__file__).resolve().parents[1] / "examples" / "train_routing_family.py"
    spec = importlib.util.spec_from_file_location("train_routing_family", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    acc = script.main(["--routing", "inverted-attention", "--max-steps", "80", "--time-budget", "600",
                       "--test-subset", "500", "--backend", "torch"])
    assert acc > 0.8
