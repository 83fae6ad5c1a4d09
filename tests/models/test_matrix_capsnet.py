"""MatrixCapsNet (Hinton et al. 2018, Fig. 1): parameter counts, shapes, padding, errors, and a
tiny network learning on synthetic batches with the spread loss (plain-PyTorch backend)."""
import pytest
import torch

import capstriton as ct


@pytest.mark.parametrize("config, count", [
    ({}, 316_394),                                           # A=B=C=D=32, 5 classes (smallNORB)
    ({"classes": 10}, 318_964),                              # MNIST
    ({"A": 64, "B": 8, "C": 16, "D": 16}, 67_154),           # the small network
    ({"A": 64, "B": 8, "C": 16, "D": 16, "classes": 10}, 68_444),
])
def test_parameter_counts(config, count):
    model = ct.MatrixCapsNet(**config)
    assert sum(p.numel() for p in model.parameters()) == count


def test_parameter_count_breakdown_of_the_spec():
    model = ct.MatrixCapsNet()
    counts = [sum(p.numel() for p in m.parameters())
              for m in (model.conv1, model.primary, model.conv_caps1, model.conv_caps2, model.class_caps)]
    assert counts == [832, 17_952, 147_520, 147_520, 2_570]


def test_valid_padding_grids_and_forward_shapes():
    model = ct.MatrixCapsNet(A=8, B=2, C=3, D=2, classes=4, backend="torch")
    assert model.grid_sizes(32, 32) == [(14, 14), (6, 6), (4, 4)]   # smallNORB crops
    assert model.grid_sizes(28, 28) == [(12, 12), (5, 5), (3, 3)]   # MNIST
    x = torch.rand(2, 1, 28, 28)
    acts = model(x)
    assert acts.shape == (2, 4) and ((acts >= 0) & (acts <= 1)).all()
    acts2, poses = model(x, return_poses=True)
    assert poses.shape == (2, 4, 4, 4) and torch.equal(acts, acts2)
    stereo = ct.MatrixCapsNet(A=4, B=2, C=2, D=2, classes=5, in_channels=2, backend="torch")
    assert stereo(torch.rand(1, 2, 32, 32)).shape == (1, 5)


def test_defaults_and_options_reach_the_layers():
    model = ct.MatrixCapsNet(A=4, B=2, C=2, D=2, iterations=2, cost_normalization="ibm", backend="torch")
    for layer in (model.conv_caps1, model.conv_caps2, model.class_caps):
        assert layer.iterations == 2 and layer.cost_normalization == "ibm" and layer.inverse_temperature == 0.01
        assert layer.backend == "torch"
    model = ct.MatrixCapsNet(A=4, B=2, C=2, D=2)
    assert (model.conv_caps1.inverse_temperature, model.class_caps.inverse_temperature) == (0.02, 0.005)
    assert model.class_caps.coordinate_addition and model.conv_caps1.stride == 2 and model.conv_caps2.stride == 1
    model.set_backend("torch")
    assert all(m.backend == "torch" for m in (model, model.primary, model.conv_caps1, model.class_caps))
    assert "A=4" in repr(model)


def test_bad_input_and_arguments_are_refused():
    model = ct.MatrixCapsNet(A=4, B=2, C=2, D=2, backend="torch")
    with pytest.raises(ValueError, match=r"expects x \(B, 1, H, W\), got shape \(2, 3, 28, 28\)"):
        model(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="at least 3 x 3"):
        model(torch.rand(1, 1, 12, 12))  # 4 x 4 primary capsules -> 1 x 1 after ConvCaps1
    with pytest.raises(ValueError, match="A must be a positive int"):
        ct.MatrixCapsNet(A=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        ct.MatrixCapsNet(backend="gpu")


def test_a_tiny_network_learns_synthetic_classes():
    torch.manual_seed(0)
    # 3 classes: a bright patch in one of three places on a 20 x 20 image, with noise
    def batch(n, gen):
        y = torch.randint(0, 3, (n,), generator=gen)
        x = 0.1 * torch.rand(n, 1, 20, 20, generator=gen)
        for i, c in enumerate(y.tolist()):
            x[i, 0, 2 + 5 * c:8 + 5 * c, 5:13] += 0.9
        return x, y
    # a class-layer inverse temperature above the paper-form default 0.005, which keeps the class
    # activations near 0.5 at this size (docs/training.md)
    model = ct.MatrixCapsNet(A=8, B=4, C=4, D=4, classes=3, iterations=2, class_inverse_temperature=0.1,
                             backend="torch")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x_test, y_test = batch(48, gen)
    with torch.no_grad():
        before = float(ct.spread_loss(model(x_test), y_test, 0.5))
    for _ in range(12):
        x, y = batch(12, gen)
        loss = ct.spread_loss(model(x), y, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acts = model(x_test)
        after = float(ct.spread_loss(acts, y_test, 0.5))
    assert after < 0.7 * before, (before, after)
    assert (acts.argmax(1) == y_test).float().mean() > 0.6
