"""CapsNet, PrimaryCaps, DigitCaps and the losses on backend="torch": shapes, parameter
count, hand-computed loss values and input errors; CapsNet and EfficientCapsNet under any
routing, their documented arguments."""
import inspect

import pytest
import torch

import capstriton as ct


def test_paper_capsnet_has_8215568_parameters():
    model = ct.CapsNet(backend="torch")
    assert sum(p.numel() for p in model.parameters()) == 8_215_568
    # Conv1 20,992; PrimaryCaps 5,308,672; DigitCaps W 1,474,560; decoder 1,411,344.
    assert model.conv1.weight.numel() + model.conv1.bias.numel() == 20_992
    assert sum(p.numel() for p in model.primary.parameters()) == 5_308_672
    assert model.digit.weight.shape == (1152, 10, 16, 8)
    assert sum(p.numel() for p in model.decoder.parameters()) == 1_411_344


def test_capsnet_shapes_small_config():
    model = ct.CapsNet(conv_channels=16, primary_caps=4, backend="torch")
    assert model.digit.weight.shape == (4 * 6 * 6, 10, 16, 8)
    x = torch.rand(5, 1, 28, 28)
    lengths, recon, v = model(x, torch.tensor([0, 1, 2, 3, 9]))
    assert lengths.shape == (5, 10) and recon.shape == (5, 784) and v.shape == (5, 10, 16)
    assert torch.all((lengths >= 0) & (lengths < 1))
    assert torch.allclose(lengths, v.norm(dim=-1), atol=1e-6)
    assert torch.all((recon >= 0) & (recon <= 1))


def test_capsnet_paper_forward_shapes():
    model = ct.CapsNet(backend="torch")
    lengths, recon, v = model(torch.rand(2, 1, 28, 28))
    assert lengths.shape == (2, 10) and recon.shape == (2, 784) and v.shape == (2, 10, 16)


def test_decoder_masks_true_label_in_training_and_longest_capsule_at_test():
    torch.manual_seed(1)
    model = ct.CapsNet(conv_channels=16, primary_caps=4, backend="torch")
    x = torch.rand(4, 1, 28, 28)
    lengths, recon_test, v = model(x)
    _, recon_argmax, _ = model(x, lengths.argmax(1))
    torch.testing.assert_close(recon_test, recon_argmax, rtol=0, atol=0)
    # The decoder input is v with every capsule but the label's zeroed.
    other = (lengths.argmax(1) + 1) % 10
    _, recon_other, _ = model(x, other)
    masked = v * torch.nn.functional.one_hot(other, 10).unsqueeze(-1)
    torch.testing.assert_close(recon_other, model.decoder(masked.flatten(1)))
    assert not torch.equal(recon_other, recon_test)


def test_capsnet_without_decoder_and_other_sizes():
    model = ct.CapsNet(in_channels=3, image_size=32, conv_channels=8, primary_caps=2, num_classes=5,
                       digit_dim=4, decoder=False, backend="torch")
    assert model.digit.weight.shape == (2 * 8 * 8, 5, 4, 8)
    lengths, recon, v = model(torch.rand(2, 3, 32, 32))
    assert lengths.shape == (2, 5) and recon is None and v.shape == (2, 5, 4)


def test_primary_caps_shape_and_squash():
    layer = ct.PrimaryCaps(in_channels=16, num_caps=4, caps_dim=8, backend="torch")
    u = layer(torch.randn(3, 16, 20, 20))
    assert u.shape == (3, 4 * 6 * 6, 8)
    assert torch.all(u.norm(dim=-1) < 1)


def test_primary_caps_layout_matches_forward():
    # Capsules are ordered (type, row, column), each from caps_dim consecutive channels.
    layer = ct.PrimaryCaps(in_channels=6, num_caps=3, caps_dim=4, kernel_size=3, stride=1, backend="torch")
    x = torch.randn(2, 6, 5, 5)
    out = layer.conv(x)  # (2, 12, 3, 3)
    expected = ct.squash(out.view(2, 3, 4, 3, 3).permute(0, 1, 3, 4, 2).reshape(2, 27, 4), backend="torch")
    torch.testing.assert_close(layer(x), expected)


def test_digit_caps_shape_and_routing_matches_reference():
    layer = ct.DigitCaps(in_caps=7, in_dim=3, out_caps=5, out_dim=4, iterations=2, backend="torch")
    assert layer.weight.shape == (7, 5, 4, 3)
    u = torch.randn(2, 7, 3)
    v = layer(u)
    assert v.shape == (2, 5, 4)
    torch.testing.assert_close(v, ct.transform_route(u, layer.weight, iterations=2, backend="torch"))
    assert "iterations=2" in repr(layer)


# --- losses: values computed by hand

def test_margin_loss_hand_computed():
    lengths = torch.tensor([[0.95, 0.2, 0.05], [0.5, 0.8, 0.1]])
    targets = torch.tensor([0, 1])
    # Image 0: present max(0, 0.9 - 0.95)^2 = 0; absent 0.5 (0.2 - 0.1)^2 = 0.005 and 0.
    # Image 1: present (0.9 - 0.8)^2 = 0.01; absent 0.5 (0.5 - 0.1)^2 = 0.08 and 0.5 * 0^2 = 0.
    expected = (0.005 + 0.09) / 2
    assert ct.margin_loss(lengths, targets).item() == pytest.approx(expected, rel=1e-6)
    one_hot = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    assert ct.margin_loss(lengths, one_hot).item() == pytest.approx(expected, rel=1e-6)


def test_margin_loss_custom_margins_and_multi_hot():
    lengths = torch.tensor([[0.7, 0.4, 0.3]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    # m+ = 0.8, m- = 0.2, lam = 0.25: (0.1)^2 + (0.4)^2 + 0.25 (0.1)^2
    value = ct.margin_loss(lengths, targets, m_pos=0.8, m_neg=0.2, lam=0.25)
    assert value.item() == pytest.approx(0.01 + 0.16 + 0.0025, rel=1e-12)


def test_margin_loss_gradient_hand_computed():
    lengths = torch.tensor([[0.5, 0.3]], requires_grad=True)
    ct.margin_loss(lengths, torch.tensor([0])).backward()
    # d/dl (0.9 - l)^2 = -2 (0.9 - 0.5) = -0.8;  d/dl 0.5 (l - 0.1)^2 = (0.3 - 0.1) = 0.2
    torch.testing.assert_close(lengths.grad, torch.tensor([[-0.8, 0.2]]))


def test_reconstruction_loss_hand_computed():
    recon = torch.tensor([[0.5, 0.0, 1.0, 0.25], [0.0, 0.0, 0.0, 0.0]])
    images = torch.tensor([[[[0.0, 0.0], [1.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.5]]]])  # (2, 1, 2, 2)
    # Image 0: 0.25 + 0 + 0 + 0.0625 = 0.3125; image 1: 1 + 1 + 0 + 0.25 = 2.25; mean 1.28125
    assert ct.reconstruction_loss(recon, images).item() == pytest.approx(1.28125, rel=1e-7)


# --- bad input

def test_capsnet_bad_input():
    model = ct.CapsNet(conv_channels=8, primary_caps=2, backend="torch")
    with pytest.raises(ValueError, match=r"y must be integer class labels of shape \(2,\), got torch.float32"):
        model(torch.rand(2, 1, 28, 28), torch.zeros(2))
    with pytest.raises(ValueError,
                       match=r"y must be integer class labels of shape \(2,\), got torch.int64 of shape \(3,\)"):
        model(torch.rand(2, 1, 28, 28), torch.zeros(3, dtype=torch.long))
    # a label outside [0, num_classes): device-side assert (CPU tensors: it fires at once)
    cpu_model = model.cpu()
    with pytest.raises(RuntimeError, match=r"class labels must lie in \[0, 10\)"):
        cpu_model(torch.rand(2, 1, 28, 28, device="cpu"), torch.tensor([1, 10], device="cpu"))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 28, 28\), got \(2, 1, 32, 32\)"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.rand(1, 28, 28))
    with pytest.raises(ValueError, match="image_size must be at least 17"):
        ct.CapsNet(image_size=16, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        ct.CapsNet(backend="cuda")


def test_digit_caps_bad_input():
    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        ct.DigitCaps(iterations=0, backend="torch")
    with pytest.raises(TypeError, match="iterations must be an int"):
        ct.DigitCaps(iterations=2.0, backend="torch")
    with pytest.raises(ValueError, match=r"in_caps must be a positive int or None \(inferred\), got 0"):
        ct.DigitCaps(in_caps=0, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        ct.DigitCaps(backend="gpu")
    layer = ct.DigitCaps(in_caps=6, in_dim=4, out_caps=3, out_dim=2, backend="torch")
    with pytest.raises(ValueError, match=r"DigitCaps\(in_dim=4\) got input capsules of 5 dimensions"):
        layer(torch.randn(2, 6, 5))
    with pytest.raises(ValueError, match=r"u must have 3 dimensions"):
        layer(torch.randn(6, 4))
    with pytest.raises(TypeError, match="u must be a floating-point tensor"):
        layer(torch.ones(2, 6, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="as with nn.Linear, convert the layer"):  # the parameters' dtype rules
        layer(torch.randn(2, 6, 4, dtype=torch.float64))
    assert layer.double()(torch.randn(2, 6, 4, dtype=torch.float64)).dtype == torch.float64


def test_margin_loss_bad_input():
    lengths = torch.rand(3, 10)
    with pytest.raises(ValueError, match=r"lengths must have 2 dimensions \(B, K\), got shape \(10,\)"):
        ct.margin_loss(torch.rand(10), torch.tensor([1]))
    with pytest.raises(TypeError, match="lengths must be a floating-point tensor"):
        ct.margin_loss(torch.ones(3, 10, dtype=torch.long), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="targets must be a torch.Tensor, got list"):
        ct.margin_loss(lengths, [1, 2, 3])
    # out-of-range labels: a device-side assert (no host sync), immediate on the CPU; on CUDA it
    # would poison the context, so this check runs on CPU tensors
    with pytest.raises(RuntimeError, match=r"class labels must lie in \[0, 10\)"):
        ct.margin_loss(lengths.cpu(), torch.tensor([0, 10, 3], device="cpu"))
    with pytest.raises(RuntimeError, match=r"class labels must lie in \[0, 10\)"):
        ct.margin_loss(lengths.cpu(), torch.tensor([0, -1, 3], device="cpu"))
    with pytest.raises(ValueError, match=r"targets must have shape \(3,\)"):
        ct.margin_loss(lengths, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="one-hot targets must have the shape of lengths"):
        ct.margin_loss(lengths, torch.zeros(3, 9))
    with pytest.raises(ValueError, match="targets must be integer labels"):
        ct.margin_loss(lengths, torch.tensor([1.0, 2.0, 3.0]))


# --- any routing, every argument documented (issue 19, point 3)

@pytest.mark.parametrize("model", [ct.CapsNet, ct.EfficientCapsNet])
def test_every_constructor_argument_is_documented(model):
    doc = model.__doc__
    missing = [name for name in inspect.signature(model).parameters if f"``{name}``" not in doc and name not in doc]
    assert not missing, f"{model.__name__} does not document {missing}"
    assert "margin_loss" in doc or "margin loss" in doc  # the loss guidance
    assert "inverted-attention" in doc


@pytest.mark.parametrize("routing", ["dynamic", "self-attention", "inverted-attention"])
def test_capsnet_takes_any_registered_routing(routing):
    model = ct.CapsNet(conv_channels=8, primary_caps=2, routing=routing, backend="torch")
    assert model.digit.routing == routing
    own = {"dynamic": set(), "self-attention": {"digit.coupling_bias"},
           "inverted-attention": {"digit.ln_weight", "digit.ln_bias"}}[routing]
    assert {n for n, _ in model.named_parameters() if n.startswith("digit.")} == {"digit.weight", *own}
    lengths, recon, v = model(torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2]))
    assert lengths.shape == (3, 10) and recon.shape == (3, 784) and v.shape == (3, 10, 16)
    if routing != "inverted-attention":  # the lengths are probabilities
        assert torch.all((lengths >= 0) & (lengths < 1))
    with pytest.raises(ValueError, match="takes no extra arguments|takes \\["):
        ct.CapsNet(routing=routing, no_such_option=1)


def test_capsnet_routing_options_and_default_init():
    model = ct.CapsNet(conv_channels=8, primary_caps=2, routing="inverted-attention", iterations=4, eps=1e-3)
    assert model.digit.iterations == 4 and model.digit.routing_options["eps"] == 1e-3
    assert ct.CapsNet(conv_channels=8, primary_caps=2).digit.iterations == 3  # dynamic routing's default
    with pytest.raises(ValueError, match=r"routing='self-attention' takes \['bias'\], got \['iterations'\]"):
        ct.CapsNet(routing="self-attention", iterations=3)
    # the paper's model: same parameter count; its recipe passes the paper's init_std=0.01
    paper = ct.CapsNet(backend="torch")
    assert sum(p.numel() for p in paper.parameters()) == 8_215_568
    assert paper.digit.init_std == pytest.approx(ct.layers.default_init_std(1152, 10, 16))
    assert ct.CapsNet(init_std=0.01).digit.init_std == 0.01


@pytest.mark.parametrize("routing", ["self-attention", "dynamic"])
def test_efficient_capsnet_takes_a_routing(routing):
    model = ct.EfficientCapsNet(decoder=False, backend="torch", routing=routing)
    assert model.digit.routing == routing
    if routing == "self-attention":  # the authors' he_normal
        assert model.digit.init_std == pytest.approx((2 / (10 * 16 * 8)) ** 0.5)
        assert sum(p.numel() for p in model.parameters()) == 161_824
    lengths, _, v = model.eval()(torch.rand(2, 1, 28, 28))
    assert lengths.shape == (2, 10) and v.shape == (2, 10, 16)


def test_efficient_capsnet_loads_checkpoints_from_before_its_digit_layer():
    model = ct.EfficientCapsNet(decoder=False, backend="torch").eval()
    state = model.state_dict()
    old = {("weight" if k == "digit.weight" else "coupling_bias" if k == "digit.coupling_bias" else k):
           (v.contiguous() if k == "digit.weight" else v) for k, v in state.items()}
    assert "weight" in old and "digit.weight" not in old
    fresh = ct.EfficientCapsNet(decoder=False, backend="torch").eval()
    fresh.load_state_dict(old)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(fresh(x)[0], model(x)[0], rtol=0, atol=0)
